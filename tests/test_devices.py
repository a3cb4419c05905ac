"""apo_jax.devices: the "auto" compute dtype / attention for each kind of device (mocked T4, A100,
H100, TPU, CPU), its application to a config at start-up, and the post-install check run on CPU;
plus the pinned tested set (constraints.txt) against setup.py's floors and this environment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types

import pytest

from apo_jax import config as config_lib
from apo_jax import devices
from loop_fixtures import REPO

CONSTRAINTS = os.path.join(REPO, "constraints.txt")

# Hand table: (platform, device_kind, compute_capability) -> (dtype, attention_impl). bfloat16 and
# cuDNN fused attention need Ampere (sm80) or newer; TPUs compute in bfloat16 natively; a CPU
# keeps float32.
KINDS = {
    "T4-sm75": (("gpu", "Tesla T4", "7.5"), ("float32", "xla")),
    "V100-sm70": (("gpu", "Tesla V100-SXM2-16GB", "7.0"), ("float32", "xla")),
    "A100-sm80": (("gpu", "NVIDIA A100-SXM4-40GB", "8.0"), ("bfloat16", "cudnn")),
    "L4-sm89": (("gpu", "NVIDIA L4", "8.9"), ("bfloat16", "cudnn")),
    "H100-sm90": (("gpu", "NVIDIA H100 80GB HBM3", "9.0"), ("bfloat16", "cudnn")),
    "ROCm-gfx90a": (("gpu", "AMD Instinct MI250X", "gfx90a"), ("float32", "xla")),
    "TPU-v4": (("tpu", "TPU v4", None), ("bfloat16", "xla")),
    "TPU-v5e": (("tpu", "TPU v5 lite", None), ("bfloat16", "xla")),
    "CPU": (("cpu", "cpu", None), ("float32", "xla")),
}


def _device(platform: str, kind: str, cc: str | None) -> types.SimpleNamespace:
    """A stand-in for jax.Device: CUDA devices carry `compute_capability`, others do not."""
    fake = types.SimpleNamespace(platform=platform, device_kind=kind)
    if cc is not None:
        fake.compute_capability = cc
    return fake


@pytest.mark.parametrize("name", sorted(KINDS))
def test_auto_choice_per_device_kind(name):
    (platform, kind, cc), (dtype, attention) = KINDS[name]
    choice = devices.choose(devices.describe(_device(platform, kind, cc)))
    assert (choice.dtype, choice.attention_impl) == (dtype, attention)
    assert choice.why  # a reason for the start-up log line


def test_describe_parses_compute_capability_and_reads_the_real_cpu_device():
    import jax

    assert devices.describe(_device("gpu", "Tesla T4", "7.5")) == devices.DeviceKind("gpu", "Tesla T4", (7, 5))
    assert devices.parse_compute_capability("10.0") == (10, 0)
    assert devices.parse_compute_capability("gfx942") is None
    assert devices.parse_compute_capability(None) is None
    kind = devices.describe(jax.devices()[0])
    assert kind.platform == "cpu" and kind.compute_capability is None
    assert devices.choose(kind) == devices.choose(devices.DeviceKind("cpu", "cpu"))


def test_a_configured_dtype_is_kept_and_decides_the_attention():
    h100 = devices.DeviceKind("gpu", "NVIDIA H100 80GB HBM3", (9, 0))
    # cuDNN's fused attention takes bfloat16/float16 only: float32 on an H100 gets XLA attention.
    assert (devices.choose(h100, "float32").dtype, devices.choose(h100, "float32").attention_impl) == ("float32", "xla")
    t4 = devices.DeviceKind("gpu", "Tesla T4", (7, 5))
    assert (devices.choose(t4, "bfloat16").dtype, devices.choose(t4, "bfloat16").attention_impl) == ("bfloat16", "xla")


def test_resolve_config_replaces_only_auto_fields_and_logs_the_choice(caplog):
    c = config_lib.base_config()
    c.policy.dtype, c.policy.attention_impl = "auto", "auto"
    c.rm.dtype, c.rm.attention_impl = "float32", "auto"
    config_lib.validate(c, 8)  # "auto" is a valid value before start-up resolves it
    with caplog.at_level("INFO", logger="apo_jax"):
        lines = devices.resolve_config(c, _device("gpu", "NVIDIA A100-SXM4-80GB", "8.0"))
    assert (c.policy.dtype, c.policy.attention_impl) == ("bfloat16", "cudnn")
    assert (c.rm.dtype, c.rm.attention_impl) == ("float32", "xla")  # float32 kept -> no cuDNN
    assert lines[0].startswith(
        "policy: auto -> dtype=bfloat16, attention_impl=cudnn on NVIDIA A100-SXM4-80GB (gpu, sm80)")
    assert lines[1].startswith("rm: auto -> attention_impl=xla on")
    assert "devices: policy: auto -> dtype=bfloat16" in caplog.text
    # Nothing to do on a config without "auto" (the CPU demo keeps its numbers).
    assert devices.resolve_config(config_lib.base_config(), _device("tpu", "TPU v4", None)) == []


def test_validate_still_rejects_other_values():
    c = config_lib.base_config()
    c.policy.dtype = "float16"
    c.rm.attention_impl = "flash"
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c, 8)
    assert "policy.dtype" in str(e.value) and "rm.attention_impl" in str(e.value)


def test_synthetic_gpu_config_asks_for_auto():
    import importlib.util

    path = os.path.join(REPO, "configs", "synthetic_gpu.py")
    spec = importlib.util.spec_from_file_location("synthetic_gpu_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    for m in (c.policy, c.rm):
        assert (m.dtype, m.attention_impl) == ("auto", "auto")


# ------------------------------------------------------------------------------------------------ pins


def test_constraints_parse_and_version_problems(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("# comment\nJax==0.10.2  # trailing\n\nml_collections==1.1.0\n")
    pins = devices.read_constraints(str(path))
    assert pins == {"jax": "0.10.2", "ml-collections": "1.1.0"}
    assert devices.version_problems(pins, {"jax": "0.10.2", "ml-collections": None}) == [
        "ml-collections: not installed (constraints pin 1.1.0)"]
    assert devices.version_problems(pins, {"jax": "0.11.0", "ml-collections": "1.1.0"}) == [
        "jax: 0.11.0 installed, constraints pin 0.10.2"]
    path.write_text("jax>=0.10\n")
    with pytest.raises(ValueError, match=r"c\.txt:1: expected `name==version`"):
        devices.read_constraints(str(path))


def test_setup_floors_are_the_pinned_versions():
    """setup.py's floors are the oldest versions CI tests: the pins of constraints.txt."""
    pins = devices.read_constraints(CONSTRAINTS)
    setup_py = open(os.path.join(REPO, "setup.py")).read()
    floors = {re.sub(r"[-_.]+", "-", name).lower(): version
              for name, version in re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([^",]+)"', setup_py)}
    for name in ("jax", "flax", "optax", "orbax-checkpoint", "transformers", "numpy", "ml-collections"):
        assert name in pins, f"constraints.txt does not pin {name}"
    shared = sorted(set(floors) & set(pins))
    assert len(shared) >= 8
    assert {n: floors[n] for n in shared} == {n: pins[n] for n in shared}
    assert 'python_requires=">=3.11"' in setup_py


def test_this_environment_is_the_pinned_set():
    """CI installs with `-c constraints.txt` (.ci/run sets APO_JAX_REQUIRE_PINNED=1): there the
    installed versions must be the pins. Elsewhere (e.g. a GPU box with a newer jax) a mismatch
    only skips, naming it."""
    import importlib.metadata

    pins = devices.read_constraints(CONSTRAINTS)
    installed = {}
    for name in pins:
        try:
            installed[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed[name] = None
    problems = devices.version_problems(pins, installed)
    if problems and os.environ.get("APO_JAX_REQUIRE_PINNED") != "1":
        pytest.skip("not the pinned tested set (installed without -c constraints.txt): " + "; ".join(problems))
    assert problems == []


def _check(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR", "TPU_WORKER"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=REPO)
    env.pop("APO_JAX_DISTRIBUTED", None)
    return subprocess.run([sys.executable, "-m", "apo_jax.devices", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)


def test_post_install_check_on_cpu_reports_the_device_count(tmp_path):
    """The launchers' post-install check, run here on 8 fake CPU devices: it passes with the right
    count and this environment's own versions, and fails (status 1) naming every problem otherwise."""
    import importlib.metadata

    import jax

    good = tmp_path / "good.txt"
    good.write_text(f"jax=={jax.__version__}\nnumpy=={importlib.metadata.version('numpy')}\n")
    proc = _check("--expect_devices=8", f"--constraints={good}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "apo_jax.devices: 8 devices (8 local), cpu (cpu); auto -> dtype=float32 attention_impl=xla" in proc.stdout
    assert f"jax={jax.__version__}" in proc.stdout and "process 0/1" in proc.stdout
    assert proc.stdout.rstrip().endswith("apo_jax.devices: OK")

    bad = tmp_path / "bad.txt"
    bad.write_text("jax==0.0.1\nno-such-package-apo==1.0\n")
    proc = _check("--expect_devices=16", f"--constraints={bad}")
    assert proc.returncode == 1
    failures = [line for line in proc.stderr.splitlines() if "FAILED" in line]
    assert failures == [
        f"apo_jax.devices: FAILED: jax: {jax.__version__} installed, constraints pin 0.0.1",
        "apo_jax.devices: FAILED: no-such-package-apo: not installed (constraints pin 1.0)",
        "apo_jax.devices: FAILED: jax.device_count() is 8, expected 16 (the slice's chips; 8 on this host)",
    ]


def test_main_resolves_auto_at_start_up_and_logs_it(tmp_path):
    """`python -m apo_jax.main` with "auto" fields: the choice is logged right after validation
    (the run then stops at preflight on a missing checkpoint, before any training)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR", "TPU_WORKER"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "apo_jax.main", f"--config={REPO}/configs/synthetic.py", "--config.policy.dtype=auto",
         "--config.policy.attention_impl=auto", "--config.rm.attention_impl=auto",
         f"--config.run_dir={tmp_path}/run", f"--config.rm.base_checkpoint={tmp_path}/missing"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "devices: policy: auto -> dtype=float32, attention_impl=xla on cpu (cpu)" in proc.stderr, proc.stderr[-3000:]
    assert "devices: rm: auto -> attention_impl=xla on cpu (cpu)" in proc.stderr
    assert proc.returncode == 2 and "rm.base_checkpoint" in proc.stderr  # stopped before any work
