#!/usr/bin/env bash
# N ambient_jax processes on this machine, on CPU, forming one real multi-host JAX job
# (jax.distributed + gloo collectives). For testing the multi-host path without a cluster.
#
#   launch/local.sh N [--port=P] [--cpu-devices=K] [--log-dir=DIR] [--timeout=S] \
#       [--module=ambient_jax.main] [--quiet] [--dry-run] -- --config=configs/X.py --workdir=DIR [...]
#
#   N               number of processes (>= 1)
#   --port          coordinator port on 127.0.0.1 (default: a free one)
#   --cpu-devices   fake CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count) [1]
#   --log-dir       proc_<i>.log per process                                      [WORKDIR/local_logs]
#   --timeout       kill everything after S seconds (0 = never)                   [0]
#   --module        the Python module to run                                      [ambient_jax.main]
#   --quiet         do not stream the logs, only print the summary
#   --dry-run       print the N commands instead of running them
# Each process is `launch/multiprocess.sh --coordinator=127.0.0.1:P --num-processes=N
# --process-id=i --platform=cpu ...`. Its output goes to DIR/proc_<i>.log and is streamed
# here with the prefix "[proc i] ". When one process fails the others are stopped (they
# would otherwise wait on collectives until jax's heartbeat timeout). Exit status: 0 when
# every process exits 0, else the first non-zero status (124 on --timeout).
set -euo pipefail

PROG="launch/local.sh"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d;s/^# \{0,1\}//'; exit 0 ;; esac
[[ $# -ge 1 ]] || die "give the number of processes first, e.g. '$PROG 2 -- --config=configs/default.py --workdir=/tmp/run'"
N="$1"; shift
[[ "$N" =~ ^[0-9]+$ && "$N" -ge 1 ]] || die "the number of processes must be a positive integer, got '$N'"

PORT=""; CPU_DEVICES=1; LOG_DIR=""; TIMEOUT=0; MODULE="ambient_jax.main"; QUIET=0; DRY_RUN=0; MAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  opt="$1"; val=""
  if [[ "$opt" == --*=* ]]; then val="${opt#*=}"; opt="${opt%%=*}"
  elif [[ "$opt" =~ ^--(port|cpu-devices|log-dir|timeout|module)$ ]]; then
    [[ $# -ge 2 ]] || die "option $opt needs a value"; val="$2"; shift
  fi
  case "$opt" in
    --port) PORT="$val" ;;
    --cpu-devices) CPU_DEVICES="$val" ;;
    --log-dir) LOG_DIR="$val" ;;
    --timeout) TIMEOUT="$val" ;;
    --module) MODULE="$val" ;;
    --quiet) QUIET=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (the trainer's flags go after --)" ;;
  esac
  shift
done
[[ -z "$PORT" || ( "$PORT" =~ ^[0-9]+$ && "$PORT" -ge 1 && "$PORT" -le 65535 ) ]] || die "--port='$PORT' must be in 1..65535"
[[ "$CPU_DEVICES" =~ ^[1-9][0-9]*$ ]] || die "--cpu-devices='$CPU_DEVICES' must be a positive integer"
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout='$TIMEOUT' must be a whole number of seconds"
if [[ -z "$LOG_DIR" ]]; then
  wd=""
  for a in ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}; do [[ "$a" == --workdir=* ]] && wd="${a#--workdir=}"; done
  [[ -n "$wd" && "$wd" != *://* ]] || die "give --log-dir=DIR (or a local --workdir=DIR after --, whose local_logs/ is used)"
  LOG_DIR="$wd/local_logs"
fi
if [[ -z "$PORT" ]]; then
  PORT="$(${PYTHON:-python} -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

cmds=()
for ((i = 0; i < N; i++)); do
  c=(bash "$HERE/multiprocess.sh" --coordinator="127.0.0.1:$PORT" --num-processes="$N" --process-id="$i"
     --platform=cpu --cpu-devices="$CPU_DEVICES" --module="$MODULE" -- ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})
  # Validate now, so a bad option fails before anything starts.
  trainer="$(bash "$HERE/multiprocess.sh" --dry-run "${c[@]:2}")"
  cmds+=("$(show "${c[@]}") > $(q "$LOG_DIR/proc_$i.log") 2>&1 &" "#   which runs: $trainer")
done

echo "# $N processes, coordinator 127.0.0.1:$PORT, $CPU_DEVICES CPU device(s) each ($((N * CPU_DEVICES)) in all)"
for ((i = 0; i < N; i++)); do echo "# proc $i: log $LOG_DIR/proc_$i.log, streamed with prefix \"[proc $i] \""; done
if [[ $DRY_RUN -eq 1 ]]; then
  echo "mkdir -p $(q "$LOG_DIR")"
  printf '%s\n' "${cmds[@]}"
  echo "wait"
  exit 0
fi

mkdir -p "$LOG_DIR"
pids=(); tails=()
cleanup() {
  local p
  for p in ${pids[@]+"${pids[@]}"}; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for p in ${pids[@]+"${pids[@]}"}; do kill -KILL "$p" 2>/dev/null || true; done
  for p in ${tails[@]+"${tails[@]}"}; do kill "$p" 2>/dev/null || true; done
}
trap 'echo "$PROG: interrupted; stopping all processes" >&2; cleanup; exit 130' INT TERM
start=$SECONDS
for ((i = 0; i < N; i++)); do
  : > "$LOG_DIR/proc_$i.log"
  bash "$HERE/multiprocess.sh" --coordinator="127.0.0.1:$PORT" --num-processes="$N" --process-id="$i" \
    --platform=cpu --cpu-devices="$CPU_DEVICES" --module="$MODULE" -- ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"} \
    > "$LOG_DIR/proc_$i.log" 2>&1 < /dev/null &
  pids+=($!)
  if [[ $QUIET -eq 0 ]]; then
    tail -n +1 -F --pid="$!" "$LOG_DIR/proc_$i.log" 2>/dev/null | sed -u "s/^/[proc $i] /" &
    tails+=($!)
  fi
done

# Wait for all; on the first failure (or the timeout) stop the rest.
declare -A status=()
first_bad=0; kill_at=0
while [[ ${#status[@]} -lt $N ]]; do
  for ((i = 0; i < N; i++)); do
    [[ -n "${status[$i]:-}" ]] && continue
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      set +e; wait "${pids[$i]}"; rc=$?; set -e
      status[$i]=$rc
      if [[ $rc -ne 0 && $first_bad -eq 0 ]]; then
        first_bad=$rc
        echo "$PROG: proc $i exited with status $rc; stopping the others" >&2
        for ((j = 0; j < N; j++)); do [[ -z "${status[$j]:-}" ]] && kill -TERM "${pids[$j]}" 2>/dev/null || true; done
        kill_at=$((SECONDS + 15))   # then SIGKILL whatever still hangs in a collective
      fi
    fi
  done
  if [[ $TIMEOUT -gt 0 && $((SECONDS - start)) -ge $TIMEOUT && ${#status[@]} -lt $N && $first_bad -eq 0 ]]; then
    echo "$PROG: timeout after ${TIMEOUT}s; stopping all processes" >&2
    first_bad=124; cleanup
  fi
  if [[ $kill_at -gt 0 && $SECONDS -ge $kill_at ]]; then
    for ((j = 0; j < N; j++)); do [[ -z "${status[$j]:-}" ]] && kill -KILL "${pids[$j]}" 2>/dev/null || true; done
  fi
  sleep 0.2
done
for p in ${tails[@]+"${tails[@]}"}; do wait "$p" 2>/dev/null || true; done
echo "# local.sh: $N processes finished in $((SECONDS - start))s"
for ((i = 0; i < N; i++)); do echo "# proc $i: exit ${status[$i]}, log $LOG_DIR/proc_$i.log"; done
exit "$first_bad"
