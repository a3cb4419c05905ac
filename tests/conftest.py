"""Test-wide settings: offline hubs, and 8 fake CPU devices for mesh tests."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Must happen before jax is imported anywhere in the test process.
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

# One persistent XLA compilation cache for the whole session, shared with the processes the tests
# start (kill/restart and multi-process games): the same tiny programs compile once. Entries are
# keyed by the program, the devices and the jax version, so a hit is the same executable.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="apo_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_configure(config):
    # Tiers: `-m "not e2e and not real_model"` is the fast unit tier (parity, losses, sampler,
    # data, store and phase resume); `-m e2e` the end-to-end tier (whole games, several
    # processes, kill and restart); `-m real_model` the pretrained-model tier. The README's test
    # command (and CI) runs all of them.
    config.addinivalue_line("markers", "e2e: end-to-end tier (whole games, multi-process, kill/restart)")
    config.addinivalue_line("markers", "real_model: tests on a real pretrained LLaMA (SmolLM2-135M-Instruct)")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (each holds JAX with 8 fake devices and its models;
    several tests start processes of their own)."""
    return max(1, min(4, os.cpu_count() or 1))
