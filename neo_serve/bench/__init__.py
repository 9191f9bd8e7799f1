"""Benchmarks (`neo-serve bench`)."""
