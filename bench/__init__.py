"""Benchmark suite of the gateway (issue 5): `python -m bench --out BENCHMARKS.md`, or `--quick`."""
