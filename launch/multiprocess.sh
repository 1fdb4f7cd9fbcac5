#!/usr/bin/env bash
# One process of a multi-process (multi-host) ambient_jax run, started by hand on each host
# of a GPU cluster without a scheduler (or by launch/local.sh on one machine).
#
#   launch/multiprocess.sh --coordinator=HOST:PORT --num-processes=N --process-id=I \
#       [--local-device-ids=0,1,...] [--platform=cpu|gpu|tpu] [--cpu-devices=K] \
#       [--module=ambient_jax.main] [--dry-run] -- --config=configs/X.py --workdir=DIR [...]
#
# Every value may come from the environment instead of a flag (a flag wins):
#   JAX_COORDINATOR_ADDRESS  host:port of process 0 (it listens there; all others connect)
#   JAX_NUM_PROCESSES        total number of processes
#   JAX_PROCESS_ID           this process's index, 0 .. N-1
#   JAX_LOCAL_DEVICE_IDS     GPUs this process uses (passed on: jax.distributed reads it)
# The trainer gets them as ambient_jax.main's flags --coordinator_address, --num_processes
# and --process_id (main calls sharding.initialize_distributed with them before touching a
# device). The script `exec`s the trainer, so SIGTERM reaches it directly (it saves a
# checkpoint), and its exit status is the trainer's.
# The workdir must be one directory every process can reach (shared filesystem or gs://).
set -euo pipefail

PROG="launch/multiprocess.sh"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

COORD="${JAX_COORDINATOR_ADDRESS:-}"; NPROC="${JAX_NUM_PROCESSES:-}"; PID_="${JAX_PROCESS_ID:-}"
LOCAL_IDS="${JAX_LOCAL_DEVICE_IDS:-}"; PLATFORM=""; CPU_DEVICES=""; MODULE="ambient_jax.main"
DRY_RUN=0; MAIN_ARGS=()
PYTHON="${PYTHON:-python}"

while [[ $# -gt 0 ]]; do
  opt="$1"; val=""
  if [[ "$opt" == --*=* ]]; then val="${opt#*=}"; opt="${opt%%=*}"
  elif [[ "$opt" =~ ^--(coordinator|num-processes|process-id|local-device-ids|platform|cpu-devices|module)$ ]]; then
    [[ $# -ge 2 ]] || die "option $opt needs a value"; val="$2"; shift
  fi
  case "$opt" in
    --coordinator) COORD="$val" ;;
    --num-processes) NPROC="$val" ;;
    --process-id) PID_="$val" ;;
    --local-device-ids) LOCAL_IDS="$val" ;;
    --platform) PLATFORM="$val" ;;
    --cpu-devices) CPU_DEVICES="$val" ;;
    --module) MODULE="$val" ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d;s/^# \{0,1\}//'; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (the trainer's flags go after --)" ;;
  esac
  shift
done

[[ -n "$COORD" ]] || die "no coordinator address: give --coordinator=HOST:PORT or set JAX_COORDINATOR_ADDRESS"
[[ "$COORD" =~ ^[^:[:space:]]+:[0-9]+$ || "$COORD" =~ ^\[[0-9a-fA-F:]+\]:[0-9]+$ ]] ||
  die "coordinator address '$COORD' must be HOST:PORT (e.g. 10.0.0.1:12345)"
port="${COORD##*:}"; [[ "$port" -ge 1 && "$port" -le 65535 ]] || die "coordinator port $port is not in 1..65535"
[[ -n "$NPROC" ]] || die "no process count: give --num-processes=N or set JAX_NUM_PROCESSES"
[[ "$NPROC" =~ ^[0-9]+$ && "$NPROC" -ge 1 ]] || die "number of processes '$NPROC' must be a positive integer"
[[ -n "$PID_" ]] || die "no process id: give --process-id=I or set JAX_PROCESS_ID"
[[ "$PID_" =~ ^[0-9]+$ ]] || die "process id '$PID_' must be a non-negative integer"
[[ "$PID_" -lt "$NPROC" ]] || die "process id $PID_ must be smaller than the number of processes ($NPROC)"
[[ -z "$LOCAL_IDS" || "$LOCAL_IDS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "local device ids '$LOCAL_IDS' must look like 0,1,2"
[[ -z "$PLATFORM" || "$PLATFORM" =~ ^(cpu|gpu|cuda|rocm|tpu)$ ]] || die "platform '$PLATFORM': one of cpu gpu tpu"
[[ -z "$CPU_DEVICES" || "$CPU_DEVICES" =~ ^[1-9][0-9]*$ ]] || die "--cpu-devices '$CPU_DEVICES' must be a positive integer"
[[ "$MODULE" =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "--module '$MODULE' is not a Python module name"
for a in ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}; do
  case "$a" in --coordinator_address*|--num_processes*|--process_id*|--distributed|--nodistributed)
    die "'$a' after --: give the coordinator, process count and id to $PROG itself" ;; esac
done
if [[ "$MODULE" == ambient_jax.main ]]; then
  have_cfg=0; have_wd=0
  for a in ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}; do
    case "$a" in --config=*) have_cfg=1 ;; --workdir=*) have_wd=1 ;; esac
  done
  [[ $have_cfg -eq 1 ]] || die "give the trainer --config=configs/X.py after --"
  [[ $have_wd -eq 1 ]] || die "give the trainer --workdir=DIR after -- (the same shared directory on every process)"
fi

envs=()
[[ -n "$LOCAL_IDS" ]] && envs+=(JAX_LOCAL_DEVICE_IDS="$LOCAL_IDS")
[[ -n "$PLATFORM" ]] && envs+=(JAX_PLATFORMS="$PLATFORM")
if [[ -n "$CPU_DEVICES" ]]; then
  xla="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}" | xargs)"
  xla="${xla:+$xla }--xla_force_host_platform_device_count=$CPU_DEVICES"
  envs+=(XLA_FLAGS="$xla")
fi
cmd=("$PYTHON" -m "$MODULE" --coordinator_address="$COORD" --num_processes="$NPROC" --process_id="$PID_"
     ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})
[[ ${#envs[@]} -gt 0 ]] && cmd=(env "${envs[@]}" "${cmd[@]}")
if [[ $DRY_RUN -eq 1 ]]; then show "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
