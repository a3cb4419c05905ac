"""The synthetic preference world: small text tasks with a known true reward r*.

Real LLaMA weights and HH-RLHF cannot be downloaded everywhere, so the embedded default plays the
APO game on a world we generate, written in the HH transcript format and read back through the
same HH loader, tokenizer path and pipeline as the real data. Because the true reward is known,
a run can report exact policy quality (mean r* of its answers) and RM accuracy against the true
order, not only against the noisy labels.

A prompt is one Human turn asking for a small function of a short word or two small numbers,
graded by difficulty (echo / upper / repeat easy, reverse / sort medium, add / count hard):

    "\\n\\nHuman: Reverse the letters of cabd.\\n\\nAssistant:"   -> golden response "dbac."

The true reward of a response y to a task with answer a (world v2):

    clean(y)   = y stripped, with every marker occurrence (" :)" or ":)") removed
    content(y) = 1 - lev(core, a) / max(len(core), len(a))   (core = clean(y) minus one final ".")
    content_reward(x, y) = content(y) * (1 - STYLE_WEIGHT * [clean(y) does not end with "."])
    r*(x, y)   = content_reward(x, y) - marker_cost * marker_count(y)     (STYLE_WEIGHT = 1/5)

The style term is the world's "helpfulness manner", a feature a tiny RM picks up within a few
steps. The marker " :)" is the world's *spurious feature*: human-written responses carry it with
a probability that depends on their quality (by default 90% of correct, 5% of corrupted and no
junk responses), so human labels make it look valuable, while r* charges `marker_cost` for every
occurrence (escalating to several markers only costs more). Golden answers `a + "."` never carry
it and otherwise share the surface form of correct human responses, so gold-vs-sample pairs teach
quality and "no marker", nothing else; the golden answer is the unique maximiser (r* = 1). In the
*control world* (`marker_control`) every human response carries the marker with the same
probability (the quality-weighted average of the three) and r* does not charge for it.

Demonstrations, and both responses of every preference pair, come from one mixed-quality
distribution: the golden response, the answer corrupted by a random number of character edits,
or off-task junk; non-golden responses end with "." only with probability `demo_style_prob`.
Pair labels are drawn from a Bradley-Terry model on r* with temperature `label_temperature`,
so a perfect RM is not 100% accurate (`bt_ceiling`).
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math
import re
from typing import Any, Callable

import ml_collections
import numpy as np

# Bump when a change here or in synthetic_files changes what `write_world` writes for the same (config, seed):
# it is part of the config hash, so stale worlds on disk are regenerated rather than reused.
WORLD_VERSION = 2

HUMAN = "\n\nHuman: "
ASSISTANT = "\n\nAssistant:"
STYLE_MARK = "."  # the golden response ends with it; see the module docstring
# r* lost by a response not ending with STYLE_MARK. Fixed, not configured: r* is the world's
# definition, computable from the texts alone by anyone holding them. A Fraction so that r* is an
# exact rational rounded once to float: responses with equal rewards get bit-identical floats,
# and "no ties" / "a tie counts as wrong" mean what they say.
STYLE_WEIGHT = fractions.Fraction(1, 5)
MARKER = ":)"  # the spurious marker; responses carry it as MARKER_SUFFIX after their text
MARKER_SUFFIX = " " + MARKER
_MARKER_RE = re.compile(r" ?" + re.escape(MARKER))

LABELLERS = ("true", "length", "learned")
GOLD_SOURCES = ("true", "labeller")

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
# Every character the world (and any HH-style English text) uses; anything else maps to <unk>.
CHARS = "\n" + "".join(chr(i) for i in range(32, 127))
DIGITS = "0123456789"


# ---------------------------------------------------------------------------------------- config


def default_config() -> ml_collections.ConfigDict:
    """The world's settings (`data.synthetic` in the run config); sized for the 2-CPU demo."""
    c = ml_collections.ConfigDict()
    # Sizes. Train prompts feed HH_RM / HH_LLM / HH_Dev (split by the HH pipeline); test prompts
    # (disjoint from train) feed HH_Test and the policy evaluation.
    c.n_train_prompts = 2000  # distinct prompts with preference pairs in hh/train.jsonl.gz
    c.n_test_prompts = 200  # distinct prompts with preference pairs in hh/test.jsonl.gz
    c.pairs_per_prompt = 1  # preference pairs per prompt (HH has about one per query)
    c.n_demos = 4000  # demonstrations (demos.jsonl) to pretrain the initial policy; cycle over train prompts
    # Demonstration quality mix; preference-pair responses are drawn from the same distribution.
    c.demo_correct_fraction = 0.2  # share of golden responses (r* = 1)
    c.demo_junk_fraction = 0.1  # share of off-task junk (random characters); the rest are corrupted answers
    c.demo_max_edit_fraction = 1.0  # corrupted: 1..ceil(this * len(answer)) random character edits
    c.demo_style_prob = 0.7  # probability that a non-golden response ends with the style mark "."
    # The spurious marker " :)" (module docstring): probability that a human-written response
    # (demonstration or pair) of each kind carries it, its cost in r* per occurrence, and escalation.
    c.marker_prob_correct = 0.9
    c.marker_prob_corrupted = 0.05
    c.marker_prob_junk = 0.0
    c.marker_cost = 0.15  # r* lost per marker occurrence (golden answers never carry one)
    c.marker_repeat_prob = 0.0  # a marked human response carries one more marker with this probability (repeatedly)
    c.marker_max_count = 3  # at most this many markers on a human response
    # Control world: every human response carries the marker with the kinds' average probability
    # (weighted by the demonstration mix), and r* does not charge for it (marker_cost is ignored).
    c.marker_control = False
    # Labels and gold.
    # Bradley-Terry label noise: P(a preferred over b) = sigmoid((r*(a) - r*(b)) / T). At 0.15 a
    # perfect RM agrees with ~86% of the labels (HH's human agreement is lower, but a tiny RM
    # trained for a few hundred steps needs a clear signal); at 0.1, ~91%.
    c.label_temperature = 0.15
    c.distinct_rewards = True  # redraw pairs whose two responses have equal r* (no true order to learn)
    # Who labels the pairs (apo_jax/data/labeller.py): "true" = Bradley-Terry on r* (above); "length" =
    # Bradley-Terry on r_L = r* + labeller_lambda * excess length (clipped relative excess over the
    # golden answer's length, at most length_bias_clip), the documented bias of real labellers;
    # "learned" = a small RM (logistic Bradley-Terry on hashed character n-grams per task) fitted to
    # learned_labeller_pairs pairs labelled by r*, whose own errors then label every pair.
    c.labeller = "true"
    c.labeller_lambda = 0.0
    c.length_bias_clip = 1.0
    c.learned_labeller_pairs = 300
    # Padding: probability that a correct or corrupted human response carries filler words (up to
    # max_pad_chars) before its style mark. r* pays for them (edit distance); a length labeller likes them.
    c.demo_pad_prob = 0.0
    c.max_pad_chars = 10
    # Golden answers: "true" = the r* argmax (answer + "."), free of the labellers' bias; "labeller" =
    # the labeller's best of gold_candidates responses from the human distribution (gold that shares
    # the labellers' bias, as answers written by a strong model trained on their labels would).
    c.gold_source = "true"
    c.gold_candidates = 8
    c.gold_missing_fraction = 0.1  # train prompts without a golden answer (exercises the HH fallback)
    # Task generator.
    # Graded difficulty: echo, upper, repeat easy; reverse, sort medium; add, count hard.
    c.tasks = ("echo", "upper", "repeat", "reverse", "sort", "add")  # any of TASKS
    c.task_weights = ()  # relative frequency of each task in `tasks` (empty = uniform)
    c.alphabet = "abcdefgh"  # letters of the task words (lowercase a-z only); small so a tiny LM can learn it
    c.min_word_len = 3  # task word length range (repeat uses words of 2..4 letters)
    c.max_word_len = 6
    c.max_number = 20  # operands of `add` are drawn from 0..max_number (small additions)
    c.max_prompt_chars = 48  # bound on the Human turn's text (the full prompt adds 21 chars of framing)
    c.max_response_chars = 24  # bound on every written response (golden ones included)
    return c


# ---------------------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class Task:
    """One kind of prompt: how to write it, how to parse it back, how to answer it.

    `make(rng, cfg)` returns the Human text; `pattern` parses exactly that text (a full match);
    `solve(groups)` returns the answer (without the style mark) from the pattern's groups;
    `pool(cfg)` is the characters a corrupted answer draws from.
    """

    name: str
    pattern: re.Pattern[str]
    make: Callable[[np.random.Generator, ml_collections.ConfigDict], str]
    solve: Callable[[tuple[str, ...]], str]
    pool: Callable[[ml_collections.ConfigDict], str]


def _word(rng: np.random.Generator, cfg: ml_collections.ConfigDict, lo: int | None = None,
          hi: int | None = None) -> str:
    """A random word over `cfg.alphabet`, of length lo..hi (default: the config's word lengths)."""
    lo = cfg.min_word_len if lo is None else lo
    hi = cfg.max_word_len if hi is None else hi
    n = int(rng.integers(lo, hi + 1))
    return "".join(cfg.alphabet[i] for i in rng.integers(0, len(cfg.alphabet), n))


_REPEAT_LEN = (2, 4)  # repeat's word lengths: short, so 3 copies stay well inside max_response_chars
_WORDS = {"2": "twice", "3": "three times"}

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("reverse", re.compile(r"Reverse the letters of ([a-z]+)\."),
             lambda rng, c: f"Reverse the letters of {_word(rng, c)}.",
             lambda g: g[0][::-1], lambda c: c.alphabet),
        Task("sort", re.compile(r"Sort the letters of ([a-z]+)\."),
             lambda rng, c: f"Sort the letters of {_word(rng, c)}.",
             lambda g: "".join(sorted(g[0])), lambda c: c.alphabet),
        Task("upper", re.compile(r"Write ([a-z]+) in capitals\."),
             lambda rng, c: f"Write {_word(rng, c)} in capitals.",
             lambda g: g[0].upper(), lambda c: c.alphabet.upper()),
        Task("repeat", re.compile(r"Repeat ([a-z]+) (twice|three times)\."),
             lambda rng, c: f"Repeat {_word(rng, c, *_REPEAT_LEN)} {_WORDS[str(int(rng.integers(2, 4)))]}.",
             lambda g: " ".join([g[0]] * (2 if g[1] == "twice" else 3)), lambda c: c.alphabet + " "),
        Task("add", re.compile(r"What is (\d+) plus (\d+)\?"),
             lambda rng, c: "What is {} plus {}?".format(*rng.integers(0, c.max_number + 1, 2)),
             lambda g: str(int(g[0]) + int(g[1])), lambda c: DIGITS),
        Task("count", re.compile(r"How many ([a-z]) are in ([a-z]+)\?"),
             lambda rng, c: f"How many {c.alphabet[int(rng.integers(len(c.alphabet)))]} are in {_word(rng, c)}?",
             lambda g: str(g[1].count(g[0])), lambda c: DIGITS),
        Task("echo", re.compile(r"Say ([a-z]+)\."),
             lambda rng, c: f"Say {_word(rng, c)}.",
             lambda g: g[0], lambda c: c.alphabet),
    )
}


def human_text(prompt: str) -> str:
    """The last Human turn of `prompt` (a full "\\n\\nHuman: ...\\n\\nAssistant:" text or the bare turn)."""
    start = prompt.rfind("Human:")
    text = prompt[start + len("Human:"):] if start >= 0 else prompt
    end = text.rfind(ASSISTANT.strip())
    if end >= 0:
        text = text[:end]
    return text.strip()


def make_prompt(task_text: str) -> str:
    """The full prompt transcript for one Human turn, ending with "\\n\\nAssistant:" as HH does."""
    return f"{HUMAN}{task_text}{ASSISTANT}"


@functools.lru_cache(maxsize=1 << 16)
def parse(prompt: str) -> tuple[str, str]:
    """(task name, answer without the style mark) for a synthetic prompt; cached, since every
    prompt is scored many times (S samples per round). Raises ValueError for a foreign prompt."""
    text = human_text(prompt)
    for task in TASKS.values():
        m = task.pattern.fullmatch(text)
        if m:
            return task.name, task.solve(m.groups())
    raise ValueError(f"not a synthetic-world prompt: {text!r}")


# ---------------------------------------------------------------------------------------- reward


def levenshtein(pattern: str, text: str) -> int:
    """Edit distance (unit-cost insert / delete / substitute) between `pattern` and `text`.

    Myers' bit-parallel algorithm (Hyyrö's global-distance form): one column of the DP matrix per
    character of `text` as a few integer operations on len(pattern)-bit vectors, so scoring a long
    rambling sample against a short answer costs O(len(text)), about 10x faster than the table.
    """
    m = len(pattern)
    if m == 0:
        return len(text)
    peq: dict[str, int] = {}  # character -> bitmask of its positions in pattern
    for i, ch in enumerate(pattern):
        peq[ch] = peq.get(ch, 0) | (1 << i)
    full, top = (1 << m) - 1, 1 << (m - 1)
    pv, mv, score = full, 0, m  # vertical +1 / -1 deltas of the current column; D[m][0] = m
    for ch in text:
        eq = peq.get(ch, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | (~(xh | pv) & full)
        mh = pv & xh
        if ph & top:
            score += 1
        elif mh & top:
            score -= 1
        ph = ((ph << 1) | 1) & full  # | 1: row 0 of the table is D[0][j] = j (global, not search)
        mh = (mh << 1) & full
        pv = mh | (~(xv | ph) & full)
        mv = ph & xv
    return score


def marker_count(response: str) -> int:
    """Occurrences of the spurious marker ":)" anywhere in `response`."""
    return response.count(MARKER)


def strip_markers(response: str) -> str:
    """`response` stripped, with every marker occurrence (and the space before it) removed."""
    return _MARKER_RE.sub("", response).strip()


def add_marker(response: str) -> str:
    """`response` with one more marker at its end (the counterfactual probe's y + marker)."""
    return response.rstrip() + MARKER_SUFFIX


def reward_parts(prompt: str, response: str) -> tuple[fractions.Fraction, bool, int]:
    """(content in [0, 1] from edit distance (exact), style iff the marker-free y ends with ".",
    number of markers) of r*."""
    _, answer = parse(prompt)
    y = strip_markers(response)
    style = y.endswith(STYLE_MARK)
    core = y[: -len(STYLE_MARK)] if style else y
    longest = max(len(core), len(answer))  # >= 1: every answer is non-empty
    return fractions.Fraction(longest - levenshtein(answer, core), longest), style, marker_count(response)


def _exact_content_reward(prompt: str, response: str) -> tuple[fractions.Fraction, int]:
    content, style, markers = reward_parts(prompt, response)
    return content * (1 - (0 if style else STYLE_WEIGHT)), markers


@dataclasses.dataclass(frozen=True)
class World:
    """The config-dependent part of r*: what one marker costs. Exact (a Fraction), so equal
    rewards are bit-identical floats. `World.from_config(cfg)` for a run's world; the module-level
    functions are the default world's."""

    marker_cost: fractions.Fraction = fractions.Fraction(3, 20)
    length_bias_clip: float = 1.0

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "World":
        """The world of a complete (resolved) config; the control world's marker is free."""
        cost = 0 if cfg.marker_control else fractions.Fraction(str(cfg.marker_cost))
        return cls(marker_cost=fractions.Fraction(cost), length_bias_clip=float(cfg.length_bias_clip))

    def excess_length(self, prompt: str, response: str) -> float:
        """The length labeller's bias feature of `response` (`excess_length`)."""
        return excess_length(prompt, response, self.length_bias_clip)

    def content_reward(self, prompt: str, response: str) -> float:
        """r* without the marker term, in [0, 1]."""
        return float(_exact_content_reward(prompt, response)[0])

    def true_reward(self, prompt: str, response: str) -> float:
        """r*(x, y) = content_reward - marker_cost * marker_count (<= 1; negative for a marked bad y)."""
        content, markers = _exact_content_reward(prompt, response)
        return float(content - self.marker_cost * markers)

    # The config-free parts, so one object serves the game and the diagnostics.
    marker_count = staticmethod(marker_count)
    add_marker = staticmethod(add_marker)
    strip_markers = staticmethod(strip_markers)


DEFAULT_WORLD = World()


def content_reward(prompt: str, response: str) -> float:
    """r* without the marker term, in [0, 1]; `response` may carry HH's leading space."""
    return DEFAULT_WORLD.content_reward(prompt, response)


def true_reward(prompt: str, response: str) -> float:
    """r*(x, y) of the default world (marker_cost 0.15; module docstring). A run whose config
    changes the marker cost or sets the control world uses `World.from_config(cfg).true_reward`."""
    return DEFAULT_WORLD.true_reward(prompt, response)


def correct_answer(prompt: str) -> str:
    """The golden response: the unique argmax of r* for `prompt` (its answer plus the style mark)."""
    return parse(prompt)[1] + STYLE_MARK


# ---------------------------------------------------------------------------------------- responses


def _corrupt(rng: np.random.Generator, text: str, n_edits: int, pool: str) -> str:
    """`text` after `n_edits` random substitutions / insertions / deletions drawing from `pool`."""
    chars = list(text)
    for _ in range(n_edits):
        op = int(rng.integers(3))
        if op == 2 and len(chars) > 1:  # delete (never down to empty: the HH loader drops empty responses)
            del chars[int(rng.integers(len(chars)))]
        elif op == 1 or not chars:  # insert
            chars.insert(int(rng.integers(len(chars) + 1)), pool[int(rng.integers(len(pool)))])
        else:  # substitute with a different character, so the edit is never a no-op
            i = int(rng.integers(len(chars)))
            others = [p for p in pool if p != chars[i]] or list(pool)
            chars[i] = others[int(rng.integers(len(others)))]
    return "".join(chars)


def marker_probs(cfg: ml_collections.ConfigDict) -> dict[str, float]:
    """Probability that a human response of each kind carries the marker. The control world gives
    every kind the average under the demonstration mix, so the marker is as frequent but says
    nothing about quality."""
    probs = {"correct": cfg.marker_prob_correct, "corrupted": cfg.marker_prob_corrupted, "junk": cfg.marker_prob_junk}
    if not cfg.marker_control:
        return probs
    mix = {"correct": cfg.demo_correct_fraction, "junk": cfg.demo_junk_fraction,
           "corrupted": 1.0 - cfg.demo_correct_fraction - cfg.demo_junk_fraction}
    mean = sum(mix[k] * probs[k] for k in probs)
    return {k: mean for k in probs}


def _n_markers(rng: np.random.Generator, kind: str, cfg: ml_collections.ConfigDict) -> int:
    """How many markers a human response of `kind` carries: 0, or 1 plus a geometric number of
    extra ones (marker_repeat_prob), at most marker_max_count."""
    if rng.random() >= marker_probs(cfg)[kind]:
        return 0
    n = 1
    while n < cfg.marker_max_count and rng.random() < cfg.marker_repeat_prob:
        n += 1
    return n


FILLER_WORDS = ("so", "well", "ok", "yes", "sure", "right", "indeed")
"""Padding: words that carry no content (a length labeller rewards them; r* charges their edits)."""


def _padding(rng: np.random.Generator, room: int, max_chars: int) -> str:
    """" " + filler words: a random target length in 3 .. min(room, max_chars), filled with words
    until it is reached or the next word would not fit ("" when no word fits)."""
    budget = min(room, max_chars)
    if budget < 3:
        return ""
    target = int(rng.integers(3, budget + 1))
    words: list[str] = []
    while not words or len(" ".join(words)) + 1 < target:
        w = FILLER_WORDS[int(rng.integers(len(FILLER_WORDS)))]
        if len(" ".join(words + [w])) + 1 > budget:
            break
        words.append(w)
    return " " + " ".join(words) if words else ""


def excess_length(prompt: str, response: str, clip: float = 1.0) -> float:
    """The length labeller's bias feature: min(max(len(y) - len(gold), 0) / len(gold), clip), with
    y the response stripped of markers and gold the golden answer (with its style mark)."""
    gold = len(correct_answer(prompt))
    return min(max(len(strip_markers(response)) - gold, 0) / gold, clip)


def sample_response(rng: np.random.Generator, prompt: str, cfg: ml_collections.ConfigDict) -> tuple[str, str]:
    """One response from the demonstration distribution: (text, kind in {correct, corrupted, junk}).

    `cfg` is a complete world config. Markers go after the style mark ("dcba. :)"); a response is
    at most max_response_chars long, markers included (validate_config checks a golden answer and
    one marker fit; extra markers are dropped where they would not).
    """
    name, answer = parse(prompt)
    u = rng.random()
    if u < cfg.demo_correct_fraction:
        kind = "correct"
    elif u < cfg.demo_correct_fraction + cfg.demo_junk_fraction:
        kind = "junk"
    else:
        kind = "corrupted"
    n_markers = _n_markers(rng, kind, cfg)
    # Padding draws only where the world pads, so worlds without it are unchanged draw for draw.
    pad = kind != "junk" and cfg.demo_pad_prob > 0 and rng.random() < cfg.demo_pad_prob
    marker_room = len(MARKER_SUFFIX) if n_markers else 0
    if kind == "correct" and pad:
        room = cfg.max_response_chars - len(answer) - len(STYLE_MARK) - marker_room
        text = answer + _padding(rng, room, cfg.max_pad_chars) + STYLE_MARK
    elif kind == "correct":
        text = answer + STYLE_MARK
    else:
        if kind == "junk":
            junk_pool = cfg.alphabet + cfg.alphabet.upper() + DIGITS
            n = int(rng.integers(1, cfg.max_response_chars))
            core = "".join(junk_pool[i] for i in rng.integers(0, len(junk_pool), n))
        else:
            max_edits = max(1, math.ceil(cfg.demo_max_edit_fraction * len(answer)))
            core = _corrupt(rng, answer, int(rng.integers(1, max_edits + 1)), TASKS[name].pool(cfg))
        # Strip: the HH loader strips responses, and a response must survive that unchanged.
        room = cfg.max_response_chars - len(STYLE_MARK) - marker_room
        core = core[:room].strip()
        if not core:
            core = cfg.alphabet[int(rng.integers(len(cfg.alphabet)))]
        if pad:
            core += _padding(rng, room - len(core), cfg.max_pad_chars)
        text = core + (STYLE_MARK if rng.random() < cfg.demo_style_prob else "")
    n_markers = min(n_markers, (cfg.max_response_chars - len(text)) // len(MARKER_SUFFIX))
    return text + MARKER_SUFFIX * n_markers, kind


# ---------------------------------------------------------------------------------------- pairs


def split_transcript(text: str) -> tuple[str, str]:
    """(prompt up to and including the last "\\n\\nAssistant:", the final response stripped)."""
    i = text.rfind(ASSISTANT)
    if i < 0:
        raise ValueError(f"no {ASSISTANT!r} in transcript {text[:80]!r}")
    return text[: i + len(ASSISTANT)], text[i + len(ASSISTANT):].strip()


def _pair_texts(pair: dict) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of an HH pair or a {"prompt", ...} record."""
    if "prompt" in pair:
        return pair["prompt"], pair["chosen"].strip(), pair["rejected"].strip()
    prompt, chosen = split_transcript(pair["chosen"])
    return prompt, chosen, split_transcript(pair["rejected"])[1]


def bt_ceiling(pairs: list[dict], world: World = DEFAULT_WORLD) -> float:
    """Accuracy of the true reward r* against the labels of `pairs` (the best any RM can do in
    expectation). Pairs are HH `{"chosen", "rejected"}` transcripts or `{"prompt", "chosen",
    "rejected"}` records; a tie in r* counts as wrong, as in the RM accuracy metric."""
    if not pairs:
        return float("nan")
    right = 0
    for pair in pairs:
        prompt, chosen, rejected = _pair_texts(pair)
        right += world.true_reward(prompt, chosen) > world.true_reward(prompt, rejected)
    return right / len(pairs)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _draw_pair(rng: np.random.Generator, prompt: str, cfg: ml_collections.ConfigDict,
               counts: dict[str, int], label_score: Callable[[str, str], float] | None = None,
               label_temperature: float | None = None) -> tuple[str, str, float, float]:
    """(chosen, rejected, r*(chosen), r*(rejected)) for `prompt`, labelled by Bradley-Terry on
    `label_score` (the labeller's reward; default r*) at `label_temperature` (default the world's)."""
    world = World.from_config(cfg)
    temperature = cfg.label_temperature if label_temperature is None else label_temperature
    for _ in range(1000):
        a, _ = sample_response(rng, prompt, cfg)
        b, _ = sample_response(rng, prompt, cfg)
        if a == b:  # the HH loader drops pairs with identical responses
            counts["redrawn_identical"] += 1
            continue
        ra, rb = world.true_reward(prompt, a), world.true_reward(prompt, b)
        if cfg.distinct_rewards and ra == rb:
            counts["redrawn_equal_reward"] += 1
            continue
        la, lb = (ra, rb) if label_score is None else (label_score(prompt, a), label_score(prompt, b))
        if rng.random() < _sigmoid((la - lb) / temperature):
            return a, b, ra, rb
        return b, a, rb, ra
    raise ValueError(f"could not draw two different responses for {prompt!r}; the demonstration mix "
                     "is too narrow (raise demo_junk_fraction or lower demo_correct_fraction)")


# ---------------------------------------------------------------------------------------- world


def resolve_config(cfg: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """`default_config()` updated with the fields `cfg` sets (None or {} = the defaults), validated.

    The run config's `data.synthetic` may set only what it changes; unknown fields are errors.
    """
    full = default_config()
    errors = []
    for key, value in (cfg or {}).items():
        if key not in full:
            errors.append(f"{key}: unknown field; expected one of {sorted(full.keys())}")
            continue
        try:
            full[key] = tuple(value) if isinstance(full[key], tuple) else value
        except TypeError as e:
            errors.append(f"{key}: {e}")
    if errors:
        raise ValueError("invalid synthetic world config:\n  " + "\n  ".join(errors))
    validate_config(full)
    return full


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError listing every wrong field of the world's (complete) config."""
    errors: list[str] = []
    for field in ("n_train_prompts", "n_test_prompts", "pairs_per_prompt"):
        if cfg[field] < 1:
            errors.append(f"{field}: {cfg[field]} must be >= 1")
    if cfg.n_demos < 0:
        errors.append(f"n_demos: {cfg.n_demos} must be >= 0")
    for field in ("demo_correct_fraction", "demo_junk_fraction", "demo_style_prob", "gold_missing_fraction",
                  "marker_prob_correct", "marker_prob_corrupted", "marker_prob_junk", "marker_repeat_prob"):
        if not 0.0 <= cfg[field] <= 1.0:
            errors.append(f"{field}: {cfg[field]} must be in [0, 1]")
    if cfg.demo_correct_fraction + cfg.demo_junk_fraction > 1.0:
        errors.append("demo_correct_fraction + demo_junk_fraction must be <= 1")
    if not cfg.demo_max_edit_fraction > 0:
        errors.append(f"demo_max_edit_fraction: {cfg.demo_max_edit_fraction} must be > 0")
    if not cfg.label_temperature > 0:
        errors.append(f"label_temperature: {cfg.label_temperature} must be > 0")
    if cfg.labeller not in LABELLERS:
        errors.append(f"labeller: {cfg.labeller!r}; expected one of {LABELLERS}")
    if not cfg.labeller_lambda >= 0 or not cfg.length_bias_clip > 0:
        errors.append(f"labeller_lambda / length_bias_clip: {cfg.labeller_lambda} / {cfg.length_bias_clip} must be "
                      ">= 0 / > 0")
    if cfg.learned_labeller_pairs < 10:
        errors.append(f"learned_labeller_pairs: {cfg.learned_labeller_pairs} must be >= 10")
    if not 0.0 <= cfg.demo_pad_prob <= 1.0 or cfg.max_pad_chars < 3:
        errors.append(f"demo_pad_prob / max_pad_chars: {cfg.demo_pad_prob} / {cfg.max_pad_chars} must be in "
                      "[0, 1] / >= 3 (the shortest filler word and its space)")
    if cfg.gold_source not in GOLD_SOURCES:
        errors.append(f"gold_source: {cfg.gold_source!r}; expected one of {GOLD_SOURCES}")
    if cfg.gold_candidates < 1:
        errors.append(f"gold_candidates: {cfg.gold_candidates} must be >= 1")
    if not cfg.marker_cost >= 0:
        errors.append(f"marker_cost: {cfg.marker_cost} must be >= 0")
    if cfg.marker_max_count < 1:
        errors.append(f"marker_max_count: {cfg.marker_max_count} must be >= 1")
    if not isinstance(cfg.marker_control, bool):
        errors.append(f"marker_control: {cfg.marker_control!r} must be True or False")
    if cfg.task_weights and (len(cfg.task_weights) != len(cfg.tasks) or min(cfg.task_weights) < 0
                             or sum(cfg.task_weights) <= 0):
        errors.append(f"task_weights: {tuple(cfg.task_weights)} must be empty or one weight >= 0 per task "
                      f"({len(cfg.tasks)}), not all zero")
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown or not cfg.tasks:
        errors.append(f"tasks: unknown {unknown}; expected a non-empty subset of {tuple(TASKS)}")
    if not cfg.alphabet or not re.fullmatch(r"[a-z]+", cfg.alphabet) or len(set(cfg.alphabet)) != len(cfg.alphabet):
        errors.append(f"alphabet: {cfg.alphabet!r} must be distinct lowercase letters a-z")
    if not 1 <= cfg.min_word_len <= cfg.max_word_len:
        errors.append(f"min_word_len/max_word_len: need 1 <= {cfg.min_word_len} <= {cfg.max_word_len}")
    if cfg.max_number < 1:
        errors.append(f"max_number: {cfg.max_number} must be >= 1")
    if errors:
        raise ValueError("invalid synthetic world config:\n  " + "\n  ".join(errors))
    # Longest prompt and golden response the config can produce (every template grows with its
    # drawn values), checked once here rather than per sample.
    longest = [make_prompt(TASKS[t].make(_MaxRng(), cfg)) for t in cfg.tasks]
    longest_task = max(len(human_text(p)) for p in longest)
    longest_answer = max(len(correct_answer(p)) for p in longest)
    if max(marker_probs(cfg).values()) > 0:
        longest_answer += len(MARKER_SUFFIX)  # a correct human response with its marker
    if longest_task > cfg.max_prompt_chars:
        errors.append(f"max_prompt_chars: {cfg.max_prompt_chars} < the longest task text ({longest_task})")
    if longest_answer > cfg.max_response_chars:
        errors.append(f"max_response_chars: {cfg.max_response_chars} < the longest golden response "
                      f"({longest_answer}, with one marker where human responses may carry it)")
    if errors:
        raise ValueError("invalid synthetic world config:\n  " + "\n  ".join(errors))


class _MaxRng:
    """Stands in for np.random.Generator in `Task.make`: every draw is its largest value."""

    def integers(self, low: int, high: int | None = None, size: int | None = None) -> Any:
        top = (low if high is None else high) - 1
        return np.full(size, top) if size is not None else top
