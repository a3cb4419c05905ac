"""XLA's temporaries of the RM train step and of the SFT loss + gradient (abstract compile: no
memory is allocated, so it runs on a laptop for any shape).

    python benchmarks/memory_probe.py --model smollm2_135m --remat auto --pairs 8 --seq 256

The SFT program is measured twice: through `lm_logits` + log-softmax (full [B, T, V] float32
logits) and through `models.token_logprobs` (chunked), over 2 x pairs sequences.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from apo_jax import models  # noqa: E402
from apo_jax.training import losses
from benchmarks import bench_train, common  # noqa: E402


def probe(model: str, remat: str, pairs: int, seq: int) -> dict[str, int]:
    """Temporary bytes of each program."""
    cfg = common.model_config(model, dtype="float32", remat=remat)
    case = dict(task="rm", model=model, seq=seq, batch=pairs, remat=remat, dtype="float32")
    out = {"rm_step": common.compiled_memory(bench_train.compile_abstract(case))["temp"]}
    params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0), lm_head=True))
    ids = jax.ShapeDtypeStruct((2 * pairs, seq), jnp.int32)

    def full(p, ids, mask):
        logits = models.lm_logits(cfg, p, ids, mask)
        return losses.sft_stats(logits, ids, mask, jnp.ones((ids.shape[0],)))["loss_num"]

    def chunked(p, ids, mask):
        logp, _ = models.token_logprobs(cfg, p, ids, mask)
        return -jnp.sum(logp * mask)

    for name, f in (("sft_full_logits", full), ("sft_token_logprobs", chunked)):
        compiled = jax.jit(jax.value_and_grad(f)).lower(params, ids, ids).compile()
        out[name] = int(compiled.memory_analysis().temp_size_in_bytes)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(common.MODEL_SHAPES), default="smollm2_135m")
    p.add_argument("--remat", choices=models.REMAT_POLICIES, default="auto")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args(argv)
    for name, temp in probe(args.model, args.remat, args.pairs, args.seq).items():
        print(f"{name:20s} temporaries {common.fmt_bytes(temp)}", flush=True)


if __name__ == "__main__":
    main()
