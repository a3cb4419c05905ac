"""From a config to the game's data: splits, golden answers, the tokenizer, and model batches.

`prepare` loads HH-RLHF (hub id or local files), any preference data set in the standard formats
(`data.kind = "preference"`, `preference.py`), or writes and loads the synthetic world, through the
same row reader, split and gold code, and returns a `Data`. The `*_set` functions tokenise a
list of records once per phase into a `TokenizedSet`, whose `batch(global_rows)` gives this
process's block of a global batch, padded to the length bucket of the global batch's longest row
(every process computes the same width from the cached lengths, without a collective).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from apo_jax.io import fileio
from apo_jax.data import batching, hh, tokenize

log = logging.getLogger("apo_jax")


@dataclasses.dataclass
class Data:
    """Everything the game reads. Pairs/prompts/gold are lists of `records` dicts."""

    tokenizer: Any
    rm_pairs: list[dict]  # D_P (HH_RM)
    gold: list[dict]  # D_gold: one golden answer per HH_RM prompt
    llm_prompts: list[dict]  # D_Q (HH_LLM queries)
    dev_pairs: list[dict]  # HH_Dev
    test_pairs: list[dict]  # HH_Test
    test_prompts: list[dict]  # HH_Test queries
    all_train_pairs: list[dict]  # RM_Test's training set
    demonstrations: list[dict] | None = None  # synthetic world: SFT data for the initial policy
    true_reward: Callable[[str, str], float] | None = None  # synthetic world: r*(prompt, response)
    world: Any = None  # synthetic world: its synthetic.World (content_reward, marker_count, add_marker)
    rm_tokenizer: Any = None  # rm.tokenizer: the reward models' own tokenizer (None: `tokenizer`)
    reports: dict[str, Any] = dataclasses.field(default_factory=dict)


def prepare(cfg: ml_collections.ConfigDict, run_dir: str) -> Data:
    """Loads (or, for the synthetic world, first writes) the data of a run and splits it."""
    d = cfg.data
    true_reward = None
    world = None
    demonstrations = None
    reports: dict[str, Any] = {}

    def local(p: str) -> str:  # gs:// inputs are copied once into the local cache
        return fileio.local_copy(p) if p and fileio.is_remote(p) else p

    if d.kind == "synthetic":
        from apo_jax.data import synthetic, synthetic_files

        import jax
        from jax.experimental import multihost_utils

        if fileio.is_remote(run_dir):
            # The world's readers (gzip, the tokenizer) need local files, and the world is a pure
            # function of its config and seed: each process writes its own local copy.
            digest = synthetic_files.config_hash(synthetic.resolve_config(d.synthetic), cfg.seed)
            world_dir = fileio.local_cache_dir("synthetic_world", f"{digest}-p{jax.process_index()}")
            reports["world"] = synthetic_files.write_world(d.synthetic, cfg.seed, world_dir)
        else:
            world_dir = os.path.join(run_dir, "world")
            # One writer (write_world's contract): process 0 writes or verifies the world, then the
            # others find it complete and only read it.
            if jax.process_index() == 0:
                reports["world"] = synthetic_files.write_world(d.synthetic, cfg.seed, world_dir)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("apo_jax: synthetic world")
            if jax.process_index() != 0:
                reports["world"] = synthetic_files.write_world(d.synthetic, cfg.seed, world_dir)  # reused
        train_src = test_src = os.path.join(world_dir, "hh")
        gold_path = os.path.join(world_dir, "gold.jsonl")
        tokenizer_path = os.path.join(world_dir, "tokenizer")
        demonstrations = _read_jsonl(os.path.join(world_dir, "demos.jsonl"))
        world = synthetic.World.from_config(synthetic.resolve_config(d.synthetic))  # r* depends on the config
        true_reward = world.true_reward
    else:
        if d.kind == "preference":
            train_src, test_src = _local_source(d.get("train", ""), local), _local_source(d.get("test", ""), local)
        else:
            train_src, test_src = local(d.hh_train), local(d.hh_test)
        gold_path = local(d.gold) or None
        tokenizer_path = local(d.tokenizer or cfg.policy.checkpoint)
    load = _pair_loader(d)
    carve = float(d.get("carve_test_fraction", 0.0))
    if carve > 0:
        # One split only (e.g. the HH test files alone): its prompts are carved into disjoint
        # train and test parts; the train source is not read.
        test_pairs, test_report = load(test_src, "test")
        train_pairs, test_pairs = hh.carve_by_prompt(test_pairs, carve, cfg.seed)
        reports["cleaning"] = [test_report.summary()]
        reports["carved"] = {"source": test_src, "test_fraction": carve, "train_pairs": len(train_pairs),
                             "test_pairs": len(test_pairs)}
    else:
        train_pairs, train_report = load(train_src, "train")
        test_pairs, test_report = load(test_src, "test")
        reports["cleaning"] = [train_report.summary(), test_report.summary()]
    for line in reports["cleaning"]:
        log.info("data: %s", line)
    extra_prompts = None
    if d.kind == "preference" and d.get("prompts", ""):
        from apo_jax.data import preference

        extra_prompts, reports["prompts"] = preference.load_prompts(
            _local_source(d.prompts, local), cols=preference.Columns.from_config(d.get("columns")),
            on_bad_line=d.on_bad_line)
    splits = hh.make_splits(train_pairs, test_pairs, n_rm=d.n_rm, n_dev=d.n_dev, n_llm=d.n_llm, n_test=d.n_test,
                            seed=cfg.seed, prompts=extra_prompts)
    gold, reports["gold"] = hh.load_gold(gold_path, splits.rm_pairs, known=[*train_pairs, *test_pairs,
                                                                            *(extra_prompts or [])],
                                         on_bad_line=d.on_bad_line)
    if (cfg.get("rm") is not None and cfg.rm.get("margin_from_data", False)
            and not any("margin" in p for p in splits.rm_pairs)):
        raise hh.DataError(f"rm.margin_from_data: the RM pairs of {train_src or test_src} have no margin; expected "
                           "a 'margin' or 'score_chosen'/'score_rejected' column (data.columns maps other names)")
    tokenizer = tokenize.load_tokenizer(tokenizer_path)
    try:
        tokenize.check_prompt_format(tokenizer, prompt_format(d))
    except ValueError as e:
        raise hh.DataError(str(e)) from None
    rm_tokenizer = None
    if cfg.get("rm") is not None and cfg.rm.get("tokenizer", ""):
        # Reward models of another family: samples are scored as text, re-encoded with this tokenizer
        # (and its chat template), like every RM input.
        rm_tokenizer = tokenize.load_tokenizer(local(cfg.rm.tokenizer))
        try:
            tokenize.check_prompt_format(rm_tokenizer, prompt_format(d))
        except ValueError as e:
            raise hh.DataError(f"rm.tokenizer {cfg.rm.tokenizer!r}: {e}") from None
    data = Data(tokenizer=tokenizer, rm_tokenizer=rm_tokenizer, rm_pairs=splits.rm_pairs, gold=gold,
                llm_prompts=splits.llm_prompts, dev_pairs=splits.dev_pairs, test_pairs=splits.test_pairs,
                test_prompts=splits.test_prompts, all_train_pairs=splits.all_train_pairs, demonstrations=demonstrations, true_reward=true_reward,
                world=world, reports=reports)
    _write_split_files(data, fileio.join(run_dir, "data"))
    return data


def _local_source(spec: str, local: Callable[[str], str]) -> str:
    """A `path_or_id[:split]` source with a gs:// path copied into the local cache."""
    if not spec or not fileio.is_remote(spec):
        return spec
    from apo_jax.data import preference

    path, split = preference.parse_source(spec, "")
    return local(path) + (f":{split}" if split else "")


def _pair_loader(d: ml_collections.ConfigDict) -> Callable[[str, str], tuple[list[dict], Any]]:
    """(source, split) -> (pair records, cleaning report) for `data.kind`: HH-RLHF's layout or any
    preference source (`preference.load_pairs`: the same records, any standard format)."""
    if d.kind == "preference":
        from apo_jax.data import preference

        cols = preference.Columns.from_config(d.get("columns"))
        return lambda src, split: preference.load_pairs(src, split, cols=cols, on_bad_line=d.on_bad_line)
    return lambda src, split: hh.load_hh_pairs(src, split, on_bad_line=d.on_bad_line)


def _write_split_files(data: Data, out_dir: str) -> None:
    """The splits as JSONL (inputs for `collect_gold` and the judge) plus their counts."""
    import jax

    if jax.process_index() != 0:
        return
    for name in ("rm_pairs", "gold", "llm_prompts", "dev_pairs", "test_pairs", "test_prompts"):
        path = fileio.join(out_dir, f"{name}.jsonl")
        if not fileio.exists(path):
            fileio.write_jsonl(path, getattr(data, name))
    counts = {name: len(getattr(data, name)) for name in ("rm_pairs", "gold", "llm_prompts", "dev_pairs",
                                                            "test_pairs", "test_prompts", "all_train_pairs")}
    fileio.write_json(fileio.join(out_dir, "splits.json"), {"counts": counts, "reports": data.reports}, indent=1,
                      default=str)


# ------------------------------------------------------------------------------------------
# Tokenised sets and their batches.


@dataclasses.dataclass
class TokenizedSet:
    """Pre-tokenised examples of one phase; `batch` builds this process's block of a global batch.

    fields: name -> list of `Encoded` rows (e.g. "chosen", "rejected" for RM pairs);
    extras: name -> per-example float/int arrays copied into the batch (weight, is_apo).
    """

    kind: str  # "rm" | "sft" | "score" | "pair_lm"
    fields: dict[str, list[tokenize.Encoded]]
    extras: dict[str, np.ndarray]
    buckets: tuple[int, ...]
    pad_id: int

    def __post_init__(self) -> None:
        lens = [np.asarray([len(e) for e in rows], np.int64) for rows in self.fields.values()]
        self.lengths = np.max(np.stack(lens), axis=0) if lens else np.zeros((0,), np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def width(self, global_rows: Sequence[int]) -> int:
        return tokenize.bucket_length(int(self.lengths[np.asarray(global_rows)].max()), self.buckets)

    def batch(self, global_rows: Sequence[int], *, local: bool = True) -> dict[str, np.ndarray]:
        """Arrays for this process's rows of `global_rows` (all rows with local=False)."""
        global_rows = np.asarray(global_rows)
        width = self.width(global_rows)
        rows = batching.process_rows(global_rows) if local else global_rows
        out: dict[str, np.ndarray] = {}
        for name, encoded in self.fields.items():
            picked = [encoded[i] for i in rows]
            ids, mask = tokenize.pad_right([e.ids for e in picked], width, len(rows), self.pad_id)
            if self.kind == "sft":
                out["input_ids"], out["attention_mask"] = ids, mask
                lm, _ = tokenize.pad_right([e.response_mask for e in picked], width, len(rows), 0)
                out["loss_mask"] = lm
            else:
                out[f"{name}_ids"], out[f"{name}_mask"] = ids, mask
                if self.kind == "pair_lm":  # DPO: which tokens of each sequence are the response
                    out[f"{name}_response_mask"], _ = tokenize.pad_right([e.response_mask for e in picked], width,
                                                                         len(rows), 0)
        for name, values in self.extras.items():
            out[name] = values[rows]
        return out


def prompt_format(d: ml_collections.ConfigDict) -> str:
    """`data.prompt_format` ("hh" when a config predates the field)."""
    return str(d.get("prompt_format", "hh"))


def _pad_id(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def rm_set(tokenizer: Any, pairs: Sequence[dict], d: ml_collections.ConfigDict) -> TokenizedSet:
    """RM pairs -> chosen/rejected inputs `[BOS] prompt response` (+ `[EOS]` when
    data.reward_position == "eos"; the reward is read at the last token), row weight and APO flag."""
    fmt = prompt_format(d)
    chosen = tokenize.encode_responses(tokenizer, [(p["prompt"], p["chosen"]) for p in pairs], d.rm_max_len,
                                       append_eos=d.reward_position == "eos", prompt_format=fmt)
    rejected = tokenize.encode_responses(tokenizer, [(p["prompt"], p["rejected"]) for p in pairs], d.rm_max_len,
                                         append_eos=d.reward_position == "eos", prompt_format=fmt)
    extras = {
        "weight": np.asarray([p.get("weight", 1.0) for p in pairs], np.float32),
        "is_apo": np.asarray([int(p.get("is_apo", 0)) for p in pairs], np.int32),
        # The data's per-pair margin (rm.margin_from_data); 0 where a pair has none (APO pairs).
        "margin": np.asarray([float(p.get("margin", 0.0)) for p in pairs], np.float32),
    }
    return TokenizedSet("rm", {"chosen": chosen, "rejected": rejected}, extras, tuple(d.buckets), _pad_id(tokenizer))


def sft_set(tokenizer: Any, examples: Sequence[dict], d: ml_collections.ConfigDict) -> TokenizedSet:
    """(prompt, response) records -> inputs with a loss mask on the response tokens (+ EOS)."""
    enc = tokenize.encode_responses(tokenizer, [(e["prompt"], e["response"]) for e in examples], d.sft_max_len,
                                    append_eos=True, prompt_format=prompt_format(d))
    extras = {"weight": np.asarray([e.get("weight", 1.0) for e in examples], np.float32)}
    return TokenizedSet("sft", {"input": enc}, extras, tuple(d.buckets), _pad_id(tokenizer))


def pair_lm_set(tokenizer: Any, pairs: Sequence[dict], d: ml_collections.ConfigDict) -> TokenizedSet:
    """Policy preference pairs {prompt, chosen, rejected, [weight]} -> both responses encoded like
    SFT inputs (`[BOS] prompt response [EOS]`) with their response masks (DPO's layout)."""
    fields = {}
    for side in ("chosen", "rejected"):
        fields[side] = tokenize.encode_responses(tokenizer, [(p["prompt"], p[side]) for p in pairs], d.sft_max_len,
                                                 append_eos=True, prompt_format=prompt_format(d))
    extras = {"weight": np.asarray([p.get("weight", 1.0) for p in pairs], np.float32)}
    return TokenizedSet("pair_lm", fields, extras, tuple(d.buckets), _pad_id(tokenizer))


def score_set(tokenizer: Any, texts: Sequence[tuple[str, str]], d: ml_collections.ConfigDict) -> TokenizedSet:
    """(prompt, response) texts for RM scoring, encoded exactly like RM training inputs."""
    enc = tokenize.encode_responses(tokenizer, list(texts), d.rm_max_len, append_eos=d.reward_position == "eos",
                                    prompt_format=prompt_format(d))
    return TokenizedSet("score", {"input": enc}, {}, tuple(d.buckets), _pad_id(tokenizer))


def prompt_ids(tokenizer: Any, prompts: Sequence[dict], d: ml_collections.ConfigDict) -> list[np.ndarray]:
    """Sampler prompts (token ids), formatted by `data.prompt_format` like the RM and SFT inputs."""
    return tokenize.encode_prompts(tokenizer, [p["prompt"] for p in prompts], d.prompt_max_len, prompt_format(d))


# ------------------------------------------------------------------------------------------
# APO pairs and true-reward evaluation.


def apo_pairs(gold: Sequence[dict], samples: Sequence[dict]) -> list[dict]:
    """D_APO: (x, y_gold, y_sample) for every sample of every gold query, gold preferred."""
    by_id = {g["prompt_id"]: g for g in gold}
    out = []
    for s in samples:
        g = by_id.get(s["prompt_id"])
        if g is None:
            raise KeyError(f"sample for prompt_id {s['prompt_id']} has no golden answer")
        out.append({"prompt_id": g["prompt_id"], "prompt": g["prompt"], "chosen": g["response"],
                    "rejected": s["response"], "is_apo": 1})
    return out


def reference_texts(data: Data, name: str) -> list[tuple[str, str]]:
    """(prompt, response) texts of a reference set for reward statistics (`rm.reward_stats_set`):
    both answers of every pair of "dev" (HH_Dev), "test" or "rm" (HH_RM)."""
    pairs = {"dev": data.dev_pairs, "test": data.test_pairs, "rm": data.rm_pairs}[name]
    return [(p["prompt"], p[side]) for p in pairs for side in ("chosen", "rejected")]


def true_order_accuracy(data: Data, pairs: Sequence[dict], good: np.ndarray, bad: np.ndarray) -> float:
    """RM accuracy against the true reward's order (pairs where r* ties are left out)."""
    assert data.true_reward is not None
    t_good = np.asarray([data.true_reward(p["prompt"], p["chosen"]) for p in pairs])
    t_bad = np.asarray([data.true_reward(p["prompt"], p["rejected"]) for p in pairs])
    decided = t_good != t_bad
    if not decided.any():
        return float("nan")
    agree = np.sign(np.asarray(good) - np.asarray(bad)) == np.sign(t_good - t_bad)
    return float(np.mean(agree[decided]))


# ------------------------------------------------------------------------------------------


def _read_jsonl(path: str) -> list[dict]:
    try:
        return fileio.read_jsonl(path)
    except ValueError as e:
        raise hh.DataError(str(e)) from None
