"""What this machine's accelerator can run: the "auto" compute dtype and attention, and the install check.

`choose` is a pure function of a device description (platform, device kind, CUDA compute
capability), so the choice for a T4, an A100, an H100, a TPU or a CPU is unit-tested without
that hardware. `resolve_config` applies it at start-up to the `policy` and `rm` sections whose
`dtype` or `attention_impl` is "auto", and logs what it chose and why.

    python -m apo_jax.devices [--expect_devices N] [--constraints constraints.txt]

is the launchers' post-install check: it initialises jax.distributed when the environment asks
for it (a TPU slice with APO_JAX_DISTRIBUTED=1, a SLURM step), prints the Python / jax / flax
versions, the device count and kind and the "auto" choice, and exits with status 1 when the
global device count is not N or an installed package differs from its pin in the constraints file.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

AUTO = "auto"
# cuDNN's fused (flash) attention and bfloat16 tensor cores both start at Ampere (sm80).
_SM80 = (8, 0)
# The packages the post-install check reports, in this order.
_REPORTED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy")


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    """What `choose` needs to know about an accelerator (from `jax.Device`)."""

    platform: str
    """jax's platform name: "cpu", "gpu" (CUDA or ROCm) or "tpu"."""
    name: str
    """jax's `device_kind`, e.g. "Tesla T4", "NVIDIA H100 80GB HBM3", "TPU v4", "cpu"."""
    compute_capability: tuple[int, int] | None = None
    """CUDA compute capability (major, minor), e.g. (7, 5) for a T4; None off CUDA or unknown."""

    def __str__(self) -> str:
        sm = f", sm{self.compute_capability[0]}{self.compute_capability[1]}" if self.compute_capability else ""
        return f"{self.name} ({self.platform}{sm})"


@dataclasses.dataclass(frozen=True)
class Choice:
    """The concrete values "auto" stands for on one kind of device."""

    dtype: str
    """Compute dtype of activations and matmuls: "float32" or "bfloat16"."""
    attention_impl: str
    """"xla" (einsum attention, everywhere) or "cudnn" (fused attention, sm80+ GPUs)."""
    why: str
    """One line for the start-up log."""


def parse_compute_capability(value: Any) -> tuple[int, int] | None:
    """"8.6" (what jaxlib's CUDA devices report) -> (8, 6); anything else (ROCm "gfx90a", None) -> None."""
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", str(value)) if value is not None else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def describe(device: Any) -> DeviceKind:
    """The DeviceKind of a `jax.Device` (or anything with `platform` and `device_kind`)."""
    return DeviceKind(platform=str(device.platform).lower(), name=str(device.device_kind),
                      compute_capability=parse_compute_capability(getattr(device, "compute_capability", None)))


def choose(kind: DeviceKind, dtype: str = AUTO) -> Choice:
    """The compute dtype and attention implementation "auto" means on `kind`.

    `dtype` is the configured compute dtype: "auto" is decided here, a concrete value is kept and
    only the attention is chosen for it (cuDNN's fused attention takes bfloat16/float16 only).
    """
    platform, cc = kind.platform, kind.compute_capability
    if platform == "tpu":
        # bfloat16 is the MXU's native input type on every TPU generation. The cuDNN kernel is GPU-only.
        chosen, why = "bfloat16", "TPU: bfloat16 matmuls are native; XLA attention"
    elif platform == "gpu" and cc is not None and cc >= _SM80:
        chosen, why = "bfloat16", f"sm{cc[0]}{cc[1]} GPU: bfloat16 tensor cores and cuDNN fused attention"
    elif platform == "gpu":
        # T4 (sm75) / V100 (sm70) have no bfloat16 tensor cores (XLA would emulate them) and no
        # cuDNN flash attention. float16 would need loss scaling, which the train steps do not do,
        # and overflows in long softmax / RMSNorm sums: float32 is the safe choice there.
        where = f"sm{cc[0]}{cc[1]}" if cc else "unknown compute capability"
        chosen, why = "float32", f"{where} GPU: no bfloat16 tensor cores or cuDNN flash attention (needs sm80+)"
    else:
        # bfloat16 on CPU is emulated (slower than float32), and keeps the CPU demo's numbers.
        chosen, why = "float32", f"{platform.upper()}: float32 (bfloat16 is emulated there); XLA attention"
    if dtype != AUTO:
        chosen = dtype
    cudnn = platform == "gpu" and cc is not None and cc >= _SM80 and chosen in ("bfloat16", "float16")
    return Choice(dtype=chosen, attention_impl="cudnn" if cudnn else "xla", why=why)


def resolve_config(cfg: Any, device: Any | None = None) -> list[str]:
    """Replaces "auto" in `cfg.policy` / `cfg.rm` (`dtype`, `attention_impl`) for this machine.

    `device` defaults to `jax.devices()[0]` (the same device on every process of a multi-process
    run, so all of them choose alike). Fields that are not "auto" are kept. Returns the log lines
    (also logged): one per section that had an "auto" field.
    """
    if device is None:
        import jax

        device = jax.devices()[0]
    kind = describe(device)
    lines = []
    for section in ("policy", "rm"):
        m = cfg[section]
        if AUTO not in (m.dtype, m.attention_impl):
            continue
        choice = choose(kind, m.dtype)
        changed = []
        if m.dtype == AUTO:
            m.dtype = choice.dtype
            changed.append(f"dtype={choice.dtype}")
        if m.attention_impl == AUTO:
            m.attention_impl = choice.attention_impl
            changed.append(f"attention_impl={choice.attention_impl}")
        lines.append(f"{section}: auto -> {', '.join(changed)} on {kind} ({choice.why})")
    for line in lines:
        logging.getLogger("apo_jax").info("devices: %s", line)
    return lines


# ------------------------------------------------------------------------------------ install check


def read_constraints(path: str) -> dict[str, str]:
    """`name==version` pins of a pip constraints file, keyed by normalised name (PEP 503)."""
    pins = {}
    with open(path) as f:
        for n, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
            if not match:
                raise ValueError(f"{path}:{n}: expected `name==version`, got {raw.strip()!r}")
            pins[_normalise(match.group(1))] = match.group(2)
    return pins


def version_problems(pins: Mapping[str, str], installed: Mapping[str, str | None]) -> list[str]:
    """One line per pinned package that is missing or at another version than its pin."""
    problems = []
    for name, want in pins.items():
        have = installed.get(name)
        if have is None:
            problems.append(f"{name}: not installed (constraints pin {want})")
        elif have != want:
            problems.append(f"{name}: {have} installed, constraints pin {want}")
    return problems


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check(expect_devices: int | None = None, constraints: str | None = None) -> list[str]:
    """The post-install check on this process: prints a report, returns the problems found."""
    import jax

    from apo_jax import sharding

    problems = []
    if constraints:
        pins = read_constraints(constraints)
        problems += version_problems(pins, {name: _installed(name) for name in pins})
    sharding.maybe_initialize_distributed()
    kind = describe(jax.devices()[0])
    choice = choose(kind)
    versions = " ".join(f"{name}={_installed(name) or '-'}" for name in _REPORTED)
    print(f"apo_jax.devices: process {jax.process_index()}/{jax.process_count()}: python "
          f"{sys.version.split()[0]} {versions}")
    print(f"apo_jax.devices: {jax.device_count()} devices ({jax.local_device_count()} local), {kind}; "
          f"auto -> dtype={choice.dtype} attention_impl={choice.attention_impl}")
    if expect_devices is not None and jax.device_count() != expect_devices:
        problems.append(f"jax.device_count() is {jax.device_count()}, expected {expect_devices} "
                        f"(the slice's chips; {jax.local_device_count()} on this host)")
    return problems


def enable_compilation_cache(path: str) -> str | None:
    """Points JAX's persistent compilation cache at `path` (user-expanded; "" leaves it off).

    An explicit `JAX_COMPILATION_CACHE_DIR` in the environment wins, so a launcher or a test
    session can share one cache between processes. Returns the directory in use, or None.
    """
    import jax

    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if env:
        return env
    if not path:
        return None
    path = path if "://" in path else os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", path)
    logging.getLogger("apo_jax").info("devices: persistent compilation cache in %s", path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apo_jax.devices", description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect_devices", type=int, default=None, help="the global device count required")
    parser.add_argument("--constraints", default=None, help="a pip constraints file whose pins must be installed")
    args = parser.parse_args(argv)
    try:
        problems = check(args.expect_devices, args.constraints)
    except (OSError, ValueError) as e:
        print(f"apo_jax.devices: {e}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"apo_jax.devices: FAILED: {problem}", file=sys.stderr)
    if not problems:
        print("apo_jax.devices: OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

