#!/usr/bin/env bash
# Runs apo_jax on a Cloud TPU VM slice: every worker runs `python -m apo_jax.main` at once.
#
#   launch/tpu_pod.sh [ACTION] --name NAME --zone ZONE --accelerator TYPE --bucket gs://BUCKET[/PREFIX]
#       [--config configs/hh.py] [--runtime VERSION] [--project ID] [--spot] [--service-account EMAIL]
#       [--scopes SCOPE,...] [--internal-ips] [--python 3.11] [--env NAME[=VALUE]]... [--allow-dirty]
#       [--sync-seconds 300] [--poll-seconds 60] [--grace-seconds 300] [--max-restarts N] [--delete]
#       [--no-fit-check] [--dry-run] [-- --config.field=value ...]
#
# ACTION (default: all)
#   up      request the slice as a queued resource (or reuse an ACTIVE one) and wait until it is
#           ACTIVE; ship the checkout through the bucket (`git archive HEAD`, so what runs is a
#           commit: <run_dir>/source/apo_jax-<commit>.tar.gz); on every worker install it into a
#           fresh venv made by uv with Python --python (default 3.11, the tested one; the images'
#           own Python 3.10 is too old for the tested jax) from the pinned tested set
#           (constraints.txt) plus jax[tpu]; then check on every worker that jax sees all of the
#           slice's chips and that the pins are installed (python -m apo_jax.devices)
#   run     on every worker, free the TPU (kill stale holders of /dev/accel* and /dev/vfio/*,
#           remove /tmp/libtpu_lockfile) and start the game detached (setsid nohup; a dropped ssh
#           connection or a Ctrl-C here leaves it running, and a second start is refused while it
#           runs); then watch
#   watch   every --sync-seconds: copy each worker's log to <run_dir>/logs/<host>.log and check
#           that the game still runs on every worker; when it fails on one, stop it on all of them
#   logs    copy the workers' logs to <run_dir>/logs/ once
#   stop    SIGTERM the game on every worker (it saves a checkpoint at its next training step),
#           SIGKILL whatever still runs --grace-seconds (default 300) later
#   delete  delete the queued resource and its slice (--force); the bucket keeps everything
#   all     up, run, watch; when the slice is preempted (spot) or lost, request it again and run
#           the same command (it resumes from the last Orbax checkpoint), up to --max-restarts
#           times (default 0, or 10 with --spot); finally delete the slice if --delete was given
#
# The runtime version follows the TPU family (v2/v3/v4: tpu-ubuntu2204-base, v5litepod:
# v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e) unless --runtime is given.
# --service-account, --scopes and --internal-ips go to the queued resource (with --internal-ips,
# ssh uses --internal-ip: run this from inside the VPC). The workers need storage access to the
# bucket (e.g. --scopes=https://www.googleapis.com/auth/cloud-platform). --env NAME passes this
# shell's $NAME to the game (HF_TOKEN, XLA_FLAGS, LIBTPU_INIT_ARGS, WANDB_API_KEY, ...), --env
# NAME=VALUE a value; they travel in a file copied to each worker, never on a command line.
# Before the first ssh, ~/.ssh/google_compute_engine is created if missing and added to a running
# ssh-agent (gcloud's `--worker=all` fails with SSHKeyNotInAgent otherwise).
#
# The run directory is <bucket>/<name>, a gs:// URL given to apo_jax as --config.run_dir: Orbax
# writes the checkpoints there itself and everything else goes through etils.epath, so all of it
# outlives the slice: the same command again, on this slice or a new one, resumes.
# Before it requests a slice, `up` (and `all`) runs the dry run of the config here (python -m
# apo_jax.main --dry_run on as many fake CPU devices as the slice has chips, with their HBM) and
# stops if it does not fit; LOCAL_PYTHON names the interpreter (default python3), --no-fit-check
# skips it.
# --dry-run prints each command (gcloud, git, tar, ssh-keygen, ssh-add) as `+ command`, runs none.
set -euo pipefail

ACTION=all NAME="" ZONE="" ACCEL="" RUNTIME="" BUCKET="" PROJECT="" CONFIG="configs/hh.py"
SPOT=0 MAX_RESTARTS="" DELETE=0 DRY_RUN=0 SERVICE_ACCOUNT="" SCOPES="" INTERNAL=0 PY_VERSION=3.11
ALLOW_DIRTY=0 FIT_CHECK=1 SYNC_SECONDS=300 POLL_SECONDS=60 GRACE_SECONDS=300 ENVS=() EXTRA=() SOURCE=""

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
say() { echo "tpu_pod.sh: $*" >&2; }

case "${1:-}" in up|run|watch|logs|stop|delete|all) ACTION="$1"; shift ;; esac
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --accelerator) ACCEL="${2:?--accelerator needs a value}"; shift 2 ;;
    --runtime) RUNTIME="${2:?--runtime needs a value}"; shift 2 ;;
    --bucket) BUCKET="${2:?--bucket needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --service-account) SERVICE_ACCOUNT="${2:?--service-account needs a value}"; shift 2 ;;
    --scopes) SCOPES="${2:?--scopes needs a value}"; shift 2 ;;
    --python) PY_VERSION="${2:?--python needs a value}"; shift 2 ;;
    --env) ENVS+=("${2:?--env needs NAME or NAME=VALUE}"); shift 2 ;;
    --sync-seconds) SYNC_SECONDS="${2:?--sync-seconds needs a value}"; shift 2 ;;
    --poll-seconds) POLL_SECONDS="${2:?--poll-seconds needs a value}"; shift 2 ;;
    --grace-seconds) GRACE_SECONDS="${2:?--grace-seconds needs a value}"; shift 2 ;;
    --max-restarts) MAX_RESTARTS="${2:?--max-restarts needs a value}"; shift 2 ;;
    --internal-ips) INTERNAL=1; shift ;;
    --allow-dirty) ALLOW_DIRTY=1; shift ;;
    --spot) SPOT=1; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --no-fit-check) FIT_CHECK=0; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done

[ -n "$NAME" ] || die "--name is required"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name $NAME: lowercase letters, digits and hyphens (a TPU name)"
[ -n "$ZONE" ] || die "--zone is required"
case "$ACTION" in up|all) [ -n "$ACCEL" ] || die "--accelerator is required (e.g. v4-32)" ;; esac
case "$ACTION" in up|run|watch|logs|all)
  case "$BUCKET" in gs://?*) ;; *) die "--bucket must be a gs:// path (e.g. gs://my-bucket/apo)" ;; esac ;;
esac
if [ -z "$MAX_RESTARTS" ]; then MAX_RESTARTS=$((SPOT ? 10 : 0)); fi
for pair in "--max-restarts:$MAX_RESTARTS" "--sync-seconds:$SYNC_SECONDS" "--poll-seconds:$POLL_SECONDS" \
            "--grace-seconds:$GRACE_SECONDS"; do
  case "${pair#*:}" in ''|*[!0-9]*) die "${pair%%:*} must be a number, not '${pair#*:}'" ;; esac
done

# The slice's jax device count (what the post-install check expects) and runtime, per family.
# v2/v3 type names count TensorCores and jax sees each core; v4/v5p count TensorCores too, but a
# chip's two cores are one jax device (megacore); v5litepod/v6e count chips of one core each.
DEVICES="" DEVICE_GIB="" FIT_CHECKED=0
if [ -n "$ACCEL" ]; then
  size="${ACCEL##*-}"
  case "$size" in ''|*[!0-9]*) die "--accelerator $ACCEL: expected TYPE-SIZE, e.g. v4-32 or v5litepod-16" ;; esac
  case "$ACCEL" in
    v2-*) family_runtime=tpu-ubuntu2204-base DEVICES="$size" DEVICE_GIB=8 ;;
    v3-*) family_runtime=tpu-ubuntu2204-base DEVICES="$size" DEVICE_GIB=16 ;;
    v4-*) family_runtime=tpu-ubuntu2204-base DEVICES=$((size / 2)) DEVICE_GIB=32 ;;
    v5p-*) family_runtime=v2-alpha-tpuv5 DEVICES=$((size / 2)) DEVICE_GIB=95 ;;
    v5litepod-*) family_runtime=v2-alpha-tpuv5-lite DEVICES="$size" DEVICE_GIB=16 ;;
    v6e-*) family_runtime=v2-alpha-tpuv6e DEVICES="$size" DEVICE_GIB=32 ;;
    *) die "--accelerator $ACCEL: unknown TPU type (v2-N, v3-N, v4-N, v5litepod-N, v5p-N or v6e-N)" ;;
  esac
  RUNTIME="${RUNTIME:-$family_runtime}"
fi

REPO="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/apo_jax-$NAME.tar.gz"
ENV_FILE="${TMPDIR:-/tmp}/apo_jax-$NAME.env"
RUN_DIR="${BUCKET%/}/$NAME"

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

exec 3>&1  # the dry run's describe lines, printed from inside $(...)
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
WHERE=(--zone="$ZONE")
if [ -n "$PROJECT" ]; then WHERE+=(--project="$PROJECT"); fi
NET=()  # how ssh/scp reach the workers
if [ "$INTERNAL" -eq 1 ]; then NET=(--internal-ip); fi
SSH=("${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all ${NET[@]+"${NET[@]}"})

on_all_workers() { run "${SSH[@]}" --command="$1"; }

# ------------------------------------------------------------------------------ remote commands
# Remote paths and $(...) are expanded by each worker's shell, not here.
# shellcheck disable=SC2088
HOME_DIR='~/apo_jax'
LOG="\$HOME/apo_jax/logs/$NAME.log"
PID="$HOME_DIR/run.pid"
EXIT="$HOME_DIR/run.exit"
ALIVE="[ -f $PID ] && kill -0 \"\$(cat $PID)\" 2>/dev/null"
# shellcheck disable=SC2016
FREE='pids=$(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u); if [ -n "$pids" ]; then'
# shellcheck disable=SC2016
FREE+=' echo "apo_jax: freeing the TPU on $(hostname) from PIDs" $pids; sudo kill -9 $pids; sleep 2; fi;'
FREE+=' sudo rm -f /tmp/libtpu_lockfile'
BUSY="if $ALIVE; then echo \"apo_jax: a game is running on \$(hostname); tpu_pod.sh stop first\"; exit 1; fi"
# shellcheck disable=SC2016
COPY_LOG="gcloud storage cp $LOG $(quote "$RUN_DIR/logs")/"'$(hostname).log'

# Every worker runs the same command; jax.distributed.initialize() (APO_JAX_DISTRIBUTED=1) finds
# the slice's other hosts from the TPU metadata. The wrapper shell records the exit status.
main_cmd="$HOME_DIR/venv/bin/python -m apo_jax.main $(quote "--config=$CONFIG") $(quote "--config.run_dir=$RUN_DIR")"
for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do main_cmd+=" $(quote "$arg")"; done
INNER="echo \"apo_jax: source \$(cat $HOME_DIR/SOURCE), started \$(date -u +%FT%TZ) on \$(hostname)\""
if [ ${#ENVS[@]} -gt 0 ]; then INNER+="; . $HOME_DIR/env"; fi
INNER+="; export APO_JAX_DISTRIBUTED=1 PYTHONUNBUFFERED=1; $main_cmd; echo \$? > $EXIT"
START="mkdir -p $HOME_DIR/logs && cd $HOME_DIR/src && if $ALIVE; then"
START+=" echo \"apo_jax: already running on \$(hostname)\";"
START+=" else $FREE; rm -f $EXIT; setsid nohup bash -c $(quote "$INNER") >> $LOG 2>&1 < /dev/null &"
START+=" echo \$! > $PID; fi"
if [ ${#ENVS[@]} -eq 0 ]; then START="rm -f $HOME_DIR/env && $START"; fi
STATUS="$COPY_LOG > /dev/null 2>&1; h=\$(hostname);"
STATUS+=" if [ -f $EXIT ]; then echo \"apo_jax-status \$h exit \$(cat $EXIT)\";"
STATUS+=" elif $ALIVE; then echo \"apo_jax-status \$h running\"; else echo \"apo_jax-status \$h lost\"; fi"
STOP="p=\$(cat $PID 2>/dev/null) || exit 0; pkill -TERM -P \"\$p\"; for _ in \$(seq $GRACE_SECONDS); do"
STOP+=" kill -0 \"\$p\" 2>/dev/null || exit 0; sleep 1; done; echo \"apo_jax: still running on \$(hostname)"
STOP+=" after ${GRACE_SECONDS}s; killing it\"; pkill -KILL -P \"\$p\"; kill -KILL \"\$p\" 2>/dev/null; true"

setup_cmd() {
  # $1: the gs:// URL of the source tarball; $2: what it holds (a commit).
  local c="$BUSY; $FREE; rm -rf $HOME_DIR/src $HOME_DIR/venv && mkdir -p $HOME_DIR/src $HOME_DIR/logs"
  c+=" && gcloud storage cp $(quote "$1") $HOME_DIR/src.tar.gz && tar -xzf $HOME_DIR/src.tar.gz -C $HOME_DIR/src"
  c+=" && echo $(quote "$2") > $HOME_DIR/SOURCE && cd $HOME_DIR/src"
  c+=" && { command -v uv > /dev/null 2>&1 || python3 -m pip install -q --user uv; }"
  c+=" && export PATH=\"\$HOME/.local/bin:\$PATH\" && uv venv -q --python $(quote "$PY_VERSION") $HOME_DIR/venv"
  c+=" && uv pip install -q --python $HOME_DIR/venv/bin/python -c constraints.txt -e '.[gcs]' 'jax[tpu]'"
  c+=" && APO_JAX_DISTRIBUTED=1 $HOME_DIR/venv/bin/python -m apo_jax.devices --expect_devices=$DEVICES"
  c+=" --constraints=constraints.txt"
  printf '%s' "$c"
}

# ------------------------------------------------------------------------------ local steps

ensure_ssh_key() {
  # gcloud's ssh/scp to several workers go through ssh-agent when one runs: the key must be in it.
  local key="$HOME/.ssh/google_compute_engine"
  if [ ! -f "$key" ]; then
    run mkdir -p -m 700 "$HOME/.ssh"
    run ssh-keygen -q -t rsa -b 3072 -N "" -f "$key"
  fi
  if [ -n "${SSH_AUTH_SOCK:-}" ]; then
    run ssh-add "$key" || say "ssh-add $key failed; ssh to all workers may fail with SSHKeyNotInAgent"
  fi
}

qr_state() {
  # ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ... or empty when there is no such queued resource.
  local cmd=("${QR[@]}" describe "$NAME" "${WHERE[@]}" --format="value(state.state)")
  if [ "$DRY_RUN" -eq 1 ]; then show "${cmd[@]}" >&3; return 0; fi
  "${cmd[@]}" 2>/dev/null || true
}

create_slice() {
  local cmd=("${QR[@]}" create "$NAME" --node-id="$NAME" "${WHERE[@]}" --accelerator-type="$ACCEL"
             --runtime-version="$RUNTIME")
  if [ "$SPOT" -eq 1 ]; then cmd+=(--spot); fi
  if [ -n "$SERVICE_ACCOUNT" ]; then cmd+=(--service-account="$SERVICE_ACCOUNT"); fi
  if [ -n "$SCOPES" ]; then cmd+=(--scopes="$SCOPES"); fi
  if [ "$INTERNAL" -eq 1 ]; then cmd+=(--internal-ips); fi
  run "${cmd[@]}"
}

delete_slice() { run "${QR[@]}" delete "$NAME" "${WHERE[@]}" --force --quiet; }

wait_active() {
  local state
  while true; do
    state="$(qr_state)"
    if [ "$DRY_RUN" -eq 1 ]; then return 0; fi
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDED|SUSPENDING|"") die "queued resource $NAME is ${state:-gone}" \
        "(gcloud compute tpus queued-resources describe $NAME --zone=$ZONE says why)" ;;
      *) say "queued resource $NAME is $state; checking again in ${POLL_SECONDS}s"; sleep "$POLL_SECONDS" ;;
    esac
  done
}

pack() {
  # Sets SOURCE (the commit shipped) and writes $TARBALL: `git archive HEAD` of a clean checkout.
  local commit
  if commit="$(git -C "$REPO" rev-parse HEAD 2>/dev/null)"; then
    if [ -z "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]; then
      SOURCE="$commit"
      run git -C "$REPO" archive --format=tar.gz -o "$TARBALL" HEAD
      return 0
    fi
    [ "$ALLOW_DIRTY" -eq 1 ] || die "$REPO has uncommitted changes: commit them (the slice gets" \
      "\`git archive HEAD\`), or pass --allow-dirty to ship the working tree as $commit-dirty"
    SOURCE="$commit-dirty"
  else
    SOURCE="unversioned"
  fi
  run tar -czf "$TARBALL" --exclude=./.git --exclude=./.venv --exclude=./runs --exclude=__pycache__ \
    --exclude='*.egg-info' -C "$REPO" .
}

fit_check() {
  # Before a slice is requested: does the config fit its chips? The dry run (no weights, data or
  # network) on as many fake CPU devices, with the chip's memory (HBM per jax device).
  if [ "$FIT_CHECK" -eq 0 ] || [ "$FIT_CHECKED" -eq 1 ]; then return 0; fi
  FIT_CHECKED=1
  local py="${LOCAL_PYTHON:-python3}"
  if [ ! -d "$REPO/apo_jax" ] || ! (cd "$REPO" && "$py" -c "import apo_jax, jax" 2>/dev/null); then
    say "no local apo_jax install for $py (LOCAL_PYTHON): skipping the fit check (--no-fit-check silences this)"
    return 0
  fi
  local cmd=(env "XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES" JAX_PLATFORMS=cpu "$py" -m apo_jax.main
             "--config=$CONFIG" "--config.run_dir=${TMPDIR:-/tmp}/apo_jax-fit-check" ${EXTRA[@]+"${EXTRA[@]}"}
             --dry_run "--dry_run_device_gib=$DEVICE_GIB")
  say "checking that $CONFIG fits $DEVICES chips of $DEVICE_GIB GiB ($ACCEL) before requesting them"
  show "${cmd[@]}"
  if [ "$DRY_RUN" -eq 1 ]; then return 0; fi
  (cd "$REPO" && "${cmd[@]}") >&2 || die "the dry run above says $CONFIG does not fit $ACCEL; nothing was created"
}

up() {
  local state
  state="$(qr_state)"
  case "$state" in
    ACTIVE) say "reusing the ACTIVE slice $NAME" ;;
    "") fit_check; create_slice ;;
    ACCEPTED|PROVISIONING|WAITING_FOR_RESOURCES|CREATING) say "queued resource $NAME is $state" ;;
    FAILED|SUSPENDED|SUSPENDING) fit_check; delete_slice; create_slice ;;
    *) say "queued resource $NAME is $state; wait for it, or delete it"; exit 1 ;;
  esac
  wait_active
  if [ -z "$SOURCE" ]; then  # once per launcher run: a restart installs the same source again
    pack
    say "shipping $SOURCE"
    run gcloud storage cp "$TARBALL" "$RUN_DIR/source/apo_jax-$SOURCE.tar.gz"
  fi
  on_all_workers "$(setup_cmd "$RUN_DIR/source/apo_jax-$SOURCE.tar.gz" "$SOURCE")"
}

send_env() {
  # The --env values, in a file readable only by its owner, copied to every worker.
  local spec name value names=()
  if [ "$DRY_RUN" -eq 0 ]; then (umask 077 && : > "$ENV_FILE"); fi
  for spec in "${ENVS[@]}"; do
    name="${spec%%=*}"
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env $spec: not a variable name"
    if [ "$spec" = "$name" ]; then
      [ -n "${!name+x}" ] || die "--env $name: \$$name is not set here"
      value="${!name}"
    else
      value="${spec#*=}"
    fi
    names+=("$name")
    if [ "$DRY_RUN" -eq 0 ]; then echo "export $name=$(quote "$value")" >> "$ENV_FILE"; fi
  done
  say "passing ${names[*]} to the workers"
  run "${TPU[@]}" scp "$ENV_FILE" "$NAME:apo_jax/env" "${WHERE[@]}" --worker=all ${NET[@]+"${NET[@]}"}
  if [ "$DRY_RUN" -eq 0 ]; then rm -f "$ENV_FILE"; fi
}

start_game() {
  if [ ${#ENVS[@]} -gt 0 ]; then send_env; fi
  on_all_workers "$START"
}

count() { grep -cE "^apo_jax-status [^ ]+ ($1)\$" <<< "$2" || true; }

PREEMPTED_STATUS=75  # apo_jax.main.EXIT_PREEMPTED: stopped on a signal (a maintenance event), state saved

watch_game() {
  # 0: finished on every worker; 1: failed (stopped everywhere); 3: the workers are unreachable;
  # 4: stopped on a signal with its state saved (resumable: `all` starts it again).
  local out unreachable=0 running failed done_ok saved
  while true; do
    if [ "$DRY_RUN" -eq 1 ]; then on_all_workers "$STATUS"; return 0; fi
    show "${SSH[@]}" --command="$STATUS"
    if out="$("${SSH[@]}" --command="$STATUS" 2>&1)"; then unreachable=0; else unreachable=$((unreachable + 1)); fi
    out="${out//$'\r'/}"
    running="$(count running "$out")" done_ok="$(count 'exit 0' "$out")"
    saved="$(count "exit $PREEMPTED_STATUS" "$out")"
    failed=$(($(count 'exit [1-9][0-9]*|lost' "$out") - saved))
    say "$(date -u +%FT%TZ) workers: $running running, $done_ok finished, $failed failed, $saved stopped and saved" \
      "(logs: $RUN_DIR/logs/)"
    if [ "$saved" -gt 0 ] && [ "$failed" -eq 0 ]; then
      say "the game stopped on a signal with its state saved; stopping it on all workers"
      on_all_workers "$STOP" || true
      on_all_workers "$COPY_LOG" || true
      return 4
    fi
    if [ "$failed" -gt 0 ]; then
      grep -E '^apo_jax-status [^ ]+ (exit [1-9]|lost)' <<< "$out" >&2 || true
      say "the game failed on a worker; stopping it on all workers"
      on_all_workers "$STOP" || true
      on_all_workers "$COPY_LOG" || true
      return 1
    fi
    if [ "$running" -eq 0 ] && [ "$done_ok" -gt 0 ] && [ "$unreachable" -eq 0 ]; then return 0; fi
    if [ "$unreachable" -ge 3 ]; then return 3; fi
    sleep "$SYNC_SECONDS"
  done
}

case "$ACTION" in delete) ;; *) ensure_ssh_key ;; esac
case "$ACTION" in
  up) up ;;
  run) start_game; watch_game ;;
  watch) watch_game ;;
  logs) on_all_workers "$COPY_LOG" ;;
  stop) on_all_workers "$STOP" ;;
  delete) delete_slice ;;
  all)
    up
    restarts=0
    while true; do
      start_game
      status=0
      watch_game || status=$?
      if [ "$status" -eq 0 ]; then break; fi
      state="$(qr_state)"
      if [ "$state" = ACTIVE ] && [ "$status" -eq 4 ] && [ "$restarts" -lt "$MAX_RESTARTS" ]; then
        restarts=$((restarts + 1))
        say "the game stopped with its state saved on the ACTIVE slice $NAME; starting it again, restart" \
          "$restarts of $MAX_RESTARTS (it resumes from that checkpoint)"
        continue
      fi
      if [ "$state" = ACTIVE ]; then
        if [ "$status" -eq 4 ]; then
          say "the game stopped with its state saved; not restarting it after $restarts restarts" \
            "(--max-restarts $MAX_RESTARTS); tpu_pod.sh run resumes it"
        elif [ "$status" -eq 1 ]; then
          say "the game failed on an ACTIVE slice (see $RUN_DIR/logs/); not restarting"
        else
          say "the workers of the ACTIVE slice $NAME do not answer; the game may still run there" \
            "(tpu_pod.sh watch / logs / stop)"
        fi
        exit 1
      fi
      if [ "$restarts" -ge "$MAX_RESTARTS" ]; then
        say "slice $NAME is ${state:-gone} after $restarts restarts; giving up"
        exit 1
      fi
      restarts=$((restarts + 1))
      say "slice $NAME is ${state:-gone} (preempted?); requesting it again, restart $restarts of" \
        "$MAX_RESTARTS; the game resumes from its last checkpoint"
      up
    done
    if [ "$DELETE" -eq 1 ]; then delete_slice; fi
    ;;
esac
