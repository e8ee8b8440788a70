"""Benchmarks run from the command line (``flowdit bench ...``)."""
