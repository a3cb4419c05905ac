"""How a decode step's layer loop should read stacked weights: a micro-benchmark.

The sampler's decode step runs the layers in a `lax.scan` over weights stacked [L, ...]; a host
trace shows each layer's weights `dynamic-slice`d (copied) before its dot. This times an
MLP-shaped stand-in for that loop (B rows, per layer `h + tanh(h @ up) @ down`) three ways, the
variants interleaved over several rounds so machine noise hits them alike:

- `scan xs`: `lax.scan` over the stacked weights (what `models.py` does);
- `unrolled, per-layer arrays`: a Python loop over L separate weight arguments (no slicing at all:
  the upper bound on what reading the weights in place could give);
- `unrolled, static slices`: a Python loop over `W[i]` of the stacked arrays.

    python benchmarks/decode_layer_weights.py            # SmolLM2-135M's MLP shape, 8 rows
    python benchmarks/decode_layer_weights.py --batch 1 --layers 16
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def _layer(h, up, down):
    return h + jnp.tanh(h @ up) @ down


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--iters", type=int, default=10, help="calls per variant per round")
    args = p.parse_args(argv)
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
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _ in range(args.rounds):
        for name, fn, a in cases:
            for _ in range(args.iters):
                t = time.perf_counter()
                jax.block_until_ready(fn(*a))
                times[name].append(time.perf_counter() - t)
    weight_gb = 2 * n * args.hidden * args.ffn * 4 / 1e9
    print(f"{n} layers, {args.batch} x {args.hidden} -> {args.ffn}, float32, {jax.devices()[0].platform}; "
          f"{args.rounds} rounds x {args.iters} calls per variant")
    print("| variant | min ms | median ms | weight GB/s (min) |")
    print("| --- | --- | --- | --- |")
    for name, v in times.items():
        print(f"| {name} | {min(v) * 1e3:.2f} | {np.median(v) * 1e3:.2f} | {weight_gb / min(v):.1f} |")


if __name__ == "__main__":
    main()
