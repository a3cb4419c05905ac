"""gs:// inputs: HH-RLHF files, the gold file and the tokenizer read from a bucket (a fake GCS)
give exactly the data the same local files give; gs:// checkpoints are checked and copied once."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from apo_jax import config as config_lib
from apo_jax.io import fileio, hf
from apo_jax.data import hh, pipeline
from fake_gcs import fake_gcs_fixture  # noqa: F401  (the fixture "fake_gcs")
from tok_fixtures import llama_like_tokenizer


def _hh_file(path, n: int, offset: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for i in range(offset, offset + n):
            prompt = f"\n\nHuman: question number {i % (n // 2)} from set {offset}?\n\nAssistant:"
            f.write(json.dumps({"chosen": f"{prompt} a good answer {i}.", "rejected": f"{prompt} bad {i}."}) + "\n")


@pytest.fixture
def local_inputs(tmp_path):
    src = tmp_path / "inputs"
    for i, subset in enumerate(("helpful-base", "harmless-base")):
        _hh_file(str(src / "hh" / subset / "train.jsonl"), 40, 100 * i)
        _hh_file(str(src / "hh" / subset / "test.jsonl"), 12, 1000 + 100 * i)
    train, _ = hh.load_hh_pairs(str(src / "hh"), "train")
    with open(src / "gold.jsonl", "w") as f:
        for pid in dict.fromkeys(p["prompt_id"] for p in train):
            f.write(json.dumps({"prompt_id": pid, "response": f"gold for {pid}", "source": "endpoint"}) + "\n")
    llama_like_tokenizer().save_pretrained(str(src / "tokenizer"))
    return src


def _cfg(hh_dir: str, gold: str, tokenizer: str):
    c = config_lib.base_config()
    c.data.kind = "hh"
    c.data.hh_train = c.data.hh_test = hh_dir
    c.data.gold, c.data.tokenizer = gold, tokenizer
    c.data.n_rm, c.data.n_dev = 8, 4
    return c


def test_gs_inputs_give_the_data_local_files_give(local_inputs, fake_gcs, tmp_path, monkeypatch):
    monkeypatch.setenv("APO_JAX_CACHE", str(tmp_path / "cache"))
    shutil.copytree(local_inputs, fake_gcs.local_path("bucket", "inputs"))  # what the bucket holds
    url = fake_gcs.url("bucket", "inputs")
    remote = pipeline.prepare(_cfg(f"{url}/hh", f"{url}/gold.jsonl", f"{url}/tokenizer"), str(tmp_path / "run_gs"))
    local = pipeline.prepare(
        _cfg(str(local_inputs / "hh"), str(local_inputs / "gold.jsonl"), str(local_inputs / "tokenizer")),
        str(tmp_path / "run_local"))
    for field in ("rm_pairs", "gold", "llm_prompts", "dev_pairs", "test_pairs", "test_prompts"):
        assert getattr(remote, field) == getattr(local, field), field
    assert len(remote.gold) == 8 and {g["source"] for g in remote.gold} == {"endpoint"}  # the gold file was read
    assert remote.tokenizer.get_vocab() == local.tokenizer.get_vocab()
    assert (tmp_path / "cache" / "remote" / "bucket" / "inputs" / "hh" / "helpful-base" / "train.jsonl").is_file()


def test_gs_checkpoint_is_checked_then_copied_once(fake_gcs, tmp_path, monkeypatch):
    from hf_fixtures import random_causal_lm

    monkeypatch.setenv("APO_JAX_CACHE", str(tmp_path / "cache"))
    model_dir = fake_gcs.local_path("bucket", "models/lm")
    model = random_causal_lm(seed=3)
    model.save_pretrained(str(model_dir))
    url = fake_gcs.url("bucket", "models/lm")
    local = hf.resolve_checkpoint_dir(url)
    assert local == str(tmp_path / "cache" / "remote" / "bucket" / "models" / "lm")
    assert sorted(os.listdir(local)) == sorted(os.listdir(model_dir))
    config, params = hf.load_pretrained(url)
    assert config.num_hidden_layers == model.config.num_hidden_layers
    np.testing.assert_array_equal(np.asarray(params["model"]["embed"]["embedding"]),
                                  model.model.embed_tokens.weight.detach().numpy())
    # A second resolve reuses the copy rather than downloading again.
    stamp = os.stat(os.path.join(local, "config.json")).st_mtime_ns
    assert hf.resolve_checkpoint_dir(url) == local
    assert os.stat(os.path.join(local, "config.json")).st_mtime_ns == stamp

    with pytest.raises(hf.CheckpointError, match="no such checkpoint"):
        hf.resolve_checkpoint_dir(fake_gcs.url("bucket", "models/missing"))
    fileio.write_text(fake_gcs.url("bucket", "models/tok_only/tokenizer_config.json"), "{}")
    with pytest.raises(hf.CheckpointError, match="no config.json with safetensors weights"):
        hf.resolve_checkpoint_dir(fake_gcs.url("bucket", "models/tok_only"))
