"""``python -m benchmarks.throughput``: see `benchmarks.throughput` (the guard: the spawned workers import this module)."""

from benchmarks.throughput.cli import main

if __name__ == "__main__":
    main()
