"""What the command-line scripts share: flag types and groups (args.py) and the translation of the
libraries' typed errors into one-line messages that name the flag to change (errors.py)."""
