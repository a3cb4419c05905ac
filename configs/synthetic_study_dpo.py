"""The CPU study with the DPO twins of RJS and APO (issue 15): configs/synthetic_study.py plus
`rjs-dpo` and `apo-dpo`, which read APO-DPO - RJS-DPO and DPO - SFT under each RM.

    python -m apo_jax.study --config=configs/synthetic_study_dpo.py --seeds=5 --out=runs/study

`results/study.md` is this config's 5-seed study. The arms shared with synthetic_study.py give the
same numbers in both (every model is named by its recipe; arms do not share random streams).
"""

import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic_study.py")
    spec = importlib.util.spec_from_file_location("apo_jax_configs_synthetic_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.apo.schedules = (*c.apo.schedules, "rjs-dpo", "apo-dpo")
    return c
