"""apo_jax: Adversarial Preference Optimization (Cheng et al., arXiv 2311.08045) in JAX/Flax.

The public API (imported on first use, so `import apo_jax` stays light):

    apo_jax.run(cfg)                          play the APO game of a config in its run dir
    apo_jax.ModelConfig                       the model config (HF interchange: from_hf / to_hf)
    apo_jax.load_pretrained / save_pretrained Hugging Face checkpoints (LLaMA, Qwen, Mistral, Gemma) in and out
    apo_jax.lm_logits / rewards / sequence_logprobs   the model's functional heads
    apo_jax.generate                          KV-cache sampling (best-of-S: num_samples)
    apo_jax.make_train_step                   the jitted, sharded train step of an objective
    apo_jax.Ranking / SFT / DPO               the learning rules (apo_jax.training.objectives)
    apo_jax.Schedule / RMUpdate / register_schedule   a new arm of the game is one table row
    apo_jax.score_texts                       score (prompt, response) texts with an RM directory
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "run": ("apo_jax.game.loop", "run"),
    "ModelConfig": ("apo_jax.models", "ModelConfig"),
    "lm_logits": ("apo_jax.models", "lm_logits"),
    "rewards": ("apo_jax.models", "rewards"),
    "sequence_logprobs": ("apo_jax.models", "sequence_logprobs"),
    "load_pretrained": ("apo_jax.io.hf", "load_pretrained"),
    "save_pretrained": ("apo_jax.io.hf", "save_pretrained"),
    "generate": ("apo_jax.inference.sampler", "generate"),
    "make_train_step": ("apo_jax.training.train", "make_train_step"),
    "Ranking": ("apo_jax.training.objectives", "Ranking"),
    "SFT": ("apo_jax.training.objectives", "SFT"),
    "DPO": ("apo_jax.training.objectives", "DPO"),
    "Schedule": ("apo_jax.game.schedules", "Schedule"),
    "RMUpdate": ("apo_jax.game.schedules", "RMUpdate"),
    "register_schedule": ("apo_jax.game.schedules", "register"),
    "score_texts": ("apo_jax.evaluation", "score_texts"),
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'apo_jax' has no attribute {name!r}")
    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
