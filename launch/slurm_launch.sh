#!/usr/bin/env bash
# Submits launch/slurm_gpu.sbatch for a multi-node GPU run.
#
#   launch/slurm_launch.sh --nodes 2 --gpus-per-node 8 --config configs/hh.py \
#       --run-dir /shared/runs/apo-hh [--per gpu|host] [--partition P] [--account A] \
#       [--time D-HH:MM:SS] [--cpus-per-task N] [--gpu-gib N] [--no-fit-check] [--dry-run]
#       [-- --config.field=value ...]
#
# --per gpu (default): one process per GPU; --per host: one process per node driving all of
# its GPUs. Defaults sized from the partition (--partition, or the cluster's default one), read
# with `sinfo`: --cpus-per-task = its nodes' CPUs (the smallest node) / tasks per node;
# --time = its time limit (none when that is infinite or sinfo is missing: the partition's
# default applies). A game longer than the limit saves and requeues itself before the limit
# (see slurm_gpu.sbatch).
# Before submitting, the config's dry run runs here (python -m apo_jax.main --dry_run on
# nodes x GPUs fake CPU devices; with --gpu-gib, the memory of one GPU, it also checks the fit) and
# a config that fails it is not submitted; --no-fit-check skips it.
# --dry-run prints the sbatch command and the srun command the job will run, as `+ command`
# lines, and submits nothing.
set -euo pipefail

NODES="" GPUS="" PER=gpu PARTITION="" ACCOUNT="" TIME="" CPUS="" CONFIG="" RUN_DIR="" DRY_RUN=0 EXTRA=()
GPU_GIB=0 FIT_CHECK=1

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }
die() { echo "slurm_launch.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="${2:?--nodes needs a value}"; shift 2 ;;
    --gpus-per-node) GPUS="${2:?--gpus-per-node needs a value}"; shift 2 ;;
    --per) PER="${2:?--per needs gpu or host}"; shift 2 ;;
    --partition) PARTITION="${2:?--partition needs a value}"; shift 2 ;;
    --account) ACCOUNT="${2:?--account needs a value}"; shift 2 ;;
    --time) TIME="${2:?--time needs a value}"; shift 2 ;;
    --cpus-per-task) CPUS="${2:?--cpus-per-task needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --run-dir) RUN_DIR="${2:?--run-dir needs a value}"; shift 2 ;;
    --gpu-gib) GPU_GIB="${2:?--gpu-gib needs a value}"; shift 2 ;;
    --no-fit-check) FIT_CHECK=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "slurm_launch.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done

[ -n "$NODES" ] || die "--nodes is required"
[ -n "$GPUS" ] || die "--gpus-per-node is required"
[ -n "$CONFIG" ] || die "--config is required"
case "$PER" in
  gpu) TASKS="$GPUS" ;;
  host) TASKS=1 ;;
  *) die "--per must be gpu or host, not $PER" ;;
esac
for pair in "--nodes:$NODES" "--gpus-per-node:$GPUS" "--cpus-per-task:${CPUS:-1}"; do
  case "${pair#*:}" in ''|*[!0-9]*|0) die "${pair%%:*} must be a positive number, not '${pair#*:}'" ;; esac
done

if [ -z "$CPUS" ] || { [ -z "$TIME" ] && command -v sinfo > /dev/null 2>&1; }; then
  # The partition's smallest node (CPUs) and its time limit; the default partition is marked '*'.
  command -v sinfo > /dev/null 2>&1 || die "sinfo is not available to size --cpus-per-task from the" \
    "partition: pass --cpus-per-task"
  read -r node_cpus limit < <(sinfo --noheader --format="%P %c %l" | awk -v want="$PARTITION" '
    { name = $1; is_default = sub(/\*$/, "", name) }
    (want == "" && is_default) || name == want {
      cpus = $2 + 0; if (min == "" || cpus < min) min = cpus; limit = $3 }
    END { if (min != "") print min, limit }') || true
  [ -n "${node_cpus:-}" ] || die "sinfo lists no partition ${PARTITION:-marked as default}: pass --partition," \
    "or --cpus-per-task and --time"
  if [ -z "$CPUS" ]; then
    CPUS=$((node_cpus / TASKS))
    if [ "$CPUS" -lt 1 ]; then CPUS=1; fi
  fi
  if [ -z "$TIME" ] && [ "$limit" != infinite ] && [ "$limit" != UNLIMITED ]; then TIME="$limit"; fi
  echo "slurm_launch.sh: partition ${PARTITION:-(default)}: $node_cpus CPUs per node, time limit $limit" \
    "(sinfo) -> --cpus-per-task=$CPUS${TIME:+ --time=$TIME}" >&2
fi

quote() {
  # POSIX shell quoting, the same as Python's shlex.quote (so tests can compare command lines).
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    local q="'" r="'\"'\"'"
    printf "'%s'" "${1//"$q"/"$r"}"
  fi
}

HERE="$(cd "$(dirname "$0")" && pwd)"
job=("$CONFIG")
if [ -n "$RUN_DIR" ]; then job+=("--config.run_dir=$RUN_DIR"); fi
job+=("${EXTRA[@]+"${EXTRA[@]}"}")

cmd=(sbatch --nodes="$NODES" --ntasks-per-node="$TASKS" --gpus-per-node="$GPUS" --cpus-per-task="$CPUS")
if [ -n "$PARTITION" ]; then cmd+=(--partition="$PARTITION"); fi
if [ -n "$ACCOUNT" ]; then cmd+=(--account="$ACCOUNT"); fi
if [ -n "$TIME" ]; then cmd+=(--time="$TIME"); fi
cmd+=(launch/slurm_gpu.sbatch "${job[@]}")

line="+"
for arg in "${cmd[@]}"; do line+=" $(quote "$arg")"; done
echo "$line"
cd "$HERE/.."  # sbatch runs the job from the submit directory: the repository root
if [ "$DRY_RUN" -eq 1 ]; then
  DRY_RUN=1 bash launch/slurm_gpu.sbatch "${job[@]}"
  exit 0
fi
if [ "$FIT_CHECK" -eq 1 ]; then
  # The job's own arguments on as many fake CPU devices as it will have GPUs (no weights, data or network).
  devices=$((NODES * GPUS))
  echo "slurm_launch.sh: checking that $CONFIG fits $devices GPUs before submitting (--no-fit-check skips)" >&2
  env "XLA_FLAGS=--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu "${PYTHON:-python}" -m apo_jax.main \
    "--config=$CONFIG" "${job[@]:1}" --dry_run "--dry_run_device_gib=$GPU_GIB" >&2 \
    || die "the dry run above says $CONFIG does not fit $NODES x $GPUS GPUs; nothing was submitted"
fi
exec "${cmd[@]}"
