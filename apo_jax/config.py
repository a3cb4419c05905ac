"""The run configuration: defaults (`base_config`) and start-up validation (`validate`).

Configs are data (`ml_collections.ConfigDict`); `configs/*.py` start from `base_config()` and
change numbers. `validate` checks everything that can be checked before any work starts and
reports every wrong field at once, named by its dotted path.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable, Sequence

import ml_collections

from apo_jax import settings
from apo_jax.io import fileio

def lookup(c: ml_collections.ConfigDict, dotted: str) -> Any:
    """The field or section at a dotted path ("rm.apo", "policy.checkpoint"); KeyError if absent."""
    node = c
    for part in dotted.split("."):
        node = node[part]
    return node


class ConfigError(ValueError):
    """One or more invalid config fields; the message lists each as `field: problem`."""


def _optimizer(lr: float, batch_size: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            lr=lr,
            batch_size=batch_size,
            epochs=1,
            max_steps=0,  # 0 = run the epochs; > 0 caps the number of steps
            warmup_steps=0,
            schedule="linear",  # constant | linear | cosine (decay after warmup)
            weight_decay=0.0,
            grad_clip=1.0,
            grad_accum=1,
            b1=0.9,
            b2=0.95,
        )
    )


def _sampling(temperature: float, top_p: float, top_k: int, max_new_tokens: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens)
    )


def base_config() -> ml_collections.ConfigDict:
    from apo_jax.game import schedules as schedule_table  # jax-free: the arm table

    c = ml_collections.ConfigDict()
    c.run_dir = "runs/apo"
    c.seed = 0
    # Persistent XLA compilation cache ("" = off; local path or gs://): a restarted or resumed run
    # loads its compiled steps instead of recompiling. JAX_COMPILATION_CACHE_DIR, if set, wins.
    c.compilation_cache_dir = ""
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

    c.data = ml_collections.ConfigDict()
    c.data.kind = "synthetic"  # synthetic | hh | preference
    c.data.hh_train = ""  # hub id `Anthropic/hh-rlhf` or a local dir / .jsonl(.gz)
    c.data.hh_test = ""
    c.data.train = ""  # data.kind = preference: a file, directory or hub id, with an optional :split
    c.data.test = ""
    c.data.prompts = ""  # optional prompt-only rows: the policy's queries
    c.data.columns = ml_collections.ConfigDict(dict(
        prompt="prompt", chosen="chosen", rejected="rejected", completion="completion", prompt_id="prompt_id",
        margin="margin", score_chosen="score_chosen", score_rejected="score_rejected"))
    c.data.gold = ""
    c.data.tokenizer = ""
    c.data.n_rm = 20_000
    c.data.n_dev = 10_000
    c.data.n_llm = 0
    c.data.n_test = 0
    c.data.rm_max_len = 512
    c.data.sft_max_len = 1024
    c.data.prompt_max_len = 512
    c.data.buckets = (128, 256, 512, 1024)
    # Where the RM reads the reward: "last_token" (the last response token, as the official APO code;
    # exports score the same in transformers) or "eos" (an appended EOS; pre-#16 behaviour).
    c.data.reward_position = "last_token"
    c.data.on_bad_line = "raise"  # raise | skip
    c.data.prompt_format = "hh"  # hh (the paper's "\n\nHuman: ...\n\nAssistant:") | chat_template (tokenizer's)
    c.data.carve_test_fraction = 0.0  # > 0: train and test carved by prompt from the hh_test split alone
    c.data.synthetic = ml_collections.ConfigDict()  # the synthetic world's own settings (data.synthetic)

    c.policy = ml_collections.ConfigDict()
    c.policy.checkpoint = ""  # HF dir or hub id; "" = a new model of `policy.arch`, pretrained on demos
    c.policy.arch = ml_collections.ConfigDict(
        dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
    )
    c.policy.pretrain = _optimizer(3e-3, 32)  # only without a checkpoint: SFT on the demonstrations
    c.policy.param_dtype = "float32"
    c.policy.dtype = "float32"
    c.policy.remat_policy = "auto"  # none for small activations, else minimal (models.remat_for)
    c.policy.attention_impl = "xla"
    c.policy.scan_layers = True
    c.policy.lora = _lora()  # LoRA adapters (docs/lora.md); rank 0 = full fine-tuning

    c.rm = ml_collections.ConfigDict()
    c.rm.init_checkpoint = ""  # HF LM or RM dir / hub id; "" = the initial policy's weights
    c.rm.base_checkpoint = ""  # a trained RM_Base to use instead of training one
    c.rm.test_checkpoint = ""  # a trained RM_Test (evaluation RM) to use instead of training one
    c.rm.reward_head_std = 0.0
    c.rm.base = _optimizer(1e-6, 64)
    c.rm.test = _optimizer(1e-6, 64)
    c.rm.apo = _optimizer(1e-8, 64)
    # Weight of each APO pair (eq. 15 in the official code's form): 0 = `apo_weight_per_query` / S, so
    # changing S keeps beta2 (the official rule is 0.1 / S per APO pair); > 0 = this weight as given.
    c.rm.apo_weight = 0.0
    c.rm.apo_weight_per_query = 0.1
    c.rm.apo_init = "base"  # APO RMs fine-tune RM_Base (paper) | "init": the RM init checkpoint (official README)
    c.rm.human_weight = 1.0
    # Reward-model options, all off by default (the paper's loss): a margin in the BT term from the
    # data's margin / score difference, TRL's reward centering, and reward statistics for exports.
    c.rm.margin_from_data = False
    c.rm.center_rewards_coefficient = 0.0
    c.rm.reward_stats_set = ""  # "" | dev | test | rm: the pairs whose rewards give an export's mean/std
    c.rm.tokenizer = ""  # "" = the policy's tokenizer; else the RMs' own (needs rm.init_checkpoint)
    c.rm.param_dtype = "float32"
    c.rm.dtype = "float32"
    c.rm.remat_policy = "auto"
    c.rm.attention_impl = "xla"
    c.rm.lora = _lora()  # every reward model's adapters; the reward head always trains fully

    c.sft = _optimizer(5e-6, 128)
    c.sft.lrs = (5e-6, 2e-6, 9e-7)  # one per round
    c.sft.normalize = "token"  # token | sequence

    # DPO policy updates (schedules named <arm>-dpo): best vs worst of S against the round's policy.
    c.dpo = _optimizer(5e-7, 128)
    c.dpo.lrs = (5e-7, 5e-7, 5e-7)  # one per round
    c.dpo.beta = 0.1
    c.dpo.label_smoothing = 0.0
    c.dpo.sft_weight = 0.0

    c.apo = ml_collections.ConfigDict()
    c.apo.rounds = 3
    c.apo.num_samples = 4
    c.apo.schedules = tuple(row.name for row in schedule_table.PAPER)  # rjs, apo, apo_seq, ablation

    c.sampling = ml_collections.ConfigDict()
    c.sampling.train = _sampling(1.2, 1.0, 0, 256)
    c.sampling.test = _sampling(0.3, 0.85, 5, 512)
    c.sampling.stop_strings = ("\nHuman",)
    c.sampling.batch_size = 64

    c.eval = ml_collections.ConfigDict(dict(num_bins=10, batch_size=64, overopt_samples=0, overopt_prompts=100))
    c.checkpoint = ml_collections.ConfigDict(dict(save_every_steps=200, async_save=True, keep=2))
    c.log_every_steps = 20
    # Weights & Biases, beside TensorBoard (pip install apo_jax[wandb]); project "" = off.
    c.wandb = ml_collections.ConfigDict(dict(project="", entity="", name="", mode=""))
    return c


def _is_remote(path: str) -> bool:
    return "://" in path


def _source_path(spec: str) -> str:
    """The path or hub id of a `path_or_id[:split]` source."""
    if os.path.exists(spec) or "://" in spec:
        return spec
    head, sep, tail = spec.rpartition(":")
    return head if sep and head and tail and "/" not in tail else spec


def _looks_like_hub_id(path: str) -> bool:
    return bool(path) and not path.startswith((".", "/", "~")) and path.count("/") == 1 and not os.path.exists(path)


def _lora() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets="all-linear", quantization=""))


def validate(c: ml_collections.ConfigDict, num_devices: int,
             checks: Sequence[Callable[[ml_collections.ConfigDict], list[str]]] = ()) -> None:
    """Raises ConfigError listing every wrong field (`field: problem`), or returns None.

    `checks`: more validators, each returning `field: problem` lines, whose rules live with the
    code that implements them (`objectives.settings_problems`: each learning rule checks its own
    section); they are reported with these. This module itself imports no jax."""
    errors: list[str] = []

    def err(field: str, msg: str) -> None:
        errors.append(f"{field}: {msg}")

    # Mesh.

    try:
        data, fsdp, _ = settings.MeshConfig(c.mesh.data, c.mesh.fsdp, c.mesh.tensor).resolve(num_devices)
    except ValueError as e:
        err("mesh", str(e))
        data, fsdp = 1, num_devices
    batch_shards = data * fsdp

    # Where the run writes.
    if not c.run_dir:
        err("run_dir", "empty; expected a local directory or gs://bucket/path")
    elif "://" in c.run_dir:
        if not c.run_dir.startswith("gs://") or len(c.run_dir) <= len("gs://"):
            err("run_dir", f"{c.run_dir!r}: the only remote scheme supported is gs://bucket/path")
        else:
            problem = fileio.remote_backend_problem(c.run_dir)
            if problem:
                err("run_dir", problem)
    for field in ("policy.checkpoint", "rm.init_checkpoint", "rm.base_checkpoint", "rm.test_checkpoint",
                  "data.hh_train", "data.hh_test", "data.train", "data.test", "data.prompts", "data.gold",
                  "data.tokenizer", "rm.tokenizer"):
        if fileio.is_remote(lookup(c, field)):
            problem = fileio.remote_backend_problem(lookup(c, field))
            if problem:
                err(field, problem)

    # Data.
    if c.data.kind not in ("synthetic", "hh", "preference"):
        err("data.kind", f"{c.data.kind!r}; expected 'synthetic', 'hh' or 'preference'")
    if c.data.kind == "preference":
        for field in ("train", "test", "prompts"):
            spec = c.data[field]
            if not spec:
                if field == "test" or (field == "train" and not c.data.carve_test_fraction > 0):
                    err(f"data.{field}", "empty; give a file, directory or hub id (path_or_id[:split])"
                        + (" or set data.carve_test_fraction > 0 to carve train from data.test" if field == "train"
                           else ""))
                continue
            path = _source_path(spec)
            if not (os.path.exists(path) or _is_remote(path) or _looks_like_hub_id(path)):
                err(f"data.{field}", f"{spec!r} does not exist (expected a file, directory or hub id owner/name[:split])")
    if c.data.kind == "preference" and c.data.gold and not (os.path.exists(_source_path(c.data.gold))
                                                            or fileio.is_remote(c.data.gold)):
        err("data.gold", f"{c.data.gold!r} does not exist (use '' to fall back to the chosen answers)")
    if c.data.kind == "hh":
        for field in ("hh_train", "hh_test"):
            path = c.data[field]
            if not path:
                err(f"data.{field}", "empty; give a local HH-RLHF dir/file or the hub id Anthropic/hh-rlhf")
            elif not (os.path.exists(path) or _is_remote(path) or _looks_like_hub_id(path)):
                err(f"data.{field}", f"{path!r} does not exist")
        if c.data.gold and not (os.path.exists(c.data.gold) or fileio.is_remote(c.data.gold)):
            err("data.gold", f"{c.data.gold!r} does not exist (use '' to fall back to HH chosen responses)")
    for field in ("n_rm", "n_dev", "n_llm", "n_test"):
        if c.data[field] < 0:
            err(f"data.{field}", f"{c.data[field]} must be >= 0")
    buckets = tuple(c.data.buckets)
    if list(buckets) != sorted(buckets) or not buckets:
        err("data.buckets", f"{buckets} must be a non-empty increasing tuple")
    for field in ("rm_max_len", "sft_max_len", "prompt_max_len"):
        if buckets and c.data[field] > buckets[-1]:
            err(f"data.{field}", f"{c.data[field]} exceeds the largest bucket {buckets[-1]}")
    if c.data.kind == "synthetic":
        from apo_jax.data import synthetic

        try:
            synthetic.validate_config(synthetic.resolve_config(c.data.synthetic))
        except ValueError as e:
            for line in str(e).splitlines()[1:]:
                field, _, problem = line.strip().partition(": ")
                err(f"data.synthetic.{field}", problem)
    if c.data.reward_position not in ("last_token", "eos"):
        err("data.reward_position", f"{c.data.reward_position!r}; expected 'last_token' or 'eos'")
    if c.data.on_bad_line not in ("raise", "skip"):
        err("data.on_bad_line", f"{c.data.on_bad_line!r}; expected 'raise' or 'skip'")
    if c.data.prompt_format not in ("hh", "chat_template"):
        err("data.prompt_format", f"{c.data.prompt_format!r}; expected 'hh' or 'chat_template'")
    if not 0.0 <= c.data.carve_test_fraction < 1.0:
        err("data.carve_test_fraction", f"{c.data.carve_test_fraction} must be in [0, 1) (0 = read a train split)")

    # Models.
    for name in ("policy", "rm"):
        m = c[name]
        # dtype / attention_impl "auto": chosen for the device at start-up (apo_jax.devices).
        for field, allowed in (("param_dtype", ("float32", "bfloat16")), ("dtype", ("float32", "bfloat16", "auto")),
                               ("remat_policy", settings.REMAT_POLICIES),
                               ("attention_impl", (*settings.ATTENTION_IMPLS, "auto"))):
            if m[field] not in allowed:
                err(f"{name}.{field}", f"{m[field]!r}; expected one of {allowed}")
        lora = m.lora
        if lora.rank < 0:
            err(f"{name}.lora.rank", f"{lora.rank} must be >= 0 (0 = no adapters)")
        if lora.alpha <= 0:
            err(f"{name}.lora.alpha", f"{lora.alpha} must be positive")
        if lora.dropout != 0.0:
            err(f"{name}.lora.dropout", f"{lora.dropout}: adapter dropout is not implemented; use 0.0")
        if lora.quantization and lora.quantization not in settings.QUANT_TYPES:
            err(f"{name}.lora.quantization", f"{lora.quantization!r}; expected '' or one of {settings.QUANT_TYPES}")
        elif lora.quantization and lora.rank <= 0:
            err(f"{name}.lora.quantization", f"{lora.quantization!r} needs {name}.lora.rank > 0 (QLoRA)")
        if lora.rank > 0:
            try:
                settings.resolve_lora_targets(lora.targets)
            except ValueError as e:
                err(f"{name}.lora.targets", str(e).removeprefix(f"lora.targets={lora.targets!r} ").removeprefix(
                    "lora.targets: "))
    # Checkpoint paths and contents are checked by apo_jax.preflight (resolved, headers read).
    if c.rm.center_rewards_coefficient < 0:
        err("rm.center_rewards_coefficient", f"{c.rm.center_rewards_coefficient} must be >= 0 (0 = off)")
    if c.rm.reward_stats_set not in ("", "dev", "test", "rm"):
        err("rm.reward_stats_set", f"{c.rm.reward_stats_set!r}; expected '', 'dev', 'test' or 'rm'")
    if c.rm.tokenizer and not c.rm.init_checkpoint:
        err("rm.tokenizer", "a tokenizer of its own needs rm.init_checkpoint (an RM started from the policy's "
            "weights reads the policy's tokens)")
    if c.data.kind in ("hh", "preference") and not c.policy.checkpoint:
        err("policy.checkpoint", "required for HH-RLHF runs (an HF checkpoint dir or hub id of a supported family, e.g. Alpaca-7B)")

    # Optimizers: only the sections this run trains with (an HH run never pretrains, so its
    # policy.pretrain batch need not divide a pod's mesh).
    opts = {}
    for section in used_optimizer_sections(c):
        try:
            opts[section] = lookup(c, section)
        except KeyError:
            pass  # a schedule naming a missing section is reported under apo.schedules below
    for field, o in opts.items():
        if o.schedule not in settings.LR_SCHEDULES:
            err(f"{field}.schedule", f"{o.schedule!r}; expected one of {settings.LR_SCHEDULES}")
        if o.batch_size <= 0 or o.batch_size % batch_shards:
            err(f"{field}.batch_size", f"{o.batch_size} must be a positive multiple of data*fsdp = {batch_shards}")
        elif o.grad_accum < 1 or o.batch_size % (o.grad_accum * batch_shards):
            err(f"{field}.grad_accum", f"{o.grad_accum}: batch_size {o.batch_size} must split into "
                f"{o.grad_accum} micro-batches each divisible by data*fsdp = {batch_shards}")
        if o.lr < 0:
            err(f"{field}.lr", f"{o.lr} must be >= 0")
        if o.epochs < 1 and o.max_steps <= 0:
            err(f"{field}.epochs", f"{o.epochs}: need epochs >= 1 or max_steps > 0")
    if c.sampling.batch_size <= 0 or c.sampling.batch_size % batch_shards:
        err("sampling.batch_size", f"{c.sampling.batch_size} must be a positive multiple of data*fsdp = {batch_shards}")
    if c.eval.batch_size <= 0 or c.eval.batch_size % batch_shards:
        err("eval.batch_size", f"{c.eval.batch_size} must be a positive multiple of data*fsdp = {batch_shards}")
    if c.rm.apo_weight < 0:
        err("rm.apo_weight", f"{c.rm.apo_weight} must be >= 0 (0 = rm.apo_weight_per_query / apo.num_samples)")
    if c.rm.apo_weight == 0 and c.rm.apo_weight_per_query <= 0:
        err("rm.apo_weight_per_query", f"{c.rm.apo_weight_per_query} must be > 0")
    if c.rm.apo_init not in ("base", "init"):
        err("rm.apo_init", f"{c.rm.apo_init!r}; expected 'base' (fine-tune RM_Base) or 'init' (the RM init checkpoint)")
    if len(tuple(c.dpo.lrs)) < c.apo.rounds and any(s.endswith("-dpo") for s in tuple(c.apo.schedules)):
        err("dpo.lrs", f"{len(tuple(c.dpo.lrs))} learning rates for {c.apo.rounds} rounds; give one per round")
    if len(tuple(c.sft.lrs)) < c.apo.rounds and "sft" in opts:
        err("sft.lrs", f"{len(tuple(c.sft.lrs))} learning rates for {c.apo.rounds} rounds; give one per round")

    # The game.
    from apo_jax.game import schedules as schedule_table

    schedules = tuple(c.apo.schedules)
    known = tuple(schedule_table.SCHEDULES)
    unknown = [s for s in schedules if s not in known]
    if unknown or not schedules:
        err("apo.schedules", f"unknown {unknown}; expected a non-empty subset of {known}")
    for s in schedules:
        row = schedule_table.SCHEDULES.get(s)
        if row is not None and row.rm is not None:
            try:
                lookup(c, row.rm.optimizer).lr  # noqa: B018
            except (KeyError, AttributeError):
                err("apo.schedules", f"schedule {s!r} trains its RM with optimizer section {row.rm.optimizer!r}, "
                    "which the config does not have")
    for s in schedules:
        row = schedule_table.SCHEDULES.get(s)
        if row is not None and row.select == "oracle" and c.data.kind != "synthetic":
            err("apo.schedules", f"schedule {s!r} picks by the true reward r*, which only the synthetic world has")
    if len(set(schedules)) != len(schedules):
        err("apo.schedules", f"{schedules} lists a schedule twice")
    if c.apo.rounds < 1:
        err("apo.rounds", f"{c.apo.rounds} must be >= 1")
    if c.apo.num_samples < 1:
        err("apo.num_samples", f"{c.apo.num_samples} must be >= 1")
    for split in ("train", "test"):
        s = c.sampling[split]
        if s.temperature < 0:
            err(f"sampling.{split}.temperature", f"{s.temperature} must be >= 0")
        if not 0 < s.top_p <= 1:
            err(f"sampling.{split}.top_p", f"{s.top_p} must be in (0, 1]")
        if s.top_k < 0:
            err(f"sampling.{split}.top_k", f"{s.top_k} must be >= 0 (0 = off)")
        if s.max_new_tokens < 1:
            err(f"sampling.{split}.max_new_tokens", f"{s.max_new_tokens} must be >= 1")
    if c.eval.num_bins < 1:
        err("eval.num_bins", f"{c.eval.num_bins} must be >= 1")
    if c.eval.overopt_samples < 0 or c.eval.overopt_prompts < 0:
        err("eval.overopt_samples", f"{c.eval.overopt_samples} (and eval.overopt_prompts {c.eval.overopt_prompts}) "
            "must be >= 0")
    if c.wandb.mode not in ("", "online", "offline", "disabled"):
        err("wandb.mode", f"{c.wandb.mode!r}; expected '', 'online', 'offline' or 'disabled'")
    if c.wandb.project and importlib.util.find_spec("wandb") is None:
        err("wandb.project", f"{c.wandb.project!r} needs the wandb package: pip install 'apo_jax[wandb]' "
            "(or --config.wandb.project='' for TensorBoard only)")
    if c.checkpoint.save_every_steps < 0:
        err("checkpoint.save_every_steps", f"{c.checkpoint.save_every_steps} must be >= 0 (0 = phase ends only)")

    for check in checks:
        errors.extend(check(c))
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def used_optimizer_sections(c: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The optimizer sections this run trains with, in the game's order: `policy.pretrain` only
    without a policy checkpoint, `rm.base` / `rm.test` unless a trained one is given, then each
    played schedule's RM section and policy-update section (`apo_jax.game.schedules`)."""
    from apo_jax.game import schedules as schedule_table

    used = [] if c.policy.checkpoint else ["policy.pretrain"]
    used += [] if c.rm.base_checkpoint else ["rm.base"]
    used += [] if c.rm.test_checkpoint else ["rm.test"]
    for name in tuple(c.apo.schedules):
        row = schedule_table.SCHEDULES.get(name)
        if row is None:
            continue
        for section in ((row.rm.optimizer,) if row.rm is not None else ()) + (row.policy_update,):
            if section not in used:
                used.append(section)
    return tuple(used)


def apo_pair_weight(c: ml_collections.ConfigDict) -> float:
    """The weight of one APO (gold vs sample) pair in the RM loss."""
    return float(c.rm.apo_weight) if c.rm.apo_weight > 0 else float(c.rm.apo_weight_per_query) / c.apo.num_samples


def to_plain(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-able dict of the config (written beside the run's outputs)."""
    return c.to_dict()


# --------------------------------------------------------------------------------------------
# The configuration reference: one line of meaning per field, checked against `base_config()` by
# the tests (a field without a note fails them), printed by `--show_config` and written to
# docs/config_reference.md by `python -m apo_jax.config`.

OPTIMIZER_SECTIONS = ("policy.pretrain", "rm.base", "rm.test", "rm.apo", "sft", "dpo")
SAMPLING_SECTIONS = ("sampling.train", "sampling.test")

NOTES: dict[str, str] = {
    "run_dir": "where the run writes everything (local path or gs://); rerunning the command resumes it",
    "seed": "seeds the data splits, initialisations, data order and sampling",
    "compilation_cache_dir": "persistent XLA compilation cache (local or gs://; \"\" = off); JAX_COMPILATION_CACHE_DIR wins",
    "log_every_steps": "train metrics are logged every this many steps",
    "wandb.project": "Weights & Biases project the metrics also go to (\"\": off; needs the wandb extra)",
    "wandb.entity": "W&B entity (team or user; \"\": the account's default)",
    "wandb.name": "W&B run name (\"\": the run_dir's last part); a resumed run_dir continues the same W&B run",
    "wandb.mode": "\"\" (WANDB_MODE or online) | online | offline | disabled",
    "mesh.data": "devices on the pure data-parallel axis (-1: all that remain)",
    "mesh.fsdp": "devices on the fully sharded data-parallel axis (weights and optimizer state sharded)",
    "mesh.tensor": "devices on the tensor-parallel axis (heads, MLP width, vocabulary)",
    "data.kind": "synthetic (the built-in preference world) | hh (HH-RLHF) | preference (any standard preference data)",
    "data.train": "preference train pairs: a .jsonl/.parquet/.arrow file, a directory or a hub id, optional :split",
    "data.test": "preference test pairs, as data.train (with data.carve_test_fraction > 0: the only split read)",
    "data.prompts": "optional prompt-only rows (a prompt column): the policy's queries instead of the train prompts",
    "data.columns.prompt": "the data's column holding the prompt (text or messages)",
    "data.columns.chosen": "the data's column holding the preferred answer (or whole transcript)",
    "data.columns.rejected": "the data's column holding the dispreferred answer (or whole transcript)",
    "data.columns.completion": "the gold data's column holding the golden answer (else 'response')",
    "data.columns.prompt_id": "the data's own prompt id column (golden answers may name prompts by it)",
    "data.columns.margin": "the data's per-pair margin column (rm.margin_from_data)",
    "data.columns.score_chosen": "the data's score of the chosen answer (margin = score_chosen - score_rejected)",
    "data.columns.score_rejected": "the data's score of the rejected answer",
    "data.hh_train": "HH-RLHF train split: hub id Anthropic/hh-rlhf or a local dir / .jsonl(.gz)",
    "data.hh_test": "HH-RLHF test split, as data.hh_train",
    "data.gold": "golden answers (prompt or prompt_id, completion or response); \"\": the chosen answers of those prompts",
    "data.tokenizer": "tokenizer dir or hub id; \"\": the policy checkpoint's tokenizer",
    "data.n_rm": "distinct train prompts whose pairs train the RMs (HH_RM)",
    "data.n_dev": "RM validation pairs, from the policy queries' pairs (HH_Dev)",
    "data.n_llm": "policy training queries, the other train prompts (0: all of them)",
    "data.n_test": "test pairs (0: all); their prompts are the policies' test queries",
    "data.rm_max_len": "tokens of an RM input (prompt + response), longer ones left-truncated",
    "data.sft_max_len": "tokens of an SFT / DPO input",
    "data.prompt_max_len": "tokens of a prompt given to the sampler",
    "data.buckets": "padded lengths inputs are grouped into (each compiles once); the largest bounds every max_len",
    "data.reward_position": "last_token (the last response token; exports score the same in transformers) | eos (an appended EOS)",
    "data.on_bad_line": "raise (stop, naming file and line) | skip (count it and go on) for an unreadable data line",
    "data.prompt_format": "hh (the paper's \\n\\nHuman: ... \\n\\nAssistant:) | chat_template (the tokenizer's)",
    "data.carve_test_fraction": "> 0: carve train and test by prompt from the test split alone (0: read a train split)",
    "data.synthetic": "the synthetic world's settings (apo_jax/data/synthetic.py: tasks, sizes, label noise, marker)",
    "policy.checkpoint": "initial policy: HF dir or hub id; \"\": a new model of policy.arch pretrained on demonstrations",
    "policy.arch.hidden_size": "width of a new policy (only without policy.checkpoint); any ModelConfig field may be set here",
    "policy.arch.intermediate_size": "MLP width of a new policy",
    "policy.arch.num_hidden_layers": "layers of a new policy",
    "policy.arch.num_attention_heads": "query heads of a new policy",
    "policy.arch.num_key_value_heads": "key/value heads of a new policy",
    "policy.arch.max_position_embeddings": "context length of a new policy",
    "policy.param_dtype": "stored weights: float32 | bfloat16",
    "policy.dtype": "compute dtype: float32 | bfloat16 | auto (the device's choice at start-up)",
    "policy.remat_policy": "activation rematerialisation: auto | none | minimal | full | dots | dots_no_batch",
    "policy.attention_impl": "xla | cudnn | auto (cuDNN flash attention on sm80+ GPUs)",
    "policy.scan_layers": "run the layer stack as a rolled scan (fast compiles); False unrolls it",
    "policy.lora.rank": "LoRA rank of the policy's adapters; 0: full fine-tuning (docs/lora.md)",
    "policy.lora.alpha": "LoRA scale numerator: adapters add (alpha / rank) x A B",
    "policy.lora.dropout": "adapter dropout (only 0.0: not implemented)",
    "policy.lora.targets": "projections with adapters: all-linear, names (q_proj,v_proj) or a regex over kernel paths",
    "policy.lora.quantization": "QLoRA: the frozen projections stored as int8 | int4 | nf4 (qwix); \"\": dense",
    "rm.init_checkpoint": "RM initialisation: HF LM or RM dir / hub id; \"\": the initial policy's weights",
    "rm.base_checkpoint": "a trained RM_Base to use instead of training one",
    "rm.test_checkpoint": "a trained RM_Test (the evaluation RM) to use instead of training one",
    "rm.reward_head_std": "std of a new reward head's weights (0: a zero head, as the paper)",
    "rm.apo_weight": "weight of each APO pair (eq. 15); 0: rm.apo_weight_per_query / apo.num_samples",
    "rm.apo_weight_per_query": "APO weight per query, split over its S samples (the official 0.1)",
    "rm.apo_init": "base (APO RMs fine-tune RM_Base, the paper) | init (the RM init checkpoint)",
    "rm.human_weight": "weight of each human preference pair",
    "rm.margin_from_data": "subtract each pair's margin (data margin or score difference) inside the BT term",
    "rm.center_rewards_coefficient": "reward centering: + coef * mean((r_chosen + r_rejected)^2) (TRL's form; 0 = off)",
    "rm.reward_stats_set": "\"\" | dev | test | rm: pairs whose rewards' mean/std are saved with each RM export",
    "rm.tokenizer": "the RMs' tokenizer when it differs from the policy's (\"\": the policy's); samples are re-encoded",
    "rm.param_dtype": "as policy.param_dtype, for reward models",
    "rm.dtype": "as policy.dtype, for reward models",
    "rm.remat_policy": "as policy.remat_policy, for reward models",
    "rm.attention_impl": "as policy.attention_impl, for reward models",
    "rm.lora.rank": "as policy.lora.rank, for every reward model (the reward head trains fully)",
    "rm.lora.alpha": "as policy.lora.alpha, for reward models",
    "rm.lora.dropout": "as policy.lora.dropout, for reward models",
    "rm.lora.targets": "as policy.lora.targets, for reward models",
    "rm.lora.quantization": "as policy.lora.quantization, for reward models",
    "sft.lrs": "the policy's learning rate in each round (one per round)",
    "sft.normalize": "token (every response token counts equally) | sequence (every response)",
    "dpo.lrs": "DPO learning rate in each round (the `<arm>-dpo` schedules)",
    "dpo.beta": "DPO's inverse temperature of the implicit reward",
    "dpo.label_smoothing": "conservative DPO: probability a preference label is flipped, in [0, 0.5)",
    "dpo.sft_weight": "weight of an SFT term on the chosen answer",
    "apo.rounds": "rounds of the game",
    "apo.num_samples": "S: samples per query, for best-of-S and the APO pairs",
    "apo.schedules": "the arms played (rows of apo_jax/game/schedules.py: rjs, apo, apo_seq, ablation, oracle, random, `<arm>-dpo`)",
    "sampling.stop_strings": "texts that end a sample (cut off), found on the decoded text",
    "sampling.batch_size": "prompts per sampling batch",
    "eval.num_bins": "calibration bins of the RM's expected calibration error",
    "eval.batch_size": "rows per RM scoring batch",
    "eval.overopt_samples": "N > 0: best-of-n over-optimization curves (n = 1, 2, 4 .. N) of policy_0's test samples "
                            "under every RM, r* and a random pick (0: off)",
    "eval.overopt_prompts": "test prompts the over-optimization curves use (0: all)",
    "checkpoint.save_every_steps": "train-state checkpoint interval within a phase (0: only at its end)",
    "checkpoint.async_save": "write checkpoints in the background",
    "checkpoint.keep": "train-state checkpoints kept per phase",
    # Every optimizer section (OPTIMIZER_SECTIONS).
    "<optimizer>.lr": "peak learning rate (AdamW)",
    "<optimizer>.batch_size": "examples per step (a multiple of data x fsdp)",
    "<optimizer>.epochs": "passes over the phase's data",
    "<optimizer>.max_steps": "> 0 caps the steps (0: run the epochs)",
    "<optimizer>.warmup_steps": "linear warmup steps",
    "<optimizer>.schedule": "after warmup: constant | linear | cosine decay",
    "<optimizer>.weight_decay": "AdamW weight decay",
    "<optimizer>.grad_clip": "global gradient-norm clip",
    "<optimizer>.grad_accum": "micro-batches per step (summed exactly)",
    "<optimizer>.b1": "Adam beta1",
    "<optimizer>.b2": "Adam beta2",
    # Both sampling sections (SAMPLING_SECTIONS: the training samples and the test answers).
    "<sampling>.temperature": "sampling temperature (0: greedy)",
    "<sampling>.top_p": "nucleus filter (1: off)",
    "<sampling>.top_k": "top-k filter (0: off)",
    "<sampling>.max_new_tokens": "tokens generated at most",
}
SECTION_NOTES = {"policy.pretrain": "SFT of a new policy on the demonstrations (no policy.checkpoint)",
                 "rm.base": "RM_Base training", "rm.test": "RM_Test (the evaluation RM) training",
                 "rm.apo": "APO RM updates", "sft": "the policy's rejection-sampling SFT", "dpo": "DPO policy updates",
                 "sampling.train": "the policy's training samples", "sampling.test": "test answers"}


def leaves(c: Any, prefix: str = "") -> dict[str, Any]:
    """Every field of a config by dotted path (an empty section is one field)."""
    out: dict[str, Any] = {}
    for key in c:
        value = c[key]
        if hasattr(value, "keys") and len(value):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def note(field: str) -> str:
    """The one-line meaning of a field (KeyError for a field nobody documented)."""
    if field in NOTES:
        return NOTES[field]
    section, _, leaf = field.rpartition(".")
    if section.startswith("data.synthetic"):
        return NOTES["data.synthetic"]
    if section == "policy.arch":  # any ModelConfig field of a new policy
        return f"a new policy's {leaf} (apo_jax.models.ModelConfig; only without policy.checkpoint)"
    for kind, sections in (("<optimizer>", OPTIMIZER_SECTIONS), ("<sampling>", SAMPLING_SECTIONS)):
        if section in sections:
            return f"{SECTION_NOTES[section]}: {NOTES[f'{kind}.{leaf}']}"
    raise KeyError(f"config field {field} has no note in apo_jax.config.NOTES")


def reference(c: ml_collections.ConfigDict) -> str:
    """Every field of `c` with its value and meaning, as a Markdown table."""
    rows = ["| field | value | meaning |", "| --- | --- | --- |"]
    for field, value in sorted(leaves(c).items()):
        shown = repr(value.to_dict() if hasattr(value, "to_dict") else value).replace("|", "\\|")
        meaning = note(field).replace("|", "\\|")
        rows.append(f"| `{field}` | `{shown}` | {meaning} |")
    return "\n".join(rows)


REFERENCE_HEADER = """# Configuration reference

Every field of `apo_jax.config.base_config()` with its default and meaning, generated from the
config (`python -m apo_jax.config > docs/config_reference.md`; a test checks this page is current).
A config file (`configs/*.py`) starts from these defaults and changes some; any field can be set on
the command line (`--config.rm.base.lr=1e-6`). `python -m apo_jax.main --config=X --show_config`
prints the resolved fields of config X the same way. Two defaults worth knowing: with
`rm.init_checkpoint` empty the reward models start from the initial policy's weights, and with
`data.tokenizer` empty every model reads the policy checkpoint's tokenizer.

"""


if __name__ == "__main__":
    print(REFERENCE_HEADER + reference(base_config()))

