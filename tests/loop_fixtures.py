"""A tiny APO game for loop tests: configs/synthetic.py with every size cut down.

`TINY` is a list of command-line overrides (so subprocess runs of `python -m apo_jax.main` and
in-process runs use the same config); `tiny_config()` applies them to a ConfigDict.
"""

from __future__ import annotations

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic.py")

TINY_VALUES = {
    "data.synthetic.n_train_prompts": 160,
    "data.synthetic.n_test_prompts": 16,
    "data.synthetic.n_demos": 128,
    "data.n_rm": 48,
    "data.n_dev": 16,
    "data.n_llm": 32,
    "policy.arch.hidden_size": 32,
    "policy.arch.intermediate_size": 64,
    "policy.arch.num_hidden_layers": 2,
    "policy.arch.num_attention_heads": 4,
    "policy.arch.num_key_value_heads": 2,
    "policy.pretrain.batch_size": 16,
    "policy.pretrain.max_steps": 6,
    "rm.base.batch_size": 16,
    "rm.base.max_steps": 5,
    "rm.test.batch_size": 16,
    "rm.test.max_steps": 5,
    "rm.apo.batch_size": 16,
    "rm.apo.max_steps": 4,
    "sft.batch_size": 16,
    "sft.max_steps": 4,
    "dpo.batch_size": 16,
    "dpo.max_steps": 4,
    "dpo.lr": 1e-3,
    "sampling.train.max_new_tokens": 6,
    "sampling.test.max_new_tokens": 6,
    "sampling.batch_size": 16,
    "eval.batch_size": 16,
    "checkpoint.save_every_steps": 2,
    "checkpoint.async_save": False,
    "log_every_steps": 1,
}

TINY = [f"--config.{k}={v}" for k, v in TINY_VALUES.items()]


def tiny_config(**extra):
    """configs/synthetic.py with TINY_VALUES and `extra` (dotted keys with '__' for '.') applied."""
    spec = importlib.util.spec_from_file_location("synthetic_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    values = dict(TINY_VALUES)
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg
