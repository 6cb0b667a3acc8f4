"""Benchmarks: ``python -m benchmarks.crypto`` (``make bench-crypto``)."""
