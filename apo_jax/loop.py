"""The APO game (paper Algorithm 1): stage 0, then rounds of sample -> RM update -> best-of-S -> SFT.

Every unit of work is a named *phase* whose result is recorded in `loop_state.json` when it
finishes; a restarted run skips finished phases. Training phases save their train state and data
position every `checkpoint.save_every_steps` steps and resume from there; sampling phases append
each finished batch to their JSONL file and resume after the last one. RNG keys are derived from
the seed and the phase name, never carried across phases, so a resumed run draws the same numbers
as an uninterrupted one.

Model names: `policy_0` (the initial policy), `rm_base`, `rm_test`, and per round R and schedule:
`rm_apo_r{R}`, `rm_apo_seq_r{R}`, `rm_ablation_r{R}`, `policy_{schedule}_r{R}`. In round 1 the
`apo` and `apo_seq` RMs are the same model (both fine-tune RM_Base on the same data) and all
schedules share policy_0's samples, so that work is done once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from apo_jax import checkpointing, evaluation, fileio, hf, models, reporting, sampler, sharding, train
from apo_jax.data import batching, pipeline, tokenize
from apo_jax.metrics import MetricsWriter

log = logging.getLogger("apo_jax")


def phase_key(seed: int, name: str) -> jax.Array:
    """A PRNG key for a phase: a function of the seed and the phase name only."""
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    return jax.random.fold_in(jax.random.PRNGKey(seed), digest)


def phase_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little")


def _fault_point(phase: str, step: int) -> None:
    """Test hook: `APO_JAX_FAULT=<phase>:<step>` kills the process there, as a crash would."""
    spec = os.environ.get("APO_JAX_FAULT", "")
    if spec and spec == f"{phase}:{step}":
        log.warning("APO_JAX_FAULT: killing the process at %s step %d", phase, step)
        os._exit(42)


@dataclasses.dataclass
class ModelSlot:
    """Where a model's params live and how to run it."""

    config: models.LlamaConfig
    params: Any


class Game:
    """One APO run: owns the mesh, the data, the model store and the loop state."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        self.run_dir = os.fspath(fileio.path(cfg.run_dir))  # local: absolute; gs://...: as given
        fileio.makedirs(self.run_dir)
        self.is_main = jax.process_index() == 0
        self.mesh = sharding.make_mesh(sharding.MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
        self.state = checkpointing.LoopState(fileio.join(self.run_dir, "loop_state.json"))
        self.store = checkpointing.ModelStore(fileio.join(self.run_dir, "models"))
        self.metrics = MetricsWriter(self.run_dir)
        self._cache: dict[str, ModelSlot] = {}
        if self.is_main:
            fileio.write_json(fileio.join(self.run_dir, "config.json"), cfg.to_dict(), indent=1, sort_keys=True,
                              default=str)
        self.status("preparing data")
        self.data = pipeline.prepare(cfg, self.run_dir)
        self.tokenizer = self.data.tokenizer
        self.stop_ids = tuple(
            tuple(self.tokenizer.encode(s, add_special_tokens=False)) for s in cfg.sampling.stop_strings
        )

    # ------------------------------------------------------------------ helpers

    def status(self, msg: str) -> None:
        if self.is_main:
            tqdm.write(f"[apo_jax {time.strftime('%H:%M:%S')}] {msg}")

    def phase(self, name: str, fn: Callable[[], Any]) -> Any:
        """Runs `fn` unless `name` finished in an earlier run; records and returns its result."""
        if self.state.done(name):
            return self.state.result(name)
        result = fn()
        self.metrics.flush()  # a finished phase's records reach storage before it counts as done
        self.state.mark_done(name, result)
        return result

    def _path(self, *parts: str) -> str:
        """A path under the run dir (a string: local or gs://); its parent exists afterwards."""
        path = fileio.join(self.run_dir, *parts)
        fileio.makedirs(fileio.path(path).parent)
        return path

    def runtime(self, which: str) -> dict[str, Any]:
        m = self.cfg[which]
        return dict(param_dtype=m.param_dtype, dtype=m.dtype, remat_policy=m.remat_policy,
                    attention_impl=m.attention_impl)

    def model(self, name: str) -> ModelSlot:
        """A finished model's params on the mesh (kept in memory; small models are cheap)."""
        if name in self._cache:
            return self._cache[name]
        meta = self.state.result(f"model:{name}")
        config = models.LlamaConfig(**_config_from_json(meta["config"]))
        like = jax.eval_shape(lambda: _params_like(config, meta["heads"]))
        like = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            like, sharding.tree_shardings(like, self.mesh))
        params = self.store.load(name, like)
        slot = ModelSlot(config, params)
        self._cache[name] = slot
        return slot

    def save_model(self, name: str, config: models.LlamaConfig, params: Any) -> None:
        self.store.save(name, params)
        self.metrics.flush()  # the training curve reaches storage before the model counts as done
        heads = sorted(k for k in ("lm_head", "score") if k in params)
        self.state.mark_done(f"model:{name}", {"config": _config_to_json(config), "heads": heads})
        self._cache[name] = ModelSlot(config, params)
        self._drop_train_checkpoints(name)

    def _drop_train_checkpoints(self, phase: str) -> None:
        """Deletes a training phase's step checkpoints once its model is saved and recorded."""
        _sync(f"drop ckpt/{phase}")  # no process still reads them
        ckpt_dir = fileio.path(fileio.join(self.run_dir, "ckpt", phase))
        if self.is_main and ckpt_dir.exists():
            ckpt_dir.rmtree()

    def have_model(self, name: str) -> bool:
        return self.state.done(f"model:{name}")

    # ------------------------------------------------------------------ stage 0

    def initial_policy(self) -> None:
        if self.have_model("policy_0"):
            return
        cfg = self.cfg
        if cfg.policy.checkpoint:
            self.status(f"loading the initial policy from {cfg.policy.checkpoint}")
            config, params = hf.load_pretrained(cfg.policy.checkpoint, mesh=self.mesh, **self.runtime("policy"))
            params.pop("score", None)
            self.save_model("policy_0", config, params)
            return
        # No checkpoint: a new LLaMA pretrained by SFT on the demonstrations (the synthetic world's
        # analogue of the paper's Alpaca policy).
        tok = self.tokenizer
        config = models.LlamaConfig(
            vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, **dict(cfg.policy.arch), **self.runtime("policy"),
            scan_layers=cfg.policy.scan_layers,
        )
        params = models.init_params(config, phase_key(cfg.seed, "policy_init"))
        params = self.train_sft("policy_pretrain", config, params, self.data.demonstrations, cfg.policy.pretrain,
                                lr=cfg.policy.pretrain.lr)
        self.save_model("policy_0", config, params)
        self._drop_train_checkpoints("policy_pretrain")

    def rm_init(self) -> tuple[models.LlamaConfig, Any]:
        """The RM starting point: an HF LM/RM checkpoint, or the initial policy's weights."""
        cfg = self.cfg
        if cfg.rm.init_checkpoint:
            config, params = hf.load_pretrained(cfg.rm.init_checkpoint, mesh=self.mesh, **self.runtime("rm"))
        else:
            slot = self.model("policy_0")
            config, params = slot.config.replace(**self.runtime("rm")), slot.params
        return config, train.rm_params_from(config, params, phase_key(cfg.seed, "rm_head"), cfg.rm.reward_head_std)

    def train_reward_model(self, name: str, init: str | None, pairs: Sequence[dict], opt: Any) -> None:
        """Trains RM `name` from model `init` (None: the RM init checkpoint) on `pairs`."""
        if self.have_model(name):
            return
        if init is None:
            config, params = self.rm_init()
        else:
            slot = self.model(init)
            config, params = slot.config, slot.params
        params = self.train_rm(name, config, params, pairs, opt)
        self.save_model(name, config, params)

    # ------------------------------------------------------------------ training phases

    def _train(self, name: str, kind: str, config: models.LlamaConfig, params: Any,
               examples: pipeline.TokenizedSet, opt_cfg: Any, lr: float) -> Any:
        cfg = self.cfg
        batch_size = opt_cfg.batch_size
        steps_per_epoch = max(1, len(examples) // batch_size)
        total = opt_cfg.max_steps if opt_cfg.max_steps > 0 else steps_per_epoch * opt_cfg.epochs
        opt = train.OptimizerConfig(
            lr=lr, warmup_steps=min(opt_cfg.warmup_steps, max(total - 1, 0)), total_steps=total,
            schedule=opt_cfg.schedule, weight_decay=opt_cfg.weight_decay, grad_clip=opt_cfg.grad_clip,
            b1=opt_cfg.b1, b2=opt_cfg.b2,
        )
        if kind == "rm":
            state = train.init_state(config, params, opt, self.mesh)
            step_fn = train.make_rm_train_step(config, opt, self.mesh, apo_weight=cfg.rm.apo_weight,
                                               human_weight=cfg.rm.human_weight, grad_accum=opt_cfg.grad_accum)
        else:
            state = train.init_state(config, params, opt, self.mesh)
            step_fn = train.make_sft_train_step(config, opt, self.mesh, normalize=cfg.sft.normalize,
                                                grad_accum=opt_cfg.grad_accum)
        it = batching.BatchIterator(len(examples), batch_size, seed=phase_seed(cfg.seed, name))
        ckpt = checkpointing.TrainCheckpointer(fileio.join(self.run_dir, "ckpt", name), save_every=cfg.checkpoint.save_every_steps,
                                               max_to_keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
                                               preemption_check_every=cfg.log_every_steps)
        start = ckpt.latest_step() or 0
        if start:
            state, data_state = ckpt.restore(start, state)
            it.restore(data_state)
            self.metrics.rewind(name, start)  # the steps after the checkpoint are logged again
            self.status(f"{name}: resumed at step {start}/{total}")
        else:
            self.status(f"{name}: {total} steps of {kind.upper()} on {len(examples)} examples, batch {batch_size}")
        pending: list[tuple[int, Any]] = []
        bar = tqdm(total=total, initial=start, desc=name, disable=not self.is_main, leave=False)
        for step in range(start + 1, total + 1):
            local = examples.batch(it.next_indices())  # this process's rows only
            state, metrics = step_fn(state, sharding.shard_batch(local, self.mesh))
            pending.append((step, metrics))
            if step % cfg.log_every_steps == 0 or step == total:
                self._flush_metrics(name, pending)
                pending = []
            if ckpt.should_save(step) and step != total:
                self._flush_metrics(name, pending)
                pending = []
                ckpt.save(step, state, it.state())
                if checkpointing.preemption_requested():
                    ckpt.close()
                    raise checkpointing.Preempted(f"{name} step {step}")
            _fault_point(name, step)
            bar.update(1)
        bar.close()
        ckpt.close()
        return state.params

    def _flush_metrics(self, name: str, pending: list[tuple[int, Any]]) -> None:
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])  # one host sync per log interval
        for (step, _), m in zip(pending, fetched):
            train.check_finite(m, step, name)
        step, m = pending[-1][0], fetched[-1]
        self.metrics.write({"phase": name, "step": step, **{k: float(v) for k, v in m.items()}},
                           step=step, tb_prefix=name)

    def train_rm(self, name: str, config: models.LlamaConfig, params: Any, pairs: Sequence[dict], opt: Any) -> Any:
        examples = pipeline.rm_set(self.tokenizer, pairs, self.cfg.data)
        return self._train(name, "rm", config, params, examples, opt, opt.lr)

    def train_sft(self, name: str, config: models.LlamaConfig, params: Any, examples: Sequence[dict], opt: Any,
                  lr: float) -> Any:
        return self._train(name, "sft", config, params, pipeline.sft_set(self.tokenizer, examples, self.cfg.data),
                           opt, lr)

    # ------------------------------------------------------------------ sampling and scoring

    def sample(self, policy: str, split: str, prompts: Sequence[dict], settings: Any, num_samples: int) -> str:
        """Samples `num_samples` answers per prompt from `policy`; returns the JSONL path.

        Resumable: finished batches are appended to the file; a restart continues after them.
        """
        name = f"samples:{policy}:{split}"
        path = self._path("samples", f"{policy}_{split}.jsonl")
        if self.state.done(name):
            return path
        slot = self.model(policy)
        # Compute-dtype weights for the whole phase: identical samples, half the bytes per decode
        # step when float32 master weights run in bfloat16.
        gen_params = models.params_for_generation(slot.config, slot.params)
        cfg = self.cfg
        bs = cfg.sampling.batch_size
        done = len(fileio.complete_lines(path)) // num_samples
        done -= done % bs  # resume at a batch boundary (a torn last batch is redone)
        if self.is_main:
            # Atomic, so other processes counting the lines meanwhile see the old or the new file.
            fileio.truncate_lines(path, done * num_samples)
        # Locally each batch is appended and fsynced; on GCS the object is rewritten at most once a
        # minute (a restart redoes the batches that had not reached the bucket).
        out_file = fileio.Appender(path, flush_every_s=60.0) if self.is_main else None
        key = phase_key(cfg.seed, name)
        n_batches = -(-len(prompts) // bs)
        ids = pipeline.prompt_ids(self.tokenizer, prompts, cfg.data)
        pad_id = int(self.tokenizer.pad_token_id or 0)
        self.status(f"sampling {num_samples} answers x {len(prompts)} {split} prompts from {policy}")
        bar = tqdm(total=len(prompts), initial=done, desc=f"sample {policy} {split}", disable=not self.is_main,
                   leave=False)
        for b in range(done // bs, n_batches):
            recs = prompts[b * bs:(b + 1) * bs]
            prompt_ids, prompt_mask = pipeline.prompt_batch(ids[b * bs:(b + 1) * bs], bs, cfg.data, pad_id)
            out = sampler.generate(
                slot.config, gen_params, prompt_ids, prompt_mask, jax.random.fold_in(key, b),
                num_samples=num_samples, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                top_p=settings.top_p, top_k=settings.top_k, eos_token_id=slot.config.eos_token_ids,
                stop_sequences=self.stop_ids, mesh=self.mesh,
            )
            tokens, lengths = _gather(out.tokens), _gather(out.lengths)
            lines = []
            for i, rec in enumerate(recs):
                for s in range(num_samples):
                    text = tokenize.decode_response(self.tokenizer, tokens[i, s, : lengths[i, s]],
                                                    cfg.sampling.stop_strings)
                    lines.append({"prompt_id": rec["prompt_id"], "prompt": rec["prompt"], "sample": s,
                                  "response": text, "num_tokens": int(lengths[i, s])})
            if out_file is not None:
                out_file.write_jsonl(lines)
            _fault_point(name, b + 1)
            bar.update(len(recs))
        bar.close()
        if out_file is not None:
            out_file.close()
        _sync(name)  # every process reads the file next; process 0 must have finished writing it
        self.state.mark_done(name, {"path": path, "count": len(prompts) * num_samples})
        return path

    def score(self, rm: str, rows: Sequence[dict], tag: str) -> np.ndarray:
        """RM scores of the sample rows of a samples file, cached as scores/<rm>__<tag>.jsonl."""
        name = f"scores:{rm}:{tag}"
        path = self._path("scores", f"{rm}__{tag}.jsonl")
        if self.state.done(name):
            return np.asarray([r["score"] for r in fileio.read_jsonl(path)], np.float32)
        scores = self.score_pairs_text(self.model(rm), [(r["prompt"], r["response"]) for r in rows])
        if self.is_main:
            fileio.write_jsonl(path, [{"prompt_id": r["prompt_id"], "sample": r["sample"], "score": float(s)}
                                for r, s in zip(rows, scores)])
        _sync(name)  # the file is complete before any process marks the phase done
        self.state.mark_done(name, {"path": path})
        return scores

    def score_pairs_text(self, slot: ModelSlot, texts: Sequence[tuple[str, str]]) -> np.ndarray:
        """Rewards of (prompt, response) texts, in batches of eval.batch_size."""
        bs = self.cfg.eval.batch_size
        score_fn = train.make_rm_score_fn(slot.config, self.mesh)
        examples = pipeline.score_set(self.tokenizer, texts, self.cfg.data)
        out = []
        for i in range(0, len(texts), bs):
            rows = np.arange(i, i + bs) % len(texts)  # the last batch is filled up with repeats
            g = sharding.shard_batch(examples.batch(rows), self.mesh)
            out.append(score_fn(slot.params, g["input_ids"], g["input_mask"]))  # stays on device
        # One transfer at the end: the host builds the next batch while the device scores.
        return np.concatenate([_gather(x) for x in out])[: len(texts)] if out else np.zeros((0,), np.float32)

    def best_of_s(self, rm: str, samples_path: str, policy: str, out_name: str) -> list[dict]:
        """Best-of-S answers per prompt by `rm`; written to best/<out_name>.jsonl."""
        rows = fileio.read_jsonl(samples_path)
        scores = self.score(rm, rows, f"{policy}_llm")
        s = self.cfg.apo.num_samples
        scores_ps = scores.reshape(-1, s)
        best = np.argmax(scores_ps, axis=1)
        chosen = []
        for p, k in enumerate(best):
            r = rows[p * s + int(k)]
            chosen.append({"prompt_id": r["prompt_id"], "prompt": r["prompt"], "response": r["response"],
                           "score": float(scores_ps[p, k])})
        if self.is_main:
            fileio.write_jsonl(self._path("best", f"{out_name}.jsonl"), chosen)
        if self.data.true_reward is not None:
            # How much of the best-of-S headroom the RM finds: r* of its picks against the mean
            # sample and the oracle's pick (the synthetic world only).
            true = np.asarray([self.data.true_reward(r["prompt"], r["response"]) for r in rows]).reshape(-1, s)
            rec = {"kind": "best_of_s", "name": out_name, "rm": rm, "policy": policy,
                   "true_reward_picked": float(np.mean(true[np.arange(len(best)), best])),
                   "true_reward_mean_sample": float(np.mean(true)),
                   "true_reward_oracle_pick": float(np.mean(true.max(axis=1)))}
            self.metrics.write(rec)
            self.status(f"best-of-{s} {out_name}: r* of {rm}'s picks {rec['true_reward_picked']:.3f} (mean sample "
                        f"{rec['true_reward_mean_sample']:.3f}, oracle {rec['true_reward_oracle_pick']:.3f})")
        return chosen

    # ------------------------------------------------------------------ evaluation

    def evaluate_rm(self, name: str, schedule: str, rnd: int) -> dict:
        def run():
            slot = self.model(name)
            rec = {"kind": "rm_eval", "model": _rm_label(name), "name": name, "schedule": schedule, "round": rnd}
            for split, pairs in (("dev", self.data.dev_pairs), ("test", self.data.test_pairs)):
                good = self.score_pairs_text(slot, [(p["prompt"], p["chosen"]) for p in pairs])
                bad = self.score_pairs_text(slot, [(p["prompt"], p["rejected"]) for p in pairs])
                rec[f"{split}_acc"] = float(evaluation.preference_accuracy(good, bad))
                rec[f"{split}_ece"] = float(evaluation.expected_calibration_error(good, bad, self.cfg.eval.num_bins))
                rec[f"{split}_ece_weighted"] = float(
                    evaluation.expected_calibration_error(good, bad, self.cfg.eval.num_bins, weighted=True))
                if self.data.true_reward is not None:
                    rec[f"{split}_true_acc"] = pipeline.true_order_accuracy(self.data, pairs, good, bad)
            self.metrics.write(rec)
            self.status(f"eval {name}: test acc {rec['test_acc']:.3f} ece {rec['test_ece']:.3f}, "
                        f"dev acc {rec['dev_acc']:.3f} ece {rec['dev_ece']:.3f}")
            return rec

        return self.phase(f"eval_rm:{name}:{schedule}", run)

    def evaluate_policy(self, policy: str, schedule: str, rnd: int) -> dict:
        def run():
            path = self.sample(policy, "test", self.data.test_prompts, self.cfg.sampling.test, 1)
            rows = fileio.read_jsonl(path)
            scores = self.score("rm_test", rows, f"{policy}_test")
            rec = {"kind": "policy_eval", "policy": policy, "schedule": schedule, "round": rnd,
                   "avg_score": float(np.mean(scores)), "num_answers": len(rows)}
            if self.data.true_reward is not None:
                rec["true_reward"] = float(np.mean([self.data.true_reward(r["prompt"], r["response"]) for r in rows]))
            if self.is_main:
                fileio.write_jsonl(self._path("answers", f"{policy}_test.jsonl"),
                             [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "response": r["response"]}
                              for r in rows])
            self.metrics.write(rec)
            extra = f", true reward {rec['true_reward']:.3f}" if "true_reward" in rec else ""
            self.status(f"eval {policy}: RM_Test score {rec['avg_score']:.3f}{extra}")
            return rec

        return self.phase(f"eval_policy:{policy}:{schedule}", run)

    # ------------------------------------------------------------------ the game

    def play(self) -> str:
        cfg = self.cfg
        d = self.data
        s = cfg.apo.num_samples
        schedules = tuple(cfg.apo.schedules)
        self.status(f"data: {len(d.rm_pairs)} RM pairs ({len(d.gold)} gold queries), {len(d.llm_prompts)} policy "
                    f"queries, {len(d.dev_pairs)} dev pairs, {len(d.test_pairs)} test pairs")

        # Stage 0: the initial policy, RM_Base on D_P, and the evaluation RM on all train pairs.
        self.phase("stage0:policy", lambda: self.initial_policy())
        if cfg.rm.base_checkpoint:
            self._import_rm("rm_base", cfg.rm.base_checkpoint)
        self.train_reward_model("rm_base", None, d.rm_pairs, cfg.rm.base)
        if cfg.rm.test_checkpoint:
            self._import_rm("rm_test", cfg.rm.test_checkpoint)
        self.train_reward_model("rm_test", None, d.all_train_pairs, cfg.rm.test)
        rm_records = [self.evaluate_rm("rm_base", "rjs", 0), self.evaluate_rm("rm_test", "eval", 0)]
        policy_records = [dict(self.evaluate_policy("policy_0", "base", 0))]

        rm_of: dict[str, str] = {sched: "rm_base" for sched in schedules}
        policy_of: dict[str, str] = {sched: "policy_0" for sched in schedules}
        evaluated = {"rm_base", "rm_test"}
        for rnd in range(1, cfg.apo.rounds + 1):
            lr = float(cfg.sft.lrs[rnd - 1])
            for sched in schedules:
                prev_policy = policy_of[sched]
                # 1-2. The RM update of this schedule.
                if sched == "rjs":
                    rm = "rm_base"
                elif sched == "ablation":
                    rm = f"rm_ablation_r{rnd}"
                    self.train_reward_model(rm, "rm_base", d.rm_pairs, cfg.rm.apo)
                else:
                    init = "rm_base" if sched == "apo" or rnd == 1 else rm_of[sched]
                    rm = f"rm_apo_r{rnd}" if sched == "apo" or rnd == 1 else f"rm_apo_seq_r{rnd}"
                    if not self.have_model(rm):
                        gold_samples = self.sample(prev_policy, "gold", d.gold, cfg.sampling.train, s)
                        apo_pairs = pipeline.apo_pairs(d.gold, fileio.read_jsonl(gold_samples))
                        self.train_reward_model(rm, init, list(d.rm_pairs) + apo_pairs, cfg.rm.apo)
                rm_of[sched] = rm
                if rm not in evaluated:  # round 1's apo and apo_seq RMs are one model
                    evaluated.add(rm)
                    rm_records.append(self.evaluate_rm(rm, sched, rnd))
                # 3. Best-of-S on the policy queries, judged by this schedule's RM.
                llm_samples = self.sample(prev_policy, "llm", d.llm_prompts, cfg.sampling.train, s)
                # Round 1 of apo_seq is round 1 of apo (same RM, same samples, same start).
                policy = "policy_apo_r1" if sched == "apo_seq" and rnd == 1 else f"policy_{sched}_r{rnd}"
                if not self.have_model(policy):
                    best = self.best_of_s(rm, llm_samples, prev_policy, f"{sched}_r{rnd}")
                    # 4. SFT of the previous round's policy on its own best answers.
                    slot = self.model(prev_policy)
                    params = self.train_sft(policy, slot.config, slot.params, best, cfg.sft, lr)
                    self.save_model(policy, slot.config, params)
                policy_of[sched] = policy
                policy_records.append(self.evaluate_policy(policy, sched, rnd))

        records = rm_records + policy_records
        outputs = reporting.write_reports(records, self.run_dir) if self.is_main else {}
        exports = self.export(schedules, rm_of, policy_of)
        summary_path = self._path("summary.json")
        if self.is_main:
            fileio.write_json(summary_path, {"records": records, "outputs": outputs, "exports": exports}, indent=1)
        self.metrics.close()
        return self._summary_text(outputs, exports, summary_path)

    def _import_rm(self, name: str, path: str) -> None:
        if self.have_model(name):
            return
        config, params = hf.load_pretrained(path, mesh=self.mesh, **self.runtime("rm"))
        if "score" not in params:
            raise hf.CheckpointError(f"{path}: has no score.weight; rm.{name.split('_')[1]}_checkpoint must be a "
                                     "reward model (LlamaForSequenceClassification, num_labels=1)")
        self.save_model(name, config, params)

    def export(self, schedules: Sequence[str], rm_of: dict[str, str], policy_of: dict[str, str]) -> dict[str, str]:
        out = {}
        names = dict.fromkeys(["rm_base", "rm_test"] + [rm_of[s] for s in schedules] + [policy_of[s] for s in schedules])
        for name in names:
            path = fileio.join(self.run_dir, "export", name)
            if not hf.is_saved(path):
                slot = self.model(name)
                hf.save_pretrained(path, slot.config, slot.params, tokenizer=self.tokenizer)
            out[name] = path
        return out

    def _summary_text(self, outputs: dict[str, str], exports: dict[str, str], summary_path: str) -> str:
        lines = ["", fileio.read_text(outputs["tables"]) if outputs else "", "apo_jax: run finished. Outputs in "
                 f"{self.run_dir}:"]
        for key, path in outputs.items():
            lines.append(f"  {key:16s} {path}")
        lines.append(f"  {'summary':16s} {summary_path}")
        lines.append(f"  {'metrics':16s} {self.metrics.jsonl_path}")
        lines.append(f"  {'samples':16s} {fileio.join(self.run_dir, 'samples')}")
        lines.append(f"  {'best-of-S':16s} {fileio.join(self.run_dir, 'best')}")
        lines.append(f"  {'HF exports':16s} {fileio.join(self.run_dir, 'export')} ({len(exports)} models)")
        lines.append(f"Compiled programs this process: {len(train._STEP_CACHE)} train steps, "
                     f"{sampler.COMPILES['prefill']} prefill, {sampler.COMPILES['decode']} decode "
                     "(one per model shape, length bucket and sampling setting).")
        return "\n".join(lines)


def preflight(cfg: ml_collections.ConfigDict) -> None:
    """Resolves every checkpoint the run will read (local dir or hub id) before any work starts,
    and reports all that cannot be had at once, each with its config field."""
    errors = []
    fields = ["policy.checkpoint", "rm.init_checkpoint", "rm.base_checkpoint", "rm.test_checkpoint"]
    if cfg.data.kind == "hh":
        fields.append("data.tokenizer")
    for field in fields:
        section, key = field.split(".")
        path = cfg[section][key]
        if not path:
            continue
        if field == "data.tokenizer" and fileio.is_remote(path):
            if not fileio.exists(path):
                errors.append(f"{field}: {path}: no such tokenizer directory")
            continue
        try:
            hf.resolve_checkpoint_dir(path)
        except hf.CheckpointError as e:
            errors.append(f"{field}: {e} Override: --config.{field}=/local/dir")
    if cfg.data.kind == "hh" and os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0"):
        for field in ("hh_train", "hh_test"):
            if not (os.path.exists(cfg.data[field]) or fileio.is_remote(cfg.data[field])):
                errors.append(f"data.{field}: {cfg.data[field]!r} is a hub id but HF_DATASETS_OFFLINE is set; pass a "
                              f"local copy of HH-RLHF: --config.data.{field}=/local/hh-rlhf (a directory holding "
                              "helpful-base/ and harmless-base/ with train/test .jsonl.gz)")
    if errors:
        raise hf.CheckpointError("cannot start:\n  " + "\n  ".join(errors))


def run(cfg: ml_collections.ConfigDict) -> str:
    checkpointing.install_preemption_handler()
    game = Game(cfg)
    try:
        with sharding.activation_sharding(None):
            return game.play()
    finally:
        game.metrics.close()  # a preempted or failed run keeps the records it logged


# ---------------------------------------------------------------------------------------------
# Small utilities.


def _rm_label(name: str) -> str:
    if name == "rm_base":
        return "RM_Base"
    if name == "rm_test":
        return "RM_Test"
    if name.startswith("rm_ablation_r"):
        return f"RM_Base-AB-v{name.rsplit('r', 1)[1]}"
    if name.startswith("rm_apo_seq_r"):
        return f"RM_APO-v{name.rsplit('r', 1)[1]}-seq"
    if name.startswith("rm_apo_r"):
        return f"RM_APO-v{name.rsplit('r', 1)[1]}"
    return name


def _config_to_json(config: models.LlamaConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    d["rope_scaling"] = [list(kv) for kv in config.rope_scaling] if config.rope_scaling else None
    return d


def _config_from_json(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    if d.get("rope_scaling"):
        d["rope_scaling"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in d["rope_scaling"])
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = tuple(d["eos_token_id"])
    return d


def _params_like(config: models.LlamaConfig, heads: Sequence[str]) -> Any:
    params = models.init_params(config, jax.random.PRNGKey(0), lm_head="lm_head" in heads,
                                reward_head="score" in heads)
    return params


def _gather(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _sync(tag: str) -> None:
    """Waits for every process at `tag`: files process 0 wrote before it are then complete."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(tag)
