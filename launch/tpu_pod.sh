#!/usr/bin/env bash
# Runs apo_jax on a Cloud TPU VM slice: every worker runs `python3 -m apo_jax.main` at once.
#
#   launch/tpu_pod.sh [ACTION] --name NAME --zone ZONE --accelerator TYPE --bucket gs://BUCKET[/PREFIX]
#       [--config configs/hh.py] [--runtime VERSION] [--project ID] [--spot] [--max-restarts N]
#       [--delete] [--dry-run] [-- --config.field=value ...]
#
# ACTION (default: all)
#   up      create the slice (or reuse a READY one), copy this checkout to every worker, install it
#           with jax[tpu] and the [gcs] extra (gcsfs, google-cloud-storage)
#   run     run the game on all workers at once; their output streams here (apo_jax's log lines
#           say "[process i/n]"), and each worker's log is copied to <run_dir>/logs/<host>.log
#   logs    copy the workers' logs to <run_dir>/logs/ again (gcloud storage cp)
#   stop    SIGTERM the run on every worker: it saves a checkpoint at its next training step, exits
#   delete  delete the slice (checkpoints and outputs stay in the bucket)
#   all     up, then run; when a spot slice is preempted, recreate it and run the same command
#           again (it resumes from the last Orbax checkpoint), up to --max-restarts times
#           (default 0, or 10 with --spot); finally delete the slice if --delete was given
#
# The run directory is <bucket>/<name>, a gs:// URL given to apo_jax as --config.run_dir: Orbax
# writes the checkpoints there itself (each worker its own shards, through TensorStore's GCS
# driver), and the loop state, samples, metrics, tables and exports go through etils.epath. All
# of it outlives the slice: running the same command again, on this slice or a new one, resumes.
# --dry-run prints each command (gcloud, and the local tar) as `+ command`, and runs none.
set -euo pipefail

ACTION=all NAME="" ZONE="" ACCEL="" RUNTIME="tpu-ubuntu2204-base" BUCKET="" PROJECT=""
CONFIG="configs/hh.py" SPOT=0 MAX_RESTARTS="" DELETE=0 DRY_RUN=0 EXTRA=()

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

case "${1:-}" in up|run|logs|stop|delete|all) ACTION="$1"; shift ;; esac
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --accelerator) ACCEL="${2:?--accelerator needs a value}"; shift 2 ;;
    --runtime) RUNTIME="${2:?--runtime needs a value}"; shift 2 ;;
    --bucket) BUCKET="${2:?--bucket needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --max-restarts) MAX_RESTARTS="${2:?--max-restarts needs a value}"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done

[ -n "$NAME" ] || die "--name is required"
[ -n "$ZONE" ] || die "--zone is required"
case "$ACTION" in up|all) [ -n "$ACCEL" ] || die "--accelerator is required (e.g. v4-32)" ;; esac
case "$ACTION" in up|run|logs|all)
  case "$BUCKET" in gs://?*) ;; *) die "--bucket must be a gs:// path (e.g. gs://my-bucket/apo)" ;; esac ;;
esac
if [ -z "$MAX_RESTARTS" ]; then MAX_RESTARTS=$((SPOT ? 10 : 0)); fi
case "$MAX_RESTARTS" in *[!0-9]*) die "--max-restarts must be a number" ;; esac

REPO="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/apo_jax-$NAME.tar.gz"
RUN_DIR="${BUCKET%/}/$NAME"

# Remote paths are expanded by each worker's shell, not here.
# shellcheck disable=SC2016
LOG='$HOME/apo_jax_logs/'"$NAME.log"

quote() {
  # POSIX shell quoting, the same as Python's shlex.quote (so tests can compare command lines).
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    local q="'" r="'\"'\"'"
    printf "'%s'" "${1//"$q"/"$r"}"
  fi
}

show() {
  local line="+" arg
  for arg in "$@"; do line+=" $(quote "$arg")"; done
  echo "$line"
}

run() {
  # Print the command; run it unless --dry-run.
  show "$@"
  if [ "$DRY_RUN" -eq 0 ]; then "$@"; fi
}

TPU=(gcloud compute tpus tpu-vm)
exec 3>&1  # the dry run's describe line, printed from inside $(...)
WHERE=(--zone="$ZONE")
if [ -n "$PROJECT" ]; then WHERE+=(--project="$PROJECT"); fi

on_all_workers() { run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"; }

SETUP="mkdir -p ~/apo_jax && tar -xzf ~/apo_jax-src.tar.gz -C ~/apo_jax && cd ~/apo_jax"
SETUP+=" && python3 -m pip install -q -e '.[gcs]' 'jax[tpu]'"

# Every worker runs the same command; jax.distributed.initialize() (APO_JAX_DISTRIBUTED=1) finds
# the slice's other hosts from the TPU metadata.
main_cmd="python3 -m apo_jax.main $(quote "--config=$CONFIG") $(quote "--config.run_dir=$RUN_DIR")"
for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do main_cmd+=" $(quote "$arg")"; done
# shellcheck disable=SC2016
COPY_LOG="gcloud storage cp $LOG $(quote "$RUN_DIR/logs")/"'$(hostname).log'
RUN="cd ~/apo_jax && mkdir -p \$HOME/apo_jax_logs"
RUN+=" && export APO_JAX_DISTRIBUTED=1 PYTHONUNBUFFERED=1 && set -o pipefail"
RUN+=" && $main_cmd 2>&1 | tee -a $LOG; status=\$?; $COPY_LOG; exit \$status"

tpu_state() {
  # READY, CREATING, PREEMPTED, ... or empty when there is no such slice.
  if [ "$DRY_RUN" -eq 1 ]; then
    show "${TPU[@]}" describe "$NAME" "${WHERE[@]}" --format="value(state)" >&3
    return 0
  fi
  "${TPU[@]}" describe "$NAME" "${WHERE[@]}" --format="value(state)" 2>/dev/null || true
}

create() {
  local cmd=("${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCEL" --version="$RUNTIME")
  if [ "$SPOT" -eq 1 ]; then cmd+=(--spot); fi
  run "${cmd[@]}"
}

delete() { run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet; }

up() {
  local state
  state="$(tpu_state)"
  case "$state" in
    READY) echo "tpu_pod.sh: reusing the READY slice $NAME" ;;
    "") create ;;
    PREEMPTED|TERMINATED|STOPPED|SUSPENDED) delete; create ;;
    *) echo "tpu_pod.sh: slice $NAME is $state; wait for it, or delete it" >&2; exit 1 ;;
  esac
  # This checkout (without .git, .venv, runs/), unpacked and installed on every worker.
  run tar -czf "$TARBALL" --exclude=./.git --exclude=./.venv --exclude=./runs --exclude=__pycache__ \
    --exclude='*.egg-info' -C "$REPO" .
  run "${TPU[@]}" scp "$TARBALL" "$NAME:apo_jax-src.tar.gz" "${WHERE[@]}" --worker=all
  on_all_workers "$SETUP"
}

run_game() { on_all_workers "$RUN"; }

case "$ACTION" in
  up) up ;;
  run) run_game ;;
  logs) on_all_workers "$COPY_LOG" ;;
  stop) on_all_workers "pkill -TERM -f '^python3 -m apo_jax[.]main' || true" ;;
  delete) delete ;;
  all)
    up
    restarts=0
    until run_game; do
      state="$(tpu_state)"
      if [ "$state" = READY ]; then
        echo "tpu_pod.sh: the run failed on a READY slice (see its log above); not restarting" >&2
        exit 1
      fi
      if [ "$restarts" -ge "$MAX_RESTARTS" ]; then
        echo "tpu_pod.sh: slice $NAME is ${state:-gone} after $restarts restarts; giving up" >&2
        exit 1
      fi
      restarts=$((restarts + 1))
      echo "tpu_pod.sh: slice $NAME is ${state:-gone} (preempted?); recreating it, restart $restarts" \
        "of $MAX_RESTARTS; the run resumes from its last checkpoint" >&2
      up
    done
    if [ "$DELETE" -eq 1 ]; then delete; fi
    ;;
esac
