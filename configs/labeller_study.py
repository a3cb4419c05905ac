"""The biased-labeller study: a world whose reward-model bias is learned from flawed labels, not planted.

    python -m apo_jax.study --config=configs/labeller_study.py:main --seeds=8 --out=runs/labeller/main
    python -m apo_jax.study --config=configs/labeller_study.py:lambda0 --seeds=8 --out=runs/labeller/lambda0
    python -m apo_jax.study --config=configs/labeller_study.py:gold_labeller --seeds=8 --out=runs/labeller/gold_labeller

The pre-registration (hypotheses, tests, seeds, variants) is docs/studies/labeller_prereg.md.

The world (apo_jax/data/synthetic.py, apo_jax/data/labeller.py): the true reward r* is the content
score (edit distance to the answer, which charges padding, and the style mark); no marker. Human
responses are padded with filler words 30% of the time. Pairs are labelled by Bradley-Terry on the
labeller's reward r_L = r* + lambda x clipped relative excess length (Gao et al. 2022's gold/proxy
setting with the documented length bias of labellers). Variants (the config's argument):

- main: lambda = 1.0 (the strongest bias), golden answers = the r* argmax, S = 16, 3 rounds.
- lambda0: lambda = 0 (labels from r* alone; the equivalence control).
- gold_labeller: main with golden answers = the labeller's best of 8 (gold that shares the bias).
- s4: main with S = 4 (less selection pressure).
- learned: the labeller is a small learned RM (no chosen bias at all; exploratory).

- paper_rm: main with the paper's APO RM settings (below; exploratory).

Arms: RJS, APO, the ablation (APO's RM schedule without D_APO), the oracle (r* picks) and the
random pick (self-training alone). The reward is read at the response's last token (the official
code's position; the demo's EOS was chosen on a confirmatory seed and is not used here). The
policy, its pretraining and SFT are the demo's.

The APO RM's settings deviate from the paper, for a measured reason. The paper weighs the D_P term
beta2 = 10 times the D_APO term (the official per-query weight 0.1 split over S samples) and trains
APO RMs at 0.01 x RM_Base's learning rate (1e-8 vs 1e-6). On pilot seed 100 of `main` with those
settings, the APO RM did not move from RM_Base (the r* of its best-of-16 picks 0.272 vs RM_Base's
0.271 in round 1; r*(APO) - r*(RJS) = +0.005 at round 3): a 0.1M-parameter RM at 1e-5 for 265 steps
stays where it started. With the demo's settings (learning-rate ratio 0.2, per-query APO weight 1.0,
i.e. beta2 = 1) the same pilot seed's APO RM of round 2 picked answers of r* 0.575 against RM_Base's
0.288. `main` therefore uses the demo's settings; `paper_rm` keeps the paper's and is reported.
"""

import importlib.util
import os

VARIANTS = ("main", "lambda0", "gold_labeller", "s4", "learned", "paper_rm")


def _demo_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic.py")
    spec = importlib.util.spec_from_file_location("apo_jax_configs_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(variant: str = "main"):
    variant = variant or "main"
    if variant not in VARIANTS:
        raise ValueError(f"configs/labeller_study.py:{variant}: unknown variant; expected one of {VARIANTS}")
    c = _demo_config()
    c.run_dir = f"runs/labeller/{variant}/seed_0"  # the study sets run_dir per seed
    w = c.data.synthetic
    # No planted feature: no marker on any response, and r* has nothing to charge for one.
    w.marker_prob_correct = w.marker_prob_corrupted = w.marker_prob_junk = 0.0
    w.marker_cost = 0.0
    w.demo_pad_prob = 0.3
    w.labeller = "length"
    w.labeller_lambda = 1.0
    w.n_test_prompts = 500  # one pair each: 500 test pairs and 500 test prompts
    c.data.n_test = 0

    c.data.reward_position = "last_token"  # the official code's position
    # The APO RM (module docstring): the demo's learning-rate ratio (0.2) and beta2 = 1.
    c.rm.apo_weight = 0.0  # -> rm.apo_weight_per_query / S per APO pair
    c.rm.apo_weight_per_query = 1.0
    c.rm.human_weight = 1.0
    c.rm.apo.lr = 0.2 * c.rm.base.lr

    c.apo.rounds = 3
    c.apo.num_samples = 16
    c.apo.schedules = ("rjs", "apo", "ablation", "oracle", "random")
    c.sft.lrs = (5e-4, 3e-4, 2e-4)
    c.eval.overopt_samples = 64  # best-of-n curves of policy_0's samples under every RM, n = 1 .. 64
    c.eval.overopt_prompts = 100
    c.sampling.batch_size = 256
    c.eval.batch_size = 256
    # Seeds 1..N-1 run the programs seed 0 compiled (the shapes do not depend on the seed).
    c.compilation_cache_dir = "~/.cache/apo_jax/xla"

    if variant == "lambda0":
        w.labeller = "true"
        w.labeller_lambda = 0.0
    elif variant == "gold_labeller":
        w.gold_source = "labeller"
    elif variant == "s4":
        c.apo.num_samples = 4
    elif variant == "learned":
        w.labeller = "learned"
        w.labeller_lambda = 0.0
    elif variant == "paper_rm":  # the paper's beta2 = 10 and learning-rate ratio 0.01
        c.rm.apo_weight_per_query = 0.1
        c.rm.apo.lr = 0.01 * c.rm.base.lr
    return c
