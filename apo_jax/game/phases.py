"""The phases of the game as plain functions over a `Context` (the run store, config and data).

train -> a model's params; sample -> a samples file; score -> RM scores of samples; select ->
best-of-S answers; evaluate_rm / evaluate_policy -> evaluation records; export -> HF dirs. Each
is memoised in the run store under a typed key, so a restarted run skips what is done and
resumes what is not (training from its step checkpoints, sampling after its last written batch).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from apo_jax import evaluation, models, sharding
from apo_jax.evaluation import diagnostics
from apo_jax.inference import sampler, scoring
from apo_jax.io import checkpointing, fileio, hf
from apo_jax.training import fit, train
from apo_jax.data import pipeline, tokenize
from apo_jax.training.objectives import Objective
from apo_jax.game.store import (ModelSlot, PolicyEvalKey, RMEvalKey, RunStore, SamplesKey, ScoresKey, phase_key,
                           phase_seed)


@dataclasses.dataclass
class Context:
    """What every phase reads: the run store, the validated config and the prepared data."""

    cfg: ml_collections.ConfigDict
    store: RunStore
    data: pipeline.Data

    @property
    def tokenizer(self) -> Any:
        return self.data.tokenizer



def optimizer(opt_cfg: ml_collections.ConfigDict, num_examples: int, lr: float) -> train.OptimizerConfig:
    """An optimizer section of the config, sized for a phase of `num_examples` examples."""
    steps_per_epoch = max(1, num_examples // opt_cfg.batch_size)
    total = opt_cfg.max_steps if opt_cfg.max_steps > 0 else steps_per_epoch * opt_cfg.epochs
    return train.OptimizerConfig(
        lr=lr, warmup_steps=min(opt_cfg.warmup_steps, max(total - 1, 0)), total_steps=total,
        schedule=opt_cfg.schedule, weight_decay=opt_cfg.weight_decay, grad_clip=opt_cfg.grad_clip,
        b1=opt_cfg.b1, b2=opt_cfg.b2,
    )


def train_params(ctx: Context, phase: str, config: models.ModelConfig, params: Any, objective: Objective,
                 records: Sequence[dict], opt_cfg: ml_collections.ConfigDict, lr: float) -> Any:
    """Trains `params` with `objective` on `records`; resumable from `ckpt/<phase>/`."""
    cfg, store = ctx.cfg, ctx.store
    examples = objective.examples(ctx.tokenizer, records, cfg.data)
    examples = objective.prepare(examples, config, params, store.mesh, cfg.eval.batch_size)
    opt = optimizer(opt_cfg, len(examples), lr)
    state = train.init_state(config, params, opt, store.mesh)
    step_fn = store.train_step(config, objective, opt, opt_cfg.grad_accum)
    ckpt = checkpointing.TrainCheckpointer(store.checkpoint_dir(phase), save_every=cfg.checkpoint.save_every_steps,
                                           max_to_keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
                                           preemption_check_every=cfg.log_every_steps)
    if not ckpt.latest_step():
        store.status(f"{phase}: {opt.total_steps} steps of {objective.describe()} on {len(examples)} examples, "
                     f"batch {opt_cfg.batch_size}")
    state = fit.fit(phase, state, step_fn, examples, batch_size=opt_cfg.batch_size, total_steps=opt.total_steps,
                    seed=phase_seed(cfg.seed, phase), mesh=store.mesh, checkpointer=ckpt, metrics=store.metrics,
                    log_every=cfg.log_every_steps, show_progress=store.is_main, status=store.status)
    return train.model_params(state)  # with LoRA: the trained adapters and head on the frozen base


def sample(ctx: Context, policy: str, split: str, prompts: Sequence[dict], settings: Any, num_samples: int) -> str:
    """Samples `num_samples` answers per prompt from `policy`; returns the JSONL path.

    Resumable: finished batches are appended to the file; a restart continues after them. On
    a preemption signal it stops after the current batch (`checkpointing.Preempted`).
    """
    store, cfg = ctx.store, ctx.cfg
    key = SamplesKey(policy, split)
    path = store.path("samples", f"{policy}_{split}.jsonl")
    if store.done(key):
        return path
    slot = store.model(policy)
    # Compute-dtype weights for the whole phase: identical samples, half the bytes per decode
    # step when float32 master weights run in bfloat16.
    gen_params = models.params_for_generation(slot.config, slot.params)
    bs = cfg.sampling.batch_size
    done = len(fileio.complete_lines(path)) // num_samples
    done -= done % bs  # resume at a batch boundary (a torn last batch is redone)
    if store.is_main:
        # Atomic, so other processes counting the lines meanwhile see the old or the new file.
        fileio.truncate_lines(path, done * num_samples)
    # Locally each batch is appended and fsynced; on GCS the object is rewritten at most once a
    # minute (a restart redoes the batches that had not reached the bucket).
    out_file = fileio.Appender(path, flush_every_s=60.0) if store.is_main else None
    rng = phase_key(cfg.seed, key.id)
    n_batches = -(-len(prompts) // bs)
    ids = pipeline.prompt_ids(ctx.tokenizer, prompts, cfg.data)
    pad_id = int(ctx.tokenizer.pad_token_id or 0)
    store.status(f"sampling {num_samples} answers x {len(prompts)} {split} prompts from {policy}")
    bar = tqdm(total=len(prompts), initial=done, desc=f"sample {policy} {split}", disable=not store.is_main,
               leave=False)
    # Closing flushes every finished batch (on GCS too) whether the phase ends, is preempted or fails.
    try:
        for b in range(done // bs, n_batches):
            recs = prompts[b * bs:(b + 1) * bs]
            prompt_ids, prompt_mask = pipeline.prompt_batch(ids[b * bs:(b + 1) * bs], bs, cfg.data, pad_id)
            out = sampler.generate(
                slot.config, gen_params, prompt_ids, prompt_mask, jax.random.fold_in(rng, b),
                num_samples=num_samples, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                top_p=settings.top_p, top_k=settings.top_k, eos_token_id=slot.config.eos_token_ids,
                stop_strings=tuple(cfg.sampling.stop_strings), tokenizer=ctx.tokenizer, mesh=store.mesh,
            )
            tokens, lengths = sharding.to_host(out.tokens), sharding.to_host(out.lengths)
            lines = []
            for i, rec in enumerate(recs):
                for s in range(num_samples):
                    text = tokenize.decode_response(ctx.tokenizer, tokens[i, s, : lengths[i, s]],
                                                    cfg.sampling.stop_strings)
                    lines.append({"prompt_id": rec["prompt_id"], "prompt": rec["prompt"], "sample": s,
                                  "response": text, "num_tokens": int(lengths[i, s])})
            if out_file is not None:
                out_file.write_jsonl(lines)
            fit.progress(key.id, b + 1)
            bar.update(len(recs))
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
    return scoring.score_texts_with(slot.config, slot.params, ctx.tokenizer, texts, ctx.cfg.data, ctx.store.mesh,
                                    ctx.cfg.eval.batch_size)


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


def _judge(ctx: Context, rule: str, rm: str | None, rows: Sequence[dict], policy: str
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Selection scores [P, S] of a samples file's rows by `rule` ("rm": `rm`'s scores; "oracle":
    r*), and r* [P, S] where the world knows it."""
    s = ctx.cfg.apo.num_samples
    true = None
    if ctx.data.true_reward is not None:
        true = np.asarray([ctx.data.true_reward(r["prompt"], r["response"]) for r in rows]).reshape(-1, s)
    if rule == "rm":
        return score(ctx, rm, rows, f"{policy}_llm").reshape(-1, s), true
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
    s = ctx.cfg.apo.num_samples
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
    _log_selection(ctx, out_name, rm if rule == "rm" else "oracle", policy, rows, scores_ps, true, valid)
    return chosen


def select_pairs(ctx: Context, rule: str, rm: str | None, samples_path: str, policy: str,
                 out_name: str) -> list[dict]:
    """Best vs worst of S per prompt by the selection rule: the policy's preference pairs for
    DPO. Prompts whose best and worst are the same text or tied in score give no pair. Written to
    pairs/<out_name>.jsonl."""
    rows = fileio.read_jsonl(samples_path)
    s = ctx.cfg.apo.num_samples
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
    _log_selection(ctx, out_name, rm if rule == "rm" else "oracle", policy, rows, scores_ps, true, valid)
    return pairs


def evaluate_rm(ctx: Context, name: str, label: str, schedule: str, rnd: int) -> dict:
    """Table 2's numbers for RM `name`: accuracy and both ECEs on HH_Dev and HH_Test."""
    store, data, cfg = ctx.store, ctx.data, ctx.cfg

    def run() -> dict:
        slot = store.model(name)
        rec = {"kind": "rm_eval", "model": label, "name": name, "schedule": schedule, "round": rnd}
        for split, pairs in (("dev", data.dev_pairs), ("test", data.test_pairs)):
            good = score_texts(ctx, slot, [(p["prompt"], p["chosen"]) for p in pairs])
            bad = score_texts(ctx, slot, [(p["prompt"], p["rejected"]) for p in pairs])
            rec[f"{split}_acc"] = float(evaluation.preference_accuracy(good, bad))
            rec[f"{split}_ece"] = float(evaluation.expected_calibration_error(good, bad, cfg.eval.num_bins))
            rec[f"{split}_ece_weighted"] = float(
                evaluation.expected_calibration_error(good, bad, cfg.eval.num_bins, weighted=True))
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
    store, data, cfg = ctx.store, ctx.data, ctx.cfg

    def run() -> dict:
        path = sample(ctx, policy, "test", data.test_prompts, cfg.sampling.test, 1)
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


def export(ctx: Context, names: Sequence[str]) -> dict[str, str]:
    """Writes each model as a Hugging Face directory under export/<name>/ (skipping finished ones)."""
    out = {}
    for name in dict.fromkeys(names):
        path = fileio.join(ctx.store.run_dir, "export", name)
        if not hf.is_saved(path):
            slot = ctx.store.model(name)
            # An RM export scores in transformers what the game scored (issue #16).
            hf.save_pretrained(path, slot.config, slot.params, tokenizer=ctx.tokenizer,
                               reward_position=ctx.cfg.data.reward_position,
                               prompt_format=ctx.cfg.data.get("prompt_format", "hh"))
            if models.lora.has_adapters(slot.params):  # and the LoRA adapter (+ head) in PEFT's format
                hf.save_adapter(fileio.join(ctx.store.run_dir, "export", f"{name}_adapter"), slot.config, slot.params)
        out[name] = path
    return out
