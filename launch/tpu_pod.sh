#!/usr/bin/env bash
# Run apo_jax on a Cloud TPU VM slice: create (or reuse) it, install the project on every worker,
# run `python -m apo_jax.main` on all workers at once, collect logs, and optionally delete it.
#
#   launch/tpu_pod.sh --name apo --zone us-central2-b --accelerator v4-32 \
#       --bucket gs://my-bucket/apo --config configs/hh.py [--spot] [--dry-run] [-- --config.apo.rounds=2]
#
# Checkpoints and outputs go to <bucket>/<name> (Orbax writes gs:// directly), so a preempted
# spot slice that is recreated resumes the run where it stopped: run the same command again.
set -euo pipefail

NAME="" ZONE="" ACCEL="" RUNTIME="tpu-ubuntu2204-base" BUCKET="" CONFIG="configs/hh.py"
SPOT=0 DRY_RUN=0 DELETE=0 PROJECT_DIR="apo_jax" EXTRA=()

usage() { sed -n '2,11p' "$0"; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --accelerator) ACCEL="$2"; shift 2 ;;
    --runtime) RUNTIME="$2"; shift 2 ;;
    --bucket) BUCKET="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done

for var in NAME ZONE ACCEL BUCKET; do
  if [ -z "${!var}" ]; then
    echo "tpu_pod.sh: --$(echo "$var" | tr '[:upper:]' '[:lower:]' | sed 's/accel/accelerator/') is required" >&2
    exit 2
  fi
done
case "$BUCKET" in gs://*) ;; *) echo "tpu_pod.sh: --bucket must be a gs:// path" >&2; exit 2 ;; esac

run() {
  # Print the command exactly; run it unless --dry-run.
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ "$DRY_RUN" -eq 0 ]; then "$@"; fi
}

RUN_DIR="$BUCKET/$NAME"
TPU=(gcloud compute tpus tpu-vm)

if [ "$DRY_RUN" -eq 1 ] || ! "${TPU[@]}" describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  create=("${TPU[@]}" create "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" --version "$RUNTIME")
  if [ "$SPOT" -eq 1 ]; then create+=(--spot); fi
  run "${create[@]}"
fi

# Copy this checkout to every worker and install it with the TPU build of JAX.
run "${TPU[@]}" scp --recurse --zone "$ZONE" --worker=all . "$NAME:~/$PROJECT_DIR"
run "${TPU[@]}" ssh "$NAME" --zone "$ZONE" --worker=all \
  --command "cd ~/$PROJECT_DIR && pip install -q -e . 'jax[tpu]'"

# Every worker runs the same command; jax.distributed.initialize() finds the pod's other hosts.
cmd="cd ~/$PROJECT_DIR && python -m apo_jax.main --config=$CONFIG --config.run_dir=$RUN_DIR"
for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do cmd+=" $(printf '%q' "$arg")"; done
cmd+=" 2>&1 | tee ~/apo_jax_worker.log"
run "${TPU[@]}" ssh "$NAME" --zone "$ZONE" --worker=all --command "$cmd"

# Collect each worker's log next to the run's outputs.
run "${TPU[@]}" ssh "$NAME" --zone "$ZONE" --worker=all \
  --command "gsutil cp ~/apo_jax_worker.log $RUN_DIR/logs/worker-\$(hostname).log"

if [ "$DELETE" -eq 1 ]; then
  run "${TPU[@]}" delete "$NAME" --zone "$ZONE" --quiet
fi
