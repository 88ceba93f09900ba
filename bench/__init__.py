"""Throughput and memory benchmarks: augmentation.py (the data pipeline), step.py (train/eval step), eta.py
(chain time from step results), summary.py (markdown report), gpu.sh (one prepared GPU run)."""
