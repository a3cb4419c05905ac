"""Train states and the one jit-compiled, sharded train step, for any objective.

`make_train_step(config, objective, opt_cfg, mesh)` gives `(state, batch) -> (state, metrics)`
for a learning rule of `apo_jax.training.objectives`, compiled once per batch shape with explicit in/out
shardings from the rules table and the state donated. Gradient accumulation runs a `lax.scan` over k
micro-batches of the global batch and divides the summed numerators by the summed denominators
once (see `losses`), so it is exact. A non-finite loss or gradient leaves params and optimizer
state untouched (on device) and reports `finite=0`; `check_finite` turns that into an error
naming the step. Metrics stay on device: no host sync per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from apo_jax import compiled, models, sharding
from apo_jax.settings import LR_SCHEDULES
from apo_jax.training.objectives import Objective

"""Learning-rate schedule kinds (decay after warmup); config validation uses this tuple."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup + decay and global-norm clipping."""

    lr: float = 1e-5
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warmup from 0 to `lr`."""
    total_steps: int = 1000
    """Steps of the whole phase (the decay ends here)."""
    schedule: str = "linear"
    """Decay after warmup: constant, linear (to 0) or cosine (to 0)."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (not on norms or 1-D params)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    b1: float = 0.9
    """Adam beta1."""
    b2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""

    def __post_init__(self) -> None:
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; expected one of {LR_SCHEDULES}")


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
    else:
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps)
    if cfg.warmup_steps <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), decay], [cfg.warmup_steps])


def lr_at(step: jax.Array, hyper: jax.Array, schedule: str) -> jax.Array:
    """`make_schedule`'s value at `step`, with (peak lr, warmup steps, total steps) = `hyper` traced.

    Traced hyper-parameters let every phase of a run share one compiled step (only the schedule's
    *kind* is static); `make_schedule` (optax) is the reference it is tested against.
    """
    peak, warmup, total = hyper[0], hyper[1], hyper[2]
    step = step.astype(jnp.float32)
    k = jnp.maximum(step - warmup, 0.0)
    decay_steps = jnp.maximum(total - warmup, 1.0)
    if schedule == "constant":
        decay = peak
    elif schedule == "linear":
        decay = peak * jnp.clip(1.0 - k / decay_steps, 0.0, 1.0)
    else:
        decay = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(k, decay_steps) / decay_steps))
    return jnp.where(step < warmup, peak * step / jnp.maximum(warmup, 1.0), decay)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Clipping + Adam + decoupled weight decay, *without* the learning rate: the step multiplies by
    -lr_at(step) itself (together this is `optax.adamw(make_schedule(cfg))` after clipping)."""
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    if cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def _static_opt(cfg: OptimizerConfig) -> OptimizerConfig:
    """The fields a compiled step depends on (lr, warmup and total steps are traced inputs)."""
    return dataclasses.replace(cfg, lr=0.0, warmup_steps=0, total_steps=1)


def _hyper(cfg: OptimizerConfig) -> np.ndarray:
    return np.asarray([cfg.lr, cfg.warmup_steps, cfg.total_steps], np.float32)


@flax.struct.dataclass
class TrainState:
    """`params` are the trained parameters (all of them, or with LoRA the adapters and the reward
    head), `opt_state` exists for them only; `frozen` (None without LoRA) holds the rest, passed to
    the step undonated and never returned, saved or updated. `model_params(state)` is the model."""

    step: jax.Array
    params: Any
    opt_state: Any
    frozen: Any = None


def model_params(state: TrainState) -> Any:
    """The whole model of a train state: its trained params with the frozen ones."""
    return models.lora.combine(state.params, state.frozen)


def trainable_params(config: models.ModelConfig, params: Any) -> tuple[Any, Any]:
    """(trained, frozen) parts of a model's params (arrays or ShapeDtypeStructs) for `config`:
    gradients and optimizer state exist for the first only; frozen is None without LoRA. Memory
    estimates count 16 bytes per trained float32 parameter and the frozen ones at their dtype."""
    return models.lora.split(config, params)


def state_shardings(state: Any, mesh: jax.sharding.Mesh) -> Any:
    return sharding.tree_shardings(state, mesh)


def init_state(config: models.ModelConfig, params: Any, opt_cfg: OptimizerConfig, mesh: jax.sharding.Mesh) -> TrainState:
    """A sharded train state: params placed by the rules table, Adam moments sharded like them."""
    tx = make_optimizer(opt_cfg)
    params, frozen = trainable_params(config, params)
    # A fresh copy: the step donates its state, which must never free the caller's params. The
    # frozen part is not donated, so it is placed, not copied.
    params = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p),
                     out_shardings=sharding.tree_shardings(params, mesh))(params)
    if frozen is not None:
        frozen = jax.device_put(frozen, sharding.tree_shardings(frozen, mesh))
    abstract = jax.eval_shape(tx.init, params)
    opt_state = jax.jit(tx.init, out_shardings=sharding.tree_shardings(abstract, mesh))(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, P()))
    return TrainState(step=step, params=params, opt_state=opt_state, frozen=frozen)


def rm_params_from(config: models.ModelConfig, params: Any, rng: jax.Array, std: float = 0.0) -> dict[str, Any]:
    """RM params from LM or RM params: keeps an existing `score` head, else adds a new one
    (zeros for std=0, else normal(std)); the LM head is dropped."""
    out = {"model": params["model"]}
    out["score"] = params["score"] if "score" in params else {"kernel": models.new_reward_head(config, rng, std)}
    return out


def _microbatches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """[B, ...] -> [k, B/k, ...] taking every k-th row, so each device's rows stay on it."""

    def split(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)

    return jax.tree_util.tree_map(split, batch)


def _accumulate(stats_fn: Callable[[Any, dict], dict], params: Any, batch: dict, k: int):
    """Summed stats and gradient of the summed loss numerator over k micro-batches."""

    def grad_of(p, b):
        def num(p_):
            s = stats_fn(p_, b)
            return s["loss_num"], s

        (_, s), g = jax.value_and_grad(num, has_aux=True)(p)
        return s, g

    if k == 1:
        return grad_of(params, batch)

    def body(carry, micro):
        s_acc, g_acc = carry
        s, g = grad_of(params, micro)
        return (jax.tree_util.tree_map(jnp.add, s_acc, s), jax.tree_util.tree_map(jnp.add, g_acc, g)), None

    micro = _microbatches(batch, k)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    s_shape = jax.eval_shape(lambda: stats_fn(params, first))
    zeros_s = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), s_shape)
    zeros_g = jax.tree_util.tree_map(jnp.zeros_like, params)
    (s, g), _ = jax.lax.scan(body, (zeros_s, zeros_g), micro)
    return s, g


class TrainStep:
    """`(state, batch) -> (state, metrics)` for one objective: a single `jax.jit` (compiled once per
    batch shape) with explicit in/out shardings from the rules table and the state donated.

    The learning-rate schedule's peak / warmup / total are traced inputs, so every phase with the
    same model, objective and static optimizer settings shares the compiled programs: a caller
    keeps one TrainStep per such key and binds each phase's schedule with `with_schedule`.
    """

    def __init__(self, step: Callable, mesh: jax.sharding.Mesh, opt_cfg: OptimizerConfig):
        self._step, self._mesh = step, mesh
        self._jit: Callable | None = None
        self.traces = 0
        """How many programs this step has compiled (one per batch shape)."""
        self._hyper = _hyper_on(mesh, opt_cfg)

    def with_schedule(self, opt_cfg: OptimizerConfig) -> "TrainStep":
        """The same compiled step with another phase's lr schedule (no recompilation)."""
        view = object.__new__(TrainStep)
        view.__dict__.update(self.__dict__)
        view._hyper = _hyper_on(self._mesh, opt_cfg)
        view._owner = getattr(self, "_owner", self)
        return view

    def jitted(self, state: TrainState, batch: dict[str, Any]) -> Callable:
        """The jitted `(state, batch, hyper) -> (state, metrics)` (for `.lower(...)` in benchmarks);
        for a state with frozen params (LoRA) `(state, batch, hyper, frozen)`, the state passed
        with `frozen=None` (`lower_args` gives the arguments)."""
        owner = getattr(self, "_owner", self)
        if owner._jit is None:
            mesh = self._mesh
            donated = state.replace(frozen=None)
            st_sh = state_shardings(donated, mesh)
            b_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
            rep = NamedSharding(mesh, P())

            def counted(*args):
                owner.traces += 1  # runs at trace time only
                compiled.count("train")
                return self._step(*args)

            in_sh = (st_sh, b_sh, rep)
            if state.frozen is not None:
                in_sh += (state_shardings(state.frozen, mesh),)
            owner._jit = jax.jit(counted, in_shardings=in_sh, out_shardings=(st_sh, rep), donate_argnums=0)
        return owner._jit

    def lower_args(self, state: TrainState, batch: dict[str, Any]) -> tuple:
        """The arguments `jitted(state, batch)` takes for this state (its `.lower(*args)`)."""
        args = (state.replace(frozen=None), batch, self._hyper)
        return args if state.frozen is None else args + (state.frozen,)

    @property
    def compiles(self) -> int:
        return getattr(self, "_owner", self).traces

    def __call__(self, state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        new, metrics = self.jitted(state, batch)(*self.lower_args(state, batch))
        return new.replace(frozen=state.frozen), metrics


def _hyper_on(mesh: jax.sharding.Mesh, opt_cfg: OptimizerConfig) -> jax.Array:
    # On device once (replicated), not a host-to-device copy per step.
    return jax.device_put(_hyper(opt_cfg), NamedSharding(mesh, P()))


def step_key(config: models.ModelConfig, objective: Objective, opt_cfg: OptimizerConfig,
             mesh: jax.sharding.Mesh, grad_accum: int) -> tuple:
    """What a compiled step depends on: steps with equal keys can share one `TrainStep`."""
    return (config, objective, _static_opt(opt_cfg), mesh, int(grad_accum))


def train_step(config: models.ModelConfig, objective: Objective, opt_cfg: OptimizerConfig,
               mesh: jax.sharding.Mesh, grad_accum: int = 1) -> TrainStep:
    """The compiled step for (model, objective, static optimizer settings, mesh, accumulation) from
    the process's one program cache (`apo_jax.compiled`), bound to `opt_cfg`'s schedule: phases
    (and runs) that differ only in lr / warmup / length share one program."""
    key = step_key(config, objective, opt_cfg, mesh, grad_accum)
    shared = compiled.program("train", key, lambda: make_train_step(config, objective, opt_cfg, mesh,
                                                                     grad_accum=grad_accum))
    return shared.with_schedule(opt_cfg)


def make_train_step(
    config: models.ModelConfig,
    objective: Objective,
    opt_cfg: OptimizerConfig,
    mesh: jax.sharding.Mesh,
    *,
    grad_accum: int = 1,
) -> TrainStep:
    """The train step of `objective`: AdamW on `objective.stats`' summed loss, accumulated exactly
    over `grad_accum` micro-batches, skipped on device when the loss or gradient is not finite."""
    tx = make_optimizer(opt_cfg)
    schedule = opt_cfg.schedule

    models.lora.check(config)

    def step(state: TrainState, batch: dict[str, jax.Array], hyper: jax.Array, frozen: Any = None):
        # Gradients of the trained params only; the frozen ones (LoRA's base) are constants here.
        def stats_fn(params, batch):
            return objective.stats(config, models.lora.combine(params, frozen), batch)

        with sharding.activation_sharding(mesh):
            s, g_num = _accumulate(stats_fn, state.params, batch, grad_accum)
        den = jnp.maximum(s["loss_den"], 1e-12)
        grads = jax.tree_util.tree_map(lambda x: (x / den).astype(x.dtype), g_num)
        metrics = objective.metrics(s)
        grad_norm = _tree_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        lr = lr_at(state.step, hyper, schedule)

        def apply(_):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            updates = jax.tree_util.tree_map(lambda u: (-lr * u).astype(u.dtype), updates)
            return optax.apply_updates(state.params, updates), opt_state

        def skip(_):
            return state.params, state.opt_state

        params, opt_state = jax.lax.cond(finite, apply, skip, None)
        metrics = dict(metrics, grad_norm=grad_norm, lr=lr, finite=finite.astype(jnp.float32))
        new_state = TrainState(step=state.step + finite.astype(jnp.int32), params=params, opt_state=opt_state)
        return new_state, metrics

    return TrainStep(step, mesh, opt_cfg)


def _tree_norm(tree: Any) -> jax.Array:
    """Global L2 norm of a pytree (optax.tree.norm where it exists; global_norm is deprecated)."""
    tree_ns = getattr(optax, "tree", None)
    if tree_ns is not None and hasattr(tree_ns, "norm"):
        return tree_ns.norm(tree)
    return optax.global_norm(tree)


class NonFiniteLossError(FloatingPointError):
    """A train step produced a NaN/inf loss or gradient (the update was skipped on device)."""


def check_finite(metrics: dict[str, Any], step: int, phase: str = "train") -> None:
    """Raises NonFiniteLossError naming the phase and step if a fetched step was not finite."""
    if float(np.asarray(metrics.get("finite", 1.0))) < 1.0:
        raise NonFiniteLossError(
            f"{phase}: non-finite loss or gradient at step {step} (loss={float(np.asarray(metrics['loss']))}, "
            f"grad_norm={float(np.asarray(metrics['grad_norm']))}); the update was skipped and nothing was saved "
            "from it. Lower the learning rate or check the data, and start again in a new run_dir (this one holds the diverged phase's checkpoints)."
        )
