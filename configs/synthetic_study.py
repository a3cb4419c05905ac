"""The CPU study: the demo's world and models, sized for 5 seeds in about an hour on two CPU cores.

    python -m apo_jax.study --config=configs/synthetic_study.py --seeds=5 --out=runs/synthetic_study

(`configs/synthetic_study_dpo.py` adds the DPO twins of RJS and APO: 1.5x the time.)

Each seed is a normal run of this config (`python -m apo_jax.main --config=configs/synthetic_study.py
--config.seed=k`); the seed changes the world, the inits and the data order. Against the demo it
has 2,000 test prompts and 2,000 test pairs (so a policy's r* and an RM's accuracy have sampling
errors near 0.01), only the arms the pre-registered checks compare (RJS, APO, the ablation and,
where the game has it, the oracle arm), and otherwise the demo's numbers.
"""

import importlib.util
import os


def _demo_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic.py")
    spec = importlib.util.spec_from_file_location("apo_jax_configs_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _demo_config()
    c.run_dir = "runs/synthetic_study/seed_0"  # the study sets run_dir per seed
    c.data.synthetic.n_test_prompts = 2000  # one pair each: 2,000 test pairs, 2,000 test prompts
    c.data.n_test = 0  # all of them
    # apo_seq is left out: no check reads it, and it would cost a fifth of each seed. The oracle
    # arm (r* picks best-of-S) is the control P4 reads.
    c.apo.schedules = ("rjs", "apo", "ablation", "oracle")
    c.sampling.batch_size = 256
    c.eval.batch_size = 256
    # Seeds 1..N-1 run the programs seed 0 compiled (the shapes do not depend on the seed).
    c.compilation_cache_dir = "~/.cache/apo_jax/xla"
    return c
