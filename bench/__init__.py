"""Benchmarks run by `make bench` (see `docs/performance.md` for the latest results)."""
