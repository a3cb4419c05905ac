"""The schedule table: how each arm of the game updates its RM, picks answers and updates its policy.

A schedule is one `Schedule` row. The paper's four (Section 4.1) are the rows of `PAPER`; a new
arm is a new row passed to `register` (no other code changes): the game reads the row, names and
labels the models from it, and the reports label the arm with `label`.
"""

from __future__ import annotations

import dataclasses

SELECTION_RULES = ("rm", "oracle", "random")
"""How best-of-S picks an answer: "rm" = argmax of the schedule's RM score; "oracle" = argmax of
the true reward r* (the synthetic world only: the bound on what the loop can do); "random" = a
uniformly random one of the S samples (the control that separates what selection adds from
self-training on the policy's own samples)."""
POLICY_UPDATES = ("sft", "dpo")
"""Objectives a policy update may use (`apo_jax.training.objectives`): "sft" learns the best of S (paper:
rejection-sampling SFT); "dpo" learns best over worst of S against the round's starting policy."""
RM_INITS = ("base", "previous")


@dataclasses.dataclass(frozen=True)
class RMUpdate:
    """A schedule's RM update, run at the start of every round."""

    init: str = "base"
    """"base": fine-tune RM_Base each round; "previous": fine-tune this schedule's previous RM."""
    apo_pairs: bool = True
    """Train on D_APO (golden answers above the current policy's samples) as well as D_P."""
    optimizer: str = "rm.apo"
    """Dotted config section of the optimizer settings (lr, batch, epochs, ...)."""
    name: str = "rm_{schedule}_r{round}"
    """Model name pattern (files under models/, export/, scores/)."""
    label: str = "RM_{schedule}-v{round}"
    """Table 2 / Figure 2 label pattern."""

    def __post_init__(self) -> None:
        if self.init not in RM_INITS:
            raise ValueError(f"RMUpdate.init={self.init!r}; expected one of {RM_INITS}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One arm of the game."""

    name: str
    """Config name (`apo.schedules`) and file-name stem (best/<name>_r<R>.jsonl, policy_<name>_r<R>)."""
    label: str
    """Table 3 / Figure 2 label."""
    rm: RMUpdate | None = None
    """The RM update rule; None keeps RM_Base in every round (rejection sampling)."""
    select: str = "rm"
    """Best-of-S selection rule (`SELECTION_RULES`)."""
    policy_update: str = "sft"
    """The policy's learning rule (`POLICY_UPDATES`)."""

    def __post_init__(self) -> None:
        if self.select not in SELECTION_RULES:
            raise ValueError(f"schedule {self.name!r}: select={self.select!r}; expected one of {SELECTION_RULES}")
        if self.policy_update not in POLICY_UPDATES:
            raise ValueError(f"schedule {self.name!r}: policy_update={self.policy_update!r}; expected one of "
                             f"{POLICY_UPDATES}")

    def rm_name(self, rnd: int) -> str:
        assert self.rm is not None
        return self.rm.name.format(schedule=self.name, round=rnd)

    def rm_label(self, rnd: int) -> str:
        assert self.rm is not None
        return self.rm.label.format(schedule=self.name, round=rnd)

    def policy_name(self, rnd: int) -> str:
        return f"policy_{self.name}_r{rnd}"


PAPER: tuple[Schedule, ...] = (
    # Rejection sampling: the RM stays RM_Base.
    Schedule("rjs", "RJS (RM_Base)"),
    # RM_APO-vR: fine-tuned from RM_Base each round on D_P + D_APO of that round.
    Schedule("apo", "APO (RM_APO-vR)",
             RMUpdate(init="base", apo_pairs=True, name="rm_apo_r{round}", label="RM_APO-v{round}")),
    # RM_APO-vR-seq: fine-tuned from the previous round's APO RM.
    Schedule("apo_seq", "APO-seq (RM_APO-vR-seq)",
             RMUpdate(init="previous", apo_pairs=True, name="rm_apo_seq_r{round}", label="RM_APO-v{round}-seq")),
    # RM_Base-AB: APO's schedule and hyper-parameters without D_APO.
    Schedule("ablation", "Ablation (RM_Base-AB)",
             RMUpdate(init="base", apo_pairs=False, name="rm_ablation_r{round}", label="RM_Base-AB-v{round}")),
)


def with_dpo(row: Schedule) -> Schedule:
    """`row` with a DPO policy update: same RM rule and selection, named `<name>-dpo`."""
    rm = row.rm
    if rm is not None:
        rm = dataclasses.replace(rm, name=rm.name.replace("_r{round}", "-dpo_r{round}"),
                                 label=rm.label + " (DPO arm)")
    return Schedule(f"{row.name}-dpo", f"{row.label} + DPO", rm, row.select, "dpo")


# The oracle arm (synthetic world only): r* picks the best of S, the bound on what the loop can do.
ORACLE = Schedule("oracle", "Oracle (r* picks)", select="oracle")
# The random arm: SFT on a uniformly random sample of S (self-training with no selection).
RANDOM = Schedule("random", "Random pick", select="random")

SCHEDULES: dict[str, Schedule] = {}
"""Every known schedule by name, in table order (the order of Table 3's columns)."""


def register(schedule: Schedule) -> Schedule:
    """Adds a row to the table (replacing a row of the same name)."""
    SCHEDULES[schedule.name] = schedule
    return schedule


def unregister(name: str) -> None:
    SCHEDULES.pop(name, None)


def get(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise KeyError(f"unknown schedule {name!r}; expected one of {tuple(SCHEDULES)}")
    return SCHEDULES[name]


def label(name: str) -> str:
    """A schedule's display label (its name when it is not in the table, e.g. "base")."""
    return SCHEDULES[name].label if name in SCHEDULES else name


for _row in (*PAPER, ORACLE, RANDOM):
    register(_row)
for _row in (*PAPER, ORACLE):
    register(with_dpo(_row))
