"""The benchmarks, run as modules from the repository root (``python -m benchmarks.throughput``,
``python -m benchmarks.lookahead``, ...), so that they import each other as a package."""
