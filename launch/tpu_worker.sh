#!/usr/bin/env bash
# Worker-side helper for launch/tpu_vm.sh. It runs ON each Cloud TPU VM worker
# (tpu_vm.sh calls it through `gcloud compute tpus tpu-vm ssh --worker=all`), so the
# gcloud --command strings stay short and there is no nested shell quoting.
#
#   tpu_worker.sh setup [--jax-version=V] [--python=3.11] [--pip-arg=ARG]... [--dry-run]
#       uv + a Python 3.11 venv at ~/ambient_jax_venv, then `jax[tpu]==V` and the project
#       (editable, from ~/ambient_jax). Idempotent: re-running only re-checks the install.
#   tpu_worker.sh run [--detach] [--env=K=V]... [--dry-run] -- MAIN_ARGS...
#       Starts `python -m ambient_jax.main MAIN_ARGS` in its own session (it survives a lost
#       ssh connection), appends its output to ~/ambient_jax_run/train.log and streams it
#       with a "[w<worker>] " prefix until it ends; exits with the trainer's exit status.
#       If a trainer started by this script is still running, it attaches instead of starting
#       a second one, so re-running tpu_vm.sh after a dropped connection is safe.
#   tpu_worker.sh status     running / exited <rc> / not-started
#   tpu_worker.sh log [-f]   this worker's log (last 100 lines, or follow)
#   tpu_worker.sh cat-log    the whole log (tpu_vm.sh fetch-logs collects it per worker)
#   tpu_worker.sh stop       SIGTERM to the trainer (it saves a checkpoint and exits with
#                            status 143), wait for exit
#
# Locations (override with env): AMBIENT_CODE_DIR=~/ambient_jax,
# AMBIENT_VENV=~/ambient_jax_venv, AMBIENT_RUN_DIR=~/ambient_jax_run.
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
CODE_DIR="${AMBIENT_CODE_DIR:-$HOME/ambient_jax}"
VENV="${AMBIENT_VENV:-$HOME/ambient_jax_venv}"
RUN_DIR="${AMBIENT_RUN_DIR:-$HOME/ambient_jax_run}"
LOG="$RUN_DIR/train.log"
PID_FILE="$RUN_DIR/pid"
RC_FILE="$RUN_DIR/rc"

PROG="tpu_worker.sh"; NO_HELP_HINT=1
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

worker_id() {
  # TPU VM hostnames end in -w-<index>; fall back to the metadata-provided env or 0.
  local h; h="$(hostname)"
  if [[ "$h" =~ -w-([0-9]+)$ ]]; then echo "${BASH_REMATCH[1]}"
  else echo "${TPU_WORKER_ID:-${CLOUD_TPU_TASK_ID:-0}}"; fi
}

trainer_pid() {  # prints the pid when a trainer started by us is alive
  [[ -f "$PID_FILE" ]] || return 1
  local pid; pid="$(cat "$PID_FILE")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && { echo "$pid"; return 0; }
  return 1
}

cmd_setup() {
  local jax_version="0.10.2" python="3.11" dry=0 pip_args=()
  for a in "$@"; do
    case "$a" in
      --jax-version=*) jax_version="${a#*=}" ;;
      --python=*) python="${a#*=}" ;;
      --pip-arg=*) pip_args+=("${a#*=}") ;;
      --dry-run) dry=1 ;;
      *) die "setup: unknown option '$a'" ;;
    esac
  done
  local uv="$HOME/.local/bin/uv"
  local steps=(
    "[ -x $uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh"
    "[ -x $VENV/bin/python ] || $uv venv --python $python $VENV"
    "$uv pip install --python $VENV/bin/python $(show "jax[tpu]==$jax_version" -e "$CODE_DIR[gcs]" ${pip_args[@]+"${pip_args[@]}"})"
    "$VENV/bin/python -c 'import jax, ambient_jax; print(\"jax\", jax.__version__, \"ambient_jax ok\")'"
  )
  local s
  for s in "${steps[@]}"; do
    echo "$s"
    [[ $dry -eq 1 ]] || bash -c "$s"
  done
}

cmd_supervise() {  # internal: runs the trainer, forwards SIGTERM/SIGINT, records rc
  [[ "${1:-}" == "--" ]] && shift
  local child rc
  trap '[[ -n "${child:-}" ]] && kill -TERM "$child" 2>/dev/null' TERM INT HUP
  "$@" &
  child=$!
  while :; do
    set +e; wait "$child"; rc=$?; set -e
    kill -0 "$child" 2>/dev/null || break   # wait was interrupted by a trapped signal
  done
  echo "$rc" > "$RC_FILE"
  echo "[ambient_jax] trainer exited with status $rc at $(date -u +%FT%TZ)"
  exit "$rc"
}

cmd_run() {
  local detach=0 dry=0 envs=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --detach) detach=1 ;;
      --dry-run) dry=1 ;;
      --env=*) envs+=("${1#*=}") ;;
      --) shift; break ;;
      *) die "run: unknown option '$1' (put the trainer's flags after --)" ;;
    esac
    shift
  done
  local e
  for e in ${envs[@]+"${envs[@]}"}; do
    [[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "run: --env wants NAME=VALUE, got '$e'"
  done
  # --distributed: jax.distributed.initialize() with no arguments finds the slice's workers.
  local cmd=("$VENV/bin/python" -m ambient_jax.main --distributed "$@")
  [[ ${#envs[@]} -gt 0 ]] && cmd=(env "${envs[@]}" "${cmd[@]}")
  local wid; wid="$(worker_id)"
  if [[ $dry -eq 1 ]]; then echo "cd $CODE_DIR && $(show "${cmd[@]}")"; return 0; fi
  mkdir -p "$RUN_DIR"
  local pid offset=0
  if pid="$(trainer_pid)"; then
    echo "[w$wid] a trainer is already running (pid $pid): attaching to its log, not starting another."
    offset=-1
  else
    rm -f "$RC_FILE"
    touch "$LOG"; offset="$(stat -c %s "$LOG")"
    echo "[ambient_jax] $(date -u +%FT%TZ) worker $wid: cd $CODE_DIR && $(show "${cmd[@]}")" >> "$LOG"
    cd "$CODE_DIR"
    nohup setsid bash "$SELF" _supervise -- "${cmd[@]}" >> "$LOG" 2>&1 < /dev/null &
    pid=$!
    echo "$pid" > "$PID_FILE"
    echo "[w$wid] started trainer pid $pid; log: $LOG"
  fi
  [[ $detach -eq 1 ]] && return 0
  if [[ $offset -lt 0 ]]; then
    tail -n 50 --pid="$pid" -F "$LOG" 2>/dev/null | sed -u "s/^/[w$wid] /"
  else
    tail -c "+$((offset + 1))" --pid="$pid" -F "$LOG" 2>/dev/null | sed -u "s/^/[w$wid] /"
  fi
  local i
  for i in $(seq 50); do [[ -f "$RC_FILE" ]] && break; sleep 0.2; done
  [[ -f "$RC_FILE" ]] || { echo "[w$wid] trainer died without an exit status (killed?)" >&2; exit 1; }
  exit "$(cat "$RC_FILE")"
}

cmd_status() {
  local pid
  if pid="$(trainer_pid)"; then echo "running (pid $pid)"
  elif [[ -f "$RC_FILE" ]]; then echo "exited $(cat "$RC_FILE")"
  else echo "not-started"; fi
}

cmd_stop() {
  local pid i
  pid="$(trainer_pid)" || { echo "no trainer running"; return 0; }
  echo "[w$(worker_id)] SIGTERM to trainer pid $pid (it saves a checkpoint before exiting)"
  kill -TERM "$pid"
  for i in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  cmd_status
}

action="${1:-}"
[[ $# -gt 0 ]] && shift
case "$action" in
  setup) cmd_setup "$@" ;;
  run) cmd_run "$@" ;;
  _supervise) cmd_supervise "$@" ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
  log) if [[ "${1:-}" == "-f" ]]; then tail -n 100 -F "$LOG"; else tail -n 100 "$LOG"; fi ;;
  cat-log) [[ -f "$LOG" ]] && sed "s/^/[w$(worker_id)] /" "$LOG" || echo "[w$(worker_id)] no log yet" ;;
  -h|--help) sed -n '2,/^set -euo/p' "$SELF" | sed '$d;s/^# \{0,1\}//' ;;
  *) die "unknown action '${action}'; one of: setup run status log cat-log stop" ;;
esac
