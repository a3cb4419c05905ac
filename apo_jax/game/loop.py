"""The APO game (paper Algorithm 1) as recipes over the run store, driven by the schedule table.

Stage 0 makes the initial policy (`policy_0`), RM_Base (on D_P) and the evaluation RM RM_Test
(on all train pairs). Then, for every round and every schedule row (`apo_jax.game.schedules`):
the schedule's RM update (1-2: fine-tune on D_P [+ D_APO: golden answers above the current
policy's samples]), best-of-S on the policy queries by the schedule's selection rule (3), and
the policy update on the picks (4). Every model is named by its *recipe* (what it starts from,
the learning rule, the data, the optimizer, the round): two schedules that ask for the same
recipe get the same model, so round 1 of `apo` and `apo_seq` share one RM and one policy
without a special case, and the work is done once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from apo_jax import config as config_lib
from apo_jax import compiled, models, sharding
from apo_jax.evaluation import metrics, reporting
from apo_jax.game import phases, schedules
from apo_jax.io import fileio, hf
from apo_jax.training import objectives, train
from apo_jax.data import pipeline
from apo_jax.game.store import RunStore, phase_key


# ------------------------------------------------------------------------------------------
# Recipes: a model's identity.


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a model is: trained from `init` (a parent recipe or a source) with `objective` on
    `data` using the optimizer section `optimizer` in round `round`. Equal recipes are one model."""

    head: str
    """"lm" (a policy) or "score" (a reward model)."""
    init: Any
    """A parent `Recipe`, or a source: "policy.checkpoint", "rm.init", "new", "rm.base_checkpoint",
    "rm.test_checkpoint" (the last two are imported RMs, not trained)."""
    objective: str = ""
    """Registered objective name ("" for imports)."""
    data: tuple = ()
    """Data references (`Human`, `AllTrain`, `Demos`, `APOPairs`, `BestOfS`)."""
    optimizer: str = ""
    """Dotted config section of the optimizer."""
    round: int = 0


@dataclasses.dataclass(frozen=True)
class Human:
    """D_P: the human preference pairs of HH_RM."""


@dataclasses.dataclass(frozen=True)
class AllTrain:
    """Every train pair (RM_Test's data)."""


@dataclasses.dataclass(frozen=True)
class Demos:
    """The synthetic world's demonstrations (the initial policy's pretraining data)."""


@dataclasses.dataclass(frozen=True)
class APOPairs:
    """D_APO: golden answers above S samples of `policy` for each gold query."""

    policy: Recipe


@dataclasses.dataclass(frozen=True)
class BestOfS:
    """The best of S samples of `policy` on the policy queries, by `rule` (judged by `rm`)."""

    policy: Recipe
    rule: str
    rm: Recipe | None


@dataclasses.dataclass(frozen=True)
class PairOfS(BestOfS):
    """The best vs the worst of S samples of `policy` on the policy queries (DPO's pairs)."""


# What each policy learning rule trains on.
POLICY_DATA = {"sft": BestOfS, "dpo": PairOfS}


class Game:
    """One APO run: the store, the data, the models named so far, and the evaluation records."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        run_dir = os.fspath(fileio.path(cfg.run_dir))  # local: absolute; gs://...: as given
        mesh = sharding.make_mesh(sharding.MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
        self.store = store = RunStore(run_dir, mesh, trackers=lambda: metrics.trackers_from_config(cfg, run_dir))
        if store.is_main:
            fileio.write_json(store.path("config.json"), cfg.to_dict(), indent=1, sort_keys=True, default=str)
        store.status("preparing data")
        self.settings = phases.Settings.from_config(cfg)
        self.ctx = phases.Context(self.settings, cfg.data, store, pipeline.prepare(cfg, run_dir))
        self.names: dict[Recipe, str] = {}
        self.labels: dict[str, str] = {}
        self.rm_records: list[dict] = []
        self.policy_records: list[dict] = []

    # ------------------------------------------------------------------ naming

    def name(self, recipe: Recipe, name: str, label: str = "") -> str:
        """The model of `recipe`: the name it was first given (later names are aliases)."""
        if recipe not in self.names:
            self.names[recipe] = name
            self.labels[name] = label or name
        return self.names[recipe]

    # ------------------------------------------------------------------ building models

    def realize(self, recipe: Recipe) -> str:
        """Makes sure the model of `recipe` exists in the store (training it if needed)."""
        name = self.names[recipe]
        if self.store.has_model(name):
            return name
        cfg = self.cfg
        if recipe.objective == "":  # an imported checkpoint
            self._import(name, recipe)
            return name
        config, params = self._init(recipe)
        records = [r for ref in recipe.data for r in self._records(ref)]
        objective = self._objective(recipe.objective)
        # The section's settings for this round (its per-round rate where it gives `lrs`).
        opt = phases.OptimizerSettings.from_section(config_lib.lookup(cfg, recipe.optimizer), recipe.round)
        phase = "policy_pretrain" if recipe.init == "new" else name
        if records:
            params = phases.train_params(self.ctx, phase, config, params, objective, records, opt)
        else:  # e.g. every prompt's samples tied: nothing to learn from this round
            self.store.status(f"{name}: no training examples; the model is its starting point unchanged")
        base = self.names[recipe.init] if isinstance(recipe.init, Recipe) else None  # LoRA: shared frozen base
        self.store.save_model(name, config, params, base=base)
        self.store.drop_checkpoints(phase)
        return name

    def _init(self, recipe: Recipe) -> tuple[models.ModelConfig, Any]:
        cfg, store = self.cfg, self.store
        if isinstance(recipe.init, Recipe):
            slot = store.model(self.realize(recipe.init))
            return slot.config, slot.params
        if recipe.init == "new":
            # No checkpoint: a new LLaMA, pretrained by SFT on the demonstrations (the synthetic
            # world's analogue of the paper's Alpaca policy).
            tok = self.ctx.tokenizer
            config = models.ModelConfig(
                vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, **dict(cfg.policy.arch), **_runtime(cfg.policy),
                scan_layers=cfg.policy.scan_layers,
            )
            return config, models.init_params(config, phase_key(cfg.seed, "policy_init"))
        if recipe.init == "rm.init":
            # The RM starting point: an HF LM/RM checkpoint, or the initial policy's weights.
            if cfg.rm.init_checkpoint:
                config, params = hf.load_pretrained(cfg.rm.init_checkpoint, mesh=store.mesh, **_runtime(cfg.rm))
            else:
                slot = store.model(self.realize(self.policy_0))
                # The policy's adapters (if any) are folded into its weights: the RM's start.
                config = slot.config.replace(**_runtime(cfg.rm))
                params = models.lora.merge_adapters(slot.config, slot.params)
            params = train.rm_params_from(config, params, phase_key(cfg.seed, "rm_head"), cfg.rm.reward_head_std)
            return config, models.lora.add_adapters(config, params, phase_key(cfg.seed, "rm_lora"))
        raise ValueError(f"unknown model source {recipe.init!r}")

    def _import(self, name: str, recipe: Recipe) -> None:
        cfg, store = self.cfg, self.store
        if recipe.init == "policy.checkpoint":
            store.status(f"loading the initial policy from {cfg.policy.checkpoint}")
            config, params = hf.load_pretrained(cfg.policy.checkpoint, mesh=store.mesh, **_runtime(cfg.policy))
            params.pop("score", None)
        else:
            field = recipe.init
            path = config_lib.lookup(cfg, field)
            config, params = hf.load_pretrained(path, mesh=store.mesh, **_runtime(cfg.rm))
            if "score" not in params:
                raise hf.CheckpointError(f"{path}: has no score.weight; {field} must be a reward model "
                                         "(a *ForSequenceClassification checkpoint, num_labels=1)")
        store.save_model(name, config, params)

    def _objective(self, name: str) -> objectives.Objective:
        return objectives.from_config(name, self.cfg)

    def _records(self, ref: Any) -> list[dict]:
        """The training records a data reference stands for (sampling/selecting them if needed)."""
        ctx, d, st = self.ctx, self.ctx.data, self.settings
        if isinstance(ref, Human):
            return list(d.rm_pairs)
        if isinstance(ref, AllTrain):
            return list(d.all_train_pairs)
        if isinstance(ref, Demos):
            return list(d.demonstrations)
        if isinstance(ref, APOPairs):
            policy = self.realize(ref.policy)
            path = phases.sample(ctx, policy, "gold", d.gold, st.train_sampling, st.num_samples)
            return pipeline.apo_pairs(d.gold, fileio.read_jsonl(path))
        if isinstance(ref, BestOfS):
            policy = self.realize(ref.policy)
            path = phases.sample(ctx, policy, "llm", d.llm_prompts, st.train_sampling, st.num_samples)
            rm = self.realize(ref.rm) if ref.rm is not None else None
            select = phases.select_pairs if isinstance(ref, PairOfS) else phases.select_best_of_s
            return select(ctx, ref.rule, rm, path, policy, self._best_name[ref])
        raise TypeError(f"unknown data reference {ref!r}")

    # ------------------------------------------------------------------ the game

    def play(self) -> str:
        cfg, store, d = self.cfg, self.store, self.ctx.data
        store.status(f"data: {len(d.rm_pairs)} RM pairs ({len(d.gold)} gold queries), {len(d.llm_prompts)} policy "
                     f"queries, {len(d.dev_pairs)} dev pairs, {len(d.test_pairs)} test pairs")
        self._best_name: dict[BestOfS, str] = {}

        # Stage 0: the initial policy, RM_Base on D_P, and the evaluation RM on all train pairs.
        if cfg.policy.checkpoint:
            self.policy_0 = Recipe("lm", "policy.checkpoint")
        else:
            self.policy_0 = Recipe("lm", "new", "sft", (Demos(),), "policy.pretrain")
        self.name(self.policy_0, "policy_0")
        base = (Recipe("score", "rm.base_checkpoint") if cfg.rm.base_checkpoint
                else Recipe("score", "rm.init", "ranking", (Human(),), "rm.base"))
        test = (Recipe("score", "rm.test_checkpoint") if cfg.rm.test_checkpoint
                else Recipe("score", "rm.init", "ranking", (AllTrain(),), "rm.test"))
        self.realize_named(self.policy_0)
        self.realize_named(base, "rm_base", "RM_Base")
        self.realize_named(test, "rm_test", "RM_Test")
        self.evaluate_rm(base, "rjs", 0)
        self.evaluate_rm(test, "eval", 0)
        self.policy_records.append(dict(phases.evaluate_policy(self.ctx, "policy_0", "base", 0, "rm_test")))

        table = [schedules.get(s) for s in cfg.apo.schedules]
        rm_of = {s.name: base for s in table}
        policy_of = {s.name: self.policy_0 for s in table}
        for rnd in range(1, cfg.apo.rounds + 1):
            for sched in table:
                prev_policy = policy_of[sched.name]
                # 1-2. The schedule's RM update.
                if sched.rm is not None:
                    if sched.rm.init == "previous":
                        init = rm_of[sched.name]
                    else:  # RM_Base (paper), or a fresh RM from the init checkpoint (official README)
                        init = base if cfg.rm.apo_init == "base" else "rm.init"
                    data = (Human(), APOPairs(prev_policy)) if sched.rm.apo_pairs else (Human(),)
                    rm = Recipe("score", init, "ranking", data, sched.rm.optimizer, rnd)
                    self.name(rm, sched.rm_name(rnd), sched.rm_label(rnd))
                    self.realize(rm)
                    self.evaluate_rm(rm, sched.name, rnd)
                    rm_of[sched.name] = rm
                # 3. Best-of-S on the policy queries by the schedule's selection rule.
                pick = POLICY_DATA[sched.policy_update](prev_policy, sched.select,
                                                         rm_of[sched.name] if sched.select == "rm" else None)
                self._best_name.setdefault(pick, f"{sched.name}_r{rnd}")
                # 4. The policy update on the picks.
                policy = Recipe("lm", prev_policy, sched.policy_update, (pick,), sched.policy_update, rnd)
                name = self.name(policy, sched.policy_name(rnd))
                self.realize(policy)
                policy_of[sched.name] = policy
                self.policy_records.append(phases.evaluate_policy(self.ctx, name, sched.name, rnd, "rm_test"))

        overopt = []
        if self.settings.overopt_samples > 0:  # every RM as a selector over policy_0's samples
            overopt.append(phases.overoptimization(self.ctx, "policy_0",
                                                   [(r["name"], r["model"]) for r in self.rm_records]))
        records = (self.rm_records + self.policy_records + self._probe_records() + self._selection_records()
                   + overopt)
        outputs = reporting.write_reports(records, store.run_dir) if store.is_main else {}
        final = ["rm_base", "rm_test"] + [self.names[rm_of[s.name]] for s in table] + [
            self.names[policy_of[s.name]] for s in table]
        exports = phases.export(self.ctx, final)
        summary_path = store.path("summary.json")
        if store.is_main:
            fileio.write_json(summary_path, {"records": records, "outputs": outputs, "exports": exports}, indent=1)
        store.close()
        return self._summary_text(outputs, exports, summary_path)

    def realize_named(self, recipe: Recipe, name: str = "", label: str = "") -> str:
        if name:
            self.name(recipe, name, label)
        return self.realize(recipe)

    def evaluate_rm(self, recipe: Recipe, schedule: str, rnd: int) -> None:
        """Evaluates an RM once, under the first schedule and round that asked for it."""
        name = self.names[recipe]
        if any(r["name"] == name for r in self.rm_records):
            return
        self.rm_records.append(phases.evaluate_rm(self.ctx, name, self.labels[name], schedule, rnd))

    def _probe_records(self) -> list[dict]:
        """b(RM) of every evaluated RM as {"kind": "rm_probe", ...} (the synthetic world only)."""
        return [{"kind": "rm_probe", "model": r["model"], "name": r["name"], "schedule": r["schedule"],
                 "round": r["round"], "marker_bias": r["marker_bias"], "marker_bias_se": r["marker_bias_se"]}
                for r in self.rm_records if "marker_bias" in r]

    def _selection_records(self) -> list[dict]:
        """Every best-of-S phase's diagnostics record (logged when its policy was trained, maybe by an
        earlier run of this run dir), the last one per selection. Process 0 writes the reports."""
        if not self.store.is_main:
            return []
        self.store.metrics.flush()
        by_name = {r["name"]: r for r in fileio.read_jsonl(self.store.metrics.jsonl_path, missing_ok=True)
                   if r.get("kind") == "best_of_s"}
        return list(by_name.values())

    def _summary_text(self, outputs: dict[str, str], exports: dict[str, str], summary_path: str) -> str:
        store = self.store
        lines = ["", fileio.read_text(outputs["tables"]) if outputs else "",
                 f"apo_jax: run finished. Outputs in {store.run_dir}:"]
        for key, path in outputs.items():
            lines.append(f"  {key:16s} {path}")
        lines.append(f"  {'summary':16s} {summary_path}")
        lines.append(f"  {'metrics':16s} {store.metrics.jsonl_path}")
        lines.append(f"  {'samples':16s} {fileio.join(store.run_dir, 'samples')}")
        lines.append(f"  {'best-of-S':16s} {fileio.join(store.run_dir, 'best')}")
        lines.append(f"  {'HF exports':16s} {fileio.join(store.run_dir, 'export')} ({len(exports)} models)")
        t = compiled.TRACES
        lines.append(f"Compiled programs this process: {t['train']} train steps, {t['prefill']} prefill, "
                     f"{t['decode']} decode, {t['score']} scoring "
                     "(one per model shape, length bucket and sampling setting).")
        return "\n".join(lines)


def _runtime(m: ml_collections.ConfigDict) -> dict[str, Any]:
    lora = m.get("lora")
    rank = lora.rank if lora is not None else 0
    return dict(param_dtype=m.param_dtype, dtype=m.dtype, remat_policy=m.remat_policy,
                attention_impl=m.attention_impl, lora_rank=rank,
                lora_alpha=float(lora.alpha) if lora is not None else 16.0,
                lora_targets=models.lora.resolve_targets(lora.targets) if rank else (),
                quantization=lora.get("quantization", "") if rank else "")


def run(cfg: ml_collections.ConfigDict) -> str:
    """Plays the game of `cfg` in its run dir (resuming whatever an earlier run left there)."""
    from apo_jax import devices
    from apo_jax.io import checkpointing

    devices.resolve_config(cfg)  # "auto" dtype / attention (a no-op when main already resolved them)
    devices.enable_compilation_cache(cfg.get("compilation_cache_dir", ""))
    checkpointing.install_preemption_handler()
    game = Game(cfg)
    try:
        with sharding.activation_sharding(None):
            return game.play()
    finally:
        game.store.close()  # a preempted or failed run keeps the records it logged
