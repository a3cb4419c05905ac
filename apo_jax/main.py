"""Entry point: `python -m apo_jax.main --config=configs/hh.py [--config.field=value ...]`.

Validates the config before any work starts (every wrong field reported at once), initialises
jax.distributed for multi-process runs, then plays the APO game (`apo_jax.loop`). Restarting the
same command resumes from the run directory's checkpoints.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    del argv
    import jax

    from apo_jax import config as config_lib
    from apo_jax import sharding
    from apo_jax.checkpointing import Preempted
    from apo_jax.hf import CheckpointError

    sharding.maybe_initialize_distributed()
    cfg = _CONFIG.value
    # One status line per phase from apo_jax; libraries (Orbax, absl, jax) only warn.
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("apo_jax").setLevel(logging.INFO)
    prefix = f"[process {jax.process_index()}/{jax.process_count()}] " if jax.process_count() > 1 else ""
    try:
        config_lib.validate(cfg, jax.device_count())
    except config_lib.ConfigError as e:
        sys.exit(f"{prefix}apo_jax: {e}")

    from apo_jax import loop
    from apo_jax.data.hh import DataError

    try:
        loop.preflight(cfg)
        summary = loop.run(cfg)
    except (CheckpointError, DataError, config_lib.ConfigError, FileNotFoundError) as e:
        sys.exit(f"{prefix}apo_jax: {e}")
    except Preempted as e:
        sys.exit(f"{prefix}apo_jax: preempted; state saved ({e}). Run the same command to resume.")
    if jax.process_index() == 0:
        print(summary)


def run() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)


if __name__ == "__main__":
    run()
