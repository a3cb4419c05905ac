"""The synthetic preference world at a size for one GPU (the controlled experiment).

    python -m apo_jax.main --config=configs/synthetic_gpu.py

Ten times the demo's data, a ~20M-parameter character-level LLaMA with bfloat16 compute and cuDNN
attention, three rounds of all four schedules. It starts from configs/synthetic.py and changes only
numbers: the same code path as the CPU demo and configs/hh.py.
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
    c.run_dir = "runs/synthetic_gpu"

    w = c.data.synthetic
    w.n_train_prompts = 16_000
    w.n_test_prompts = 1_000
    w.n_demos = 40_000
    w.max_number = 199  # enough distinct `add` prompts for this many train prompts
    c.data.n_rm = 5_000
    c.data.n_dev = 1_000
    c.data.n_llm = 8_000
    c.data.buckets = (64, 80, 96, 112)

    c.policy.arch.hidden_size = 512
    c.policy.arch.intermediate_size = 1408
    c.policy.arch.num_hidden_layers = 6
    c.policy.arch.num_attention_heads = 8
    c.policy.arch.num_key_value_heads = 4
    for m in (c.policy, c.rm):
        m.param_dtype = "float32"
        m.dtype = "bfloat16"
        m.attention_impl = "cudnn"
        m.remat_policy = "none"
    c.policy.pretrain.lr = 1e-3
    c.policy.pretrain.batch_size = 128
    c.policy.pretrain.epochs = 8

    for opt in (c.rm.base, c.rm.test):
        opt.lr = 2e-4
        opt.batch_size = 64
        opt.epochs = 2
    c.rm.apo.lr = 5e-5
    c.rm.apo.batch_size = 64
    c.sft.batch_size = 128
    c.sft.lrs = (3e-4, 2e-4, 1e-4)

    c.apo.rounds = 3
    c.sampling.batch_size = 512
    c.eval.batch_size = 512
    c.checkpoint.save_every_steps = 200
    return c
