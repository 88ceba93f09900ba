"""Tools that write the project's documentation from real runs (score_table.py: the README's score
table); the speed measurements are in bench/."""
