"""Settings that the model, training and sharding layers implement, as plain values importable
without jax: `config.validate` checks a config against them before anything heavy is loaded, and
the layers that implement them (`models.config`, `train`, `sharding`) import them from here."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

MESH_AXES = ("data", "fsdp", "tensor")
"""The device mesh's axes (`sharding.make_mesh`)."""

REMAT_POLICIES = ("auto", "none", "minimal", "full", "dots", "dots_no_batch")
"""Per-layer rematerialisation policies (`models.decoder.remat_for`)."""
ATTENTION_IMPLS = ("xla", "cudnn")
"""Attention kernels (`models.attention`); configs may also say "auto" (`apo_jax.devices`)."""
LR_SCHEDULES = ("constant", "linear", "cosine")
"""Learning-rate schedules after warmup (`train.lr_at`)."""
QUANT_TYPES = ("int8", "int4", "nf4")
"""QLoRA base quantizations (`models.quant`, through qwix)."""

# LoRA targets (`models.lora`): the decoder's projections.
# Module name -> (group under "layers", number of input axes of its kernel).
LORA_MODULES: dict[str, tuple[str, int]] = {
    "q_proj": ("attn", 1), "k_proj": ("attn", 1), "v_proj": ("attn", 1), "o_proj": ("attn", 2),
    "gate_proj": ("mlp", 1), "up_proj": ("mlp", 1), "down_proj": ("mlp", 1),
}


def lora_module_path(name: str) -> str:
    """The '/'-joined path of a target's kernel ("model/layers/attn/q_proj/kernel")."""
    return f"model/layers/{LORA_MODULES[name][0]}/{name}/kernel"


def resolve_lora_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Module names from `lora.targets`: names ("q_proj", "v_proj" or "q_proj,v_proj"), "all-linear"
    (PEFT's spelling: every projection), or one regex searched in each projection kernel's path
    (`lora_module_path`, e.g. "attn/(q|v)_proj"). A regex that matches nothing, or a name the decoder
    has no projection of, raises ValueError naming it."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return tuple(LORA_MODULES)
        if re.fullmatch(r"\w+(\s*,\s*\w+)*", targets):  # "q_proj,v_proj": names
            return resolve_lora_targets([t.strip() for t in targets.split(",")])
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(f"lora.targets={targets!r}: not a regex ({e})") from None
        names = tuple(n for n in LORA_MODULES if pattern.search(lora_module_path(n)))
        if not names:
            raise ValueError(f"lora.targets={targets!r} matches no projection; the paths are "
                             + ", ".join(lora_module_path(n) for n in LORA_MODULES))
        return names
    unknown = [t for t in targets if t not in LORA_MODULES]
    if unknown:
        raise ValueError(f"lora.targets: {unknown} are not projections of the decoder; expected names from "
                         f"{tuple(LORA_MODULES)}, 'all-linear' or a regex over their paths")
    return tuple(dict.fromkeys(targets))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 for "all remaining devices"."""

    data: int = 1
    """Pure data parallelism (replicated weights)."""
    fsdp: int = -1
    """Data parallelism with weights, gradients and optimizer state sharded (ZeRO-3)."""
    tensor: int = 1
    """Tensor (Megatron) parallelism over heads, MLP width and vocabulary."""

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Axis sizes for `num_devices`, or ValueError naming the offending field."""
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        bad = [f"{k}={v}" for k, v in sizes.items() if v == 0 or v < -1]
        if bad:
            raise ValueError(f"mesh: sizes must be positive or -1, got {', '.join(bad)}")
        free = [k for k, v in sizes.items() if v == -1]
        if len(free) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got {', '.join(free)}")
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if free:
            if num_devices % fixed:
                raise ValueError(
                    f"mesh: fixed axes multiply to {fixed}, which does not divide the {num_devices} devices"
                )
            sizes[free[0]] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            raise ValueError(
                f"mesh: data*fsdp*tensor = {math.prod(sizes.values())} but there are {num_devices} devices"
            )
        return sizes["data"], sizes["fsdp"], sizes["tensor"]
