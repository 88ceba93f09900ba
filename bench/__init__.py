"""Speed and memory benchmarks, each a script run from the repository root as `python bench/NAME.py`
(it puts the root on sys.path itself, so no install is needed) and importable as `bench.NAME`; common.py
holds what they share beyond engine/ and cli/, summary.py their tables, gpu.sh runs them all on a GPU."""
