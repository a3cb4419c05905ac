"""Benchmarks of apo_jax against transformers PyTorch and the device's measured ceilings."""
