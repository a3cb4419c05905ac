"""Start-up validation: every wrong field is named, and configs/hh.py fails fast without data."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from apo_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_base_config_is_valid():
    config_lib.validate(config_lib.base_config(), num_devices=8)


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py")))
def test_every_shipped_config_is_valid_on_one_device_and_documented(name):
    import runpy

    c = runpy.run_path(os.path.join(REPO, "configs", name))["get_config"]()
    config_lib.validate(c, num_devices=1)
    config_lib.reference(c)  # every field it sets is documented


def test_the_gemma3_config_is_hh_small_with_gemma_checkpoints():
    import runpy

    small, gemma = (runpy.run_path(os.path.join(REPO, "configs", f))["get_config"]() for f in ("hh_small.py", "hh_gemma3.py"))
    assert gemma.policy.checkpoint == gemma.rm.init_checkpoint == "google/gemma-3-270m-it"
    for c in (small, gemma):
        c.policy.checkpoint = c.rm.init_checkpoint = c.run_dir = ""
    assert gemma.to_dict() == small.to_dict()


def test_every_wrong_field_is_reported_at_once():
    c = config_lib.base_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 3, -1, 1
    c.apo.schedules = ("apo", "rejection")
    c.rm.base.schedule = "exponential"
    c.sft.lrs = (1e-5,)
    c.sampling.train.top_p = 0.0
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c, num_devices=8)
    msg = str(e.value)
    for field in ("mesh:", "apo.schedules:", "rm.base.schedule:", "sft.lrs:", "sampling.train.top_p:"):
        assert field in msg, (field, msg)


def test_batch_sizes_must_divide_the_data_axes():
    c = config_lib.base_config()
    c.mesh.data, c.mesh.fsdp = 2, 4
    c.rm.base.batch_size = 12
    c.sft.grad_accum = 3
    with pytest.raises(config_lib.ConfigError, match=r"rm\.base\.batch_size: 12 must be a positive multiple of data\*fsdp = 8") as e:
        config_lib.validate(c, num_devices=8)
    assert "sft.grad_accum" in str(e.value)


def test_missing_paths_are_named(tmp_path):
    c = config_lib.base_config()
    c.data.kind = "hh"
    c.data.hh_train = str(tmp_path / "nowhere")
    c.data.hh_test = str(tmp_path / "nowhere")
    c.data.gold = str(tmp_path / "gold.jsonl")
    c.policy.checkpoint = str(tmp_path / "no-model")  # checked by apo_jax.preflight (tests/test_errors.py)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c, num_devices=1)
    msg = str(e.value)
    for field in ("data.hh_train", "data.hh_test", "data.gold"):
        assert field in msg


def test_hh_config_without_checkpoints_fails_in_seconds_with_instructions(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "apo_jax.main", "--config=configs/hh.py", f"--config.run_dir={tmp_path}/run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    err = proc.stderr
    assert "Traceback" not in err, err[-2000:]
    # Offline: the hub ids cannot be fetched; the message says what to pass instead.
    assert "--config.policy.checkpoint=" in err or "policy.checkpoint" in err, err[-2000:]
    assert "local" in err, err[-2000:]


def test_apo_pair_weight_is_tied_to_the_number_of_samples():
    from apo_jax.config import apo_pair_weight, base_config

    c = base_config()
    assert apo_pair_weight(c) == pytest.approx(0.1 / 4)  # the official rule, 0.1 / S per APO pair
    c.apo.num_samples = 8
    assert apo_pair_weight(c) == pytest.approx(0.1 / 8)  # changing S keeps beta2
    c.rm.apo_weight = 0.3
    assert apo_pair_weight(c) == pytest.approx(0.3)  # an explicit weight is used as given


def test_each_learning_rule_validates_its_own_section_at_start_up():
    from apo_jax.training import objectives

    c = config_lib.base_config()
    c.sft.normalize = "word"
    c.dpo.beta = 0.0
    c.dpo.sft_weight = -1.0
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c, num_devices=8, checks=(objectives.settings_problems,))
    lines = str(e.value).splitlines()[1:]
    assert [line.strip().split(":")[0] for line in lines] == ["dpo.beta", "dpo.sft_weight", "sft.normalize"], lines
    assert objectives.from_config("dpo", config_lib.base_config()) == objectives.DPO(beta=0.1)


def test_reading_and_validating_a_config_loads_no_jax():
    code = ("import sys, runpy; from apo_jax import config; "
            "config.validate(runpy.run_path('configs/synthetic.py')['get_config'](), 1); "
            "assert not [m for m in sys.modules if m == 'jax' or m.startswith('jax.')], 'jax imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_every_field_has_a_note_and_the_reference_page_is_current():
    reference = config_lib.reference(config_lib.base_config())  # raises for a field without a note
    page = open(os.path.join(REPO, "docs", "config_reference.md")).read()
    assert page == config_lib.REFERENCE_HEADER + reference + "\n", "regenerate: python -m apo_jax.config > docs/config_reference.md"
    assert "| `rm.init_checkpoint` | `''` | RM initialisation" in page


def test_show_config_prints_every_resolved_field_and_no_config_points_at_the_quick_start():
    out = subprocess.run([sys.executable, "-m", "apo_jax.main", "--config=configs/hh_gemma3.py", "--show_config",
                          "--config.rm.base.lr=0.25"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "| `rm.base.lr` | `0.25` | RM_Base training: peak learning rate (AdamW) |" in out.stdout
    assert "| `policy.checkpoint` | `'google/gemma-3-270m-it'` |" in out.stdout
    bare = subprocess.run([sys.executable, "-m", "apo_jax.main"], cwd=REPO, capture_output=True, text=True)
    assert bare.returncode == 2
    assert bare.stderr.strip() == ("apo_jax: no --config given. The quick start: python -m apo_jax.main "
                                   "--config=configs/synthetic.py (configs/ holds the others; --config=X --show_config "
                                   "lists every field of X with its meaning)")
