"""KV-cache sampling for best-of-S: prefill each prompt once, tile its cache S times, decode.

`generate` runs two jitted programs: `prefill` ([B, P] left-padded prompts -> a KV cache tiled to
[L, B*S, P+N, K, h] and the next-token logits) and `decode` (a `lax.while_loop` that samples one
token per step for all B*S rows, stops early once every row is done, and donates the cache).
Temperature, top-k and top-p are applied in float32. EOS ends a row (the EOS is kept and
counted); a stop ends a row and is cut off (as the official APO code cuts samples at the first
"\\nHuman"). Stop strings are found on each row's decoded text, so every tokenisation of one
counts: the decode loop then runs in chunks of `stop_check_every` steps, and between chunks the
host decodes a small window of each running row's last tokens (`stop_cuts`). A stop string whose
own token ids decode back to it is also matched on device at every step (the fast path).

`logprobs` are the log-probabilities of the sampled tokens under the *sampling* distribution
(after temperature, top-k and top-p); for greedy decoding (temperature 0) under the model.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from apo_jax import compiled, models, sharding
from apo_jax.data.tokenize import bucket_length, pad_left

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


SAMPLE_BLOCK = 256
"""Vocabulary entries per block of `categorical`'s first draw."""


def categorical(rng: jax.Array, logits_bv: jax.Array, block: int = SAMPLE_BLOCK) -> jax.Array:
    """One draw per row from softmax(logits_bv), in two exact stages: a block of `block` entries
    with probability its mass (logsumexp of its logits), then an entry of that block with
    probability its share of the block. P(token) = (m_b / M)(p_t / m_b) = p_t / M, as with
    `jax.random.categorical` over the whole row, but from V / block + block Gumbel draws per row
    instead of V: at SmolLM2's 49,152 entries, 448 instead of 49,152, and on a 2-vCPU Xeon
    2-3 ms instead of 13 ms for 16 rows (most of it generating and transforming the random bits),
    a tenth of a decode step. Entries at -inf (filtered) are never drawn; the vocabulary is padded
    with -inf to whole blocks."""
    b, v = logits_bv.shape
    blocks = -(-v // block)
    x_bv = jnp.pad(logits_bv, ((0, 0), (0, blocks * block - v)), constant_values=-jnp.inf)
    x_bnk = x_bv.reshape(b, blocks, block)
    block_rng, entry_rng = jax.random.split(rng)
    chosen_b = jax.random.categorical(block_rng, jax.nn.logsumexp(x_bnk, axis=-1), axis=-1)
    inside_bk = jnp.take_along_axis(x_bnk, chosen_b[:, None, None], axis=1)[:, 0]
    return chosen_b * block + jax.random.categorical(entry_rng, inside_bk, axis=-1)


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
        token = categorical(rng, filtered)
        logp = jax.nn.log_softmax(filtered, axis=-1)
    return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


# ------------------------------------------------------------------------------------------
# Prefill and decode.


@compiled.cached("prefill")
def _prefill_fn(config: models.ModelConfig, num_samples: int, max_new_tokens: int, mesh: Any):
    def prefill(params, prompt_ids_bp, prompt_mask_bp):
        compiled.count("prefill")
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


class _DecodeState(NamedTuple):
    """The decode loop's carry (rows R = B*S, N new tokens)."""

    i: jax.Array  # int32 []: the next step
    logits: jax.Array  # float32 [R, V]: next-token logits
    tokens: jax.Array  # int32 [R, N]
    logps: jax.Array  # float32 [R, N]
    done: jax.Array  # bool [R]
    lengths: jax.Array  # int32 [R]: tokens kept so far
    rng: jax.Array


def _decode_steps(config: models.ModelConfig, n: int, temperature: float, top_k: int, top_p: float,
                  eos_ids: tuple[int, ...], stop_sequences: tuple[tuple[int, ...], ...], pad_id: int, mesh: Any):
    """A traced function running decode steps from `state.i` until step `end` or every row is done."""

    def run(params, cache, state: _DecodeState, kv_mask_rs, prompt_len_r, end):
        rows = state.logits.shape[0]
        p = kv_mask_rs.shape[1] - n

        def cond(carry):
            st, _ = carry
            return (st.i < end) & ~jnp.all(st.done)

        def body(carry):
            (i, logits, tokens, logps, done, lengths, rng), cache = carry
            rng, step_rng = jax.random.split(rng)
            token, logp = sample_token(step_rng, logits, temperature, top_k, top_p)
            token = jnp.where(done, pad_id, token)
            logp = jnp.where(done, 0.0, logp)
            tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
            logps = jax.lax.dynamic_update_slice(logps, logp[:, None], (0, i))
            new_len = jnp.where(done, lengths, i + 1)
            ended = jnp.isin(token, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else jnp.zeros_like(done)
            # The token-id fast path: a stop sequence's own token ids end the row at once.
            for seq in stop_sequences:
                k = len(seq)
                start = jnp.maximum(i - k + 1, 0)
                tail = jax.lax.dynamic_slice(tokens, (0, start), (rows, k))
                hit = (i >= k - 1) & jnp.all(tail == jnp.asarray(seq, jnp.int32)[None], axis=1) & ~done
                new_len = jnp.where(hit, i + 1 - k, new_len)
                ended = ended | hit
            done = done | ended
            with sharding.activation_sharding(mesh):
                positions = (prompt_len_r + i)[:, None]
                hidden, cache = models.cached_forward(config, params, token[:, None], positions, kv_mask_rs,
                                                      cache, p + i)
                logits = models.logits_from_hidden(config, params, hidden)[:, 0]
            return _DecodeState(i + 1, logits, tokens, logps, done, new_len, rng), cache

        return jax.lax.while_loop(cond, body, (state, cache))

    return run


def _initial_state(logits_rv: jax.Array, rng: jax.Array, n: int, pad_id: int) -> _DecodeState:
    rows = logits_rv.shape[0]
    return _DecodeState(jnp.int32(0), logits_rv, jnp.full((rows, n), pad_id, jnp.int32),
                        jnp.zeros((rows, n), jnp.float32), jnp.zeros((rows,), bool), jnp.zeros((rows,), jnp.int32),
                        rng)


def _finish_with_cuts(state: _DecodeState, cut_r: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    cut = cut_r >= 0
    return _finish(state._replace(lengths=jnp.where(cut, cut_r, state.lengths)), pad_id)


def _finish(state: _DecodeState, pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Tokens and log-probs past each row's kept length cleared (stop tokens, and what a row decoded
    after a stop string that was found on the host)."""
    n = state.tokens.shape[1]
    keep = jnp.arange(n)[None, :] < state.lengths[:, None]
    return jnp.where(keep, state.tokens, pad_id), jnp.where(keep, state.logps, 0.0), state.lengths


_initial_state_jit = jax.jit(_initial_state, static_argnums=(2, 3))
_finish_with_cuts_jit = jax.jit(_finish_with_cuts, static_argnums=(2,))


@compiled.cached("decode")
def _decode_fn(
    config: models.ModelConfig,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_ids: tuple[int, ...],
    stop_sequences: tuple[tuple[int, ...], ...],
    pad_id: int,
    mesh: Any,
):
    """The whole decode in one program (no stop strings to check on the host)."""
    n = max_new_tokens
    steps = _decode_steps(config, n, temperature, top_k, top_p, eos_ids, stop_sequences, pad_id, mesh)

    def decode(params, cache, logits_rv, kv_mask_rs, prompt_len_r, rng):
        compiled.count("decode")
        state, cache = steps(params, cache, _initial_state(logits_rv, rng, n, pad_id), kv_mask_rs, prompt_len_r, n)
        # The cache is returned so its donated buffer is updated in place by the loop.
        return (*_finish(state, pad_id), cache)

    return jax.jit(decode, donate_argnums=(1,))


@compiled.cached("decode")
def _decode_chunk_fn(
    config: models.ModelConfig,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_ids: tuple[int, ...],
    stop_sequences: tuple[tuple[int, ...], ...],
    pad_id: int,
    mesh: Any,
    window: int,
):
    """Decode steps up to `end`, after applying the host's stop-string cuts; returns the new state,
    the cache, and the last `window` token columns (replicated: every process checks the same text)."""
    n = max_new_tokens
    steps = _decode_steps(config, n, temperature, top_k, top_p, eos_ids, stop_sequences, pad_id, mesh)

    def chunk(params, cache, state: _DecodeState, kv_mask_rs, prompt_len_r, end, cut_r):
        compiled.count("decode")
        cut = cut_r >= 0
        state = state._replace(done=state.done | cut, lengths=jnp.where(cut, cut_r, state.lengths))
        state, cache = steps(params, cache, state, kv_mask_rs, prompt_len_r, end)
        start = jnp.clip(state.i - window, 0, n - window)
        win = jax.lax.dynamic_slice(state.tokens, (0, start), (state.tokens.shape[0], window))
        host = (state.i, state.done, state.lengths, win, start)
        if mesh is not None:
            host = jax.lax.with_sharding_constraint(host, NamedSharding(mesh, P()))
        return state, cache, host

    return jax.jit(chunk, donate_argnums=(1,))


def stop_cuts(tokenizer: Any, window_rw: np.ndarray, start: int, lengths_r: np.ndarray, check_r: np.ndarray,
              stop_strings: Sequence[str]) -> np.ndarray:
    """Where each checked row's text first holds a stop string: the number of tokens to keep, or -1.

    window_rw: int [R, W], generated tokens start..start+W of each row; lengths_r: tokens each row
    keeps so far; check_r: bool [R], the rows to look at. A row keeps every token that starts before
    the stop string, so a stop beginning at a token boundary is cut off whole (like the token-id
    path), and one beginning inside a token keeps that token (the text is cut by
    `data.tokenize.decode_response`). Text is decoded as `decode_response` decodes it (special
    tokens skipped), so any tokenisation of a stop string is found.
    """
    cuts = np.full(window_rw.shape[0], -1, np.int32)

    def text(ids: Any) -> str:
        return tokenizer.decode([int(t) for t in ids], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    for r in np.flatnonzero(check_r):
        ids = window_rw[r, : max(int(lengths_r[r]) - start, 0)]
        found = [k for k in (text(ids).find(s) for s in stop_strings) if k >= 0]
        if not found:
            continue
        pos = min(found)
        keep = next(j for j in range(len(ids) + 1) if len(text(ids[:j])) >= pos)
        cuts[r] = start + keep
    return cuts


def _window_tokens(stop_strings: Sequence[str], every: int, n: int) -> int:
    """Token columns the host must see after a chunk of `every` steps: the chunk plus enough earlier
    tokens to hold a stop string that began before it (a character takes at most 4 byte tokens)."""
    return min(n, every + 4 * max(len(s) for s in stop_strings) + 1)


def generate(
    config: models.ModelConfig,
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
    stop_strings: Sequence[str] = (),
    tokenizer: Any = None,
    stop_check_every: int = 16,
    mesh: jax.sharding.Mesh | None = None,
) -> SampleOutput:
    """Samples `num_samples` continuations of each left-padded prompt [B, P].

    Stops: `stop_sequences` are token-id sequences matched on device at every step. `stop_strings`
    (with the `tokenizer` that decodes the samples) are matched on each row's decoded text every
    `stop_check_every` steps, so any tokenisation of a stop string ends the row (e.g. "\\nHuman"
    generated as "\\n\\n" + "Human"); where a stop string's own encoding decodes back to exactly
    that string, its ids are also matched on device, which ends the row without waiting for the
    check. A row may decode up to `stop_check_every` - 1 tokens past a stop found only on the host;
    they are dropped. With a `mesh`, prompts are sharded over the batch axes and the cache as the
    rules table says (batch over data/fsdp, KV heads over tensor); `params` should already be placed
    on it.
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    if mesh is not None:
        prompt_ids = jax.device_put(prompt_ids, sharding.batch_sharding(mesh, 2))
        prompt_mask = jax.device_put(prompt_mask, sharding.batch_sharding(mesh, 2))
    eos = () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    stop_strings = tuple(s for s in stop_strings if s)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer that decodes the samples (tokenizer=...)")
    if stop_check_every < 1:
        raise ValueError(f"stop_check_every={stop_check_every}; expected >= 1")
    stops = [tuple(int(t) for t in s) for s in stop_sequences if len(s)]
    for s in stop_strings:
        ids = tuple(int(t) for t in tokenizer.encode(s, add_special_tokens=False))
        exact = tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False) == s
        if ids and exact and ids not in stops:  # e.g. SentencePiece's "\\nHuman" -> "▁", "\\n", ... is not
            stops.append(ids)
    b = prompt_ids.shape[0]
    n = max_new_tokens
    pad_id = int(config.pad_token_id or 0)
    cache, logits, kv_mask = _prefill_fn(config, num_samples, n, mesh)(params, prompt_ids, prompt_mask)
    prompt_len = jnp.repeat(jnp.sum(prompt_mask, axis=1), num_samples)
    args = (config, n, float(temperature), int(top_k), float(top_p), eos, tuple(stops), pad_id, mesh)
    if not stop_strings:
        tokens, logps, lengths, _ = _decode_fn(*args)(params, cache, logits, kv_mask, prompt_len, rng)
    else:
        window = _window_tokens(stop_strings, stop_check_every, n)
        chunk = _decode_chunk_fn(*args, window)
        state = _initial_state_jit(logits, rng, n, pad_id)
        rows = b * num_samples
        cut = np.full(rows, -1, np.int32)
        done = np.zeros(rows, bool)
        step = 0
        while True:
            end = min(step + stop_check_every, n)
            state, cache, host = chunk(params, cache, state, kv_mask, prompt_len, np.int32(end), cut)
            step, now_done, lengths_r, win, start = jax.device_get(host)
            # Rows still running at the chunk's start, including those EOS or a stop id ended in it.
            cut = stop_cuts(tokenizer, np.asarray(win), int(start), np.asarray(lengths_r), ~done, stop_strings)
            done = np.asarray(now_done) | (cut >= 0)
            if int(step) >= n or done.all():
                break
        tokens, logps, lengths = _finish_with_cuts_jit(state, cut, pad_id)
    return SampleOutput(tokens.reshape(b, num_samples, n), lengths.reshape(b, num_samples),
                        logps.reshape(b, num_samples, n))


# ------------------------------------------------------------------------------------------
# A whole query set.


def sample_batches(
    config: models.ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    rng: jax.Array,
    *,
    batch_size: int,
    buckets: Sequence[int],
    start: int = 0,
    pad_id: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    **generate_kwargs: Any,
) -> Iterator[tuple[int, list[int], np.ndarray, np.ndarray]]:
    """Samples a query set (token ids, already truncated) in input-order batches of `batch_size`.

    Yields `(b, indices, tokens [n, S, N], lengths [n, S])` on the host for batches b = `start`,
    `start` + 1, ...: batch b holds prompts b*batch_size ... and samples with `fold_in(rng, b)`, so
    a run resumed at batch `start` gives the samples the whole run would have. Each batch is
    left-padded to the length bucket of its longest prompt (the last one filled with copies of its
    first prompt, whose samples are dropped), so there are at most two compiles per bucket used.
    `generate_kwargs` are `generate`'s (num_samples, max_new_tokens, temperature, stops, ...).
    """
    pad = int(config.pad_token_id or 0) if pad_id is None else int(pad_id)
    for b in range(start, -(-len(prompts) // batch_size)):
        indices = list(range(b * batch_size, min((b + 1) * batch_size, len(prompts))))
        rows = [np.asarray(prompts[i], np.int32) for i in indices]
        rows += [rows[0]] * (batch_size - len(rows))
        ids, mask = pad_left(rows, bucket_length(max(len(r) for r in rows), buckets), batch_size, pad)
        out = generate(config, params, ids, mask, jax.random.fold_in(rng, b), mesh=mesh, **generate_kwargs)
        tokens, lengths = sharding.to_host(out.tokens), sharding.to_host(out.lengths)
        yield b, indices, tokens[:len(indices)], lengths[:len(indices)]


def sample_dataset(config: models.ModelConfig, params: Any, prompts: Sequence[Sequence[int]], rng: jax.Array, *,
                   progress: bool = True, **kwargs: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """`sample_batches` collected: per prompt (tokens [S, N], lengths [S]) in the input order."""
    results: list[Any] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="sampling", disable=not progress, leave=False) as bar:
        for _, indices, tokens, lengths in sample_batches(config, params, prompts, rng, **kwargs):
            for r, i in enumerate(indices):
                results[i] = (tokens[r], lengths[r])
            bar.update(len(indices))
    return results
