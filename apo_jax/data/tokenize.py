"""Tokenisation for the RM, SFT and the sampler, with any `transformers` tokenizer.

Texts are encoded as one string, `prompt + " " + response` (HH prompts end in "Assistant:"), so
the tokenizer sees exactly what a model sees at inference; the response's tokens are found from
the tokenizer's own character offsets, not by encoding the two parts apart (which changes
SentencePiece's leading-space tokens). Over-long examples lose tokens from the *left* of the
prompt, after the leading special tokens (BOS), so the end of the response, where the reward is
read and the SFT loss matters most, is never cut.

Prompt formats (`data.prompt_format`), applied alike to sampling, scoring, SFT and RM training:
- "hh" (the paper's): the HH transcript as is, `"\n\nHuman: ... \n\nAssistant:"`, the response
  after one space, the tokenizer's own special tokens (BOS) added.
- "chat_template": the transcript converted to messages (Human -> user, Assistant -> assistant)
  and rendered by the tokenizer's chat template, with the generation prompt for prompts and the
  assistant turn for responses; the template writes its own special tokens, so none are added.
  SFT examples end with the turn's end-of-turn token (+ EOS when that is not it); an RM scores the
  text the policy was prompted with plus its answer, up to the answer's last token
  (data.reward_position = "last_token") or with the end-of-turn and EOS ("eos").

Shapes are fixed: rows are padded to a length bucket (the smallest of `buckets` that fits the
longest row of the *global* batch), so a phase compiles once per bucket it uses.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np


PROMPT_FORMATS = ("hh", "chat_template")
_TURN = re.compile(r"\n\n(Human|Assistant|System):")
_ROLE = {"Human": "user", "Assistant": "assistant", "System": "system"}


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

    from apo_jax.io import hf

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


def hh_to_messages(prompt: str) -> list[dict[str, str]]:
    """An HH prompt `"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"` as chat messages
    [user a, assistant b, user c] (the final empty Assistant turn is the generation prompt).
    A "\n\nSystem:" turn (a conversation's system message, `preference.messages_to_prompt`) is a
    system message.

    Text before the first marker, if any, is kept at the start of the first user turn.
    """
    parts = _TURN.split(prompt)
    head, rest = parts[0].strip(), parts[1:]
    messages: list[dict[str, str]] = []
    for role, text in zip(rest[0::2], rest[1::2]):
        messages.append({"role": _ROLE[role], "content": text.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if head:
        if messages and messages[0]["role"] == "user":
            messages[0]["content"] = (head + "\n\n" + messages[0]["content"]).strip()
        else:
            messages.insert(0, {"role": "user", "content": head})
    if not messages:
        raise ValueError(f"prompt {prompt[:60]!r}: no '\\n\\nHuman:' turn to convert to chat messages")
    return messages


def check_prompt_format(tokenizer: Any, prompt_format: str) -> None:
    """ValueError (naming `data.prompt_format`) when the format is unknown or the tokenizer lacks a template."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"data.prompt_format: {prompt_format!r}; expected one of {PROMPT_FORMATS}")
    if prompt_format == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"data.prompt_format: 'chat_template' but the tokenizer "
                         f"{getattr(tokenizer, 'name_or_path', '')!r} has no chat template; use 'hh'")


def format_prompt(tokenizer: Any, prompt: str, prompt_format: str = "hh") -> str:
    """The text a policy is prompted with for an HH prompt under `prompt_format`."""
    if prompt_format == "hh":
        return prompt
    check_prompt_format(tokenizer, prompt_format)
    return tokenizer.apply_chat_template(hh_to_messages(prompt), tokenize=False, add_generation_prompt=True)


def format_example(tokenizer: Any, prompt: str, response: str, prompt_format: str = "hh",
                   end_of_turn: bool = True) -> tuple[str, str]:
    """(prompt text, response text) whose concatenation is the whole example under `prompt_format`.

    "hh": the response after one space. "chat_template": the rendered assistant turn; with
    `end_of_turn` up to and including the template's end-of-turn token (what SFT learns, so the
    policy learns to stop), without it up to the content's last character (RM inputs read at the
    last response token: the end-of-turn is often the pad id too, e.g. SmolLM2's <|im_end|> = 2,
    and `transformers` pools the last non-pad token).
    """
    if prompt_format == "hh":
        return prompt, (" " + response if response else "")
    head = format_prompt(tokenizer, prompt, prompt_format)
    full = tokenizer.apply_chat_template(hh_to_messages(prompt) + [{"role": "assistant", "content": response}],
                                         tokenize=False)
    if not full.startswith(head):
        raise ValueError("data.prompt_format: the tokenizer's chat template renders an assistant turn that does not "
                         "extend its generation prompt; use 'hh'")
    tail = full[len(head):].rstrip()
    at = tail.find(response)
    if not end_of_turn and response and at >= 0:
        tail = tail[: at + len(response)]
    return head, tail


def _keep_left(ids: np.ndarray, offsets: Sequence[tuple[int, int]], tokenizer: Any, prompt_format: str) -> int:
    """How many leading tokens left truncation must keep: the added special tokens (BOS) under "hh";
    the BOS the template wrote, if it did, under "chat_template"."""
    if prompt_format == "hh":
        return _special_prefix(offsets)
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(len(ids) > 0 and bos is not None and int(ids[0]) == bos)


def encode_responses(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_len: int, *, append_eos: bool, prompt_format: str = "hh"
) -> list[Encoded]:
    """`[BOS] prompt response [EOS]` for each (prompt, response), left-truncated to `max_len`.

    Prompts are HH prompts, formatted by `prompt_format` (see the module docstring). The response
    mask covers the response's tokens and the appended EOS (what SFT learns). Under
    "chat_template", `append_eos` also decides whether the turn's end-of-turn token is included,
    and EOS is not appended again when the turn already ends in it.
    """
    formatted = [format_example(tokenizer, p, r, prompt_format, end_of_turn=append_eos) for p, r in pairs]
    texts = [head + tail for head, tail in formatted]
    enc = tokenizer(texts, add_special_tokens=prompt_format == "hh", return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    out = []
    for (head, _), ids, offsets in zip(formatted, enc["input_ids"], enc["offset_mapping"]):
        ids = np.asarray(ids, np.int32)
        n_special = _keep_left(ids, offsets, tokenizer, prompt_format)
        # A token belongs to the response if any of its characters lies after the prompt.
        resp = np.asarray([end > len(head) for _, end in offsets], bool)
        resp[:n_special] = False
        if append_eos and eos is not None and not (len(ids) and resp[-1] and ids[-1] == eos):
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


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_len: int, prompt_format: str = "hh") -> list[np.ndarray]:
    """`[BOS] prompt` token ids (HH prompts formatted by `prompt_format`), left-truncated to
    `max_len` (BOS kept)."""
    texts = [format_prompt(tokenizer, p, prompt_format) for p in prompts]
    enc = tokenizer(texts, add_special_tokens=prompt_format == "hh", return_offsets_mapping=True)
    out = []
    for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"]):
        ids = np.asarray(ids, np.int32)
        if len(ids) > max_len:
            n_special = _keep_left(ids, offsets, tokenizer, prompt_format)
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
