"""The start-up check of everything a run reads: checkpoints and offline data, before any work.

`preflight(cfg)` resolves every checkpoint field (local dir, `gs://` URL or hub id) and checks its
*contents* the way loading will need them, without reading a weight: `config.json` parses as a
config.json of a supported family, every safetensors file's header parses and its tensors fit in the file, no weights
are pickled, and an imported reward model has its `score.weight`. All problems are reported at
once, one line each, named by config field, so a bad checkpoint stops the run in seconds rather
than after data preparation or RM_Base training.
"""

from __future__ import annotations

import json
import os

import ml_collections

from apo_jax.io import fileio, hf
from apo_jax.config import lookup

CHECKPOINT_FIELDS = ("policy.checkpoint", "rm.init_checkpoint", "rm.base_checkpoint", "rm.test_checkpoint")
# Checkpoints used as reward models as they are: they must carry the reward head.
RM_FIELDS = ("rm.base_checkpoint", "rm.test_checkpoint")
TOKENIZER_FIELDS = ("data.tokenizer", "rm.tokenizer")  # resolved (local or hub cache), contents not checked


def check_checkpoint_contents(ckpt_dir: str, *, reward_model: bool = False) -> None:
    """Raises hf.CheckpointError (naming the file) unless `ckpt_dir` holds a loadable model:
    a config.json of a supported family (`models.FAMILIES`), safetensors weights whose headers parse, and `score.weight` if
    `reward_model`. Reads only headers (a few KB per file)."""
    from apo_jax.models import ModelConfig

    config = hf.read_config(ckpt_dir)
    try:
        ModelConfig.from_hf(config)
    except (ValueError, TypeError, KeyError) as e:
        raise hf.CheckpointError(f"{os.path.join(ckpt_dir, hf.CONFIG_NAME)}: {e}") from None
    index = os.path.join(ckpt_dir, hf.INDEX_NAME)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
        except json.JSONDecodeError as e:
            raise hf.CheckpointError(f"{index}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
        if not isinstance(weight_map, dict):
            raise hf.CheckpointError(f"{index}: has no 'weight_map' object")
        keys: set[str] = set()
        for name in sorted(set(weight_map.values())):
            path = os.path.join(ckpt_dir, name)
            if not os.path.exists(path):
                raise hf.CheckpointError(f"{path}: listed in {hf.INDEX_NAME} but missing")
            keys |= set(hf.safetensors_header(path))
    else:
        hf.safetensors_files(ckpt_dir)  # refuses pickles, names a missing weights file
        keys = set(hf.safetensors_header(os.path.join(ckpt_dir, hf.WEIGHTS_NAME)))
    if reward_model and "score.weight" not in keys:
        raise hf.CheckpointError(f"{ckpt_dir}: has no score.weight; expected a reward model "
                                 "(a *ForSequenceClassification checkpoint, num_labels=1)")


def preflight(cfg: ml_collections.ConfigDict) -> None:
    """Resolves and checks every checkpoint the run will read, and the offline data inputs;
    raises hf.CheckpointError listing every problem (`field: problem`), or returns None."""
    errors = []
    fields = list(CHECKPOINT_FIELDS)
    if cfg.data.kind in ("hh", "preference"):
        fields.append("data.tokenizer")
    if cfg.rm.get("tokenizer", ""):
        fields.append("rm.tokenizer")
    for field in fields:
        path = lookup(cfg, field)
        if not path:
            continue
        if field in TOKENIZER_FIELDS and fileio.is_remote(path):
            if not fileio.exists(path):
                errors.append(f"{field}: {path}: no such tokenizer directory")
            continue
        try:
            local = hf.resolve_checkpoint_dir(path)
        except hf.CheckpointError as e:
            errors.append(f"{field}: {e} Override: --config.{field}=/local/dir")
            continue
        if field in TOKENIZER_FIELDS:
            continue
        try:
            check_checkpoint_contents(local, reward_model=field in RM_FIELDS)
        except hf.CheckpointError as e:
            errors.append(f"{field}: {e}")
    if cfg.data.kind == "hh" and os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0"):
        for field in ("hh_train", "hh_test"):
            if not (os.path.exists(cfg.data[field]) or fileio.is_remote(cfg.data[field])):
                errors.append(f"data.{field}: {cfg.data[field]!r} is a hub id but HF_DATASETS_OFFLINE is set; pass a "
                              f"local copy of HH-RLHF: --config.data.{field}=/local/hh-rlhf (a directory holding "
                              "helpful-base/ and harmless-base/ with train/test .jsonl.gz)")
    if errors:
        raise hf.CheckpointError("cannot start:\n  " + "\n  ".join(errors))
