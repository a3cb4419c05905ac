"""apo_jax: Adversarial Preference Optimization in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="apo_jax",
    version="0.1.0",
    description="Adversarial Preference Optimization (APO) for LLaMA models in JAX/Flax",
    packages=find_packages(include=["apo_jax", "apo_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.10.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "etils[epath]>=1.7",  # comes with orbax; run-dir I/O (local or gs://) goes through epath
        "transformers>=4.46.0",
        "datasets>=3.0.0",
        "numpy>=1.26",
        "ml-collections>=0.1.1",
        "absl-py>=2.0",
        "safetensors>=0.4.3",
        "huggingface-hub>=0.24",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        # torch is the reference implementation in tests only; install torch==2.13.0 (CPU) first.
        "test": ["torch>=2.3", "pytest>=8.0", "nbformat>=5.9"],
        "tfds": ["tensorflow-datasets>=4.9"],
        # run_dir / checkpoints on gs://: epath's fsspec backend needs gcsfs (Orbax's arrays use TensorStore).
        "gcs": ["gcsfs>=2024.2"],
    },
)
