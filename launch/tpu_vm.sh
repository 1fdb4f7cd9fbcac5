#!/usr/bin/env bash
# Train ambient_jax on a Cloud TPU VM slice (single host or pod slice) with one command.
#
#   launch/tpu_vm.sh [ACTION] --name=NAME --zone=ZONE --config=configs/X.py[:VARIANT] \
#       --workdir=gs://BUCKET/PATH [options] [-- --config.FIELD=VALUE ...]
#
# ACTION (default: launch)
#   launch      create (or reuse) the VM, push the code, install, run on all workers while
#               streaming their logs, fetch the logs, delete the VM (unless --keep)
#   up          create (or reuse) the VM, push the code, install; no training
#   push        put the code on every worker          setup   install jax[tpu] + the project
#   run         start (or re-attach to) training on all workers and stream the logs
#   start       start training on all workers in the background and return
#   logs        follow worker 0's log (--log-worker=N|all)
#   fetch-logs  copy every worker's log to --log-dir (one file per worker: <id>.log)
#   status      VM state and the trainer's state on every worker
#   stop        SIGTERM the trainer on all workers (it saves a checkpoint) and wait
#   down        delete the VM (the gs:// workdir is never touched)
#
# Options (both --opt=VALUE and --opt VALUE work)
#   --name=NAME               TPU VM name (or $TPU_NAME)                      [required]
#   --zone=ZONE               e.g. us-central2-b (or $TPU_ZONE)              [required]
#   --project=PROJECT         GCP project (default: gcloud's core/project)
#   --accelerator-type=TYPE   v4-8, v4-32, v5litepod-16, v5p-8, v6e-8, ...   [v4-8]
#   --version=RUNTIME         TPU software version (alias --runtime-version) [tpu-ubuntu2204-base]
#   --spot | --preemptible    cheaper, may be preempted (see --resume-loop)
#   --config=CFG              passed as --config=CFG to ambient_jax.main     [launch/run/start]
#   --workdir=gs://...        the run's directory; re-running with the same one resumes
#   --code=scp|git            scp a tarball of the local tree (default) or git checkout
#   --git-repo=URL --git-ref=REF   for --code=git (default: origin's URL, local HEAD commit)
#   --jax-version=V           jax[tpu]==V on the workers                     [0.10.2]
#   --env=NAME=VALUE          extra environment for the trainer (repeatable)
#   --create-flag=FLAG        extra flag for `tpu-vm create`, e.g. --create-flag=--network=N
#   --ssh-flag=FLAG           extra flag for `tpu-vm ssh/scp`, e.g. --ssh-flag=--internal-ip
#   --keep                    do not delete the VM at the end of `launch`
#   --resume-loop             if the VM is preempted, re-create it and run again (same
#                             workdir, so training resumes from the last checkpoint); the
#                             trainer exits 143 after a SIGTERM save, 0 only when finished
#   --max-attempts=N          attempts for --resume-loop                      [20]
#   --retry-wait=SECONDS      pause before re-creating                        [60]
#   --log-dir=DIR             where fetch-logs writes                          [tpu_logs/NAME]
#   --dry-run                 print every command (gcloud and local) instead of running it
#   --simulate-preemptions=K  with --dry-run --resume-loop: pretend the first K runs were
#                             preempted, to show the recovery commands          [1]
#   Everything after -- goes to ambient_jax.main unchanged.
#
# The workdir is never created, listed or deleted by this script: resuming is the trainer's
# job (same --workdir = resume), so re-running this command is always safe.
set -euo pipefail

PROG="launch/tpu_vm.sh"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

# ---- options -------------------------------------------------------------------------
ACTION=launch
NAME="${TPU_NAME:-}"; ZONE="${TPU_ZONE:-}"; PROJECT=""
ACCEL="v4-8"; RUNTIME="tpu-ubuntu2204-base"; PROVISIONING=""
CONFIG=""; WORKDIR=""; CODE="scp"; GIT_REPO=""; GIT_REF=""; JAX_VERSION="0.10.2"
ENVS=(); CREATE_FLAGS=(); SSH_FLAGS=(); MAIN_ARGS=()
KEEP=0; RESUME_LOOP=0; MAX_ATTEMPTS=20; RETRY_WAIT=60; LOG_DIR=""; LOG_WORKER=0
DRY_RUN=0; SIMULATE_PREEMPTIONS=1

case "${1:-}" in
  launch|up|push|setup|run|start|logs|fetch-logs|status|stop|down) ACTION="$1"; shift ;;
  -h|--help|"") ;;
  -*) ;;
  *) die "unknown action '$1'; one of: launch up push setup run start logs fetch-logs status stop down" ;;
esac

need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
  opt="$1"; val=""; has_eq=0
  if [[ "$opt" == --*=* ]]; then val="${opt#*=}"; opt="${opt%%=*}"; has_eq=1; fi
  case "$opt" in
    --spot|--preemptible|--keep|--resume-loop|--dry-run|-h|--help|--) takes_value=0 ;;
    --name|--zone|--project|--accelerator-type|--version|--runtime-version|--config|--workdir|\
    --code|--git-repo|--git-ref|--jax-version|--env|--create-flag|--ssh-flag|--max-attempts|\
    --retry-wait|--log-dir|--log-worker|--simulate-preemptions) takes_value=1 ;;
    *) die "unknown option '$1' (trainer flags such as --config.optim.lr=... go after --)" ;;
  esac
  if [[ $takes_value -eq 1 && $has_eq -eq 0 ]]; then need_value "$opt" "${2:-}"; val="$2"; shift; fi
  if [[ $takes_value -eq 0 && $has_eq -eq 1 ]]; then die "option $opt takes no value"; fi
  case "$opt" in
    --name) NAME="$val" ;;
    --zone) ZONE="$val" ;;
    --project) PROJECT="$val" ;;
    --accelerator-type) ACCEL="$val" ;;
    --version|--runtime-version) RUNTIME="$val" ;;
    --spot) [[ -z "$PROVISIONING" ]] || die "--spot and --preemptible exclude each other"; PROVISIONING="--spot" ;;
    --preemptible) [[ -z "$PROVISIONING" ]] || die "--spot and --preemptible exclude each other"; PROVISIONING="--preemptible" ;;
    --config) CONFIG="$val" ;;
    --workdir) WORKDIR="$val" ;;
    --code) CODE="$val" ;;
    --git-repo) GIT_REPO="$val" ;;
    --git-ref) GIT_REF="$val" ;;
    --jax-version) JAX_VERSION="$val" ;;
    --env) ENVS+=("$val") ;;
    --create-flag) CREATE_FLAGS+=("$val") ;;
    --ssh-flag) SSH_FLAGS+=("$val") ;;
    --keep) KEEP=1 ;;
    --resume-loop) RESUME_LOOP=1 ;;
    --max-attempts) MAX_ATTEMPTS="$val" ;;
    --retry-wait) RETRY_WAIT="$val" ;;
    --log-dir) LOG_DIR="$val" ;;
    --log-worker) LOG_WORKER="$val" ;;
    --dry-run) DRY_RUN=1 ;;
    --simulate-preemptions) SIMULATE_PREEMPTIONS="$val" ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d;s/^# \{0,1\}//'; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (trainer flags such as --config.train.lr=... go after --)" ;;
  esac
  shift
done

# ---- validation (before anything touches the cloud) -----------------------------------
REPO_ROOT="${AMBIENT_REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[[ -n "$NAME" ]] || die "--name is required (the TPU VM's name; or set TPU_NAME)"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] || die "--name='$NAME': lower-case letters, digits and '-', starting with a letter"
[[ -n "$ZONE" ]] || die "--zone is required (e.g. us-central2-b; or set TPU_ZONE)"
[[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone='$ZONE' does not look like a zone (e.g. us-central2-b)"
[[ "$ACCEL" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] || die "--accelerator-type='$ACCEL' does not look like v4-8, v5litepod-16, v5p-32, v6e-8"
[[ -n "$RUNTIME" ]] || die "--version must not be empty"
[[ "$CODE" == scp || "$CODE" == git ]] || die "--code='$CODE': use scp or git"
for n in MAX_ATTEMPTS RETRY_WAIT SIMULATE_PREEMPTIONS; do
  [[ "${!n}" =~ ^[0-9]+$ ]] || die "--$(echo "$n" | tr 'A-Z_' 'a-z-')='${!n}' must be a non-negative integer"
done
[[ "$MAX_ATTEMPTS" -ge 1 ]] || die "--max-attempts must be at least 1"
[[ "$LOG_WORKER" =~ ^([0-9]+|all)$ ]] || die "--log-worker='$LOG_WORKER': a worker index or all"
for e in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants NAME=VALUE, got '$e'"
done
case "$ACTION" in
  launch|run|start)
    [[ -n "$CONFIG" ]] || die "--config is required for '$ACTION' (e.g. --config=configs/cifar10.py)"
    [[ -n "$WORKDIR" ]] || die "--workdir is required for '$ACTION' (a gs://BUCKET/PATH every worker can write)"
    [[ "$WORKDIR" == gs://?* ]] || die "--workdir='$WORKDIR' must be a gs:// path: every worker writes to it and it must outlive the VM"
    for a in ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}; do
      case "$a" in --config=*|--workdir=*|--config|--workdir)
        die "give --config/--workdir to $PROG itself, not after --" ;;
      --distributed|--coordinator_address*|--num_processes*|--process_id*)
        die "'$a': every worker already runs with --distributed (JAX finds the slice itself)" ;; esac
    done
    if [[ "$CODE" == scp ]]; then
      cfg_file="${CONFIG%%:*}"
      [[ -f "$REPO_ROOT/$cfg_file" ]] || die "--config='$CONFIG': $cfg_file not found under $REPO_ROOT (give it relative to the repository root)"
    fi ;;
esac
[[ $DRY_RUN -eq 1 ]] || command -v gcloud >/dev/null || die "gcloud not found; install the Google Cloud CLI, or use --dry-run"
LOG_DIR="${LOG_DIR:-tpu_logs/$NAME}"
if [[ "$CODE" == git ]]; then
  if [[ -z "$GIT_REPO" ]]; then
    GIT_REPO="$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null)" || die "--code=git needs --git-repo=URL (this checkout has no 'origin' remote)"
  fi
  if [[ -z "$GIT_REF" ]]; then
    GIT_REF="$(git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null)" || die "--code=git needs --git-ref=REF"
    [[ -z "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]] ||
      echo "$PROG: warning: local changes are not in $GIT_REF; push them or use --code=scp" >&2
  fi
fi

# ---- command plumbing ------------------------------------------------------------------
# Every command goes to fd 3 (stdout), also from inside $(...), so --dry-run shows all of them
# in order. Functions chain with && / || return, because `set -e` is off inside conditions.
exec 3>&1
TPU=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE"); [[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")
WORKER_SH='bash ~/ambient_jax/launch/tpu_worker.sh'
note() { echo "# $*" >&3; }

# run_cmd CMD...: print it (dry-run), or print "+ CMD" to stderr and run it.
run_cmd() {
  if [[ $DRY_RUN -eq 1 ]]; then echo "$(show "$@")" >&3; return 0; fi
  echo "+ $(show "$@")" >&2
  "$@"
}
# run_sh 'shell line': for local pipelines.
run_sh() {
  if [[ $DRY_RUN -eq 1 ]]; then echo "$1" >&3; return 0; fi
  echo "+ $1" >&2
  bash -o pipefail -c "$1"
}
ssh_all() {  # ssh_all WORKER 'remote command' [extra gcloud flags]
  local worker="$1" cmd="$2"; shift 2
  run_cmd "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker="$worker" ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} --command="$cmd" "$@"
}

SIM_STATE="NOT_FOUND"   # dry-run's idea of the VM
VM_STATE=""; VM_ACCEL=""
# refresh_state: sets VM_STATE (READY, CREATING, PREEMPTED, ..., or NOT_FOUND) and VM_ACCEL.
refresh_state() {
  local cmd=("${TPU[@]}" describe "$NAME" "${LOC[@]}" "--format=value(state,acceleratorType)")
  VM_ACCEL=""
  if [[ $DRY_RUN -eq 1 ]]; then echo "$(show "${cmd[@]}")" >&3; VM_STATE="$SIM_STATE"; return 0; fi
  local out
  if out="$("${cmd[@]}" 2>&1)"; then
    VM_STATE="$(awk 'NR==1{print $1}' <<<"$out")"; VM_ACCEL="$(awk 'NR==1{print $2}' <<<"$out")"
  elif grep -qiE 'NOT_FOUND|not found' <<<"$out"; then VM_STATE=NOT_FOUND
  else echo "$PROG: gcloud describe failed:" >&2; echo "$out" >&2; VM_STATE=UNKNOWN; return 1; fi
}

create_vm() {
  local cmd=("${TPU[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$RUNTIME")
  [[ -n "$PROVISIONING" ]] && cmd+=("$PROVISIONING")
  cmd+=(${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"})
  run_cmd "${cmd[@]}" && SIM_STATE=READY
}
delete_vm() { run_cmd "${TPU[@]}" delete "$NAME" "${LOC[@]}" --quiet && SIM_STATE=NOT_FOUND; }

wait_state() {  # wait_state WANT: poll until the VM is in state WANT (30 min max)
  local i
  for i in $(seq 120); do
    refresh_state || true
    [[ "$VM_STATE" == "$1" || $DRY_RUN -eq 1 ]] && return 0
    sleep 15
  done
  echo "$PROG: TPU VM $NAME still $VM_STATE after 30 minutes (wanted $1)" >&2; return 1
}

# ensure_vm: make the VM exist and be READY, whatever state it was left in.
ensure_vm() {
  refresh_state || return 1
  case "$VM_STATE" in
    NOT_FOUND) note "TPU VM $NAME does not exist: creating it"; create_vm ;;
    READY)
      if [[ -n "$VM_ACCEL" && "$VM_ACCEL" != "$ACCEL" && "$VM_ACCEL" != */"$ACCEL" ]]; then
        die "TPU VM $NAME exists with accelerator type $VM_ACCEL, not $ACCEL; pick another --name or '$PROG down' it first"
      fi
      note "TPU VM $NAME is READY: reusing it" ;;
    CREATING|STARTING|RESTARTING|REPAIRING|PROVISIONING)
      note "TPU VM $NAME is $VM_STATE: waiting for READY"; wait_state READY ;;
    PREEMPTED|TERMINATED|STOPPING|STOPPED|DELETING|FAILED|"")
      note "TPU VM $NAME is ${VM_STATE:-in no known state}: deleting and re-creating it (a preempted spot VM cannot be restarted)"
      if [[ "$VM_STATE" != DELETING ]]; then delete_vm || return $?; fi
      wait_state NOT_FOUND && create_vm ;;
    *) echo "$PROG: TPU VM $NAME in unexpected state '$VM_STATE'" >&2; return 1 ;;
  esac
}

push_code() {
  if [[ "$CODE" == scp ]]; then
    local tarball="${TMPDIR:-/tmp}/ambient_jax-$NAME.tar.gz"
    note "copy the local tree (tracked and untracked files, minus git-ignored ones) to every worker"
    run_sh "git -C $(q "$REPO_ROOT") ls-files -z --cached --others --exclude-standard | tar -czf $(q "$tarball") --ignore-failed-read -C $(q "$REPO_ROOT") --null -T -" &&
    run_cmd "${TPU[@]}" scp "$tarball" "$NAME:ambient_jax.tar.gz" "${LOC[@]}" --worker=all ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} &&
    ssh_all all 'rm -rf ~/ambient_jax && mkdir -p ~/ambient_jax && tar -xzf ~/ambient_jax.tar.gz -C ~/ambient_jax'
  else
    note "git checkout of $GIT_REF on every worker"
    ssh_all all "if [ -d ~/ambient_jax/.git ]; then git -C ~/ambient_jax fetch --tags origin; else rm -rf ~/ambient_jax && git clone $(q "$GIT_REPO") ~/ambient_jax; fi && git -C ~/ambient_jax checkout --force $(q "$GIT_REF")"
  fi
}

setup_workers() { ssh_all all "$WORKER_SH setup --jax-version=$(q "$JAX_VERSION")"; }

worker_run_cmd() {  # the remote command that runs ambient_jax.main on a worker
  local extra=("$@") e
  for e in ${ENVS[@]+"${ENVS[@]}"}; do extra+=("--env=$e"); done
  local head="$WORKER_SH run"
  [[ ${#extra[@]} -gt 0 ]] && head+=" $(show "${extra[@]}")"
  printf '%s -- %s' "$head" "$(show --config="$CONFIG" --workdir="$WORKDIR" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})"
}

RUN_COUNT=0
run_training() {  # streams the logs of all workers; returns the first failing status
  RUN_COUNT=$((RUN_COUNT + 1))
  note "on every worker: cd ~/ambient_jax && python -m ambient_jax.main --distributed $(show --config="$CONFIG" --workdir="$WORKDIR" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})"
  local rc=0
  ssh_all all "$(worker_run_cmd)" || rc=$?
  if [[ $DRY_RUN -eq 1 && $RESUME_LOOP -eq 1 && $RUN_COUNT -le $SIMULATE_PREEMPTIONS ]]; then
    note "(dry-run: simulating that run $RUN_COUNT was preempted: ssh exits 255, the VM reports PREEMPTED)"
    SIM_STATE=PREEMPTED; rc=255
  fi
  return $rc
}

fetch_logs() {
  run_cmd mkdir -p "$LOG_DIR" &&
  ssh_all all "$WORKER_SH cat-log" --output-directory="$LOG_DIR" &&
  note "worker logs: $LOG_DIR/<worker>.log"
}

do_launch() {
  local attempt=1 rc=0 state
  trap 'echo; echo "$PROG: interrupted. Training keeps running on the VM: re-run the same command to re-attach, \"$PROG stop\" to stop it, \"$PROG down\" to delete the VM." >&2; exit 130' INT
  while :; do
    [[ $RESUME_LOOP -eq 1 ]] && note "attempt $attempt of $MAX_ATTEMPTS"
    rc=0
    if ensure_vm && push_code && setup_workers; then
      run_training || rc=$?
    else
      rc=$?; [[ $rc -eq 0 ]] && rc=1
      echo "$PROG: could not create/prepare the VM (status $rc)" >&2
    fi
    [[ $rc -eq 0 ]] && { note "training finished"; break; }
    [[ $RESUME_LOOP -eq 1 ]] || break
    refresh_state || true; state="$VM_STATE"
    if [[ "$state" == READY && $rc -eq 143 ]]; then
      echo "$PROG: the trainer was stopped by SIGTERM (status 143: \"$PROG stop\"?) on a healthy VM after saving a checkpoint; not retrying: the same command resumes" >&2
      break
    fi
    if [[ "$state" == READY && $rc -ne 255 ]]; then
      echo "$PROG: the trainer failed with status $rc on a healthy VM; not retrying (see the logs)" >&2
      break
    fi
    if [[ $attempt -ge $MAX_ATTEMPTS ]]; then
      echo "$PROG: giving up after $attempt attempts (last status $rc, VM state $state)" >&2; rc=3; break
    fi
    attempt=$((attempt + 1))
    note "VM state $state after status $rc: preempted or unreachable; retrying in ${RETRY_WAIT}s (same workdir: training resumes from its last checkpoint)"
    run_cmd sleep "$RETRY_WAIT"
  done
  trap - INT
  refresh_state || true
  if [[ "$VM_STATE" == READY ]]; then fetch_logs || true; fi
  if [[ $KEEP -eq 1 ]]; then note "--keep: leaving TPU VM $NAME running; delete it with: $PROG down --name=$NAME --zone=$ZONE"
  else delete_vm || true; fi
  return $rc
}

case "$ACTION" in
  launch) do_launch ;;
  up) ensure_vm && push_code && setup_workers ;;
  push) push_code ;;
  setup) setup_workers ;;
  run) run_training ;;
  start) ssh_all all "$(worker_run_cmd --detach)" ;;
  logs) if [[ "$LOG_WORKER" == all ]]; then ssh_all all "$WORKER_SH log -f"; else ssh_all "$LOG_WORKER" "$WORKER_SH log -f"; fi ;;
  fetch-logs) fetch_logs ;;
  status) refresh_state; echo "state: $VM_STATE ${VM_ACCEL}"; ssh_all all "$WORKER_SH status" ;;
  stop) ssh_all all "$WORKER_SH stop" ;;
  down) delete_vm ;;
esac
