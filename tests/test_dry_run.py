"""`python -m apo_jax.main --dry_run`: the paper's and the small real config on 1, 8 and 64 fake
devices (a subprocess per device count, XLA_FLAGS), with a tiny LLaMA config.json standing in for
the checkpoints (the 7B's own compile takes ~50 s on two cores; docs/launch.md shows its table).
The parameter count of each phase is checked against `transformers`' own models of that
config.json, the per-device parameter bytes against a hand computation of the fsdp split; a bad
batch names its field, a config that does not fit exits 2 naming the phase, without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loop_fixtures import REPO

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "vocab_size": 256, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "tie_word_embeddings": False, "rope_theta": 10000.0, "hidden_act": "silu"}
# Small lengths: the shapes, not the program, change with them.
SHAPES = ["--config.data.buckets=(32,64)", "--config.data.rm_max_len=64", "--config.data.sft_max_len=64",
          "--config.data.prompt_max_len=32"]

SCRIPT = r"""
import json, sys, runpy
import jax
from apo_jax import config as config_lib, dryrun, sharding, devices
from apo_jax.training import objectives
ckpt, out = sys.argv[1], {}
for name in ("hh", "hh_small"):
    cfg = runpy.run_path(f"configs/{name}.py")["get_config"]()
    cfg.policy.checkpoint = cfg.rm.init_checkpoint = ckpt
    cfg.data.buckets, cfg.data.rm_max_len, cfg.data.sft_max_len, cfg.data.prompt_max_len = (32, 64), 64, 64, 32
    problems = []
    try:
        config_lib.validate(cfg, jax.device_count(), checks=(objectives.settings_problems,))
    except config_lib.ConfigError as e:
        problems = str(e).splitlines()[1:]
        cfg.mesh.tensor = 2  # the fix the message suggests: fewer batch shards
        config_lib.validate(cfg, jax.device_count(), checks=(objectives.settings_problems,))
    devices.resolve_config(cfg)
    mesh = sharding.make_mesh(sharding.MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    rows = dryrun.measure(cfg, mesh, dryrun.model_configs(cfg))
    out[name] = dict(problems=[p.strip() for p in problems], mesh=dict(mesh.shape), rows=[
        dict(section=r.phase.section, batch=r.global_batch, per_device=r.per_device_batch, seq=r.phase.seq_len,
             params=r.memory.params, peak=r.memory.peak, temp=r.memory.temp) for r in rows])
print(json.dumps(out))
"""


def _env(n: int) -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", PYTHONPATH=REPO,
                HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    (d / "config.json").write_text(json.dumps(TINY))
    return str(d)


def _hf_param_counts() -> dict[str, int]:
    """Parameters of the policy (LM) and RM (sequence classifier, 1 label) by transformers."""
    import transformers

    hf = transformers.LlamaConfig(**{k: v for k, v in TINY.items() if k not in ("architectures", "model_type")},
                                  num_labels=1)
    lm = transformers.LlamaForCausalLM(hf).num_parameters()
    rm = transformers.LlamaForSequenceClassification(hf).num_parameters()
    return {"policy": lm, "rm": rm}


@pytest.mark.parametrize("n", [1, 8, 64])
def test_paper_and_small_configs_on_fake_devices(n, tiny_ckpt):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, tiny_ckpt], cwd=REPO, env=_env(n), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    counts = _hf_param_counts()
    d, layers = TINY["hidden_size"], TINY["num_hidden_layers"]
    norms = (2 * layers + 1) * d  # RMSNorm scales: replicated, every other parameter splits over fsdp
    for name, got in out.items():
        # HH runs never pretrain: policy.pretrain (batch 32) is neither validated nor compiled.
        assert [r["section"] for r in got["rows"]] == ["rm.base", "rm.test", "sft", "rm.apo"], got
        if name == "hh_small" and n == 64:  # batch 32 cannot split over 64 devices: named, then fixed
            assert "rm.base.batch_size: 32 must be a positive multiple of data*fsdp = 64" in got["problems"]
            assert got["mesh"] == {"data": 1, "fsdp": 32, "tensor": 2}
        else:
            assert got["problems"] == [] and got["mesh"] == {"data": 1, "fsdp": n, "tensor": 1}
        fsdp, tensor = got["mesh"]["fsdp"], got["mesh"]["tensor"]
        for r in got["rows"]:
            total = counts["policy" if r["section"] == "sft" else "rm"]
            assert r["per_device"] == r["batch"] // (got["mesh"]["data"] * fsdp)
            assert r["seq"] == 64
            if tensor == 1:  # float32 params (both configs' param_dtype)
                assert r["params"] == 4 * ((total - norms) // fsdp + norms), (name, r)
            assert r["peak"] >= r["params"] * 3 and r["temp"] > 0  # params + two Adam moments, and scratch


def _cli(n: int, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apo_jax.main", "--dry_run", *args], cwd=REPO,
                          env={**_env(n), **env}, capture_output=True, text=True, timeout=400)


def test_cli_a_config_that_does_not_fit_exits_2_naming_the_phase(tiny_ckpt):
    proc = _cli(8, "--config=configs/hh.py", f"--config.policy.checkpoint={tiny_ckpt}",
                f"--config.rm.init_checkpoint={tiny_ckpt}", "--dry_run_device_gib=0.001", *SHAPES)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "| rm.base | ranking | 64 | 8 x 1 | 64 |" in proc.stdout
    assert "peak " in proc.stdout and " GiB per device in " in proc.stdout
    assert "apo_jax: dry run: does not fit:" in proc.stderr
    assert "sft: needs " in proc.stderr and "more than the 0.0 GiB" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_a_bad_batch_names_the_field_and_a_hub_checkpoint_is_skipped(tmp_path):
    proc = _cli(8, "--config=configs/hh.py", "--config.sft.batch_size=12")
    assert proc.returncode == 2 and "sft.batch_size: 12 must be a positive multiple of data*fsdp = 8" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Hub ids, offline, an empty HF cache: no dimensions to compile.
    proc = _cli(1, "--config=configs/hh.py", HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rm.base: skipped: needs the checkpoint's config.json" in proc.stdout
    assert proc.stdout.strip().endswith("dry run ok")


@pytest.mark.parametrize("name", ["ranking", "sft", "dpo"])
def test_each_objective_declares_the_batch_its_examples_make(name):
    """`Objective.batch_layout` (what the dry run compiles on) against a real batch of the
    objective's own `examples` (and `prepare`'s extras for DPO), padded to a bucket."""
    import numpy as np

    from apo_jax import config as config_lib
    from apo_jax.training import objectives
    from tok_fixtures import llama_like_tokenizer

    cfg = config_lib.base_config()
    cfg.data.buckets, cfg.data.rm_max_len, cfg.data.sft_max_len = (16, 32), 32, 32
    obj = objectives.from_config(name, cfg)
    records = [{"prompt": f"question {i}", "chosen": "a good answer", "rejected": "no", "response": "an answer"}
               for i in range(4)]
    examples = obj.examples(llama_like_tokenizer(), records, cfg.data)
    if name == "dpo":  # what prepare adds: the reference log-probs of both sides
        examples.extras["ref_chosen"] = np.zeros(4, np.float32)
        examples.extras["ref_rejected"] = np.zeros(4, np.float32)
    batch = examples.batch(np.arange(4), local=False)
    width = examples.width(np.arange(4))
    layout = obj.batch_layout(4, width)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s, np.dtype(d)) for k, (s, d) in layout.items()}
