"""Inference: the KV-cache best-of-S sampler (`sampler`) and batched reward-model scoring (`scoring`)."""
