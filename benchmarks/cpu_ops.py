"""One RM layer's pieces and the SFT step's LM head, apo_jax vs PyTorch, at the SmolLM2-135M width
(float32, 8 pairs x 256; the head at 8 x 256): where a CPU train step's time goes when the whole
step is slower than transformers'.

    python benchmarks/cpu_ops.py [--rows 4096] [--iters 10]

Each row times the same function both ways, interleaved call by call (so both see the same load):
apo_jax's own code (`models.project`, the blocked attention core) under `jax.jit`, and what
transformers runs (`nn.functional.linear` on [out, in] weights, `scaled_dot_product_attention`).
"fwd" is the forward alone, "fwd+bwd" the forward and the gradient of every input. XLA flags
(`XLA_FLAGS=...`) and malloc settings (`GLIBC_TUNABLES=...`) apply to both sides' process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from apo_jax import models  # noqa: E402
from benchmarks import common  # noqa: E402

D, N, K, H, F, V = 576, 9, 3, 64, 1536, 49152  # SmolLM2-135M: hidden, heads, KV heads, head dim, MLP, vocabulary


def _cases(rows: int, seq: int, rng: np.random.Generator) -> list[tuple[str, Callable, Callable, dict]]:
    """(name, jax loss fn of a dict, torch loss fn of a dict, inputs as NumPy) for every row."""
    def arr(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def linear(x, w_io):  # torch: x @ w with w given [in, out], as nn.Linear stores it ([out, in])
        return torch.nn.functional.linear(x, w_io.T)

    batch = rows // seq
    gemm = dict(x=arr(rows, D), w=arr(D, F, scale=0.02), c=arr(rows, F))
    mlp = dict(x=arr(rows, D), g=arr(D, F, scale=0.02), u=arr(D, F, scale=0.02), d=arr(F, D, scale=0.02),
               c=arr(rows, D))
    proj = dict(x=arr(rows, D), q=arr(D, N * H, scale=0.02), k=arr(D, K * H, scale=0.02),
                v=arr(D, K * H, scale=0.02), o=arr(N * H, D, scale=0.02), c=arr(rows, D))
    attn = dict(q=arr(batch, seq, N, H), k=arr(batch, seq, K, H), v=arr(batch, seq, K, H), c=arr(batch, seq, N, H))
    mask = jnp.ones((batch, seq), jnp.int32)

    def j_gemm(p):
        return jnp.sum(models.project(p["x"], p["w"]) * p["c"])

    def t_gemm(p):
        return torch.sum(linear(p["x"], p["w"]) * p["c"])

    def j_mlp(p):
        h = jax.nn.silu(models.project(p["x"], p["g"])) * models.project(p["x"], p["u"])
        return jnp.sum(models.project(h, p["d"]) * p["c"])

    def t_mlp(p):
        h = torch.nn.functional.silu(linear(p["x"], p["g"])) * linear(p["x"], p["u"])
        return torch.sum(linear(h, p["d"]) * p["c"])

    def j_proj(p):  # q, k, v and o (the attention core left out: the next row)
        q, k, v = (models.project(p["x"], p[n]) for n in "qkv")
        mixed = q + jnp.tile(k + v, (1, N // K))
        return jnp.sum(models.project(mixed, p["o"]) * p["c"])

    def t_proj(p):
        q, k, v = (linear(p["x"], p[n]) for n in "qkv")
        mixed = q + (k + v).repeat(1, N // K)
        return torch.sum(linear(mixed, p["o"]) * p["c"])

    def j_attn(p):
        out = models.attention._blocked_causal_attention(p["q"], p["k"], p["v"], mask)
        return jnp.sum(out * p["c"])

    def t_attn(p):
        q, k, v = (p[n].transpose(1, 2) for n in "qkv")
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return torch.sum(out.transpose(1, 2) * p["c"])

    head_cfg = models.ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=1,
                                  num_attention_heads=N, num_key_value_heads=K, tie_word_embeddings=False,
                                  dtype="float32", param_dtype="float32")
    head = dict(h=arr(batch // 2, seq, D), w=arr(D, V, scale=0.02), c=arr(batch // 2, seq - 1))
    ids = jnp.asarray(rng.integers(0, V, (batch // 2, seq)).astype(np.int32))
    ids_t = torch.tensor(np.asarray(ids)).long()

    def j_head(p):  # what the DPO objective runs after the layers (SFT: `models.weighted_logprob_sum`)
        logp, _ = models.logprobs_from_hidden(head_cfg, {"lm_head": {"kernel": p["w"]}}, p["h"], ids)
        return jnp.sum(logp[:, 1:] * p["c"])

    def t_head(p):  # transformers: the whole [B, T, V] logits, then log-softmax
        logp = torch.log_softmax(linear(p["h"][:, :-1], p["w"]).float(), dim=-1)
        return torch.sum(logp.gather(-1, ids_t[:, 1:, None])[..., 0] * p["c"])

    return [
        (f"GEMM x @ W [{rows}x{D}]x[{D}x{F}]", j_gemm, t_gemm, gemm),
        (f"MLP (gate, up, SwiGLU, down), {rows} rows", j_mlp, t_mlp, mlp),
        (f"attention q/k/v/o projections, {rows} rows", j_proj, t_proj, proj),
        (f"causal attention core {batch}x{seq}, {N}/{K} heads", j_attn, t_attn, attn),
        (f"SFT LM head + log-softmax {batch // 2}x{seq}, vocab {V}", j_head, t_head, head),
    ]


def _timed(call: Callable[[], Any], sync: Callable[[Any], None]) -> float:
    t0 = time.perf_counter()
    sync(call())
    return time.perf_counter() - t0


def measure(rows: int, seq: int, iters: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    out = []
    for name, j_loss, t_loss, inputs in _cases(rows, seq, rng):
        j_in = {k: jnp.asarray(v) for k, v in inputs.items()}
        t_in = {k: torch.tensor(v, requires_grad=k != "c") for k, v in inputs.items()}
        diff_keys = [k for k in inputs if k != "c"]
        j_fwd = jax.jit(j_loss)
        j_grad = jax.jit(jax.value_and_grad(lambda p, c: j_loss({**p, "c": c})))
        j_diff = {k: j_in[k] for k in diff_keys}

        def t_fwd():
            with torch.no_grad():
                return t_loss(t_in)

        def t_grad():
            loss = t_loss(t_in)
            return torch.autograd.grad(loss, [t_in[k] for k in diff_keys])

        pairs = {"fwd": (lambda: j_fwd(j_in), t_fwd), "fwd+bwd": (lambda: j_grad(j_diff, j_in["c"]), t_grad)}
        # The same function both ways: forward values and gradients agree (float32 tolerances).
        jv, jg = j_grad(j_diff, j_in["c"])
        tv = t_loss(t_in)
        tg = torch.autograd.grad(tv, [t_in[k] for k in diff_keys])
        gap = max(float(np.max(np.abs(np.asarray(jg[k]) - g.numpy())) / (np.max(np.abs(g.numpy())) + 1e-30))
                  for k, g in zip(diff_keys, tg))
        for kind, (j_call, t_call) in pairs.items():
            common.jax_sync(j_call())
            t_call()
            js, ts = [], []
            for _ in range(iters):
                js.append(_timed(j_call, common.jax_sync))
                ts.append(_timed(t_call, lambda _: None))
            out.append({"op": name, "kind": kind, "jax_min_s": min(js), "jax_median_s": statistics.median(js),
                        "torch_min_s": min(ts), "torch_median_s": statistics.median(ts),
                        "loss": (float(jv), tv.item()), "max_rel_grad_gap": gap})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096, help="tokens (8 pairs x 2 x 256 = 4096)")
    p.add_argument("--seq", type=int, default=256, help="sequence length of the attention row")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch's intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args.rows, args.seq, args.iters)
    env = common.environment()
    print(f"{env.get('cpu_model') or env['device_kind']}, {env['cpu_count']} CPUs, jax {env['jax']}, torch "
          f"{env['torch']}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    head = ("op", "pass", "apo_jax min / median", "PyTorch min / median", "apo_jax / PyTorch (median)")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['op']} | {r['kind']} | {common.fmt_time(r['jax_min_s'])} / {common.fmt_time(r['jax_median_s'])} | "
              f"{common.fmt_time(r['torch_min_s'])} / {common.fmt_time(r['torch_median_s'])} | "
              f"{r['jax_median_s'] / r['torch_median_s']:.2f}x |")
    print("largest relative gradient gap per op: "
          + ", ".join(f"{r['op'].split(' [')[0].split(',')[0]} {r['max_rel_grad_gap']:.1e}" for r in rows[::2]))


if __name__ == "__main__":
    main()
