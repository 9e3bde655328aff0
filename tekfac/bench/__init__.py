"""Benchmark suite: data sets and model definitions for comparing the optimizers."""
