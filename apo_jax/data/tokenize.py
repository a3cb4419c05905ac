"""Tokenisation for the RM, SFT and the sampler, with any `transformers` tokenizer.

Texts are encoded as one string, `prompt + " " + response` (HH prompts end in "Assistant:"), so
the tokenizer sees exactly what a model sees at inference; the response's tokens are found from
the tokenizer's own character offsets, not by encoding the two parts apart (which changes
SentencePiece's leading-space tokens). Over-long examples lose tokens from the *left* of the
prompt, after the leading special tokens (BOS), so the end of the response, where the reward is
read and the SFT loss matters most, is never cut.

Shapes are fixed: rows are padded to a length bucket (the smallest of `buckets` that fits the
longest row of the *global* batch), so a phase compiles once per bucket it uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenised example: ids [T] (special tokens included) and a response mask [T]."""

    ids: np.ndarray
    response_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def load_tokenizer(path_or_hub_id: str) -> Any:
    """A `transformers` tokenizer from a local directory or a hub id, with a pad token.

    LLaMA tokenizers ship without a pad token; pad = unk (or 0) keeps the pad distinct from EOS,
    which matters because rewards are read at the last non-pad position (TRL #937).
    """
    import transformers

    from apo_jax import hf

    directory = hf.resolve_checkpoint_dir(path_or_hub_id)
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{path_or_hub_id}: a fast tokenizer (tokenizer.json) is required for offsets")
    if tok.pad_token_id is None:
        if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.pad_token_id = 0
    return tok


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (ValueError if none)."""
    for b in buckets:
        if n <= b:
            return int(b)
    raise ValueError(f"a row of {n} tokens exceeds the largest length bucket {buckets[-1]}")


def _special_prefix(offsets: Sequence[tuple[int, int]]) -> int:
    """How many leading tokens are special (zero-width, e.g. BOS)."""
    n = 0
    for start, end in offsets:
        if start == end == 0:
            n += 1
        else:
            break
    return n


def encode_responses(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_len: int, *, append_eos: bool
) -> list[Encoded]:
    """`[BOS] prompt response [EOS]` for each (prompt, response), left-truncated to `max_len`.

    The response mask covers the response's tokens and the appended EOS (what SFT learns).
    """
    texts = [f"{p} {r}" if r else p for p, r in pairs]
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    out = []
    for (prompt, _), ids, offsets in zip(pairs, enc["input_ids"], enc["offset_mapping"]):
        ids = np.asarray(ids, np.int32)
        n_special = _special_prefix(offsets)
        # A token belongs to the response if any of its characters lies after the prompt.
        resp = np.asarray([end > len(prompt) for _, end in offsets], bool)
        resp[:n_special] = False
        if append_eos and eos is not None:
            ids = np.append(ids, np.int32(eos))
            resp = np.append(resp, True)
        if len(ids) > max_len:
            keep = max_len - n_special
            if keep <= 0:
                raise ValueError(f"max_len {max_len} leaves no room after {n_special} special tokens")
            ids = np.concatenate([ids[:n_special], ids[-keep:]])
            resp = np.concatenate([resp[:n_special], resp[-keep:]])
        out.append(Encoded(ids, resp.astype(np.int32)))
    return out


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_len: int) -> list[np.ndarray]:
    """`[BOS] prompt` token ids, left-truncated to `max_len` (BOS kept)."""
    enc = tokenizer(list(prompts), add_special_tokens=True, return_offsets_mapping=True)
    out = []
    for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"]):
        ids = np.asarray(ids, np.int32)
        if len(ids) > max_len:
            n_special = _special_prefix(offsets)
            ids = np.concatenate([ids[:n_special], ids[len(ids) - (max_len - n_special):]])
        out.append(ids)
    return out


def pad_right(rows: Sequence[np.ndarray], width: int, num_rows: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[num_rows, width] ids and mask, rows right-padded; rows past len(rows) are all padding."""
    ids = np.full((num_rows, width), pad_id, np.int32)
    mask = np.zeros((num_rows, width), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def pad_left(rows: Sequence[np.ndarray], width: int, num_rows: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[num_rows, width] ids and mask, rows left-padded (the sampler's prompt layout)."""
    ids = np.full((num_rows, width), pad_id, np.int32)
    mask = np.zeros((num_rows, width), np.int32)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
    return ids, mask


def decode_response(tokenizer: Any, tokens: Sequence[int], stop_strings: Sequence[str] = ()) -> str:
    """A sampled response's text: special tokens dropped, cut at the first stop string, stripped."""
    text = tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True)
    for stop in stop_strings:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    return text.strip()
