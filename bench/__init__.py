"""Benchmarks that print tables: oomkit beside its peers and floors (`python -m bench.NAME`)."""
