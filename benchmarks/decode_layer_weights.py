"""How a decode step's layer loop should read stacked weights: a micro-benchmark.

The sampler's decode step runs the layers in a `lax.scan` over weights stacked [L, ...]; a host
trace shows each layer's weights `dynamic-slice`d (copied) before its dot. This times an
MLP-shaped stand-in for that loop (B rows, per layer `h + tanh(h @ up) @ down`) three ways, the
variants interleaved over several rounds so machine noise hits them alike:

- `scan xs`: `lax.scan` over the stacked weights (what `models.py` does);
- `unrolled, per-layer arrays`: a Python loop over L separate weight arguments (no slicing at all:
  the upper bound on what reading the weights in place could give);
- `unrolled, static slices`: a Python loop over `W[i]` of the stacked arrays.

`--projections` times a whole layer's seven projections instead (q, k, v, o, gate, up, down at
the model's widths, a stand-in mixing in place of attention) four ways: separate weights as the
model stores them ([in, out]), separate weights stored [out, in] (the dot contracts both
operands' minor axis), q|k|v and gate|up fused into one weight each, and fused stored [out, in]:
what a decode-only weight layout (made once per sampling phase, as `models.params_for_generation`
casts the policy) could buy.

    python benchmarks/decode_layer_weights.py            # SmolLM2-135M's MLP shape, 8 rows
    python benchmarks/decode_layer_weights.py --batch 1 --layers 16
    python benchmarks/decode_layer_weights.py --projections --batch 16
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def _layer(h, up, down):
    return h + jnp.tanh(h @ up) @ down


def _time_interleaved(cases, rounds: int, iters: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _ in range(rounds):
        for name, fn, a in cases:
            for _ in range(iters):
                t = time.perf_counter()
                jax.block_until_ready(fn(*a))
                times[name].append(time.perf_counter() - t)
    return times


def _print_table(times: dict[str, list[float]], weight_gb: float) -> None:
    print("| variant | min ms | median ms | weight GB/s (min) |")
    print("| --- | --- | --- | --- |")
    for name, v in times.items():
        print(f"| {name} | {min(v) * 1e3:.2f} | {np.median(v) * 1e3:.2f} | {weight_gb / min(v):.1f} |")


def _projections(args) -> None:
    """A whole decode layer's projections: separate vs fused weights, [in, out] vs [out, in]."""
    n, d, f = args.layers, args.hidden, args.ffn
    q_w, kv_w = args.heads * args.head_dim, args.kv_heads * args.head_dim
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))

    def w(*shape):
        return jax.random.normal(next(keys), (n, *shape), jnp.float32) * 0.02

    sep = dict(q=w(d, q_w), k=w(d, kv_w), v=w(d, kv_w), o=w(q_w, d), gate=w(d, f), up=w(d, f), down=w(f, d))
    fused = dict(qkv=jnp.concatenate([sep["q"], sep["k"], sep["v"]], -1), o=sep["o"],
                 gate_up=jnp.concatenate([sep["gate"], sep["up"]], -1), down=sep["down"])
    out_in = lambda p: {k: jnp.swapaxes(v, 1, 2).copy() for k, v in p.items()}  # noqa: E731
    x = jax.random.normal(next(keys), (args.batch, d), jnp.float32)

    def mix(q, k, v):  # stands in for attention: uses every output, keeps the shapes
        reps = q_w // kv_w
        return q * jnp.tile(jax.nn.sigmoid(k) + v, reps) if reps * kv_w == q_w else q

    def layer(h, p, fuse: bool, mm):
        if fuse:
            qkv = mm(h, p["qkv"])
            q, k, v = qkv[:, :q_w], qkv[:, q_w:q_w + kv_w], qkv[:, q_w + kv_w:]
        else:
            q, k, v = mm(h, p["q"]), mm(h, p["k"]), mm(h, p["v"])
        h = h + mm(mix(q, k, v), p["o"])
        if fuse:
            gu = mm(h, p["gate_up"])
            gate, up = gu[:, :f], gu[:, f:]
        else:
            gate, up = mm(h, p["gate"]), mm(h, p["up"])
        return h + mm(jax.nn.silu(gate) * up, p["down"])

    in_out = lambda h, m: h @ m  # noqa: E731
    out_in_mm = lambda h, m: jnp.einsum("bi,oi->bo", h, m)  # noqa: E731

    def variant(fuse, mm):
        return jax.jit(lambda x, p: jax.lax.scan(lambda h, pl: (layer(h, pl, fuse, mm), None), x, p)[0])

    cases = (("separate, [in, out] (the model's)", variant(False, in_out), (x, sep)),
             ("separate, [out, in]", variant(False, out_in_mm), (x, out_in(sep))),
             ("q|k|v and gate|up fused, [in, out]", variant(True, in_out), (x, fused)),
             ("q|k|v and gate|up fused, [out, in]", variant(True, out_in_mm), (x, out_in(fused))))
    ref = np.asarray(cases[0][1](*cases[0][2]))
    for name, fn, a in cases:
        np.testing.assert_allclose(np.asarray(fn(*a)), ref, rtol=2e-3, atol=2e-3, err_msg=name)
    times = _time_interleaved(cases, args.rounds, args.iters)
    weight_gb = sum(v.size for v in sep.values()) * 4 / 1e9
    print(f"{n} layers' projections (d {d}, ffn {f}, q {q_w}, kv {kv_w}), {args.batch} rows, float32, "
          f"{jax.devices()[0].platform}; {args.rounds} rounds x {args.iters} calls per variant")
    _print_table(times, weight_gb)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--iters", type=int, default=10, help="calls per variant per round")
    p.add_argument("--projections", action="store_true", help="a whole layer's projections (see above)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args(argv)
    if args.projections:
        _projections(args)
        return
    n = args.layers
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    up = jax.random.normal(k1, (n, args.hidden, args.ffn), jnp.float32) * 0.02
    down = jax.random.normal(k2, (n, args.ffn, args.hidden), jnp.float32) * 0.02
    x = jax.random.normal(k3, (args.batch, args.hidden), jnp.float32)
    ups, downs = [up[i] for i in range(n)], [down[i] for i in range(n)]

    @jax.jit
    def scan_xs(x, up, down):
        return jax.lax.scan(lambda h, w: (_layer(h, *w), None), x, (up, down))[0]

    @jax.jit
    def per_layer_arrays(x, ups, downs):
        for u, d in zip(ups, downs):
            x = _layer(x, u, d)
        return x

    @jax.jit
    def static_slices(x, up, down):
        for i in range(n):
            x = _layer(x, up[i], down[i])
        return x

    cases = (("scan xs", scan_xs, (x, up, down)), ("unrolled, per-layer arrays", per_layer_arrays, (x, ups, downs)),
             ("unrolled, static slices", static_slices, (x, up, down)))
    ref = np.asarray(per_layer_arrays(x, ups, downs))
    for name, fn, a in cases:  # compile, and check every variant computes the same thing
        np.testing.assert_allclose(np.asarray(fn(*a)), ref, rtol=1e-4, atol=1e-4, err_msg=name)
    times = _time_interleaved(cases, args.rounds, args.iters)
    weight_gb = 2 * n * args.hidden * args.ffn * 4 / 1e9
    print(f"{n} layers, {args.batch} x {args.hidden} -> {args.ffn}, float32, {jax.devices()[0].platform}; "
          f"{args.rounds} rounds x {args.iters} calls per variant")
    _print_table(times, weight_gb)


if __name__ == "__main__":
    main()
