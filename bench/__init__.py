"""Throughput and memory benchmarks: data.py (augmentation), step.py (train/eval step), eta.py
(chain time from step results), summary.py (markdown report), gpu.sh (one prepared GPU run)."""
