"""The launchers: shell scripts that parse and lint, dry runs that print the exact gcloud / sbatch /
srun command lines, SLURM's environment starting jax.distributed, and the Colab notebook (valid
nbformat 4, the README's commands, and its run reproduced on CPU at the tiny size)."""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import socket
import subprocess
import sys
import types

import pytest

import multiproc
from loop_fixtures import REPO

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")) + glob.glob(os.path.join(REPO, "launch", "*.sbatch")))
NOTEBOOK = os.path.join(REPO, "launch", "colab_gpu.ipynb")


def _bash(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})))


def _commands(stdout: str) -> list[list[str]]:
    """The `+ command` lines of a dry run, as argument lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_launch_dir_has_the_three_launchers():
    names = {os.path.basename(p) for p in SCRIPTS}
    assert {"tpu_pod.sh", "slurm_gpu.sbatch", "slurm_launch.sh"} <= names
    assert os.path.exists(NOTEBOOK)


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_parses_with_bash_n(script):
    proc = _bash("-n", script)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_passes_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian/Ubuntu: apt-get install shellcheck; .ci/run tries that)")
    proc = subprocess.run(["shellcheck", "--shell=bash", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ TPU pod

def test_tpu_pod_dry_run_prints_the_gcloud_commands(tmp_path):
    extra = ["--config.apo.rounds=3", "--config.apo.schedules=('apo',)"]
    proc = _bash("launch/tpu_pod.sh", "--name", "apo-v4", "--zone", "us-central2-b", "--accelerator", "v4-32",
                 "--runtime", "tpu-ubuntu2204-base", "--bucket", "gs://my-bucket/apo/runs/", "--project", "my-proj",
                 "--config", "configs/hh.py", "--spot", "--delete", "--dry-run", "--", *extra,
                 env={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    cmds = _commands(proc.stdout)
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone=us-central2-b", "--project=my-proj"]
    tarball = f"{tmp_path}/apo_jax-apo-v4.tar.gz"
    ssh = [*tpu, "ssh", "apo-v4", *where, "--worker=all"]
    run_dir = "gs://my-bucket/apo/runs/apo-v4"  # the run writes to the bucket itself (Orbax + epath)
    log = "$HOME/apo_jax_logs/apo-v4.log"
    main = (f"python3 -m apo_jax.main --config=configs/hh.py --config.run_dir={run_dir} "
            + " ".join(shlex.quote(a) for a in extra))
    run = (f"cd ~/apo_jax && mkdir -p $HOME/apo_jax_logs && export APO_JAX_DISTRIBUTED=1 "
           f"PYTHONUNBUFFERED=1 && set -o pipefail && {main} 2>&1 | tee -a {log}; status=$?; "
           f"gcloud storage cp {log} {run_dir}/logs/$(hostname).log; exit $status")
    expected = [
        [*tpu, "describe", "apo-v4", *where, "--format=value(state)"],
        [*tpu, "create", "apo-v4", *where, "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"],
        ["tar", "-czf", tarball, "--exclude=./.git", "--exclude=./.venv", "--exclude=./runs", "--exclude=__pycache__",
         "--exclude=*.egg-info", "-C", REPO, "."],
        [*tpu, "scp", tarball, "apo-v4:apo_jax-src.tar.gz", *where, "--worker=all"],
        None,  # setup, below
        [*ssh, f"--command={run}"],
        [*tpu, "delete", "apo-v4", *where, "--quiet"],
    ]
    assert len(cmds) == len(expected), proc.stdout
    for got, want in zip(cmds, expected):
        if want is not None:
            assert got == want
    setup = cmds[4]
    assert setup[:-1] == ssh
    assert setup[-1] == ("--command=mkdir -p ~/apo_jax && tar -xzf ~/apo_jax-src.tar.gz -C ~/apo_jax && "
                         "cd ~/apo_jax && python3 -m pip install -q -e '.[gcs]' 'jax[tpu]'")
    # The remote commands are valid shell, and the extra overrides reach apo_jax.main intact.
    for remote in (setup[-1], run):
        assert _bash("-n", "-c", remote.removeprefix("--command=")).returncode == 0, remote
    words = shlex.split(main)
    assert words[-2:] == extra


def test_tpu_pod_dry_run_other_actions(tmp_path):
    def dry(*args: str) -> list[list[str]]:
        proc = _bash("launch/tpu_pod.sh", *args, "--name", "apo", "--zone", "europe-west4-a", "--dry-run",
                     env={"TMPDIR": str(tmp_path)})
        assert proc.returncode == 0, proc.stderr
        return _commands(proc.stdout)

    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    ssh = [*tpu, "ssh", "apo", "--zone=europe-west4-a", "--worker=all"]
    assert dry("stop") == [[*ssh, "--command=pkill -TERM -f '^python3 -m apo_jax[.]main' || true"]]
    assert dry("delete") == [[*tpu, "delete", "apo", "--zone=europe-west4-a", "--quiet"]]
    assert dry("logs", "--bucket", "gs://b") == [  # a bucket without prefix
        [*ssh, "--command=gcloud storage cp $HOME/apo_jax_logs/apo.log gs://b/apo/logs/$(hostname).log"]]
    # Without --spot: no --spot flag, and `up` stops after installing (no run, no delete).
    up = dry("up", "--accelerator", "v5litepod-16", "--runtime", "v2-alpha-tpuv5-lite", "--bucket", "gs://b/x")
    assert up[1] == [*tpu, "create", "apo", "--zone=europe-west4-a", "--accelerator-type=v5litepod-16",
                     "--version=v2-alpha-tpuv5-lite"]
    assert len(up) == 5 and "apo_jax.main" not in " ".join(up[-1])


def test_tpu_pod_refuses_missing_or_bad_flags():
    proc = _bash("launch/tpu_pod.sh", "--name", "apo", "--zone", "z", "--accelerator", "v4-8", "--bucket", "/local",
                 "--dry-run")
    assert proc.returncode == 2 and "--bucket must be a gs:// path" in proc.stderr
    proc = _bash("launch/tpu_pod.sh", "--zone", "z", "--dry-run")
    assert proc.returncode == 2 and "--name is required" in proc.stderr
    proc = _bash("launch/tpu_pod.sh", "--name", "a", "--zone", "z", "--bogus")
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr


# ------------------------------------------------------------------------------------------------ SLURM


def test_slurm_launch_dry_run_one_process_per_gpu():
    extra = "--config.apo.schedules=('apo',)"
    proc = _bash("launch/slurm_launch.sh", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--account",
                 "lab", "--time", "24:00:00", "--config", "configs/hh.py", "--run-dir", "/shared/runs/apo hh",
                 "--dry-run", "--", extra)
    assert proc.returncode == 0, proc.stderr
    job = ["configs/hh.py", "--config.run_dir=/shared/runs/apo hh", extra]
    assert _commands(proc.stdout) == [
        ["sbatch", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--account=lab",
         "--time=24:00:00", "launch/slurm_gpu.sbatch", *job],
        ["srun", "--kill-on-bad-exit=1", "--label", "python", "-m", "apo_jax.main", "--config=configs/hh.py",
         *job[1:]],
    ]
    # Printed exactly as a shell would need them (shlex.quote), so a copy-paste runs the same.
    assert proc.stdout.splitlines()[1] == "+ " + shlex.join(["srun", "--kill-on-bad-exit=1", "--label", "python", "-m",
                                                             "apo_jax.main", "--config=configs/hh.py", *job[1:]])


def test_slurm_launch_dry_run_one_process_per_host():
    proc = _bash("launch/slurm_launch.sh", "--nodes", "4", "--gpus-per-node", "8", "--per", "host",
                 "--cpus-per-task", "96", "--config", "configs/synthetic_gpu.py", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert _commands(proc.stdout) == [
        ["sbatch", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=96",
         "launch/slurm_gpu.sbatch", "configs/synthetic_gpu.py"],
        ["srun", "--kill-on-bad-exit=1", "--label", "python", "-m", "apo_jax.main",
         "--config=configs/synthetic_gpu.py"],
    ]


def test_sbatch_script_dry_run_and_directives():
    proc = _bash("launch/slurm_gpu.sbatch", "configs/hh.py", "--config.run_dir=/shared/x",
                 env={"DRY_RUN": "1", "PYTHON": "/venv/bin/python"})
    assert proc.returncode == 0, proc.stderr
    assert _commands(proc.stdout) == [["srun", "--kill-on-bad-exit=1", "--label", "/venv/bin/python", "-m",
                                       "apo_jax.main", "--config=configs/hh.py", "--config.run_dir=/shared/x"]]
    text = open(os.path.join(REPO, "launch", "slurm_gpu.sbatch")).read()
    for directive in ("--ntasks-per-node=8", "--gpus-per-node=8", "--signal=TERM@300", "--requeue"):
        assert f"#SBATCH {directive}\n" in text
    # No per-task CUDA_VISIBLE_DEVICES: JAX picks the task's GPU (sharding.slurm_local_device_ids).
    assert "CUDA_VISIBLE_DEVICES=" not in text
    assert _bash("launch/slurm_gpu.sbatch").returncode == 2  # no config: usage


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_NTASKS": "16", "SLURM_NNODES": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, None),  # JAX: LOCALID
    ({"SLURM_NTASKS": "2", "SLURM_NNODES": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, list(range(8))),
    ({"SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_NNODES": "1", "CUDA_VISIBLE_DEVICES": "0,1"}, [0, 1]),
    ({"SLURM_NTASKS": "16", "SLURM_NNODES": "2", "CUDA_VISIBLE_DEVICES": "5"}, [0]),  # --gpus-per-task=1
    ({"SLURM_NTASKS": "4", "SLURM_NNODES": "2"}, None),  # CPU nodes
])
def test_slurm_local_device_ids(env, expected):
    from apo_jax import sharding

    assert sharding.slurm_local_device_ids(env) == expected


def _slurm_job_id_with_a_free_port() -> int:
    """A job id whose SLURM coordinator port (JAX: 61440 + id % 4096) is free here."""
    for job_id in range(os.getpid() % 4096, os.getpid() % 4096 + 4096):
        port = 61440 + job_id % 4096
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return job_id
    pytest.skip("no free port in 61440-65535 for a SLURM coordinator")


def test_slurm_environment_starts_jax_distributed_with_a_mesh_over_all_processes():
    """Two local processes with only SLURM's variables: maybe_initialize_distributed finds the
    coordinator from the node list and job id, and the mesh spans both processes' devices."""
    job_id = _slurm_job_id_with_a_free_port()
    code = """
import logging, jax, numpy as np
from apo_jax import sharding
sharding.maybe_initialize_distributed()
logging.getLogger("apo_jax").warning("up")
mesh = sharding.make_mesh()
x = sharding.shard_batch({"x": np.full((2, 3), jax.process_index() + 1.0, np.float32)}, mesh)["x"]
total = jax.jit(lambda a: a.sum())(x)
print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(), dict(mesh.shape),
      float(np.asarray(total.addressable_data(0))))
"""
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROC"))}
        env.update(SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                   SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_NODES="1", JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=REPO)
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-3000:]
        line = [x for x in out.splitlines() if x.startswith("RESULT")][0]
        # 2 rows of 3 per process, filled with 1s and 2s: the sum over the global batch is 18.
        assert line == f"RESULT {rank} 2 4 {{'data': 1, 'fsdp': 4, 'tensor': 1}} 18.0"
        assert f"[process {rank}/2] up" in err  # log lines say which process wrote them


# ------------------------------------------------------------------------------------------------ Colab


def _notebook():
    nbformat = pytest.importorskip("nbformat")
    return nbformat, nbformat.read(NOTEBOOK, as_version=4)


def _shell_commands(nb) -> list[str]:
    """The notebook's `!command` lines."""
    return [line.strip()[1:].strip() for cell in nb.cells if cell.cell_type == "code"
            for line in cell.source.splitlines() if line.strip().startswith("!")]


def test_colab_notebook_is_valid_nbformat_4():
    nbformat, nb = _notebook()
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.get("accelerator") == "GPU"
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")  # committed clean


def test_colab_notebook_runs_the_readme_commands():
    _, nb = _notebook()
    readme = open(os.path.join(REPO, "README.md")).read()
    commands = _shell_commands(nb)
    # Getting the code is the one step the README cannot spell out (it depends on where the copy
    # lives); every other command is the README's, character for character.
    documented = [c for c in commands if "git clone" not in c]
    assert documented == ['pip install -e . "jax[cuda12]"', "python -m apo_jax.main --config=configs/synthetic_gpu.py"]
    for command in documented:
        assert command in readme, f"notebook command not in README.md: {command}"


def test_colab_notebook_run_reproduced_on_cpu_shows_tables_and_plots(tmp_path_factory, monkeypatch):
    """The notebook's run command with its CPU twin (configs/synthetic.py at the tiny size), then
    its display cell on that run's outputs: Table 2, Table 3 and both Figure 2 plots."""
    _, nb = _notebook()
    [run] = [c for c in _shell_commands(nb) if "apo_jax.main" in c]
    argv = shlex.split(run)
    assert argv[:3] == ["python", "-m", "apo_jax.main"]
    cpu = [a.replace("configs/synthetic_gpu.py", "configs/synthetic.py") for a in argv[3:]]
    run_dir = multiproc.reference_run(tmp_path_factory.getbasetemp())  # shared with test_multiprocess
    assert multiproc.tiny_main_args(run_dir)[:1] == cpu  # the same command, plus the tiny overrides

    [show] = [c.source for c in nb.cells if c.cell_type == "code" and "display(" in c.source]
    assert 'RUN_DIR = "runs/synthetic_gpu"' in show
    shown: list[tuple[str, object]] = []
    display_mod = types.ModuleType("IPython.display")
    display_mod.Markdown = lambda text: ("markdown", text)
    display_mod.Image = lambda filename: ("image", open(filename, "rb").read())
    display_mod.display = shown.append
    ipython = types.ModuleType("IPython")
    ipython.display = display_mod
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display_mod)
    exec(show.replace('RUN_DIR = "runs/synthetic_gpu"', f"RUN_DIR = {run_dir!r}"), {})

    kinds = [kind for kind, _ in shown]
    assert kinds == ["markdown", "image", "image"]
    tables = shown[0][1]
    assert "Table 2" in tables and "Table 3" in tables and "RM_APO-v2-seq" in tables
    for _, png in shown[1:]:
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
