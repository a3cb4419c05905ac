"""The `Objective` interface and the registry of learning rules."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import jax

Stats = dict[str, jax.Array]
"""Per-batch sums: `loss_num` / `loss_den` is the loss; the rest feed `metrics`."""


@dataclasses.dataclass(frozen=True)
class Objective(abc.ABC):
    """A learning rule. Subclasses are frozen dataclasses whose fields are the rule's settings."""

    name: ClassVar[str]
    """Registry name (`objectives.get(name)`)."""
    head: ClassVar[str]
    """Which head the trained params carry: "score" (reward model) or "lm" (policy)."""

    @classmethod
    def settings_from(cls, cfg: Any) -> dict[str, Any]:
        """This rule's settings read from the run config (its own section); default: none."""
        del cfg
        return {}

    @abc.abstractmethod
    def examples(self, tokenizer: Any, records: Sequence[dict], data_cfg: Any) -> Any:
        """Records -> a `pipeline.TokenizedSet` whose `batch(rows)` is this objective's layout."""

    @abc.abstractmethod
    def stats(self, config: Any, params: Any, batch: Mapping[str, jax.Array]) -> Stats:
        """Sums over the batch's rows (filler rows have weight 0 and add nothing)."""

    @abc.abstractmethod
    def metrics(self, stats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Loss and metrics from (summed) stats; must contain "loss"."""

    def batch_layout(self, rows: int, length: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        """`examples(...).batch(...)`'s arrays for `rows` rows padded to `length` tokens, as
        {name: (shape, dtype)} (after `prepare`): what `apo_jax.dryrun` compiles the step on."""
        raise NotImplementedError(f"objective {self.name!r} declares no batch layout")

    def prepare(self, examples: Any, config: Any, params: Any, mesh: Any, batch_size: int) -> Any:
        """Per-phase preparation with the phase's *starting* params, before any step (e.g. DPO's
        reference log-probs). Default: nothing to do."""
        del config, params, mesh, batch_size
        return examples

    def describe(self) -> str:
        return self.name.upper()


OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: makes `cls` available as `get(cls.name, **settings)`."""
    if cls.name in OBJECTIVES and OBJECTIVES[cls.name] is not cls:
        raise ValueError(f"objective {cls.name!r} is registered twice")
    OBJECTIVES[cls.name] = cls
    return cls


def from_config(name: str, cfg: Any) -> Objective:
    """The registered objective `name` with the settings its own config section gives. Raises
    ValueError naming the field (`dpo.beta: ...`) for a setting the rule refuses."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; registered: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**OBJECTIVES[name].settings_from(cfg))


def settings_problems(cfg: Any) -> list[str]:
    """Every registered rule's objections to its config section, one `field: problem` line each
    (for `config.validate`'s start-up checks)."""
    problems: list[str] = []
    for name in sorted(OBJECTIVES):
        try:
            from_config(name, cfg)
        except ValueError as e:
            problems.extend(str(e).splitlines())
    return problems


def get(name: str, **settings: Any) -> Objective:
    """The registered objective `name` with its settings."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; registered: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**settings)
