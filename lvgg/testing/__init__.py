"""Helpers that build real (small or synthetic) files for tests and benchmarks."""
