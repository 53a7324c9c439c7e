"""Benchmarks (not part of the package): ``python -m bench.train_throughput`` and ``python -m bench.sampling``.

See docs/PERFORMANCE.md for the method, the commands and the measured tables.
"""
