"""Numerical parity of every model family with its `transformers` class, as a table.

    python benchmarks/family_parity.py [--real] [--out parity.json]

Per family, the tiny random 4-layer model of `tests/family_fixtures.py` (random norms and biases,
a 5-token sliding window where the family has one) saved by transformers and read by
`apo_jax.hf.load_pretrained`: the largest |difference| of the LM logits over the real positions of
left- and right-padded 24-token rows and of a 300-token row (the blocked kernel), of the rewards
of the family's `*ForSequenceClassification`, and whether greedy decoding of 15 tokens (three
windows) equals `generate` token for token. `--real` adds Gemma-3-270M's real weights
(tests/real_model.py) on real text and on a 700-token row past its 512-token window. float32 on
the CPU; needs the test extra (torch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from family_fixtures import FAMILIES, WINDOW, random_model  # noqa: E402
from hf_fixtures import padded_batch, torch_logits, torch_rewards  # noqa: E402

from apo_jax import models  # noqa: E402
from apo_jax.inference import sampler
from apo_jax.io import hf


def _logit_gap(model, config, params, ids, mask) -> float:
    ours = np.asarray(jax.jit(lambda p: models.lm_logits(config, p, ids, mask))(params))
    real = mask.astype(bool)
    return float(np.max(np.abs(ours[real] - torch_logits(model, ids, mask)[real])))


def _greedy_equal(model, config, params, ids, mask, n) -> bool:
    out = sampler.generate(config, models.params_for_generation(config, params), ids, mask, jax.random.PRNGKey(0),
                           num_samples=1, max_new_tokens=n, temperature=0.0, eos_token_id=None)
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return bool(np.array_equal(np.asarray(out.tokens[:, 0]), ref[:, ids.shape[1]:].numpy()))


def tiny_row(family: str, tmp: str) -> dict:
    lm = random_model(family, seed=3)
    lm.save_pretrained(os.path.join(tmp, family, "lm"))
    config, params = hf.load_pretrained(os.path.join(tmp, family, "lm"))
    row = {"family": family}
    for side in ("left", "right"):
        ids, mask = padded_batch(3, 24, config.vocab_size, side, seed=1, min_len=WINDOW + 3)
        row[f"logits_{side}"] = _logit_gap(lm, config, params, ids, mask)
    ids, mask = padded_batch(2, 300, config.vocab_size, "right", seed=4, min_len=200)
    row["logits_300"] = _logit_gap(lm, config, params, ids, mask)
    rm = random_model(family, reward=True, seed=8)
    rm.save_pretrained(os.path.join(tmp, family, "rm"))
    rm_config, rm_params = hf.load_pretrained(os.path.join(tmp, family, "rm"))
    ids, mask = padded_batch(4, 20, config.vocab_size, "left", seed=2, min_len=WINDOW + 2)
    ref = torch_rewards(rm, ids, mask)
    row["rewards"] = float(np.max(np.abs(np.asarray(models.rewards(rm_config, rm_params, ids, mask)) - ref)))
    ids, mask = padded_batch(3, 9, config.vocab_size, "left", seed=5, min_len=2)
    row["greedy_equal"] = _greedy_equal(lm, config, params, ids, mask, 3 * WINDOW)
    return row


def real_row() -> dict:
    import real_model
    import transformers

    path = real_model.gemma3_dir()
    config, params = hf.load_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    lm = transformers.Gemma3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = ["The capital of France is Paris, and the capital of Italy is",
            "Isaac Newton formulated the laws of motion and universal gravitation, which"]
    enc = tok(text, padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    row = {"family": "gemma3_text (Gemma-3-270M)", "logits_right": _logit_gap(lm, config, params, ids, mask)}
    long_ids = np.asarray([tok(" ".join(text * 40))["input_ids"][:700]], np.int32)
    long_mask = np.ones_like(long_ids)
    hidden = models.hidden_states(config, params, long_ids, long_mask)
    ours = np.asarray(models.logits_from_hidden(config, params, hidden[:, -32:]))
    row["logits_700_last32"] = float(np.max(np.abs(ours - torch_logits(lm, long_ids, long_mask, keep=32))))
    left = tok(text, padding=True, padding_side="left", return_tensors="np")
    row["greedy_equal"] = _greedy_equal(lm, config, params, left["input_ids"].astype(np.int32),
                                        left["attention_mask"].astype(np.int32), 20)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="add Gemma-3-270M's real weights")
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = [tiny_row(f, tmp) for f in sorted(FAMILIES)]
    if args.real:
        rows.append(real_row())
    cols = ["family", "logits_left", "logits_right", "logits_300", "logits_700_last32", "rewards", "greedy_equal"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        cells = [r.get(c, "") for c in cols]
        print("| " + " | ".join(f"{v:.2e}" if isinstance(v, float) else str(v) for v in cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
