"""The synthetic world's files: the character tokenizer and `write_world` (HH-format pairs, golden
answers, demonstrations, world.json), reused by config hash. The world itself (tasks, r*, the
marker, the response distribution, config validation) is `apo_jax.data.synthetic`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import types
from typing import Any, Iterable

import ml_collections
import numpy as np
import tokenizers
import transformers

from apo_jax.data import labeller as labeller_lib
from apo_jax.data.records import prompt_id
from apo_jax.data.synthetic import (BOS, CHARS, EOS, MARKER, PAD, SPECIAL_TOKENS, TASKS, UNK, WORLD_VERSION,
                                    World, _draw_pair, _sigmoid, correct_answer, excess_length, human_text,
                                    make_prompt, marker_count, marker_probs, parse, resolve_config,
                                    sample_response)

# ---------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(out_dir: str | None = None) -> transformers.PreTrainedTokenizerFast:
    """A character-level LLaMA-style tokenizer: ids 0..3 = <pad> <s> </s> <unk>, then "\\n" and
    printable ASCII (32..126) in code-point order (100 tokens). Encoding prepends BOS (as LLaMA),
    decoding concatenates characters exactly. Saved with `save_pretrained` when `out_dir` is given.

    A BPE model with an empty merge list tokenises any string into single characters with exact
    offsets, and needs no pre-tokenizer (which would treat spaces and newlines specially).
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARS))}
    core = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = tokenizers.decoders.Fuse()
    core.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        # The default clean-up would turn " ." into "." and break exact round trips.
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        tok.save_pretrained(out_dir)
        # transformers 5 records its own class name ("TokenizersBackend"), which transformers 4
        # cannot resolve; "PreTrainedTokenizerFast" loads the same tokenizer.json under both.
        config_path = os.path.join(out_dir, "tokenizer_config.json")
        with open(config_path) as f:
            tok_config = json.load(f)
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(config_path, "w") as f:
            json.dump(tok_config, f, indent=2, sort_keys=True)
            f.write("\n")
    return tok


def config_hash(cfg: ml_collections.ConfigDict, seed: int) -> str:
    """sha256 (16 hex digits) of the world's config, seed and WORLD_VERSION."""
    blob = json.dumps({"config": cfg.to_dict(), "seed": int(seed), "version": WORLD_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _rng(seed: int, stream: str) -> np.random.Generator:
    """An independent stream per purpose, so e.g. changing n_demos leaves the pairs unchanged."""
    return np.random.default_rng([int(seed), int(hashlib.sha1(stream.encode()).hexdigest()[:8], 16)])


def _draw_prompts(rng: np.random.Generator, cfg: ml_collections.ConfigDict, n: int,
                  exclude: set[str]) -> list[str]:
    """`n` distinct prompts not in `exclude`; a task whose instances run out simply stops appearing."""
    weights = np.asarray(cfg.task_weights or [1.0] * len(cfg.tasks), np.float64)
    weights = weights / weights.sum()
    out: list[str] = []
    seen = set(exclude)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct prompts (got {len(out)}): the tasks {tuple(cfg.tasks)} "
                             "have too few instances; widen alphabet / word lengths / max_number")
        task = TASKS[cfg.tasks[int(rng.choice(len(cfg.tasks), p=weights))]]
        prompt = make_prompt(task.make(rng, cfg))
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


def _summary(values: Iterable[float]) -> dict[str, float]:
    v = np.asarray(list(values), np.float64)
    if v.size == 0:
        return {"n": 0}
    q = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "q10": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]),
            "q90": float(q[4]), "max": float(v.max())}


def _jsonl(records: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _write_atomic(path: str, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see a partial file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


FILES = {  # key -> path inside out_dir
    "hh_train": "hh/train.jsonl.gz",
    "hh_test": "hh/test.jsonl.gz",
    "gold": "gold.jsonl",
    "demos": "demos.jsonl",
    "tokenizer_json": "tokenizer/tokenizer.json",
    "tokenizer_config": "tokenizer/tokenizer_config.json",
}
WORLD_JSON = "world.json"


def _paths(out_dir: str) -> dict[str, str]:
    out = os.path.abspath(out_dir)
    paths = {k: os.path.join(out, v) for k, v in FILES.items()}
    paths.update(out_dir=out, hh_dir=os.path.join(out, "hh"), tokenizer=os.path.join(out, "tokenizer"),
                 world=os.path.join(out, WORLD_JSON))
    return paths


def _existing_world(out_dir: str, digest: str) -> dict[str, Any] | None:
    """The stats of a complete world with hash `digest` in out_dir, or None."""
    try:
        with open(os.path.join(out_dir, WORLD_JSON)) as f:
            world = json.load(f)
    except (OSError, ValueError):
        return None
    if world.get("config_hash") != digest:
        return None
    for key, rel in FILES.items():
        path = os.path.join(out_dir, rel)
        if not os.path.exists(path) or _sha256(path) != world.get("sha256", {}).get(key):
            return None
    return world


def _pairs_split(rng: np.random.Generator, prompts: list[str], cfg: ml_collections.ConfigDict,
                 counts: dict[str, int], labeller: labeller_lib.Labeller) -> tuple[list[dict], dict[str, Any]]:
    """HH pairs for `prompts` labelled by `labeller`, and their stats (r* against the labels, its
    analytical expectation under a true labeller, r* means, the bias features' rates)."""
    pairs, r_chosen, r_rejected, m_chosen, m_rejected, x_chosen, x_rejected = [], [], [], [], [], [], []
    by_labeller = {} if labeller.kind == "true" else dict(label_score=labeller.score,
                                                          label_temperature=labeller.temperature)
    for prompt in prompts:
        for _ in range(cfg.pairs_per_prompt):
            chosen, rejected, rc, rr = _draw_pair(rng, prompt, cfg, counts, **by_labeller)
            x_chosen.append(excess_length(prompt, chosen, cfg.length_bias_clip))
            x_rejected.append(excess_length(prompt, rejected, cfg.length_bias_clip))
            pairs.append({"chosen": f"{prompt} {chosen}", "rejected": f"{prompt} {rejected}"})
            r_chosen.append(rc)
            r_rejected.append(rr)
            m_chosen.append(marker_count(chosen) > 0)
            m_rejected.append(marker_count(rejected) > 0)
    dr = np.asarray(r_chosen) - np.asarray(r_rejected)
    expected = np.asarray([_sigmoid(abs(d) / cfg.label_temperature) if d != 0 else 0.0 for d in dr])
    stats = {
        "n_pairs": len(pairs),
        "bt_ceiling": float(np.mean(dr > 0)),  # r* against the drawn labels (== bt_ceiling(pairs))
        "bt_expected": float(expected.mean()),  # E[sigmoid(|dr| / T)], ties counted wrong
        "true_reward_chosen": _summary(r_chosen),
        "true_reward_rejected": _summary(r_rejected),
        "abs_reward_gap": _summary(np.abs(dr)),
        # How much the labels reward the marker: its rate on chosen vs rejected responses.
        "marker_rate_chosen": float(np.mean(m_chosen)),
        "marker_rate_rejected": float(np.mean(m_rejected)),
        # How much the labels reward length: the mean excess length of chosen vs rejected responses.
        "excess_length_chosen": float(np.mean(x_chosen)),
        "excess_length_rejected": float(np.mean(x_rejected)),
    }
    return pairs, stats


def _labeller(cfg: Any, seed: int, train_prompts: list[str]) -> tuple[labeller_lib.Labeller, dict]:
    return labeller_lib.from_config(cfg, World.from_config(cfg), _rng(seed, "labeller"), train_prompts)


def world_labeller(cfg: ml_collections.ConfigDict | None, seed: int) -> labeller_lib.Labeller:
    """The labeller that labelled the pairs of the world `write_world(cfg, seed, ...)` writes."""
    cfg = resolve_config(cfg)
    return _labeller(cfg, seed, _draw_prompts(_rng(seed, "train_prompts"), cfg, cfg.n_train_prompts, set()))[0]


def write_world(cfg: ml_collections.ConfigDict | None, seed: int, out_dir: str) -> dict[str, Any]:
    """Generates the world into `out_dir` (or reuses the one there with the same config hash).

    Writes hh/train.jsonl.gz, hh/test.jsonl.gz (HH `{"chosen", "rejected"}` transcripts),
    gold.jsonl, demos.jsonl (records.py formats), tokenizer/ and world.json (stats, config, hash,
    file checksums). Returns world.json's content plus `paths` (absolute, by key) and `reused`.

    `cfg` may be partial: missing fields take `default_config()` values (the hash is of the
    completed config). Atomic: world.json is removed first and written last, each file is
    replaced by rename, and reuse checks every checksum, so a killed write is regenerated rather
    than half read. Call it from one process per out_dir (e.g. process 0, then a barrier).
    """
    cfg = resolve_config(cfg)
    digest = config_hash(cfg, seed)
    paths = _paths(out_dir)
    world = _existing_world(paths["out_dir"], digest)
    if world is not None:
        return {**world, "paths": paths, "reused": True}
    if os.path.exists(paths["world"]):
        os.remove(paths["world"])

    config_dict = cfg
    # Generation reads config fields a million times; a plain namespace reads them ~5x faster than
    # a ConfigDict (same attribute names, so every function below takes either).
    cfg = types.SimpleNamespace(**config_dict.to_dict())
    counts = {"redrawn_identical": 0, "redrawn_equal_reward": 0}
    train_prompts = _draw_prompts(_rng(seed, "train_prompts"), cfg, cfg.n_train_prompts, set())
    test_prompts = _draw_prompts(_rng(seed, "test_prompts"), cfg, cfg.n_test_prompts, set(train_prompts))
    world_r = World.from_config(cfg)
    labeller, labeller_stats = _labeller(cfg, seed, train_prompts)
    train_pairs, train_stats = _pairs_split(_rng(seed, "train_pairs"), train_prompts, cfg, counts, labeller)
    test_pairs, test_stats = _pairs_split(_rng(seed, "test_pairs"), test_prompts, cfg, counts, labeller)

    n_missing = round(cfg.gold_missing_fraction * len(train_prompts))
    missing = set(_rng(seed, "gold").permutation(len(train_prompts))[:n_missing].tolist())
    if cfg.gold_source == "true":
        gold = [{"prompt_id": prompt_id(p), "prompt": p, "response": correct_answer(p), "source": "oracle"}
                for i, p in enumerate(train_prompts) if i not in missing]
    else:  # the labeller's best of gold_candidates human responses: gold that shares its bias
        gold_rng = _rng(seed, "gold_candidates")
        gold = [{"prompt_id": prompt_id(p), "prompt": p, "response": labeller_lib.best_of(gold_rng, p, cfg, labeller),
                 "source": f"labeller_best_of_{cfg.gold_candidates}"}
                for i, p in enumerate(train_prompts) if i not in missing]

    demo_rng = _rng(seed, "demos")
    order = demo_rng.permutation(len(train_prompts))
    demos, demo_rewards, kinds = [], [], {"correct": [], "corrupted": [], "junk": []}
    marked = {"correct": [], "corrupted": [], "junk": []}
    for i in range(cfg.n_demos):
        p = train_prompts[int(order[i % len(order)])]
        response, kind = sample_response(demo_rng, p, cfg)
        r = world_r.true_reward(p, response)
        marked[kind].append(marker_count(response))
        demos.append({"prompt_id": prompt_id(p), "prompt": p, "response": response})
        demo_rewards.append(r)
        kinds[kind].append(r)

    # Files: gzip with mtime=0 so equal worlds are byte-identical.
    _write_atomic(paths["hh_train"], gzip.compress(_jsonl(train_pairs), mtime=0))
    _write_atomic(paths["hh_test"], gzip.compress(_jsonl(test_pairs), mtime=0))
    _write_atomic(paths["gold"], _jsonl(gold))
    _write_atomic(paths["demos"], _jsonl(demos))
    tok_tmp = f"{paths['tokenizer']}.tmp-{os.getpid()}"
    shutil.rmtree(tok_tmp, ignore_errors=True)
    build_tokenizer(tok_tmp)
    shutil.rmtree(paths["tokenizer"], ignore_errors=True)
    os.replace(tok_tmp, paths["tokenizer"])

    all_prompts = train_prompts + test_prompts
    per_task: dict[str, int] = {}
    for p in train_prompts:
        per_task[parse(p)[0]] = per_task.get(parse(p)[0], 0) + 1
    world = {
        "version": WORLD_VERSION,
        "config_hash": digest,
        "seed": int(seed),
        "config": config_dict.to_dict(),
        "marker": {"text": MARKER, "cost": float(world_r.marker_cost), "probs": marker_probs(cfg)},
        "labeller": {"kind": cfg.labeller, "lambda": cfg.labeller_lambda, **labeller_stats},
        "gold_true_reward": _summary(world_r.true_reward(g["prompt"], g["response"]) for g in gold),
        "gold_excess_length": _summary(excess_length(g["prompt"], g["response"], cfg.length_bias_clip) for g in gold),
        "files": dict(FILES),
        "sha256": {k: _sha256(paths[k]) for k in FILES},
        "counts": {
            "train_prompts": len(train_prompts), "test_prompts": len(test_prompts),
            "train_pairs": len(train_pairs), "test_pairs": len(test_pairs),
            "gold": len(gold), "gold_missing": n_missing, "demos": len(demos),
            "train_prompts_per_task": dict(sorted(per_task.items())), **counts,
        },
        "demos": {
            "true_reward": _summary(demo_rewards),
            "by_kind": {k: _summary(v) for k, v in kinds.items()},
            "marker_rate_by_kind": {k: float(np.mean(np.asarray(v) > 0)) if v else float("nan")
                                    for k, v in marked.items()},
            "marker_rate": float(np.mean([marker_count(d["response"]) > 0 for d in demos])) if demos else 0.0,
        },
        "pairs": {"train": train_stats, "test": test_stats},
        "lengths": {
            "max_task_chars": max(len(human_text(p)) for p in all_prompts),
            "max_full_prompt_chars": max(len(p) for p in all_prompts),  # with the Human/Assistant framing
            "max_response_chars": max(len(r["response"]) for r in demos + gold) if demos or gold else 0,
            "max_transcript_chars": max(len(t) for pr in train_pairs + test_pairs for t in pr.values()),
        },
    }
    _write_atomic(paths["world"], json.dumps(world, indent=1, sort_keys=True).encode("utf-8"))
    return {**world, "paths": paths, "reused": False}
