"""The launchers: shell scripts that parse and lint; dry runs that print the exact gcloud / git /
sbatch / srun command lines (queued resources, ssh-add, staging through the bucket, install with
the pinned set and the device check, detached start, cleanup, per-family runtime); the TPU
workers' start / status / stop commands and the SLURM time-limit requeue run here with stand-ins;
SLURM's environment starting jax.distributed only in a job step; the README's install commands
equal to .ci/run's; and the Colab notebook (valid nbformat 4, the README's commands, and its run
reproduced on CPU at the tiny size)."""

from __future__ import annotations

import glob
import os
import re
import runpy
import shlex
import shutil
import socket
import subprocess
import sys
import time
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


# ------------------------------------------------------------------------------------------------ install


def test_readme_install_commands_are_ci_runs_and_pin_the_tested_set():
    """.ci/run runs the README's test command, step for step, with the constraints; the demo and
    the GPU/TPU install use them too."""
    readme = open(os.path.join(REPO, "README.md")).read()
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    block = ci.split('# --- README: "Run the tests" (keep in sync) ---\n', 1)[1].split("# --- end ---", 1)[0]
    ci_steps = [line for line in block.splitlines() if line and not line.startswith(("set ", "status="))]
    [test_line] = [line for line in readme.splitlines() if line.endswith("python -m pytest -q tests")]
    assert test_line.split(" && ") == ["python3 -m venv .venv", ". .venv/bin/activate", *ci_steps]
    assert 'pip install -c constraints.txt -e ".[test]"' in ci_steps
    assert "pip install -c constraints.txt -e . && python -m apo_jax.main --config=configs/synthetic.py" in readme
    assert 'pip install -c constraints.txt -e . "jax[cuda12]"' in readme


# ------------------------------------------------------------------------------------------------ TPU pod

TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]


@pytest.fixture(scope="module")
def pod_repo(tmp_path_factory) -> str:
    """A clean git checkout holding the TPU launcher (what `git archive HEAD` ships), so the dry
    runs do not depend on the state of this working tree."""
    repo = tmp_path_factory.mktemp("pod_repo")
    os.makedirs(repo / "launch")
    shutil.copy(os.path.join(REPO, "launch", "tpu_pod.sh"), repo / "launch" / "tpu_pod.sh")
    shutil.copy(os.path.join(REPO, "constraints.txt"), repo / "constraints.txt")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "pod"]):
        subprocess.run([*git, *cmd], check=True, capture_output=True)
    return str(repo)


def _pod(repo: str, tmp_path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """launch/tpu_pod.sh of `repo`, with HOME (its ssh key) and TMPDIR under tmp_path."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    base = {"HOME": str(home), "TMPDIR": str(tmp_path)}
    base.update(env or {})
    if "SSH_AUTH_SOCK" not in base:
        base["SSH_AUTH_SOCK"] = ""
    return subprocess.run(["bash", os.path.join(repo, "launch", "tpu_pod.sh"), *args], cwd=repo, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, **base))


def _remote(cmd: list[str]) -> str:
    [command] = [a for a in cmd if a.startswith("--command=")]
    return command.removeprefix("--command=")


def test_tpu_pod_dry_run_prints_every_command(pod_repo, tmp_path):
    """`all` on a new spot slice: ssh key into the agent, queued resource polled until ACTIVE,
    `git archive HEAD` staged through the bucket, the install + device check on every worker, the
    --env file, the detached start, the watch, and the forced delete."""
    extra = ["--config.apo.rounds=3", "--config.apo.schedules=('apo',)"]
    proc = _pod(pod_repo, tmp_path, "--name", "apo-v4", "--zone", "us-central2-b", "--accelerator", "v4-32",
                "--bucket", "gs://my-bucket/apo/runs/", "--project", "my-proj", "--spot", "--service-account",
                "sa@my-proj.iam.gserviceaccount.com", "--scopes", "cloud-platform", "--internal-ips", "--env",
                "HF_TOKEN", "--env", "XLA_FLAGS=--xla_dump_to=/tmp/x y", "--delete", "--dry-run", "--", *extra,
                env={"SSH_AUTH_SOCK": "/tmp/agent.sock", "HF_TOKEN": "hf_secret_value"})
    assert proc.returncode == 0, proc.stderr
    cmds = _commands(proc.stdout)
    commit = subprocess.run(["git", "-C", pod_repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    home, where = str(tmp_path / "home"), ["--zone=us-central2-b", "--project=my-proj"]
    run_dir = "gs://my-bucket/apo/runs/apo-v4"
    src = f"{run_dir}/source/apo_jax-{commit}.tar.gz"
    tarball = f"{tmp_path}/apo_jax-apo-v4.tar.gz"
    ssh = [*TPU, "ssh", "apo-v4", *where, "--worker=all", "--internal-ip"]
    describe = [*QR, "describe", "apo-v4", *where, "--format=value(state.state)"]
    expected = [
        ["mkdir", "-p", "-m", "700", f"{home}/.ssh"],
        ["ssh-keygen", "-q", "-t", "rsa", "-b", "3072", "-N", "", "-f", f"{home}/.ssh/google_compute_engine"],
        ["ssh-add", f"{home}/.ssh/google_compute_engine"],
        describe,
        [*QR, "create", "apo-v4", "--node-id=apo-v4", *where, "--accelerator-type=v4-32",
         "--runtime-version=tpu-ubuntu2204-base", "--spot", "--service-account=sa@my-proj.iam.gserviceaccount.com",
         "--scopes=cloud-platform", "--internal-ips"],
        describe,  # polled until ACTIVE
        ["git", "-C", pod_repo, "archive", "--format=tar.gz", "-o", tarball, "HEAD"],
        ["gcloud", "storage", "cp", tarball, src],
        None,  # setup
        [*TPU, "scp", f"{tmp_path}/apo_jax-apo-v4.env", "apo-v4:apo_jax/env", *where, "--worker=all", "--internal-ip"],
        None,  # start
        None,  # status
        [*QR, "delete", "apo-v4", *where, "--force", "--quiet"],
    ]
    assert len(cmds) == len(expected), proc.stdout
    for got, want in zip(cmds, expected):
        if want is not None:
            assert got == want
    setup, start, status = (_remote(cmds[i]) for i in (8, 10, 11))
    for i in (8, 10, 11):
        assert cmds[i][:-1] == ssh
    # Install: the shipped commit, a uv venv with Python 3.11, the pinned set, then the device check.
    assert f"gcloud storage cp {src} ~/apo_jax/src.tar.gz && tar -xzf ~/apo_jax/src.tar.gz -C ~/apo_jax/src" in setup
    assert f"echo {commit} > ~/apo_jax/SOURCE" in setup
    assert "uv venv -q --python 3.11 ~/apo_jax/venv" in setup
    assert "uv pip install -q --python ~/apo_jax/venv/bin/python -c constraints.txt -e '.[gcs]' 'jax[tpu]'" in setup
    assert setup.endswith("APO_JAX_DISTRIBUTED=1 ~/apo_jax/venv/bin/python -m apo_jax.devices --expect_devices=16 "
                          "--constraints=constraints.txt")  # v4-32: 16 chips, one jax device each
    # Start: TPU freed, detached, refused while a game runs; the game on every worker.
    assert "sudo lsof -t /dev/accel* /dev/vfio/*" in start and "sudo rm -f /tmp/libtpu_lockfile" in start
    assert "setsid nohup bash -c " in start and "< /dev/null & echo $! > ~/apo_jax/run.pid" in start
    assert 'then echo "apo_jax: already running on $(hostname)"' in start
    [inner] = [w for w in shlex.split(start.split("setsid nohup bash -c ", 1)[1]) if "apo_jax.main" in w][:1]
    main = inner.split("; ")[-2]
    assert shlex.split(main) == ["~/apo_jax/venv/bin/python", "-m", "apo_jax.main", "--config=configs/hh.py",
                                 f"--config.run_dir={run_dir}", *extra]
    assert ". ~/apo_jax/env" in inner and "export APO_JAX_DISTRIBUTED=1 PYTHONUNBUFFERED=1" in inner
    assert f"gcloud storage cp $HOME/apo_jax/logs/apo-v4.log {run_dir}/logs/$(hostname).log" in status
    for remote in (setup, start, status):
        assert _bash("-n", "-c", remote).returncode == 0, remote
    # The secret travels in the env file only: never on a printed (or remote) command line.
    assert "hf_secret_value" not in proc.stdout + proc.stderr
    assert "passing HF_TOKEN XLA_FLAGS to the workers" in proc.stderr
    assert not os.path.exists(f"{tmp_path}/apo_jax-apo-v4.env")  # a dry run writes nothing


@pytest.mark.parametrize("accel, runtime, devices", [
    ("v2-8", "tpu-ubuntu2204-base", 8), ("v3-32", "tpu-ubuntu2204-base", 32), ("v4-8", "tpu-ubuntu2204-base", 4),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", 16), ("v5p-8", "v2-alpha-tpuv5", 4), ("v6e-16", "v2-alpha-tpuv6e", 16),
])
def test_tpu_pod_runtime_and_device_count_per_family(pod_repo, tmp_path, accel, runtime, devices):
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    (tmp_path / "home" / ".ssh" / "google_compute_engine").write_text("key")  # no ssh-keygen, no agent
    proc = _pod(pod_repo, tmp_path, "up", "--name", "apo", "--zone", "z", "--accelerator", accel, "--bucket", "gs://b",
                "--dry-run")
    assert proc.returncode == 0, proc.stderr
    cmds = _commands(proc.stdout)
    assert cmds[1] == [*QR, "create", "apo", "--node-id=apo", "--zone=z", f"--accelerator-type={accel}",
                       f"--runtime-version={runtime}"]
    assert _remote(cmds[-1]).endswith(f"--expect_devices={devices} --constraints=constraints.txt")
    assert len(cmds) == 6 and "apo_jax.main" not in " ".join(cmds[-1])  # `up` installs, runs nothing
    if accel == "v4-8":
        proc = _pod(pod_repo, tmp_path, "up", "--name", "apo", "--zone", "z", "--accelerator", accel, "--runtime",
                    "v2-alpha-tpuv4", "--bucket", "gs://b", "--dry-run")
        assert _commands(proc.stdout)[1][-1] == "--runtime-version=v2-alpha-tpuv4"


def test_tpu_pod_ships_only_commits_unless_allowed(pod_repo, tmp_path):
    dirty = tmp_path / "repo"
    shutil.copytree(pod_repo, dirty)
    with open(dirty / "constraints.txt", "a") as f:
        f.write("# local edit\n")
    args = ["up", "--name", "apo", "--zone", "z", "--accelerator", "v4-8", "--bucket", "gs://b", "--dry-run"]
    proc = _pod(str(dirty), tmp_path, *args)
    assert proc.returncode == 2 and "has uncommitted changes" in proc.stderr and "--allow-dirty" in proc.stderr
    proc = _pod(str(dirty), tmp_path, *args, "--allow-dirty")
    assert proc.returncode == 0, proc.stderr
    cmds = _commands(proc.stdout)
    commit = subprocess.run(["git", "-C", str(dirty), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    tar = [c for c in cmds if c[0] == "tar"]
    assert tar and tar[0][-3:] == ["-C", str(dirty), "."]
    assert [c for c in cmds if c[:3] == ["gcloud", "storage", "cp"]][0][-1] == \
        f"gs://b/apo/source/apo_jax-{commit}-dirty.tar.gz"


def test_tpu_pod_dry_run_other_actions(pod_repo, tmp_path):
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    (tmp_path / "home" / ".ssh" / "google_compute_engine").write_text("key")

    def dry(*args: str) -> list[list[str]]:
        proc = _pod(pod_repo, tmp_path, *args, "--name", "apo", "--zone", "europe-west4-a", "--dry-run")
        assert proc.returncode == 0, proc.stderr
        return _commands(proc.stdout)

    ssh = [*TPU, "ssh", "apo", "--zone=europe-west4-a", "--worker=all"]
    [stop] = dry("stop", "--grace-seconds", "120")
    assert stop[:-1] == ssh
    assert _remote(stop).startswith('p=$(cat ~/apo_jax/run.pid 2>/dev/null) || exit 0; pkill -TERM -P "$p"; '
                                    "for _ in $(seq 120); do")
    assert dry("delete") == [[*QR, "delete", "apo", "--zone=europe-west4-a", "--force", "--quiet"]]
    assert dry("logs", "--bucket", "gs://b") == [  # a bucket without prefix
        [*ssh, "--command=gcloud storage cp $HOME/apo_jax/logs/apo.log gs://b/apo/logs/$(hostname).log"]]
    [watch] = dry("watch", "--bucket", "gs://b")
    assert _remote(watch).startswith("gcloud storage cp $HOME/apo_jax/logs/apo.log gs://b/apo/logs/$(hostname).log")
    run = dry("run", "--bucket", "gs://b")
    assert [_remote(c).split(" && ")[0] for c in run] == ["rm -f ~/apo_jax/env", _remote(watch).split(" && ")[0]]


def test_tpu_pod_refuses_missing_or_bad_flags(pod_repo, tmp_path):
    def refused(*args: str, env: dict[str, str] | None = None) -> str:
        proc = _pod(pod_repo, tmp_path, *args, env=env)
        assert proc.returncode == 2, proc.stdout
        return proc.stderr

    ok = ["--name", "apo", "--zone", "z", "--accelerator", "v4-8", "--bucket", "gs://b", "--dry-run"]
    assert "--bucket must be a gs:// path" in refused(*ok[:6], "--bucket", "/local", "--dry-run")
    assert "--name is required" in refused("--zone", "z", "--dry-run")
    assert "unknown argument --bogus" in refused("--name", "a", "--zone", "z", "--bogus")
    assert "--accelerator v9-8: unknown TPU type" in refused(*ok[:4], "--accelerator", "v9-8", *ok[6:])
    assert "--name Apo_1: lowercase letters" in refused("--name", "Apo_1", *ok[2:])
    assert "--env 1X: not a variable name" in refused(*ok, "--env", "1X")
    assert "--env APO_UNSET_VAR: $APO_UNSET_VAR is not set here" in refused(*ok, "--env", "APO_UNSET_VAR")
    assert "--sync-seconds must be a number" in refused(*ok, "--sync-seconds", "5m")


def _shim(bin_dir, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_tpu_pod_remote_commands_start_detached_report_and_stop(pod_repo, tmp_path):
    """The worker-side start / status / stop commands, run here with a stand-in game: the start
    returns at once and the game outlives it, a second start is refused while it runs, status
    reports it (and copies the log), and stop's SIGTERM ends it with its exit status recorded."""
    missing = [tool for tool in ("setsid", "pkill") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (util-linux / procps; every TPU VM image has them)")
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    (tmp_path / "home" / ".ssh" / "google_compute_engine").write_text("key")
    cmds = _commands(_pod(pod_repo, tmp_path, "run", "--name", "apo", "--zone", "z", "--bucket", "gs://b",
                          "--dry-run", "--", "--config.seed=7").stdout)
    start, status = _remote(cmds[0]), _remote(cmds[1])
    [stop] = _commands(_pod(pod_repo, tmp_path, "stop", "--name", "apo", "--zone", "z", "--grace-seconds", "20",
                            "--dry-run").stdout)
    home = tmp_path / "worker"
    (home / "apo_jax" / "src").mkdir(parents=True)
    (home / "apo_jax" / "venv" / "bin").mkdir(parents=True)
    (home / "apo_jax" / "SOURCE").write_text("abc123\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    _shim(bin_dir, "sudo", f'echo "sudo $*" >> {calls}\n')  # no TPU here: nothing to free
    _shim(bin_dir, "gcloud", f'echo "gcloud $*" >> {calls}\n')
    # The stand-in game: says what it got, runs until SIGTERM, then "saves" and exits 1 (preempted).
    _shim(home / "apo_jax" / "venv" / "bin", "python",
          'echo "game $* distributed=$APO_JAX_DISTRIBUTED"\ntrap \'echo saved; exit 1\' TERM\n'
          "for _ in $(seq 600); do sleep 0.05; done\nexit 0\n")
    env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}")

    def remote(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30)

    log = home / "apo_jax" / "logs" / "apo.log"
    assert remote(start).returncode == 0  # returns while the game runs
    _wait_for(lambda: log.exists() and "game -m apo_jax.main" in log.read_text())
    assert "already running on" in remote(start).stdout
    host = socket.gethostname()
    assert remote(status).stdout == f"apo_jax-status {host} running\n"
    assert f"gcloud storage cp {home}/apo_jax/logs/apo.log gs://b/apo/logs/{host}.log" in calls.read_text()
    assert "sudo rm -f /tmp/libtpu_lockfile" in calls.read_text()
    assert remote(_remote(stop)).returncode == 0
    _wait_for(lambda: (home / "apo_jax" / "run.exit").exists())
    assert remote(status).stdout == f"apo_jax-status {host} exit 1\n"
    text = log.read_text()
    assert text.startswith("apo_jax: source abc123, started ")
    assert ("game -m apo_jax.main --config=configs/hh.py --config.run_dir=gs://b/apo --config.seed=7 "
            "distributed=1\nsaved\n") in text


# A gcloud stand-in for the launcher's own logic: each `queued-resources describe` answers the
# next line of describe.txt (a state, or empty: no such resource), each worker status check the
# next line of status.txt ('|' separates the workers' lines); every call is logged.
_FAKE_GCLOUD = """echo "gcloud $*" >> "$FAKE/calls.log"
answer() {
  n=$(cat "$FAKE/$1.n" 2>/dev/null || echo 0); echo $((n + 1)) > "$FAKE/$1.n"; sed -n "$((n + 1))p" "$FAKE/$1.txt"
}
case "$*" in
  *"queued-resources describe"*) answer describe ;;
  *"--command=gcloud storage cp"*"apo_jax-status"*) answer status | tr '|' '\\n' ;;
esac
"""


def _pod_with_fake_gcloud(pod_repo, tmp_path, describe: list[str], status: list[str], action: str, *args: str):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "describe.txt").write_text("\n".join(describe) + "\n")
    (fake / "status.txt").write_text("\n".join(status) + "\n")
    _shim(fake, "gcloud", _FAKE_GCLOUD)
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    (tmp_path / "home" / ".ssh" / "google_compute_engine").write_text("key")
    proc = _pod(pod_repo, tmp_path, action, "--name", "apo", "--zone", "z", "--bucket", "gs://b", "--sync-seconds", "0",
                "--poll-seconds", "0", *args, env={"FAKE": str(fake), "PATH": f"{fake}:{os.environ['PATH']}"})
    calls = []
    for line in (fake / "calls.log").read_text().splitlines():
        words = line.split()
        if words[3] == "queued-resources":
            calls.append(f"qr {words[4]}")
        elif words[1:3] == ["storage", "cp"]:
            calls.append("stage")
        else:  # ssh --command=...: which remote command
            command = line.split("--command=", 1)[1]
            calls.append("ssh " + ("status" if "apo_jax-status" in command else "start" if "setsid" in command
                                   else "setup" if "uv venv" in command else "stop" if "pkill" in command
                                   else "logs" if command.startswith("gcloud storage cp") else command))
    return proc, calls


def test_tpu_pod_all_recreates_a_preempted_slice_and_resumes(pod_repo, tmp_path):
    """A spot slice is queued, runs, loses a worker (preempted: the queued resource is SUSPENDED),
    every worker is stopped, the slice is requested again, the same source installed and the game
    started again; it finishes, and --delete removes the slice."""
    proc, calls = _pod_with_fake_gcloud(
        pod_repo, tmp_path,
        ["", "WAITING_FOR_RESOURCES", "ACTIVE", "SUSPENDED", "SUSPENDED", "ACTIVE"],
        ["apo_jax-status w0 running|apo_jax-status w1 running", "apo_jax-status w0 running|apo_jax-status w1 lost",
         "apo_jax-status w0 exit 0|apo_jax-status w1 exit 0"],
        "all", "--accelerator", "v4-16", "--spot", "--delete")
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        "qr describe", "qr create", "qr describe", "qr describe",  # queued, waited for, ACTIVE
        "stage", "ssh setup", "ssh start", "ssh status", "ssh status",  # w1 lost
        "ssh stop", "ssh logs", "qr describe",  # stopped everywhere; the slice is SUSPENDED
        "qr describe", "qr delete", "qr create", "qr describe",  # requested again
        "ssh setup", "ssh start", "ssh status",  # the same tarball (no second stage), resumed, finished
        "qr delete",
    ]
    assert "restart 1 of 10" in proc.stderr and "workers: 0 running, 2 finished, 0 failed" in proc.stderr


def test_tpu_pod_all_restarts_a_game_stopped_with_its_state_saved(pod_repo, tmp_path):
    """A worker exits with apo_jax.main.EXIT_PREEMPTED (a maintenance event's SIGTERM: saved) on a
    slice that stays ACTIVE: every worker is stopped and the game started again, which resumes."""
    proc, calls = _pod_with_fake_gcloud(
        pod_repo, tmp_path, ["", "ACTIVE", "ACTIVE"],
        ["apo_jax-status w0 exit 75|apo_jax-status w1 running", "apo_jax-status w0 exit 0|apo_jax-status w1 exit 0"],
        "all", "--accelerator", "v4-16", "--spot")
    assert proc.returncode == 0, (proc.stderr, calls)
    assert calls == ["qr describe", "qr create", "qr describe", "stage", "ssh setup", "ssh start", "ssh status",
                     "ssh stop", "ssh logs", "qr describe",  # stopped and saved; the slice is still ACTIVE
                     "ssh start", "ssh status"]  # started again: resumed and finished
    assert "1 stopped and saved" in proc.stderr and "starting it again, restart 1 of 10" in proc.stderr


def test_tpu_pod_stops_every_worker_when_one_fails_on_an_active_slice(pod_repo, tmp_path):
    proc, calls = _pod_with_fake_gcloud(pod_repo, tmp_path, ["ACTIVE"],
                                        ["apo_jax-status w0 running|apo_jax-status w1 exit 1"], "run", "--spot")
    assert proc.returncode == 1
    assert calls == ["ssh start", "ssh status", "ssh stop", "ssh logs"]
    assert "apo_jax-status w1 exit 1" in proc.stderr and "stopping it on all workers" in proc.stderr


# ------------------------------------------------------------------------------------------------ SLURM


def test_slurm_launch_dry_run_one_process_per_gpu():
    extra = "--config.apo.schedules=('apo',)"
    proc = _bash("launch/slurm_launch.sh", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--account",
                 "lab", "--time", "24:00:00", "--cpus-per-task", "10", "--config", "configs/hh.py", "--run-dir",
                 "/shared/runs/apo hh", "--dry-run", "--", extra)
    assert proc.returncode == 0, proc.stderr
    job = ["configs/hh.py", "--config.run_dir=/shared/runs/apo hh", extra]
    assert _commands(proc.stdout) == [
        ["sbatch", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--partition=gpu",
         "--account=lab", "--time=24:00:00", "launch/slurm_gpu.sbatch", *job],
        ["srun", "--kill-on-bad-exit=1", "--label", "python", "-m", "apo_jax.main", "--config=configs/hh.py",
         *job[1:]],
    ]
    # Printed exactly as a shell would need them (shlex.quote), so a copy-paste runs the same.
    assert proc.stdout.splitlines()[1] == "+ " + shlex.join(["srun", "--kill-on-bad-exit=1", "--label", "python", "-m",
                                                             "apo_jax.main", "--config=configs/hh.py", *job[1:]])


@pytest.mark.parametrize("args, sized", [
    (["--partition", "gpu"], ["--cpus-per-task=12", "--partition=gpu", "--time=2-00:00:00"]),  # 96 CPUs / 8 tasks
    (["--per", "host"], ["--cpus-per-task=64", "--time=1-00:00:00"]),  # the default partition (cpu*), 1 task
    (["--partition", "debug"], ["--cpus-per-task=2", "--partition=debug"]),  # infinite limit: no --time
    (["--partition", "gpu", "--time", "4:00:00"], ["--cpus-per-task=12", "--partition=gpu", "--time=4:00:00"]),
])
def test_slurm_launch_sizes_cpus_and_time_from_the_partition(tmp_path, args, sized):
    # sinfo --format="%P %c %l": partition (default marked *), CPUs per node (+: nodes differ), limit.
    _shim(tmp_path, "sinfo", "printf 'cpu* 64 1-00:00:00\\ngpu 128+ 2-00:00:00\\ngpu 96 2-00:00:00\\n"
                             "debug 16 infinite\\n'\n")
    proc = _bash("launch/slurm_launch.sh", "--nodes", "2", "--gpus-per-node", "8", *args, "--config",
                 "configs/synthetic_gpu.py", "--dry-run", env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    tasks = "1" if "host" in args else "8"
    assert _commands(proc.stdout)[0] == ["sbatch", "--nodes=2", f"--ntasks-per-node={tasks}", "--gpus-per-node=8",
                                         *sized, "launch/slurm_gpu.sbatch", "configs/synthetic_gpu.py"]
    assert "(sinfo) -> --cpus-per-task=" in proc.stderr


def test_slurm_launch_submits_nothing_for_a_config_that_fails_its_dry_run(tmp_path):
    _shim(tmp_path, "sbatch", f'echo "sbatch $*" >> {tmp_path}/calls.log\n')
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": sys.executable, "PYTHONPATH": REPO,
           "HF_HUB_OFFLINE": "1"}
    proc = _bash("launch/slurm_launch.sh", "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "4",
                 "--config", "configs/hh.py", "--", "--config.rm.base.batch_size=24", env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "rm.base.batch_size: 24 must be a positive multiple of data*fsdp = 16" in proc.stderr
    assert "nothing was submitted" in proc.stderr and not (tmp_path / "calls.log").exists()


def test_slurm_launch_without_sinfo_needs_cpus_per_task():
    env = {"PATH": os.pathsep.join(sorted({os.path.dirname(shutil.which(c)) for c in ("bash", "awk", "dirname")}))}
    if shutil.which("sinfo", path=env["PATH"]):
        pytest.skip("sinfo is installed next to bash/awk: cannot hide it")
    args = ["launch/slurm_launch.sh", "--nodes", "1", "--gpus-per-node", "4", "--config", "configs/hh.py", "--dry-run"]
    proc = _bash(*args, env=env)
    assert proc.returncode == 2 and "pass --cpus-per-task" in proc.stderr
    proc = _bash(*args, "--cpus-per-task", "4", env=env)  # then no --time: the partition's default
    assert proc.returncode == 0, proc.stderr
    assert _commands(proc.stdout)[0][:5] == ["sbatch", "--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=4",
                                            "--cpus-per-task=4"]
    assert not any(a.startswith("--time") for a in _commands(proc.stdout)[0])


def test_sbatch_script_dry_run_and_directives():
    proc = _bash("launch/slurm_gpu.sbatch", "configs/hh.py", "--config.run_dir=/shared/x",
                 env={"DRY_RUN": "1", "PYTHON": "/venv/bin/python"})
    assert proc.returncode == 0, proc.stderr
    assert _commands(proc.stdout) == [["srun", "--kill-on-bad-exit=1", "--label", "/venv/bin/python", "-m",
                                       "apo_jax.main", "--config=configs/hh.py", "--config.run_dir=/shared/x"]]
    text = open(os.path.join(REPO, "launch", "slurm_gpu.sbatch")).read()
    directives = re.findall(r"^#SBATCH (\S+)$", text, re.M)
    assert {"--ntasks-per-node=8", "--gpus-per-node=8", "--signal=B:USR1@300", "--requeue"} <= set(directives)
    # No hidden sizes that partitions reject: CPUs and time come from sbatch flags / slurm_launch.sh.
    assert not [d for d in directives if d.startswith(("--cpus-per-task", "--time"))]
    # No per-task CUDA_VISIBLE_DEVICES: JAX picks the task's GPU (sharding.slurm_local_device_ids).
    assert "CUDA_VISIBLE_DEVICES=" not in text
    assert _bash("launch/slurm_gpu.sbatch").returncode == 2  # no config: usage


def _fake_slurm(tmp_path, task_body: str) -> dict[str, str]:
    """srun / scontrol stand-ins that log their calls; the environment of a running batch job.

    The srun stand-in behaves as real srun does with the signals it gets: it runs the task (the
    game stand-in `task_body`) as its step, forwards SIGUSR1 / SIGUSR2 to it, answers SIGTERM by
    killing the step (SIGKILL: no chance to save), and exits with the task's status."""
    log = tmp_path / "calls.log"
    (tmp_path / "task.sh").write_text(task_body)
    _shim(tmp_path, "srun", f'echo "srun $* SRUN_CPUS_PER_TASK=${{SRUN_CPUS_PER_TASK:-unset}}" >> {log}\n'
          f"trap 'echo \"srun: TERM: KILL of the step\" >> {log}; kill -KILL $child' TERM\n"
          "trap 'kill -USR1 $child' USR1\ntrap 'kill -USR2 $child' USR2\n"
          f'export BATCH_PID=$PPID\nbash {tmp_path / "task.sh"} &\nchild=$!\n'
          'while true; do status=0; wait "$child" || status=$?\n'
          '  if [ "$status" -gt 128 ] && kill -0 "$child" 2>/dev/null; then continue; fi; break; done\n'
          'exit "$status"\n')
    _shim(tmp_path, "scontrol", f'echo "scontrol $*" >> {log}\n')
    return {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "6",
            "SLURM_SUBMIT_DIR": REPO, "PYTHON": "python3"}


# The game under srun: Slurm's B:USR1@300 reaches the batch script while the game runs; the
# forwarded SIGUSR1 makes it save and exit with apo_jax.main.EXIT_PREEMPTED (75), as apo_jax does.
_GAME_HITS_TIME_LIMIT = ("trap 'echo \"task: USR1: saved\" >> \"$(dirname \"$0\")/calls.log\"; exit 75' USR1\n"
                         "sleep 0.3\nkill -USR1 \"$BATCH_PID\"\n"
                         "for _ in $(seq 400); do sleep 0.05; done\nexit 0\n")


def test_sbatch_requeues_after_saving_at_the_time_limit(tmp_path):
    env = _fake_slurm(tmp_path, _GAME_HITS_TIME_LIMIT)
    proc = _bash("launch/slurm_gpu.sbatch", "configs/hh.py", "--config.run_dir=/shared/x", env=env)
    assert proc.returncode == 75, proc.stderr
    assert (tmp_path / "calls.log").read_text().splitlines() == [
        "srun --kill-on-bad-exit=1 --label python3 -m apo_jax.main --config=configs/hh.py --config.run_dir=/shared/x "
        "SRUN_CPUS_PER_TASK=6",
        "task: USR1: saved",
        "scontrol requeue 4242",
    ]
    assert "requeueing job 4242 (requeue 1 of 20)" in proc.stderr


def test_srun_stand_in_kills_the_step_on_sigterm(tmp_path):
    """What the old script did (TERM to srun) loses the save: the stand-in is real srun's semantics."""
    env = _fake_slurm(tmp_path, "trap 'echo saved; exit 75' TERM USR1\nfor _ in $(seq 400); do sleep 0.05; done\n")
    srun = subprocess.Popen([str(tmp_path / "srun")], env=dict(os.environ, **env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: (tmp_path / "calls.log").exists())
    time.sleep(0.3)
    srun.terminate()
    out, _ = srun.communicate(timeout=10)
    assert srun.returncode != 75 and "saved" not in out  # the step was killed: nothing saved
    assert "srun: TERM: KILL of the step" in (tmp_path / "calls.log").read_text()


def test_sbatch_requeues_only_a_saved_stop(tmp_path):
    env = _fake_slurm(tmp_path, "exit 0\n")
    assert _bash("launch/slurm_gpu.sbatch", "configs/hh.py", env=env).returncode == 0
    assert "scontrol" not in (tmp_path / "calls.log").read_text()
    (tmp_path / "calls.log").unlink()
    env = _fake_slurm(tmp_path, "exit 1\n")  # a crash: not requeued
    proc = _bash("launch/slurm_gpu.sbatch", "configs/hh.py", env=env)
    assert proc.returncode == 1 and "not requeueing" in proc.stderr
    assert "scontrol" not in (tmp_path / "calls.log").read_text()
    (tmp_path / "calls.log").unlink()
    env = _fake_slurm(tmp_path, _GAME_HITS_TIME_LIMIT)
    proc = _bash("launch/slurm_gpu.sbatch", "configs/hh.py", env={**env, "SLURM_RESTART_COUNT": "3",
                                                                   "MAX_REQUEUES": "3"})
    assert proc.returncode == 75 and "not requeueing: job 4242 was requeued 3 times" in proc.stderr
    assert "scontrol" not in (tmp_path / "calls.log").read_text()


@pytest.mark.parametrize("env, initializes", [
    ({"SLURM_NTASKS": "16"}, False),  # the batch script / salloc shell: no job step
    ({"SLURM_NTASKS": "16", "SLURM_STEP_ID": "4294967291"}, False),  # the batch pseudo-step
    ({"SLURM_NTASKS": "16", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1"}, False),  # a one-task step
    ({"SLURM_NTASKS": "16", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16"}, True),  # srun of the job
    ({"SLURM_NTASKS": "2", "SLURM_STEP_ID": "3"}, True),
    ({"SLURM_NTASKS": "4", "APO_JAX_DISTRIBUTED": "1"}, True),  # explicit opt-in without a step
])
def test_slurm_initializes_jax_distributed_only_in_a_job_step(monkeypatch, env, initializes):
    from apo_jax import sharding

    for key in [k for k in os.environ if k.startswith(("SLURM_", "JAX_COORDINATOR", "TPU_WORKER"))]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("APO_JAX_DISTRIBUTED", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "")  # no gloo switch in this (already initialised) process
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(sharding, "_distributed_initialized", lambda: False)
    monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(sharding, "tag_log_records", lambda *a: None)
    sharding.maybe_initialize_distributed()
    assert calls == ([{"local_device_ids": None}] if initializes else [])


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
        env.update(SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", SLURM_STEP_ID="0",
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
    """Install the pinned set from git (constraints written out in the notebook, the same pins as
    constraints.txt), check the install, run: every command is the README's, character for character."""
    _, nb = _notebook()
    readme = open(os.path.join(REPO, "README.md")).read()
    commands = _shell_commands(nb)
    assert commands == ['pip install -c constraints.txt --src /content -e "git+$APO_JAX_GIT#egg=apo_jax" "jax[cuda12]"',
                        "python -m apo_jax.devices --constraints=constraints.txt",
                        "python -m apo_jax.main --config=configs/synthetic_gpu.py"]
    for command in commands:
        assert command in readme, f"notebook command not in README.md: {command}"
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    [pins] = [c for c in code if c.startswith("%%writefile constraints.txt\n")]
    from apo_jax import devices

    written = {devices._normalise(name): v for name, v in (line.split("==") for line in pins.splitlines()[1:] if line)}
    assert written == devices.read_constraints(os.path.join(REPO, "constraints.txt"))
    assert any("%cd /content/apo-jax" in c for c in code)  # where `pip --src /content -e` puts the checkout
    assert not any("/content/drive" in c for c in code)  # no Orbax run dir on Drive (untested)
    with pytest.raises(ValueError, match="Set APO_JAX_GIT"):
        exec(code[0], {})  # the URL cell stops the notebook until it is filled in


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
    # The cell runs unchanged in a checkout (configs/) whose synthetic_gpu run dir holds the tiny
    # run's outputs: it finds them through the config's own run_dir, as on Colab after step 3.
    work = tmp_path_factory.mktemp("colab_checkout")
    shutil.copytree(os.path.join(REPO, "configs"), work / "configs")
    gpu_run_dir = runpy.run_path(os.path.join(REPO, "configs", "synthetic_gpu.py"))["get_config"]().run_dir
    assert gpu_run_dir == "runs/synthetic_gpu_s4"  # what step 3's command writes
    os.makedirs(work / "runs")
    os.symlink(run_dir, work / gpu_run_dir)
    monkeypatch.chdir(work)
    python_dir = tmp_path_factory.mktemp("python_bin")
    _shim(python_dir, "python", f'exec {shlex.quote(sys.executable)} "$@"\n')  # the cell's `python`
    monkeypatch.setenv("PATH", f"{python_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", REPO)
    shown: list[tuple[str, object]] = []
    display_mod = types.ModuleType("IPython.display")
    display_mod.Markdown = lambda text: ("markdown", text)
    display_mod.Image = lambda filename: ("image", open(filename, "rb").read())
    display_mod.display = shown.append
    ipython = types.ModuleType("IPython")
    ipython.display = display_mod
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display_mod)
    exec(show, {})

    kinds = [kind for kind, _ in shown]
    assert kinds == ["markdown", "image", "image"]
    tables = shown[0][1]
    assert "Table 2" in tables and "Table 3" in tables and "RM_APO-v2-seq" in tables
    for _, png in shown[1:]:
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


# ------------------------------------------------------------------------------------------
# Stopping on a signal: one exit status the launchers act on.


def test_the_launchers_use_apo_jax_main_exit_status_for_a_saved_stop():
    from apo_jax import main

    for script in ("launch/slurm_gpu.sbatch", "launch/tpu_pod.sh"):
        text = open(os.path.join(REPO, script)).read()
        assert f"PREEMPTED_STATUS={main.EXIT_PREEMPTED}" in text, script


def test_ctrl_c_saves_and_exits_with_the_preempted_status(tmp_path):
    """SIGINT between two training steps (as Ctrl-C): a checkpoint, one line, EXIT_PREEMPTED; the
    same command then resumes at the saved step."""
    import signal

    from apo_jax import main
    from loop_fixtures import TINY

    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests"), env.get("PYTHONPATH", "")])
    run_dir = str(tmp_path / "run")
    args = ["--config=configs/synthetic.py", f"--config.run_dir={run_dir}", *TINY]
    boot = f"import faults; faults.install_signal_at('policy_pretrain:1', {int(signal.SIGINT)})"
    run = "import runpy; runpy.run_module('apo_jax.main', run_name='__main__', alter_sys=True)"
    proc = subprocess.run([sys.executable, "-c", f"{boot}\n{run}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == main.EXIT_PREEMPTED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    line = [ln.strip() for ln in re.split(r"[\r\n]", proc.stderr) if ln.startswith("apo_jax: ")]  # \r: the bar
    assert len(line) == 1 and line[0].startswith("apo_jax: stopped on a signal; state saved (policy_pretrain step ")
    assert os.listdir(os.path.join(run_dir, "ckpt", "policy_pretrain")), "no checkpoint saved"


def test_every_stop_signal_is_caught():
    import signal

    from apo_jax.io import checkpointing

    saved = {s: signal.getsignal(getattr(signal, s)) for s in checkpointing.STOP_SIGNALS}
    try:
        checkpointing.install_preemption_handler()
        for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"):
            assert callable(signal.getsignal(getattr(signal, name))), name
            assert signal.getsignal(getattr(signal, name)) not in (signal.SIG_DFL, signal.default_int_handler)
    finally:
        for s, h in saved.items():
            signal.signal(getattr(signal, s), h)
        checkpointing._SIGNALLED.clear()
        checkpointing._PREEMPTED.clear()


def test_tpu_pod_checks_the_config_fits_before_requesting_a_slice(tmp_path):
    """`up` runs the dry run on as many fake devices as the slice has chips, with their HBM, and a
    config that fails it creates nothing (here: a batch that does not divide 64 chips)."""
    fake = tmp_path / "fake"
    fake.mkdir()
    _shim(fake, "gcloud", f'echo "gcloud $*" >> {fake}/calls.log\n')
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    (tmp_path / "home" / ".ssh" / "google_compute_engine").write_text("key")
    env = {"HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path), "LOCAL_PYTHON": sys.executable,
           "PATH": f"{fake}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    args = ["launch/tpu_pod.sh", "up", "--name", "apo", "--zone", "z", "--accelerator", "v5litepod-64", "--bucket",
            "gs://b", "--allow-dirty"]
    dry = _bash(*args, "--dry-run", env=env)
    assert ["env", "XLA_FLAGS=--xla_force_host_platform_device_count=64", "JAX_PLATFORMS=cpu", sys.executable, "-m",
            "apo_jax.main", "--config=configs/hh.py", f"--config.run_dir={tmp_path}/apo_jax-fit-check", "--dry_run",
            "--dry_run_device_gib=16"] in _commands(dry.stdout)
    proc = _bash(*args, "--", "--config.sft.batch_size=96", env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sft.batch_size: 96 must be a positive multiple of data*fsdp = 64" in proc.stderr
    assert "does not fit v5litepod-64; nothing was created" in proc.stderr
    assert "create" not in (fake / "calls.log").read_text()
