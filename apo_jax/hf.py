"""`apo_jax.hf`: the stable import path of the Hugging Face interchange (users' scripts read
`apo_jax.hf.load_pretrained` / `save_pretrained` / `save_adapter`); the implementation is `apo_jax.io.hf`."""

from apo_jax.io.hf import (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, CONFIG_NAME, INDEX_NAME, REWARD_POSITIONS,
                           SCORING_NAME, TOKENIZER_FILES, WEIGHTS_NAME, CheckpointError, export_tokenizer, is_saved,
                           load_adapter, load_pretrained, param_shapes, read_config, resolve_checkpoint_dir,
                           safetensors_files, safetensors_header, save_adapter, save_pretrained)

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "CONFIG_NAME", "CheckpointError", "INDEX_NAME",
           "REWARD_POSITIONS", "SCORING_NAME", "TOKENIZER_FILES", "WEIGHTS_NAME", "export_tokenizer", "is_saved",
           "load_adapter", "load_pretrained", "param_shapes", "read_config", "resolve_checkpoint_dir",
           "safetensors_files", "safetensors_header", "save_adapter", "save_pretrained"]
