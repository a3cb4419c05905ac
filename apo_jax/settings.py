"""Settings that the model, training and sharding layers implement, as plain values importable
without jax: `config.validate` checks a config against them before anything heavy is loaded, and
the layers that implement them (`models.config`, `train`, `sharding`) import them from here."""

from __future__ import annotations

import dataclasses
import math

MESH_AXES = ("data", "fsdp", "tensor")
"""The device mesh's axes (`sharding.make_mesh`)."""

REMAT_POLICIES = ("auto", "none", "minimal", "full", "dots", "dots_no_batch")
"""Per-layer rematerialisation policies (`models.decoder.remat_for`)."""
ATTENTION_IMPLS = ("xla", "cudnn")
"""Attention kernels (`models.attention`); configs may also say "auto" (`apo_jax.devices`)."""
LR_SCHEDULES = ("constant", "linear", "cosine")
"""Learning-rate schedules after warmup (`train.lr_at`)."""


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
