"""Entry point: `python -m apo_jax.main --config=configs/hh.py [--config.field=value ...]`.

Start-up, in order, each failure one line per problem on stderr and exit code 2 (no traceback):
parse the flags and load the config file (an unknown field, in an override or in the file,
gets a "did you mean"), validate every field, open the run dir (`apo_jax.io.rundir`: create it,
take its lock, check the config fingerprint), check every checkpoint and offline input
(`apo_jax.preflight`), then play the APO game (`apo_jax.game.loop`). Restarting the same command
resumes from the run directory's checkpoints. `--dry_run` stops after validation: it compiles every
training phase on abstract shapes and says whether the config fits the devices (`apo_jax.dryrun`).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
from typing import Any, NoReturn, Sequence

from absl import app, flags
from ml_collections import config_flags

from apo_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_SHOW_CONFIG = flags.DEFINE_bool("show_config", False, "Print every field of the resolved config with its meaning "
                                 "(docs/config_reference.md lists the defaults) and exit.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Check that the config fits the devices this process sees, without weights, data or network: "
    "resolve the mesh, validate, compile every training phase's step on abstract shapes and print its memory per "
    "device (XLA_FLAGS=--xla_force_host_platform_device_count=N fakes N devices); exit 0 if it fits, else 2.")
_DRY_RUN_DEVICE_GIB = flags.DEFINE_float(
    "dry_run_device_gib", 0.0, "With --dry_run: the memory of one device (GiB) of the machine the run is for "
    "(0: this device's own, where jax reports it).")
_ALLOW_CHANGE = flags.DEFINE_list(
    "allow_config_change", [],
    "Config fields that may differ from the run dir's recorded fingerprint: only apo.rounds (increase) "
    "and sft.lrs (entries after the rounds already played), to continue a finished game with more rounds.")
flags.mark_flags_as_required(["config"])

EXIT_USAGE = 2  # every start-up error and a diverged run; 1 stays for unexpected crashes
EXIT_PREEMPTED = 75  # stopped on a signal with the state saved: run the same command to resume
# (sysexits' EX_TEMPFAIL, "try again later"; launch/slurm_gpu.sbatch requeues and launch/tpu_pod.sh
# restarts on it; tests/test_launch.py checks they use this value)
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once, nothing saved since the last checkpoint


def fail(message: str, prefix: str = "") -> NoReturn:
    """Prints `apo_jax: message` (one line per problem) to stderr and exits with code 2."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    if len(lines) == 2 and lines[0].endswith(":"):  # "invalid config:" + one problem: one line
        lines = [f"{lines[0]} {lines[1]}"]
    head = f"{prefix}apo_jax: "
    sys.stderr.write("\n".join([head + lines[0]] + ["  " + line for line in lines[1:]]) + "\n")
    sys.stderr.flush()
    sys.exit(EXIT_USAGE)


# --------------------------------------------------------------------------------------------
# Flags and the config file.


def _config_file_location(exc: BaseException, config_path: str) -> str:
    """`file:line` of the config file's frame in `exc`'s traceback (or in a re-raised message)."""
    target = os.path.abspath(config_path)
    where = ""
    tb = exc.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == target:
            where = f"{config_path}:{tb.tb_lineno}"
        tb = tb.tb_next
    if not where:  # ml_collections re-raises TypeError/ValueError with the traceback as text
        found = re.findall(r'File "([^"]+)", line (\d+)', str(exc))
        for file, line in found:
            if os.path.abspath(file) == target:
                where = f"{config_path}:{line}"
    if not where and isinstance(exc, SyntaxError) and exc.lineno:
        where = f"{config_path}:{exc.lineno}"
    return where


def _override_error(exc: BaseException, argv: Sequence[str]) -> str | None:
    """One line for an override naming a field the config lacks (ml_collections' KeyError)."""
    text = str(exc.args[0]) if exc.args else str(exc)
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    for arg in argv:
        name = arg.split("=", 1)[0].lstrip("-")
        parts = name.split(".")[1:]
        key = next((p for p in parts if f"'{p}'" in text or f"\\'{p}\\'" in text), None)
        if name.startswith("config.") and key:
            field = name[len("config."):]
            hint = ""
            if suggestion:
                i = parts.index(key)
                hint = f" (did you mean {'.'.join(parts[:i] + [suggestion.group(1)] + parts[i + 1:])}?)"
            return f"{arg}: the config has no field {field}{hint}"
    return None


def _config_arg(argv: Sequence[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return ""


NO_CONFIG = ("no --config given. The quick start: python -m apo_jax.main --config=configs/synthetic.py "
             "(configs/ holds the others; --config=X --show_config lists every field of X with its meaning)")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every error as one line and exit code 2."""
    if not _config_arg(argv) and not any(a.startswith(("--help", "-h", "--helpfull", "--helpshort")) for a in argv[1:]):
        fail(NO_CONFIG)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        text = str(e)
        if "Error whilst parsing config file" in text:  # the file raised TypeError/ValueError
            config_path = _config_arg(argv)
            last = [line.strip() for line in text.splitlines() if line.strip()][-1]
            fail(f"{_config_file_location(e, config_path) or config_path}: {last}")
        fail(text.splitlines()[0] + " (see --helpshort)")
    except (AttributeError, KeyError) as e:
        fail(_override_error(e, argv) or f"{type(e).__name__}: {str(e).splitlines()[0]}")
    except Exception as e:  # the config file itself raised while loading
        config_path = _config_arg(argv)
        where = _config_file_location(e, config_path) or config_path
        last = [line for line in str(e).splitlines() if line.strip()]
        msg = last[-1].strip() if last else type(e).__name__
        if not msg.startswith(type(e).__name__) and "Error" not in msg.split(":")[0]:
            msg = f"{type(e).__name__}: {msg}"
        fail(f"{where}: {msg}")


def load_config() -> Any:
    """The parsed config; a config file that cannot be loaded is one line naming it."""
    try:
        cfg = _CONFIG.value
        cfg.run_dir  # noqa: B018 - a config that failed to load raises on first access
    except OSError as e:
        path = flags.FLAGS["config"].config_filename.split(":", 1)[0]
        if not os.path.exists(path):
            fail(f"--config={path}: no such config file")
        cause = e.__cause__ or e
        where = _config_file_location(cause, path) or path
        fail(f"{where}: cannot load the config ({type(cause).__name__}: {str(cause).splitlines()[-1].strip()})")
    return cfg


# Sections whose keys belong to another module's schema (checked there), so any key is fine here.
_OPEN_SECTIONS = ("data.synthetic",)


def unknown_config_fields(cfg: Any, base: Any, config_path: str = "") -> list[str]:
    """One line per field a config file added that `config.base_config()` does not define
    (a typo such as `c.rm.base.lrr = ...` would otherwise be accepted silently)."""
    known = config_lib.leaves(base)
    sections = {p.rsplit(".", 1)[0] for p in known if "." in p} | set(known)
    try:
        text = open(config_path).read().splitlines() if config_path else []
    except OSError:
        text = []
    problems = []
    for field in sorted(config_lib.leaves(cfg)):
        if field in known or any(field.startswith(s + ".") for s in _OPEN_SECTIONS):
            continue
        parent, _, leaf = field.rpartition(".")
        if parent and parent not in sections and parent in known:
            continue  # a dict-valued field's contents (e.g. a user's own mapping)
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
        close = difflib.get_close_matches(leaf, siblings, n=1)
        hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
        line = next((i + 1 for i, t in enumerate(text) if re.search(rf"\.{re.escape(leaf)}\b", t)), None)
        where = f"{config_path}:{line}: " if line else (f"{config_path}: " if config_path else "")
        problems.append(f"{where}unknown config field {field}{hint}")
    return problems


# --------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    del argv
    import jax

    from apo_jax import preflight, sharding
    from apo_jax.io import rundir
    from apo_jax.io.checkpointing import Preempted
    from apo_jax.data.hh import DataError
    from apo_jax.io.hf import CheckpointError
    from apo_jax.training.train import NonFiniteLossError

    sharding.maybe_initialize_distributed()
    # One status line per phase from apo_jax; libraries (Orbax, absl, jax) only warn.
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("apo_jax").setLevel(logging.INFO)
    prefix = f"[process {jax.process_index()}/{jax.process_count()}] " if jax.process_count() > 1 else ""
    cfg = load_config()
    config_path = flags.FLAGS["config"].config_filename.split(":", 1)[0]
    unknown = unknown_config_fields(cfg, config_lib.base_config(), config_path)
    if unknown:
        fail("\n".join(unknown), prefix)
    if _SHOW_CONFIG.value:
        print(f"# {config_path}, resolved\n\n" + config_lib.reference(cfg))
        return
    from apo_jax.training import objectives

    try:
        config_lib.validate(cfg, jax.device_count(), checks=(objectives.settings_problems,))
    except config_lib.ConfigError as e:
        fail(str(e), prefix)
    from apo_jax import devices

    devices.resolve_config(cfg)  # "auto" dtype / attention_impl -> this device's choice (logged)
    if _DRY_RUN.value:
        from apo_jax import dryrun

        problems = dryrun.run(cfg, device_gib_override=_DRY_RUN_DEVICE_GIB.value)
        if problems:
            fail("dry run: does not fit:\n" + "\n".join(problems), prefix)
        print("dry run ok")
        return

    from apo_jax.game import loop

    lock = None
    try:
        lock = rundir.open_run(cfg, allow_changes=_ALLOW_CHANGE.value)
        preflight.preflight(cfg)
        summary = loop.run(cfg)
    except (rundir.RunDirError, CheckpointError, DataError, config_lib.ConfigError, NonFiniteLossError) as e:
        fail(str(e), prefix)
    except (FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError) as e:
        fail(f"{e.filename or ''}: {e.strerror or e}" if e.filename else str(e), prefix)
    except Preempted as e:
        sys.stderr.write(f"{prefix}apo_jax: stopped on a signal; state saved ({e}). Run the same command to resume.\n")
        sys.exit(EXIT_PREEMPTED)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prefix}apo_jax: interrupted again; stopped without saving (the run resumes from its "
                         "last checkpoint).\n")
        sys.exit(EXIT_INTERRUPTED)
    finally:
        if lock is not None:
            lock.release()
    if jax.process_index() == 0:
        print(summary)


def run() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # apo_jax uses transformers for tokenizers only: its "PyTorch was not found" advice is noise here.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
