"""pytest-benchmark suite: inference per runtime, training throughput, export and verify, compute floor.

Run with `make bench` (timings saved under benchmarks/results/) or as ordinary tests with
`pytest benchmarks` (benchmarking disabled: every benchmark runs once on tiny inputs).
See benchmarks/README.md.
"""
