"""Benchmarks of the GFT loss against the alternatives a user would pick (see README)."""
