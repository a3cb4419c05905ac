"""`apo_jax.sampler`: the stable import path of the KV-cache sampler (users' scripts read
`apo_jax.sampler.generate`); the implementation is `apo_jax.inference.sampler`."""

from apo_jax.inference.sampler import SampleOutput, generate, sample_batches, sample_dataset

__all__ = ["SampleOutput", "generate", "sample_batches", "sample_dataset"]
