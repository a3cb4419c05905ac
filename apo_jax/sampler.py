"""KV-cache sampling for best-of-S: prefill each prompt once, tile its cache S times, decode.

`generate` runs two jitted programs: `prefill` ([B, P] left-padded prompts -> a KV cache tiled to
[L, B*S, P+N, K, h] and the next-token logits) and `decode` (a `lax.while_loop` that samples one
token per step for all B*S rows, stops early once every row is done, and donates the cache).
Temperature, top-k and top-p are applied in float32. EOS ends a row (the EOS is kept and
counted); a stop sequence ends a row and is cut off (as the official APO code cuts samples at
the first "\\nHuman").

`logprobs` are the log-probabilities of the sampled tokens under the *sampling* distribution
(after temperature, top-k and top-p); for greedy decoding (temperature 0) under the model.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from apo_jax import models, sharding
from apo_jax.data.tokenize import bucket_length

COMPILES = {"prefill": 0, "decode": 0, "score": 0}
"""Trace counts of the jitted programs (a trace happens once per compiled shape)."""


class SampleOutput(NamedTuple):
    tokens: jax.Array  # int32 [B, S, N]; pad (0) after each row's end
    lengths: jax.Array  # int32 [B, S]; generated tokens kept (EOS included, stop sequence excluded)
    logprobs: jax.Array  # float32 [B, S, N]; 0 after the end


# ------------------------------------------------------------------------------------------
# Pure filters.


def apply_top_k(logits_bv: jax.Array, top_k: int) -> jax.Array:
    """Keeps the `top_k` largest logits of each row (ties at the k-th value kept); 0 = off."""
    if top_k <= 0 or top_k >= logits_bv.shape[-1]:
        return logits_bv
    kth = jax.lax.top_k(logits_bv, top_k)[0][..., -1:]
    return jnp.where(logits_bv < kth, -jnp.inf, logits_bv)


def apply_top_p(logits_bv: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filter: keeps the smallest set of top tokens whose probability reaches `top_p`."""
    if top_p >= 1.0:
        return logits_bv
    sorted_desc = jnp.sort(logits_bv, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p  # the top token always stays (mass_before = 0)
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_bv < threshold, -jnp.inf, logits_bv)


def sample_token(
    rng: jax.Array, logits_bv: jax.Array, temperature: float, top_k: int, top_p: float
) -> tuple[jax.Array, jax.Array]:
    """One token per row and its log-probability; temperature 0 is greedy."""
    logits_bv = logits_bv.astype(jnp.float32)
    if temperature == 0.0:
        token = jnp.argmax(logits_bv, axis=-1)
        logp = jax.nn.log_softmax(logits_bv, axis=-1)
    else:
        filtered = apply_top_p(apply_top_k(logits_bv / temperature, top_k), top_p)
        token = jax.random.categorical(rng, filtered, axis=-1)
        logp = jax.nn.log_softmax(filtered, axis=-1)
    return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


# ------------------------------------------------------------------------------------------
# Prefill and decode.


@functools.lru_cache(maxsize=64)
def _prefill_fn(config: models.LlamaConfig, num_samples: int, max_new_tokens: int, mesh: Any):
    def prefill(params, prompt_ids_bp, prompt_mask_bp):
        COMPILES["prefill"] += 1
        with sharding.activation_sharding(mesh):
            b, p = prompt_ids_bp.shape
            s_max = p + max_new_tokens
            cache = models.init_cache(config, b, s_max)
            kv_mask = jnp.concatenate([prompt_mask_bp, jnp.ones((b, max_new_tokens), prompt_mask_bp.dtype)], 1)
            positions = models.positions_from_mask(prompt_mask_bp)
            hidden, cache = models.cached_forward(config, params, prompt_ids_bp, positions, kv_mask, cache, 0)
            # Left padding puts every prompt's last real token in the last column.
            logits = models.logits_from_hidden(config, params, hidden[:, -1:])[:, 0]
            # One prefill per prompt, then S copies of its cache (row b * S + s).
            tile = lambda x: jnp.repeat(x, num_samples, axis=1)  # noqa: E731
            cache = {k: _constrain_cache(tile(v), mesh) for k, v in cache.items()}
            return cache, jnp.repeat(logits, num_samples, 0), jnp.repeat(kv_mask, num_samples, 0)

    if mesh is None:
        return jax.jit(prefill)
    return jax.jit(prefill, out_shardings=(None, NamedSharding(mesh, P()), None))


def _constrain_cache(x: jax.Array, mesh: Any) -> jax.Array:
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, sharding.cache_sharding(mesh, x.shape))


@functools.lru_cache(maxsize=64)
def _decode_fn(
    config: models.LlamaConfig,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_ids: tuple[int, ...],
    stop_sequences: tuple[tuple[int, ...], ...],
    pad_id: int,
    mesh: Any,
):
    n = max_new_tokens

    def decode(params, cache, logits_rv, kv_mask_rs, prompt_len_r, rng):
        COMPILES["decode"] += 1
        rows = logits_rv.shape[0]
        p = kv_mask_rs.shape[1] - n

        def cond(carry):
            i, _, _, _, _, done, _, _ = carry
            return (i < n) & ~jnp.all(done)

        def body(carry):
            i, cache, logits, tokens, logps, done, lengths, rng = carry
            rng, step_rng = jax.random.split(rng)
            token, logp = sample_token(step_rng, logits, temperature, top_k, top_p)
            token = jnp.where(done, pad_id, token)
            logp = jnp.where(done, 0.0, logp)
            tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
            logps = jax.lax.dynamic_update_slice(logps, logp[:, None], (0, i))
            new_len = jnp.where(done, lengths, i + 1)
            ended = jnp.isin(token, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else jnp.zeros_like(done)
            for seq in stop_sequences:
                k = len(seq)
                start = jnp.maximum(i - k + 1, 0)
                tail = jax.lax.dynamic_slice(tokens, (0, start), (rows, k))
                hit = (i >= k - 1) & jnp.all(tail == jnp.asarray(seq, jnp.int32)[None], axis=1) & ~done
                new_len = jnp.where(hit, i + 1 - k, new_len)
                ended = ended | hit
            lengths = new_len
            done = done | ended
            with sharding.activation_sharding(mesh):
                positions = (prompt_len_r + i)[:, None]
                hidden, cache = models.cached_forward(config, params, token[:, None], positions, kv_mask_rs,
                                                      cache, p + i)
                logits = models.logits_from_hidden(config, params, hidden)[:, 0]
            return i + 1, cache, logits, tokens, logps, done, lengths, rng

        init = (
            jnp.int32(0), cache, logits_rv, jnp.full((rows, n), pad_id, jnp.int32), jnp.zeros((rows, n), jnp.float32),
            jnp.zeros((rows,), bool), jnp.zeros((rows,), jnp.int32), rng,
        )
        _, cache, _, tokens, logps, _, lengths, _ = jax.lax.while_loop(cond, body, init)
        # Clear stop-sequence tokens past each row's kept length.
        keep = jnp.arange(n)[None, :] < lengths[:, None]
        # The cache is returned so its donated buffer is updated in place by the loop.
        return jnp.where(keep, tokens, pad_id), jnp.where(keep, logps, 0.0), lengths, cache

    return jax.jit(decode, donate_argnums=(1,))


def generate(
    config: models.LlamaConfig,
    params: Any,
    prompt_ids: Any,
    prompt_mask: Any,
    rng: jax.Array,
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_sequences: Sequence[Sequence[int]] = (),
    mesh: jax.sharding.Mesh | None = None,
) -> SampleOutput:
    """Samples `num_samples` continuations of each left-padded prompt [B, P].

    With a `mesh`, prompts are sharded over the batch axes and the cache as the rules table says
    (batch over data/fsdp, KV heads over tensor); `params` should already be placed on it.
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    if mesh is not None:
        prompt_ids = jax.device_put(prompt_ids, sharding.batch_sharding(mesh, 2))
        prompt_mask = jax.device_put(prompt_mask, sharding.batch_sharding(mesh, 2))
    eos = () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    stops = tuple(tuple(int(t) for t in s) for s in stop_sequences if len(s))
    b = prompt_ids.shape[0]
    cache, logits, kv_mask = _prefill_fn(config, num_samples, max_new_tokens, mesh)(params, prompt_ids, prompt_mask)
    prompt_len = jnp.repeat(jnp.sum(prompt_mask, axis=1), num_samples)
    decode = _decode_fn(config, max_new_tokens, float(temperature), int(top_k), float(top_p), eos, stops,
                        int(config.pad_token_id or 0), mesh)
    tokens, logps, lengths, _ = decode(params, cache, logits, kv_mask, prompt_len, rng)
    n = max_new_tokens
    return SampleOutput(tokens.reshape(b, num_samples, n), lengths.reshape(b, num_samples),
                        logps.reshape(b, num_samples, n))


# ------------------------------------------------------------------------------------------
# Best-of-S.


def pack_for_reward(
    prompt_ids: jax.Array, prompt_mask: jax.Array, tokens: jax.Array, lengths: jax.Array,
    *, eos_token_id: int | None, pad_id: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """RM inputs [B*S, P+N+1], RIGHT-padded: the prompt's real tokens, the sample, and EOS when
    the sample did not end with one (the RM reads its reward at the last real token)."""
    b, s, n = tokens.shape
    p = prompt_ids.shape[1]
    plen = jnp.sum(prompt_mask, axis=1)  # [B]
    ids_r = jnp.repeat(prompt_ids, s, 0)
    plen_r = jnp.repeat(plen, s)
    tok_rn = tokens.reshape(b * s, n)
    len_r = lengths.reshape(b * s)
    last = jnp.take_along_axis(tok_rn, jnp.maximum(len_r - 1, 0)[:, None], axis=1)[:, 0]
    add_eos = (eos_token_id is not None) & ((len_r == 0) | (last != (eos_token_id if eos_token_id is not None else -1)))
    total = plen_r + len_r + add_eos.astype(jnp.int32)
    j = jnp.arange(p + n + 1)[None, :]
    from_prompt = jnp.take_along_axis(ids_r, jnp.clip(p - plen_r[:, None] + j, 0, p - 1), axis=1)
    from_sample = jnp.take_along_axis(tok_rn, jnp.clip(j - plen_r[:, None], 0, n - 1), axis=1)
    ids = jnp.where(j < plen_r[:, None], from_prompt, from_sample)
    ids = jnp.where(add_eos[:, None] & (j == (plen_r + len_r)[:, None]), eos_token_id or 0, ids)
    mask = (j < total[:, None]).astype(jnp.int32)
    return jnp.where(mask == 1, ids, pad_id), mask


class BestOfS(NamedTuple):
    best_index: jax.Array  # int32 [B]
    scores: jax.Array  # float32 [B, S]
    best_tokens: jax.Array  # int32 [B, N]
    best_lengths: jax.Array  # int32 [B]


def best_of_s(
    rm_config: models.LlamaConfig, rm_params: Any, prompt_ids: Any, prompt_mask: Any, samples: SampleOutput,
    *, eos_token_id: int | None,
) -> BestOfS:
    """Scores all B*S samples with the RM and picks each prompt's argmax, all on device."""
    return _best_of_s_jit(rm_config, eos_token_id)(rm_params, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask),
                                                   samples.tokens, samples.lengths)


@functools.lru_cache(maxsize=16)
def _best_of_s_jit(rm_config: models.LlamaConfig, eos_token_id: int | None):
    def run(rm_params, prompt_ids, prompt_mask, tokens, lengths):
        COMPILES["score"] += 1
        b, s, _ = tokens.shape
        ids, mask = pack_for_reward(prompt_ids, prompt_mask, tokens, lengths, eos_token_id=eos_token_id,
                                    pad_id=int(rm_config.pad_token_id or 0))
        scores = models.rewards(rm_config, rm_params, ids, mask).reshape(b, s)
        best = jnp.argmax(scores, axis=1).astype(jnp.int32)
        pick = lambda x: jnp.take_along_axis(x, best.reshape((b, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]  # noqa: E731
        return BestOfS(best, scores, pick(tokens), pick(lengths))

    return jax.jit(run)


# ------------------------------------------------------------------------------------------
# A whole query set.


def sample_dataset(
    config: models.LlamaConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    rng: jax.Array,
    *,
    batch_size: int,
    buckets: Sequence[int],
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_sequences: Sequence[Sequence[int]] = (),
    mesh: jax.sharding.Mesh | None = None,
    on_batch: Callable[[list[int], SampleOutput], None] | None = None,
    progress: bool = True,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Samples every prompt (token ids, already truncated); returns per prompt (tokens [S, N],
    lengths [S]) in the input order.

    Prompts are grouped by length bucket and run in fixed-size batches (the last batch of a
    bucket padded with dummy rows), so the number of compiles is at most 2 x buckets used.
    Batch i of the run uses `fold_in(rng, i)`, so results do not depend on what ran before.
    """
    order = sorted(range(len(prompts)), key=lambda i: (bucket_length(len(prompts[i]), buckets), i))
    results: list[Any] = [None] * len(prompts)
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and bucket_length(len(prompts[batches[-1][0]]), buckets) == \
                bucket_length(len(prompts[i]), buckets):
            batches[-1].append(i)
        else:
            batches.append([i])
    pad_id = int(config.pad_token_id or 0)
    bar = tqdm(total=len(prompts), desc="sampling", disable=not progress, leave=False)
    for k, rows in enumerate(batches):
        width = bucket_length(max(len(prompts[i]) for i in rows), buckets)
        ids = np.full((batch_size, width), pad_id, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(rows + [rows[0]] * (batch_size - len(rows))):
            seq = prompts[i]
            ids[r, width - len(seq):] = seq
            mask[r, width - len(seq):] = 1
        out = generate(config, params, ids, mask, jax.random.fold_in(rng, k), num_samples=num_samples,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       eos_token_id=eos_token_id, stop_sequences=stop_sequences, mesh=mesh)
        if on_batch is not None:
            on_batch(rows, out)
        tokens, lengths = jax.device_get((out.tokens, out.lengths))
        for r, i in enumerate(rows):
            results[i] = (tokens[r], lengths[r])
        bar.update(len(rows))
    bar.close()
    return results
