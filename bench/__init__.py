"""Benchmarks (not part of the package): ``python -m bench.train_throughput``, ``bench.sampling``,
``bench.sample_job``, ``bench.mnist_end_to_end`` and the quality tables; ``bench/gpu_check.sh`` runs them
within a time budget on a lent GPU machine.

See docs/PERFORMANCE.md for the method, the commands and the measured tables.
"""
