"""Where the CPU RM step loses to PyTorch: forward, gradient, gradient without the embedding's,
on the SmolLM2-135M width with L layers (float32, 8 pairs x 256), apo_jax vs transformers.

    python benchmarks/rm_parts.py 4
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from apo_jax import models  # noqa: E402
from benchmarks import bench_train  # noqa: E402

torch.set_num_threads(2)
L = int(sys.argv[1]) if len(sys.argv) > 1 else 4
case = dict(impl="jax", task="rm", model="smollm2_135m", seq=256, batch=8, dtype="float32", param_dtype="float32",
            remat="none", ref_weights="identical")
c = bench_train.case_defaults(case)
cfg = bench_train._config(c).replace(num_hidden_layers=L)
params = models.init_params(cfg, jax.random.PRNGKey(0), reward_head=True, reward_head_std=0.02)
rng = np.random.RandomState(0)
ids = jnp.asarray(rng.randint(3, cfg.vocab_size, (16, 256)).astype(np.int32)); mask = jnp.ones((16, 256), jnp.int32)
def loss_fn(p):
    r = models.rewards(cfg, p, ids, mask); return -jnp.mean(jax.nn.log_sigmoid(r[:8] - r[8:]))
def tm(f, n=3):
    jax.block_until_ready(f()); t = time.perf_counter()
    for _ in range(n): jax.block_until_ready(f())
    return (time.perf_counter() - t) / n
fwd = jax.jit(loss_fn); grad = jax.jit(jax.grad(loss_fn))
# The gradient with respect to everything but the embedding (no scatter-add into [V, D]).
emb_frozen = jax.jit(lambda p: jax.grad(lambda q: loss_fn({**p, 'model': {**p['model'], **q}}))(
    {k: v for k, v in p['model'].items() if k != 'embed'}))
res = {"fwd": tm(lambda: fwd(params)), "grad": tm(lambda: grad(params)), "grad_no_embed": tm(lambda: emb_frozen(params))}
# torch
import transformers  # noqa: E402
hc = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
    num_hidden_layers=L, num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
    num_labels=1, pad_token_id=0, tie_word_embeddings=True, attn_implementation="sdpa")
m = transformers.LlamaForSequenceClassification(hc).float()
tids = torch.tensor(np.asarray(ids), dtype=torch.long)
def tloss():
    r = m(tids).logits[:, 0]; return -torch.nn.functional.logsigmoid(r[:8] - r[8:]).mean()
def ttm(f, n=3):
    f(); t = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t) / n
with torch.no_grad(): res["t_fwd"] = ttm(tloss)
def tg():
    m.zero_grad(set_to_none=True); tloss().backward()
res["t_grad"] = ttm(tg)
m.model.embed_tokens.weight.requires_grad_(False)
res["t_grad_no_embed"] = ttm(tg)
print(L, {k: round(v, 3) for k, v in res.items()})
