"""Data: HH-RLHF pairs, the synthetic preference world, tokenisation and batching."""
