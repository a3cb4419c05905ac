"""Start-up errors (issue #16): one line on stderr, no traceback, exit code 2, naming the
field or `file:line`. Each case runs `python -m apo_jax.main` and fails before any model work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu", XLA_FLAGS="")


def _run(*args: str, code: str | None = None) -> tuple[int, str]:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "apo_jax.main", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def _one_line(rc: int, err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]
    assert rc == 2, (rc, err[-3000:])
    assert lines[0].startswith("apo_jax: "), lines
    return lines[0]


def test_unknown_override_names_it_with_did_you_mean(tmp_path):
    line = _one_line(*_run("--config=configs/synthetic.py", "--config.rm.base.lrr=1e-3"))
    assert "--config.rm.base.lrr=1e-3" in line and "did you mean rm.base.lr?" in line, line


def test_missing_config_file_is_named(tmp_path):
    line = _one_line(*_run(f"--config={tmp_path}/nope.py"))
    assert f"{tmp_path}/nope.py: no such config file" in line, line


def test_unknown_field_in_a_config_file_is_refused_at_its_line(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("from apo_jax import config as config_lib\n\n\ndef get_config():\n"
                    "    c = config_lib.base_config()\n    c.rm.base.lrr = 1e-3\n    return c\n")
    line = _one_line(*_run(f"--config={path}"))
    assert f"{path}:6: unknown config field rm.base.lrr (did you mean rm.base.lr?)" in line, line


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_run_dir_that_is_or_is_under_a_file(tmp_path, where):
    (tmp_path / "f").write_text("x")
    run_dir = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    line = _one_line(*_run("--config=configs/synthetic.py", f"--config.run_dir={run_dir}"))
    assert line.startswith(f"apo_jax: run_dir: {run_dir} ") and "file" in line, line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (0555) directory anyway")
def test_read_only_run_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    line = _one_line(*_run("--config=configs/synthetic.py", f"--config.run_dir={ro}"))
    assert f"run_dir: {ro}" in line and "writable" in line, line


def test_corrupt_safetensors_header_is_named_at_start_up(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=104, hidden_size=32,
        intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5)))
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    line = _one_line(*_run("--config=configs/synthetic.py", f"--config.run_dir={tmp_path}/run",
                           f"--config.policy.checkpoint={ckpt}"))
    assert f"policy.checkpoint: {ckpt}/model.safetensors: not a safetensors file" in line, line
    assert not (tmp_path / "run" / "world").exists()  # stopped before data preparation


def test_non_finite_loss_is_one_line_pointing_to_a_new_run_dir(tmp_path):
    # The real main and check_finite; the game is replaced by one that diverges at once.
    code = (
        "import sys, numpy as np\n"
        "from apo_jax import main\nfrom apo_jax.game import loop\nfrom apo_jax.training import train\n"
        "def diverge(cfg):\n"
        "    train.check_finite({'finite': np.float32(0), 'loss': np.float32('nan'),"
        " 'grad_norm': np.float32('inf')}, 3, 'rm_base')\n"
        "loop.run = diverge\n"
        "sys.argv = ['apo_jax.main'] + sys.argv[1:]\n"
        "main.run()\n"
    )
    line = _one_line(*_run("--config=configs/synthetic.py", f"--config.run_dir={tmp_path}/run", code=code))
    assert "rm_base: non-finite loss or gradient at step 3" in line and "new run_dir" in line, line
    # The lock was released on the way out: the next run (in a new run dir or this one) may start.
    assert (tmp_path / "run" / "run.lock").read_text() == ""


def test_preflight_lists_every_bad_checkpoint_by_field(tmp_path):
    """In-process: missing dirs, pickles only, and an LM given as a reward model, all at once."""
    from apo_jax import config as config_lib
    from apo_jax import preflight
    from apo_jax.io import hf
    from hf_fixtures import random_causal_lm

    random_causal_lm(seed=0).save_pretrained(tmp_path / "lm")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text((tmp_path / "lm" / "config.json").read_text())
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04not unpickled")
    c = config_lib.base_config()
    c.policy.checkpoint = str(tmp_path / "lm")  # fine
    c.rm.init_checkpoint = str(tmp_path / "pickled")
    c.rm.base_checkpoint = str(tmp_path / "lm")  # an LM, not an RM
    c.rm.test_checkpoint = str(tmp_path / "no-such-dir")
    with pytest.raises(hf.CheckpointError) as e:
        preflight.preflight(c)
    lines = str(e.value).splitlines()
    assert lines[0] == "cannot start:" and len(lines) == 4, lines
    assert "rm.init_checkpoint:" in lines[1] and "pickled weights" in lines[1], lines
    assert "rm.base_checkpoint:" in lines[2] and "has no score.weight" in lines[2], lines
    assert "rm.test_checkpoint:" in lines[3] and "no-such-dir" in lines[3], lines


def test_rerun_with_another_seed_is_refused_through_main(tmp_path):
    """The fingerprint through the real entry point (each run stops at preflight, before the game)."""
    ckpt = tmp_path / "bad"
    ckpt.mkdir()  # no config.json: every run below stops at preflight, after the run-dir check
    base = ["--config=configs/synthetic.py", f"--config.run_dir={tmp_path}/run", f"--config.policy.checkpoint={ckpt}"]
    first = _one_line(*_run(*base))
    assert "policy.checkpoint" in first and "config.json" in first, first
    assert _one_line(*_run(*base)) == first  # unchanged: passes the run-dir check again
    line = _one_line(*_run(*base, "--config.seed=1"))
    assert "seed 0 -> 1" in line and "--config.run_dir" in line and "--allow_config_change" in line, line
    more = _run(*base, "--config.apo.rounds=3", "--config.sft.lrs=(5e-4, 3e-4, 2e-4)",
                "--allow_config_change=apo.rounds,sft.lrs")
    assert _one_line(*more) == first  # the documented override passes the check
