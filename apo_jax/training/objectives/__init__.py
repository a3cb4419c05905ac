"""Learning rules, one module each: what a train step minimises, on which batch layout.

An `Objective` bundles three things that must agree: how records become a tokenised set
(`examples`), the per-batch *sums* of its loss and metrics (`stats`, accumulated exactly over
micro-batches by `train.make_train_step`), and the metrics derived from those sums (`metrics`).
Objectives are frozen dataclasses: their settings are part of a compiled step's identity.

Registered objectives (name -> class): `ranking` (BT / APO-RM ranking), `sft`, `dpo`.
A new learning rule is one module that defines a subclass and registers it with `@register`; it
reads (and its `__post_init__` validates) its own config section (`settings_from`), so the game
builds any rule with `from_config(name, cfg)`.
"""

from apo_jax.training.objectives.base import OBJECTIVES, Objective, from_config, get, register, settings_problems
from apo_jax.training.objectives.dpo import DPO
from apo_jax.training.objectives.ranking import Ranking
from apo_jax.training.objectives.sft import SFT

__all__ = ["DPO", "OBJECTIVES", "Objective", "Ranking", "SFT", "from_config", "get", "register", "settings_problems"]
