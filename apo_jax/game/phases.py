"""The phases of the game as plain functions over a `Context` (the run store, config and data).

train -> a model's params; sample -> a samples file; score -> RM scores of samples; select ->
best-of-S answers; evaluate_rm / evaluate_policy -> evaluation records; export -> HF dirs. Each
is memoised in the run store under a typed key, so a restarted run skips what is done and
resumes what is not (training from its step checkpoints, sampling after its last written batch).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from apo_jax import evaluation, models
from apo_jax.evaluation import diagnostics, overopt
from apo_jax.inference import sampler, scoring
from apo_jax.io import checkpointing, fileio, hf
from apo_jax.training import fit, train
from apo_jax.data import pipeline, tokenize
from apo_jax.training.objectives import Objective
from apo_jax.game.store import (ModelSlot, PolicyEvalKey, ProbeKey, RMEvalKey, RunStore, SamplesKey, ScoresKey,
                                phase_key, phase_seed)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One sampling setting (`sampling.train` for best-of-S and D_APO, `sampling.test` for Table 3)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int

    @classmethod
    def from_section(cls, section: Any) -> "Sampling":
        return cls(int(section.max_new_tokens), float(section.temperature), float(section.top_p), int(section.top_k))


@dataclasses.dataclass(frozen=True)
class Settings:
    """The run-wide values the phases read, resolved once from the validated config."""

    seed: int
    num_samples: int
    """S: samples per query for best-of-S and D_APO."""
    train_sampling: Sampling
    test_sampling: Sampling
    sample_batch_size: int
    stop_strings: tuple[str, ...]
    eval_batch_size: int
    ece_bins: int
    overopt_samples: int
    """N: samples per test prompt for the over-optimization curves (0: off)."""
    overopt_prompts: int
    save_every_steps: int
    keep_checkpoints: int
    async_save: bool
    log_every_steps: int
    reward_stats_set: str
    """"" or the reference set whose reward mean/std an exported RM carries (`rm.reward_stats_set`)."""

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "Settings":
        return cls(
            seed=int(cfg.seed), num_samples=int(cfg.apo.num_samples),
            train_sampling=Sampling.from_section(cfg.sampling.train),
            test_sampling=Sampling.from_section(cfg.sampling.test),
            sample_batch_size=int(cfg.sampling.batch_size), stop_strings=tuple(cfg.sampling.stop_strings),
            eval_batch_size=int(cfg.eval.batch_size), ece_bins=int(cfg.eval.num_bins),
            overopt_samples=int(cfg.eval.overopt_samples), overopt_prompts=int(cfg.eval.overopt_prompts),
            save_every_steps=int(cfg.checkpoint.save_every_steps), keep_checkpoints=int(cfg.checkpoint.keep),
            async_save=bool(cfg.checkpoint.async_save), log_every_steps=int(cfg.log_every_steps),
            reward_stats_set=str(cfg.rm.get("reward_stats_set", "")),
        )


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """An optimizer section of the config resolved for one model (its round's learning rate)."""

    lr: float
    batch_size: int
    grad_accum: int
    epochs: int
    max_steps: int
    warmup_steps: int
    schedule: str
    weight_decay: float
    grad_clip: float
    b1: float
    b2: float

    @classmethod
    def from_section(cls, section: ml_collections.ConfigDict, round_: int) -> "OptimizerSettings":
        """`section.lrs[round - 1]` where the section gives per-round rates, else `section.lr`."""
        lr = section.lrs[round_ - 1] if "lrs" in section and round_ >= 1 else section.lr
        return cls(lr=float(lr), batch_size=int(section.batch_size), grad_accum=int(section.grad_accum),
                   epochs=int(section.epochs), max_steps=int(section.max_steps),
                   warmup_steps=int(section.warmup_steps), schedule=str(section.schedule),
                   weight_decay=float(section.weight_decay), grad_clip=float(section.grad_clip),
                   b1=float(section.b1), b2=float(section.b2))

    def sized(self, num_examples: int) -> train.OptimizerConfig:
        """The schedule for a phase of `num_examples` examples."""
        steps_per_epoch = max(1, num_examples // self.batch_size)
        total = self.max_steps if self.max_steps > 0 else steps_per_epoch * self.epochs
        return train.OptimizerConfig(
            lr=self.lr, warmup_steps=min(self.warmup_steps, max(total - 1, 0)), total_steps=total,
            schedule=self.schedule, weight_decay=self.weight_decay, grad_clip=self.grad_clip, b1=self.b1, b2=self.b2,
        )


@dataclasses.dataclass
class Context:
    """What every phase reads: the run store, the resolved settings, the data section (read by
    the tokenisation layer) and the prepared data."""

    settings: Settings
    data_cfg: ml_collections.ConfigDict
    store: RunStore
    data: pipeline.Data

    @property
    def tokenizer(self) -> Any:
        return self.data.tokenizer

    @property
    def rm_tokenizer(self) -> Any:
        """The reward models' tokenizer (`rm.tokenizer`; the policy's when not set)."""
        return self.data.rm_tokenizer or self.data.tokenizer


def train_params(ctx: Context, phase: str, config: models.ModelConfig, params: Any, objective: Objective,
                 records: Sequence[dict], opt_settings: OptimizerSettings) -> Any:
    """Trains `params` with `objective` on `records`; resumable from `ckpt/<phase>/`."""
    st, store = ctx.settings, ctx.store
    tokenizer = ctx.rm_tokenizer if objective.head == "score" else ctx.tokenizer
    examples = objective.examples(tokenizer, records, ctx.data_cfg)
    examples = objective.prepare(examples, config, params, store.mesh, st.eval_batch_size)
    opt = opt_settings.sized(len(examples))
    state = train.init_state(config, params, opt, store.mesh)
    step_fn = train.train_step(config, objective, opt, store.mesh, opt_settings.grad_accum)
    ckpt = checkpointing.TrainCheckpointer(store.checkpoint_dir(phase), save_every=st.save_every_steps,
                                           max_to_keep=st.keep_checkpoints, async_save=st.async_save,
                                           preemption_check_every=st.log_every_steps)
    if not ckpt.latest_step():
        store.status(f"{phase}: {opt.total_steps} steps of {objective.describe()} on {len(examples)} examples, "
                     f"batch {opt_settings.batch_size}")
    state = fit.fit(phase, state, step_fn, examples, batch_size=opt_settings.batch_size, total_steps=opt.total_steps,
                    seed=phase_seed(st.seed, phase), mesh=store.mesh, checkpointer=ckpt, metrics=store.metrics,
                    log_every=st.log_every_steps, show_progress=store.is_main, status=store.status)
    return train.model_params(state)  # with LoRA: the trained adapters and head on the frozen base


def sample(ctx: Context, policy: str, split: str, prompts: Sequence[dict], settings: Sampling, num_samples: int) -> str:
    """Samples `num_samples` answers per prompt from `policy`; returns the JSONL path.

    Resumable: finished batches are appended to the file; a restart continues after them (batch b
    samples with the same key whatever ran before: `sampler.sample_batches`). On a preemption
    signal it stops after the current batch (`checkpointing.Preempted`).
    """
    store, st = ctx.store, ctx.settings
    key = SamplesKey(policy, split)
    path = store.path("samples", f"{policy}_{split}.jsonl")
    if store.done(key):
        return path
    slot = store.model(policy)
    # Compute-dtype weights for the whole phase: identical samples, half the bytes per decode
    # step when float32 master weights run in bfloat16.
    gen_params = models.params_for_generation(slot.config, slot.params)
    bs = st.sample_batch_size
    done = len(fileio.complete_lines(path)) // num_samples
    done -= done % bs  # resume at a batch boundary (a torn last batch is redone)
    if store.is_main:
        # Atomic, so other processes counting the lines meanwhile see the old or the new file.
        fileio.truncate_lines(path, done * num_samples)
    # Locally each batch is appended and fsynced; on GCS the object is rewritten at most once a
    # minute (a restart redoes the batches that had not reached the bucket).
    out_file = fileio.Appender(path, flush_every_s=60.0) if store.is_main else None
    n_batches = -(-len(prompts) // bs)
    store.status(f"sampling {num_samples} answers x {len(prompts)} {split} prompts from {policy}")
    bar = tqdm(total=len(prompts), initial=done, desc=f"sample {policy} {split}", disable=not store.is_main,
               leave=False)
    batches = sampler.sample_batches(
        slot.config, gen_params, pipeline.prompt_ids(ctx.tokenizer, prompts, ctx.data_cfg),
        phase_key(st.seed, key.id), batch_size=bs, buckets=tuple(ctx.data_cfg.buckets), start=done // bs,
        pad_id=int(ctx.tokenizer.pad_token_id or 0), mesh=store.mesh, num_samples=num_samples,
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
        top_k=settings.top_k, eos_token_id=slot.config.eos_token_ids, stop_strings=st.stop_strings,
        tokenizer=ctx.tokenizer)
    # Closing flushes every finished batch (on GCS too) whether the phase ends, is preempted or fails.
    try:
        for b, indices, tokens, lengths in batches:
            lines = []
            for r, i in enumerate(indices):
                rec = prompts[i]
                for s in range(num_samples):
                    text = tokenize.decode_response(ctx.tokenizer, tokens[r, s, : lengths[r, s]], st.stop_strings)
                    lines.append({"prompt_id": rec["prompt_id"], "prompt": rec["prompt"], "sample": s,
                                  "response": text, "num_tokens": int(lengths[r, s])})
            if out_file is not None:
                out_file.write_jsonl(lines)
            fit.progress(key.id, b + 1)
            bar.update(len(indices))
            # A SIGTERM (a preemptible VM's notice) stops the phase at this batch boundary: the file
            # holds every finished batch and the same command resumes after them.
            if b + 1 < n_batches and checkpointing.agree_on_preemption():
                raise checkpointing.Preempted(f"{key.id} after batch {b + 1} of {n_batches}")
    finally:
        bar.close()
        if out_file is not None:
            out_file.close()
    store.barrier(key.id)  # every process reads the file next; process 0 must have finished writing it
    store.once(key, lambda: {"path": path, "count": len(prompts) * num_samples})
    return path


def score_texts(ctx: Context, slot: ModelSlot, texts: Sequence[tuple[str, str]]) -> np.ndarray:
    """Rewards of (prompt, response) texts by the RM in `slot`, in batches of eval.batch_size."""
    return scoring.score_texts_with(slot.config, slot.params, ctx.rm_tokenizer, texts, ctx.data_cfg, ctx.store.mesh,
                                    ctx.settings.eval_batch_size)


def score(ctx: Context, rm: str, rows: Sequence[dict], tag: str) -> np.ndarray:
    """RM scores of the rows of a samples file, cached as scores/<rm>__<tag>.jsonl."""
    store = ctx.store
    key = ScoresKey(rm, tag)
    path = store.path("scores", f"{rm}__{tag}.jsonl")
    if store.done(key):
        return np.asarray([r["score"] for r in fileio.read_jsonl(path)], np.float32)
    scores = score_texts(ctx, store.model(rm), [(r["prompt"], r["response"]) for r in rows])
    if store.is_main:
        fileio.write_jsonl(path, [{"prompt_id": r["prompt_id"], "sample": r["sample"], "score": float(s)}
                                  for r, s in zip(rows, scores)])
    store.barrier(key.id)  # the file is complete before any process marks it done
    store.once(key, lambda: {"path": path})
    return scores


def samples_per_prompt(rows: Sequence[dict]) -> int:
    """S of a samples file (rows prompt-major, `sample` = 0 .. S-1 within each prompt)."""
    s = 1 + max((int(r["sample"]) for r in rows), default=0)
    if len(rows) % s:
        raise ValueError(f"a samples file of {len(rows)} rows does not hold {s} samples per prompt")
    return s


def _judge(ctx: Context, rule: str, rm: str | None, rows: Sequence[dict], policy: str
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Selection scores [P, S] of a samples file's rows by `rule` ("rm": `rm`'s scores; "oracle":
    r*; "random": i.i.d. uniform draws, a function of the seed and the policy only), and r* [P, S]
    where the world knows it."""
    s = samples_per_prompt(rows)
    true = None
    if ctx.data.true_reward is not None:
        true = np.asarray([ctx.data.true_reward(r["prompt"], r["response"]) for r in rows]).reshape(-1, s)
    if rule == "rm":
        return score(ctx, rm, rows, f"{policy}_llm").reshape(-1, s), true
    if rule == "random":
        draws = np.random.default_rng(phase_seed(ctx.settings.seed, f"random_pick/{policy}"))
        return draws.random((len(rows) // s, s)), true
    if rule == "oracle":
        if true is None:
            raise ValueError("the oracle selection rule needs a world with a known true reward (data.kind=synthetic)")
        return true, true
    raise ValueError(f"unknown selection rule {rule!r}")


def _log_selection(ctx: Context, out_name: str, judge: str, policy: str, rows: Sequence[dict],
                   scores_ps: np.ndarray, true: np.ndarray | None, valid: np.ndarray) -> None:
    """The hacking diagnostics of a selection (the synthetic world only): r* of the picks against
    the mean sample and the oracle's pick, the selector's on-policy pair accuracy against r* (all
    pairs, and marker-free pairs), and the marker rates of samples and picks."""
    if true is None:
        return
    world = ctx.data.world
    markers = None
    if world is not None:
        markers = np.asarray([world.marker_count(r["response"]) for r in rows]).reshape(true.shape)
    schedule, _, rnd = out_name.rpartition("_r")
    rec = {"kind": "best_of_s", "name": out_name, "schedule": schedule, "round": int(rnd), "rm": judge,
           "policy": policy, **diagnostics.best_of_s_stats(scores_ps, true, markers, valid)}
    ctx.store.metrics.write(rec)
    ctx.store.status(f"best-of-{true.shape[1]} {out_name}: r* of {judge}'s picks {rec['true_reward_picked']:.3f} "
                     f"(mean sample {rec['true_reward_mean_sample']:.3f}, oracle {rec['true_reward_oracle_pick']:.3f}; "
                     f"on-policy pair acc {rec['onpolicy_pair_acc']:.3f})")


def _nonempty(rows: Sequence[dict], shape: tuple[int, ...]) -> np.ndarray:
    """[P, S] bool: samples with a non-empty response (best-of-S never picks an empty answer, as the
    official code skips them; a prompt whose samples are all empty keeps its argmax)."""
    return np.asarray([bool(r["response"].strip()) for r in rows]).reshape(shape)


def select_best_of_s(ctx: Context, rule: str, rm: str | None, samples_path: str, policy: str,
                     out_name: str) -> list[dict]:
    """Best-of-S answers per prompt (rule "rm": argmax of `rm`'s scores; "oracle": argmax of r*);
    written to best/<out_name>.jsonl."""
    rows = fileio.read_jsonl(samples_path)
    s = samples_per_prompt(rows)
    scores_ps, true = _judge(ctx, rule, rm, rows, policy)
    valid = _nonempty(rows, scores_ps.shape)
    best = diagnostics.pick(scores_ps, valid)
    chosen = []
    for p, k in enumerate(best):
        r = rows[p * s + int(k)]
        chosen.append({"prompt_id": r["prompt_id"], "prompt": r["prompt"], "response": r["response"],
                       "score": float(scores_ps[p, k])})
    if ctx.store.is_main:
        fileio.write_jsonl(ctx.store.path("best", f"{out_name}.jsonl"), chosen)
    _log_selection(ctx, out_name, rm if rule == "rm" else rule, policy, rows, scores_ps, true, valid)
    return chosen


def select_pairs(ctx: Context, rule: str, rm: str | None, samples_path: str, policy: str,
                 out_name: str) -> list[dict]:
    """Best vs worst of S per prompt by the selection rule: the policy's preference pairs for
    DPO. Prompts whose best and worst are the same text or tied in score give no pair. Written to
    pairs/<out_name>.jsonl."""
    rows = fileio.read_jsonl(samples_path)
    s = samples_per_prompt(rows)
    scores_ps, true = _judge(ctx, rule, rm, rows, policy)
    valid = _nonempty(rows, scores_ps.shape)
    best, worst = diagnostics.pick(scores_ps, valid), np.argmin(scores_ps, axis=1)
    pairs = []
    for p, (b, w) in enumerate(zip(best, worst)):
        rb, rw = rows[p * s + int(b)], rows[p * s + int(w)]
        if scores_ps[p, b] <= scores_ps[p, w] or rb["response"] == rw["response"]:
            continue
        pairs.append({"prompt_id": rb["prompt_id"], "prompt": rb["prompt"], "chosen": rb["response"],
                      "rejected": rw["response"], "score_chosen": float(scores_ps[p, b]),
                      "score_rejected": float(scores_ps[p, w])})
    if ctx.store.is_main:
        fileio.write_jsonl(ctx.store.path("pairs", f"{out_name}.jsonl"), pairs)
    ctx.store.status(f"{out_name}: {len(pairs)} best-vs-worst pairs from {len(best)} prompts")
    _log_selection(ctx, out_name, rm if rule == "rm" else rule, policy, rows, scores_ps, true, valid)
    return pairs


def evaluate_rm(ctx: Context, name: str, label: str, schedule: str, rnd: int) -> dict:
    """Table 2's numbers for RM `name`: accuracy and both ECEs on HH_Dev and HH_Test."""
    store, data, bins = ctx.store, ctx.data, ctx.settings.ece_bins

    def run() -> dict:
        slot = store.model(name)
        rec = {"kind": "rm_eval", "model": label, "name": name, "schedule": schedule, "round": rnd}
        for split, pairs in (("dev", data.dev_pairs), ("test", data.test_pairs)):
            good = score_texts(ctx, slot, [(p["prompt"], p["chosen"]) for p in pairs])
            bad = score_texts(ctx, slot, [(p["prompt"], p["rejected"]) for p in pairs])
            rec[f"{split}_acc"] = float(evaluation.preference_accuracy(good, bad))
            rec[f"{split}_ece"] = float(evaluation.expected_calibration_error(good, bad, bins))
            rec[f"{split}_ece_weighted"] = float(
                evaluation.expected_calibration_error(good, bad, bins, weighted=True))
            if data.true_reward is not None:
                rec[f"{split}_true_acc"] = pipeline.true_order_accuracy(data, pairs, good, bad)
        if data.world is not None:
            # The counterfactual probe b(RM): how much one spurious marker moves the reward.
            # The test pairs' responses without a marker: y + marker then carries one marker, as human
            # responses do (a second one would be out of the RM's training distribution).
            texts = [(p["prompt"], p[side]) for p in data.test_pairs for side in ("chosen", "rejected")]
            keep = diagnostics.probe_indices(np.asarray([data.world.marker_count(y) for _, y in texts]))
            plain = [texts[i] for i in keep]
            marked = [(x, data.world.add_marker(y)) for x, y in plain]
            probe = diagnostics.marker_bias(score_texts(ctx, slot, plain), score_texts(ctx, slot, marked))
            rec.update(marker_bias=probe["marker_bias"], marker_bias_se=probe["marker_bias_se"])
        store.metrics.write(rec)
        store.status(f"eval {name}: test acc {rec['test_acc']:.3f} ece {rec['test_ece']:.3f}, "
                     f"dev acc {rec['dev_acc']:.3f} ece {rec['dev_ece']:.3f}")
        return rec

    return store.once(RMEvalKey(name, schedule), run)


def evaluate_policy(ctx: Context, policy: str, schedule: str, rnd: int, scorer: str) -> dict:
    """Table 3's numbers for `policy`: its answers to the test prompts, scored by `scorer`."""
    store, data = ctx.store, ctx.data

    def run() -> dict:
        path = sample(ctx, policy, "test", data.test_prompts, ctx.settings.test_sampling, 1)
        rows = fileio.read_jsonl(path)
        scores = score(ctx, scorer, rows, f"{policy}_test")
        rec = {"kind": "policy_eval", "policy": policy, "schedule": schedule, "round": rnd,
               "avg_score": float(np.mean(scores)), "num_answers": len(rows)}
        true = None
        if data.true_reward is not None:
            true = [data.true_reward(r["prompt"], r["response"]) for r in rows]
            rec["true_reward"] = float(np.mean(true))
        if data.world is not None:
            w = data.world
            rec.update(diagnostics.answer_stats(
                true,
                [w.content_reward(r["prompt"], r["response"]) for r in rows],
                [w.marker_count(r["response"]) for r in rows]))
            # The length labeller's bias feature of the answers (0 for answers no longer than gold).
            rec["excess_length"] = float(np.mean([w.excess_length(r["prompt"], r["response"]) for r in rows]))
            # RM_Base's score of the same answers: what a fixed RM believes about the policy.
            rec["rm_base_score"] = float(np.mean(score(ctx, "rm_base", rows, f"{policy}_test")))
        if store.is_main:
            fileio.write_jsonl(store.path("answers", f"{policy}_test.jsonl"),
                               [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "response": r["response"]}
                                for r in rows])
        store.metrics.write(rec)
        extra = f", true reward {rec['true_reward']:.3f}" if "true_reward" in rec else ""
        shared = "" if policy.startswith(f"policy_{schedule}_") or schedule == "base" else f" (as {schedule})"
        store.status(f"eval {policy}{shared}: {scorer} score {rec['avg_score']:.3f}{extra}")
        return rec

    return store.once(PolicyEvalKey(policy, schedule), run)


def overoptimization(ctx: Context, policy: str, rms: Sequence[tuple[str, str]]) -> dict:
    """Best-of-n curves over `policy`'s answers to the test prompts (`evaluation.overopt`): N =
    `eval.overopt_samples` samples per prompt at the training temperature, each RM of `rms`
    ((name, label) pairs) as a selector, the true reward r* as gold where the world knows it (and
    as the oracle selector), else RM_Test's score (the paper's evaluator)."""
    store, data, st = ctx.store, ctx.data, ctx.settings

    def run() -> dict:
        prompts = data.test_prompts[:st.overopt_prompts] if st.overopt_prompts > 0 else data.test_prompts
        rows = fileio.read_jsonl(sample(ctx, policy, "overopt", prompts, st.train_sampling, st.overopt_samples))
        s = samples_per_prompt(rows)
        tag = f"{policy}_overopt"
        selectors = {label: score(ctx, name, rows, tag).reshape(-1, s) for name, label in rms}
        if data.true_reward is not None:
            gold_name = "true reward r*"
            gold = np.asarray([data.true_reward(r["prompt"], r["response"]) for r in rows]).reshape(-1, s)
            selectors["oracle"] = gold
        else:
            gold_name = "RM_Test score"
            gold = score(ctx, "rm_test", rows, tag).reshape(-1, s)
        ns = overopt.powers_of_two(s)
        rec = {"kind": "overopt", "policy": policy, "gold": gold_name, "num_prompts": len(prompts), "n": list(ns),
               "kl_bon": overopt.kl_bon(ns).tolist(), "curves": overopt.curves(selectors, gold, ns)}
        store.metrics.write(rec)
        top = ", ".join(f"{k} {v[-1]:.3f}" for k, v in rec["curves"].items())
        store.status(f"best-of-{ns[-1]} over {policy}'s test samples ({gold_name}): {top}")
        return rec

    return store.once(ProbeKey(f"overopt_{policy}"), run)


def export(ctx: Context, names: Sequence[str]) -> dict[str, str]:
    """Writes each model as a Hugging Face directory under export/<name>/ (skipping finished ones)."""
    out = {}
    for name in dict.fromkeys(names):
        path = fileio.join(ctx.store.run_dir, "export", name)
        if not hf.is_saved(path):
            slot = ctx.store.model(name)
            is_rm, stats = "score" in slot.params, None
            if is_rm and ctx.settings.reward_stats_set:  # the rewards' mean/std on a reference set
                texts = pipeline.reference_texts(ctx.data, ctx.settings.reward_stats_set)
                stats = scoring.reward_stats(score_texts(ctx, slot, texts))
            # An RM export scores in transformers what the game scored (issue #16).
            hf.save_pretrained(path, slot.config, slot.params, tokenizer=ctx.rm_tokenizer if is_rm else ctx.tokenizer,
                               reward_position=ctx.data_cfg.reward_position,
                               prompt_format=ctx.data_cfg.get("prompt_format", "hh"), reward_stats=stats)
            if models.lora.has_adapters(slot.params):  # and the LoRA adapter (+ head) in PEFT's format
                hf.save_adapter(fileio.join(ctx.store.run_dir, "export", f"{name}_adapter"), slot.config, slot.params)
        out[name] = path
    return out
