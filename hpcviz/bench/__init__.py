"""The benchmarks behind jobs/benchmark.py."""
