"""Benchmarks and the active-learning simulation (``bench.al``). The scripts also run
as files (``python bench/store.py``): they import ``common`` from this folder."""
