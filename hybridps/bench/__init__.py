"""Benchmark runners of `hybridps bench` (one module per benchmark) and their shared report helpers."""
