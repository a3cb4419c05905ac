"""The synthetic preference world at a size for one GPU (the controlled experiment).

    python -m apo_jax.main --config=configs/synthetic_gpu.py        # S = 4
    python -m apo_jax.main --config=configs/synthetic_gpu.py:8      # S = 8
    python -m apo_jax.study --config=configs/synthetic_gpu.py --seeds=5 --out=runs/gpu_study

Ten times the demo's data, a ~18M-parameter character-level LLaMA (6 layers, width 512) with
"auto" compute dtype and attention (chosen from the GPU at start-up by apo_jax.devices: bfloat16
and cuDNN attention on sm80+ such as A100/L4/H100, float32 and XLA attention on Colab's T4),
all six graded tasks (easy ones weighted up), 2,000 test prompts and test pairs, three rounds of
RJS, APO, APO-seq, the ablation and (where the game has it) the oracle arm. It starts from configs/synthetic.py and changes only numbers: the same code
path as the CPU demo and configs/hh.py.

Expected runtime (an ESTIMATE, not measured: no GPU was available when this config was written):
about 30-60 minutes per seed on one H100/H200 at S = 4 and roughly 1.5x that at S = 8, dominated
by sampling (S x 8,000 policy queries + S x 5,000 gold queries per round and schedule).
"""

import importlib.util
import os


def _demo_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic.py")
    spec = importlib.util.spec_from_file_location("apo_jax_configs_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(num_samples: str = "4"):
    from apo_jax.game import schedules

    c = _demo_config()
    c.run_dir = f"runs/synthetic_gpu_s{int(num_samples)}"

    w = c.data.synthetic
    w.n_train_prompts = 16_000
    w.n_test_prompts = 2_000
    w.n_demos = 64_000
    w.tasks = ("echo", "upper", "repeat", "reverse", "sort", "add")  # graded: easy, medium, hard
    w.task_weights = (2.0, 2.0, 1.0, 1.0, 1.0, 1.0)
    w.max_number = 99  # enough distinct `add` prompts for this many train prompts
    c.data.n_rm = 5_000
    c.data.n_dev = 2_000
    c.data.n_llm = 8_000
    c.data.n_test = 0
    c.data.buckets = (64, 80, 96, 112)

    c.policy.arch.hidden_size = 512
    c.policy.arch.intermediate_size = 1408
    c.policy.arch.num_hidden_layers = 6
    c.policy.arch.num_attention_heads = 8
    c.policy.arch.num_key_value_heads = 4
    for m in (c.policy, c.rm):
        m.param_dtype = "float32"
        m.dtype = "auto"
        m.attention_impl = "auto"
        m.remat_policy = "none"
    c.policy.pretrain.lr = 1e-3
    c.policy.pretrain.batch_size = 128
    c.policy.pretrain.epochs = 8  # 4,000 steps

    for opt in (c.rm.base, c.rm.test):
        opt.lr = 2e-4
        opt.batch_size = 64
        opt.epochs = 2
    c.rm.apo.lr = 5e-5
    c.rm.apo.batch_size = 64
    c.sft.batch_size = 128
    c.sft.lrs = (3e-4, 2e-4, 1e-4)

    c.apo.rounds = 3
    c.apo.num_samples = int(num_samples)
    c.rm.apo_weight = 0.1 / c.apo.num_samples * 10  # the demo's per-pair weight, kept tied to S
    c.apo.schedules = ("rjs", "apo", "apo_seq", "ablation") + (("oracle",) if "oracle" in schedules.SCHEDULES
                                                                  else ())
    c.sampling.batch_size = 512
    c.eval.batch_size = 512
    c.checkpoint.save_every_steps = 200
    return c
