"""apo_jax: Adversarial Preference Optimization (Cheng et al., arXiv 2311.08045) in JAX/Flax."""

__version__ = "0.1.0"
