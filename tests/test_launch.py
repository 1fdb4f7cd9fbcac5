"""launch/: every script's --dry-run output, its option errors, and what it really executes.

Nothing here reaches a cloud or a cluster: `gcloud`, `srun` and `scontrol` are replaced by
small fakes on PATH that record their arguments, so the test also checks that --dry-run
prints exactly the commands a real run executes. Runs in a few seconds.
"""

import os
import pathlib
import shlex
import signal
import subprocess
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["tpu_vm.sh", "tpu_worker.sh", "local.sh", "multiprocess.sh", "slurm.sbatch"]

TPU_OPTS = ["--name=amb-test", "--zone=us-central2-b", "--project=my-proj",
            "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
            "--config=configs/cifar10.py:0.2", "--workdir=gs://my-bucket/runs/c10"]
TRAINER_EXTRA = ["--config.optim.lr=3e-4", "--config.note=a b"]


def run(args, env=None, cwd=ROOT, timeout=60):
  full_env = dict(os.environ)
  full_env.update(env or {})
  return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=full_env,
                        cwd=cwd, timeout=timeout)


def commands(stdout):
  """The non-comment lines of a dry-run, each split like a shell would."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


@pytest.fixture
def repo(tmp_path):
  """A tiny git checkout with a config, standing in for the repository root."""
  root = tmp_path / "repo"
  (root / "configs").mkdir(parents=True)
  (root / "configs" / "cifar10.py").write_text("def get_config(arg=None):\n  return None\n")
  subprocess.run(["git", "init", "-q", str(root)], check=True)
  return root


REFUSE_GCLOUD = '#!/usr/bin/env bash\necho "a test tried to run the real gcloud: $*" >&2\nexit 99\n'


def tpu(repo, *args, env=None):
  """launch/tpu_vm.sh; `gcloud` is the fake one given in env, else one that refuses to run."""
  env = dict(env or {})
  if "FAKE" not in env:
    refuse = repo.parent / "refuse"
    refuse.mkdir(exist_ok=True)
    (refuse / "gcloud").write_text(REFUSE_GCLOUD)
    (refuse / "gcloud").chmod(0o755)
    env["PATH"] = f"{refuse}:{os.environ['PATH']}"
  return run(["bash", LAUNCH / "tpu_vm.sh", *args], env={"AMBIENT_REPO_ROOT": str(repo), **env})


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
  r = run(["bash", "-n", LAUNCH / script])
  assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  r = run(["bash", LAUNCH / script, "--help"])
  assert r.returncode == 0, r.stderr
  assert "ambient_jax" in r.stdout or "Worker-side" in r.stdout


# ---- Cloud TPU VM ----------------------------------------------------------------------

def test_tpu_launch_dry_run(repo):
  r = tpu(repo, *TPU_OPTS, "--spot", "--env=TFDS_DATA_DIR=gs://my-bucket/tfds", "--dry-run", "--",
          *TRAINER_EXTRA)
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  gcloud = [c for c in cmds if c[0] == "gcloud"]
  verbs = [c[4] for c in gcloud]
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh", "describe", "ssh", "delete"]
  for c in gcloud:
    assert c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
    assert c[5] == "amb-test" or c[4] == "scp"
    assert "--zone=us-central2-b" in c and "--project=my-proj" in c
  create = gcloud[1]
  assert create[6:] == ["--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v4-32",
                        "--version=tpu-ubuntu2204-base", "--spot"]
  scp = gcloud[2]
  assert scp[5].endswith("/ambient_jax-amb-test.tar.gz") and scp[6] == "amb-test:ambient_jax.tar.gz"
  assert "--worker=all" in scp
  for c in gcloud:
    if c[4] in ("ssh", "scp"):
      assert "--worker=all" in c
  ssh_cmds = [next(a for a in c if a.startswith("--command=")) for c in gcloud if c[4] == "ssh"]
  assert ssh_cmds[0] == ("--command=rm -rf ~/ambient_jax && mkdir -p ~/ambient_jax && "
                         "tar -xzf ~/ambient_jax.tar.gz -C ~/ambient_jax")
  assert ssh_cmds[1] == "--command=bash ~/ambient_jax/launch/tpu_worker.sh setup --jax-version=0.10.2"
  run_cmd = ssh_cmds[2][len("--command="):]
  assert shlex.split(run_cmd) == [
      "bash", "~/ambient_jax/launch/tpu_worker.sh", "run", "--env=TFDS_DATA_DIR=gs://my-bucket/tfds",
      "--", "--config=configs/cifar10.py:0.2", "--workdir=gs://my-bucket/runs/c10", *TRAINER_EXTRA]
  assert ssh_cmds[3] == "--command=bash ~/ambient_jax/launch/tpu_worker.sh cat-log"
  assert "--output-directory=tpu_logs/amb-test" in gcloud[7]
  assert gcloud[-1][-1] == "--quiet"
  # The exact trainer command is shown, and the workdir is used by the trainer only.
  assert ("# on every worker: cd ~/ambient_jax && python -m ambient_jax.main --distributed "
          "--config=configs/cifar10.py:0.2 --workdir=gs://my-bucket/runs/c10 "
          "--config.optim.lr=3e-4 --config.note='a b'") in r.stdout
  assert [line for line in r.stdout.splitlines()
          if "gs://my-bucket/runs" in line and not line.startswith("#")] == [
              line for line in r.stdout.splitlines() if "tpu_worker.sh run" in line]
  for word in ("gsutil", "gcloud storage", "rm -rf gs://"):
    assert word not in r.stdout


def test_tpu_keep_preemptible_git(repo):
  r = tpu(repo, *TPU_OPTS, "--preemptible", "--keep", "--code=git",
          "--git-repo=https://github.com/me/ambient_jax.git", "--git-ref=v1.0", "--dry-run")
  assert r.returncode == 0, r.stderr
  gcloud = [c for c in commands(r.stdout) if c[0] == "gcloud"]
  assert "delete" not in [c[4] for c in gcloud]
  assert "--preemptible" in gcloud[1] and "--spot" not in gcloud[1]
  assert not any(c[4] == "scp" for c in gcloud)
  checkout = next(a for a in gcloud[2] if a.startswith("--command="))
  assert "git clone https://github.com/me/ambient_jax.git ~/ambient_jax" in checkout
  assert checkout.endswith("git -C ~/ambient_jax checkout --force v1.0")
  assert "--keep: leaving TPU VM amb-test running" in r.stdout


def test_tpu_resume_loop_dry_run_shows_recovery(repo):
  r = tpu(repo, *TPU_OPTS, "--spot", "--resume-loop", "--retry-wait=5", "--dry-run")
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  flat = [c[4] if c[0] == "gcloud" else c[0] for c in cmds]
  assert flat == ["describe", "create", "git", "scp", "ssh", "ssh", "ssh",      # attempt 1 ...
                  "describe", "sleep",                                       # ... preempted
                  "describe", "delete", "describe", "create", "git", "scp", "ssh", "ssh", "ssh",
                  "describe", "mkdir", "ssh", "delete"]
  assert ["sleep", "5"] in cmds
  assert "# attempt 2 of 20" in r.stdout and "is PREEMPTED: deleting and re-creating" in r.stdout
  assert sum("tpu_worker.sh run" in " ".join(c) for c in cmds) == 2


def test_tpu_single_actions(repo):
  base = ["--name=amb-test", "--zone=europe-west4-a", "--dry-run"]
  down = commands(tpu(repo, "down", *base).stdout)
  assert down == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "amb-test",
                   "--zone=europe-west4-a", "--quiet"]]
  stop = commands(tpu(repo, "stop", *base).stdout)
  assert stop[0][-2:] == ["--worker=all", "--command=bash ~/ambient_jax/launch/tpu_worker.sh stop"]
  logs = commands(tpu(repo, "logs", *base).stdout)
  assert logs[0][-2:] == ["--worker=0", "--command=bash ~/ambient_jax/launch/tpu_worker.sh log -f"]
  start = tpu(repo, "start", *base, "--config=configs/cifar10.py", "--workdir=gs://b/r")
  assert commands(start.stdout)[0][-1] == ("--command=bash ~/ambient_jax/launch/tpu_worker.sh run --detach -- "
                                           "--config=configs/cifar10.py --workdir=gs://b/r")
  up = [c[4] for c in commands(tpu(repo, "up", *base).stdout) if c[0] == "gcloud"]
  assert up == ["describe", "create", "scp", "ssh", "ssh"]


@pytest.mark.parametrize("args, message", [
    (["--zone=us-central2-b"], "--name is required"),
    (["--name=amb"], "--zone is required"),
    (["--name=amb", "--zone=uscentral"], "does not look like a zone"),
    (["--name=Amb_1", "--zone=us-central2-b"], "--name='Amb_1'"),
    (["--name=amb", "--zone=us-central2-b", "--accelerator-type=tpu8"], "--accelerator-type='tpu8'"),
    (["--name=amb", "--zone=us-central2-b", "--workdir=gs://b/r"], "--config is required"),
    (["--name=amb", "--zone=us-central2-b", "--config=configs/cifar10.py"], "--workdir is required"),
    (["--name=amb", "--zone=us-central2-b", "--config=configs/cifar10.py", "--workdir=/tmp/run"],
     "must be a gs:// path"),
    (["--name=amb", "--zone=us-central2-b", "--config=configs/nope.py", "--workdir=gs://b/r"],
     "configs/nope.py not found"),
    (["--name=amb", "--zone=us-central2-b", "--spot", "--preemptible"], "exclude each other"),
    (["--name=amb", "--zone=us-central2-b", "--bogus"], "unknown option '--bogus'"),
    (["--name=amb", "--zone=us-central2-b", "--keep=yes"], "--keep takes no value"),
    (["--name=amb", "--zone=us-central2-b", "--max-attempts=x"], "--max-attempts='x'"),
    (["--name=amb", "--zone=us-central2-b", "--env=1BAD"], "--env wants NAME=VALUE"),
    (["--name=amb", "--zone=us-central2-b", "--code=rsync"], "--code='rsync'"),
    (["--name=amb", "--zone=us-central2-b", "--config=configs/cifar10.py", "--workdir=gs://b/r",
      "--", "--workdir=gs://other"], "not after --"),
    (["deploy", "--name=amb"], "unknown action 'deploy'"),
])
def test_tpu_bad_options(repo, args, message):
  r = tpu(repo, "--dry-run", *args) if args[0] != "deploy" else tpu(repo, *args, "--dry-run")
  assert r.returncode == 2, r.stdout
  assert message in r.stderr and r.stdout == ""


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records each call (one argument per line, then a blank line) and plays a TPU VM.
{ printf '%s\n' "$@"; echo; } >> "$FAKE/calls"
state="$(cat "$FAKE/state" 2>/dev/null || echo NOT_FOUND)"
case "$4" in
  describe) if [[ $state == NOT_FOUND ]]; then echo "ERROR: NOT_FOUND: Resource not found" >&2; exit 1; fi
            printf '%s\tv4-32\n' "$state" ;;
  create) echo READY > "$FAKE/state" ;;
  delete) echo NOT_FOUND > "$FAKE/state" ;;
  ssh) if [[ "$*" == *"tpu_worker.sh run"* && -s "$FAKE/preempt" ]]; then
         n=$(cat "$FAKE/preempt"); if [[ $n -gt 0 ]]; then
           echo $((n - 1)) > "$FAKE/preempt"; echo PREEMPTED > "$FAKE/state"; exit 255; fi; fi
       if [[ "$*" == *"tpu_worker.sh run"* && -s "$FAKE/sigterm" ]]; then
         n=$(cat "$FAKE/sigterm"); if [[ $n -gt 0 ]]; then  # the trainer saved, exited 143
           echo $((n - 1)) > "$FAKE/sigterm"; echo "${FAKE_STATE_AFTER_SIGTERM:-PREEMPTED}" > "$FAKE/state"
           exit 143; fi; fi
       if [[ "$*" == *"tpu_worker.sh run"* && -n "${FAKE_TRAINER_RC:-}" ]]; then exit "$FAKE_TRAINER_RC"; fi ;;
esac
exit 0
"""


@pytest.fixture
def fake_gcloud(tmp_path):
  fake = tmp_path / "fake"
  fake.mkdir()
  (fake / "gcloud").write_text(FAKE_GCLOUD)
  (fake / "gcloud").chmod(0o755)
  env = {"PATH": f"{fake}:{os.environ['PATH']}", "FAKE": str(fake), "TMPDIR": str(tmp_path)}

  def calls():
    text = (fake / "calls").read_text() if (fake / "calls").exists() else ""
    return [block.split("\n") for block in text.split("\n\n") if block]

  return fake, env, calls


def test_tpu_dry_run_is_what_runs(repo, fake_gcloud):
  """A real run (fake gcloud, one preemption) executes exactly the dry-run's gcloud lines."""
  fake, env, calls = fake_gcloud
  (fake / "preempt").write_text("1")
  opts = [*TPU_OPTS, "--spot", "--resume-loop", "--retry-wait=0", "--log-dir", str(repo / "logs")]
  dry = tpu(repo, *opts, "--dry-run", "--", *TRAINER_EXTRA, env=env)
  assert dry.returncode == 0 and not (fake / "calls").exists()
  real = tpu(repo, *opts, "--", *TRAINER_EXTRA, env=env)
  assert real.returncode == 0, real.stderr
  printed = [c for c in commands(dry.stdout) if c[0] == "gcloud"]
  assert [["gcloud", *c] for c in calls()] == printed
  assert (repo / "logs").is_dir()
  assert "+ gcloud compute tpus tpu-vm create amb-test" in real.stderr


def test_tpu_trainer_failure_is_not_retried(repo, fake_gcloud):
  fake, env, calls = fake_gcloud
  env["FAKE_TRAINER_RC"] = "3"
  r = tpu(repo, *TPU_OPTS, "--resume-loop", "--retry-wait=0", "--log-dir", str(repo / "logs"), env=env)
  assert r.returncode == 3
  assert "failed with status 3 on a healthy VM; not retrying" in r.stderr
  verbs = [c[3] for c in calls()]
  assert verbs.count("create") == 1 and verbs[-1] == "delete"


def test_tpu_resume_loop_after_a_sigterm_save(repo, fake_gcloud):
  """The trainer exits 143 after saving on SIGTERM: a preempted VM is re-created and the run
  resumed; on a VM still READY (someone ran `stop`) the loop stops and says so."""
  fake, env, calls = fake_gcloud
  (fake / "sigterm").write_text("1")
  r = tpu(repo, *TPU_OPTS, "--resume-loop", "--retry-wait=0", "--log-dir", str(repo / "logs"), env=env)
  assert r.returncode == 0, r.stderr
  assert "VM state PREEMPTED after status 143" in r.stdout and "training finished" in r.stdout
  assert [c[3] for c in calls()].count("create") == 2

  (fake / "sigterm").write_text("1")
  r = tpu(repo, *TPU_OPTS, "--resume-loop", "--retry-wait=0", "--log-dir", str(repo / "logs"),
          env={**env, "FAKE_STATE_AFTER_SIGTERM": "READY"})
  assert r.returncode == 143
  assert "stopped by SIGTERM (status 143" in r.stderr and "not retrying" in r.stderr


def test_tpu_reuses_ready_vm(repo, fake_gcloud):
  fake, env, calls = fake_gcloud
  (fake / "state").write_text("READY")
  r = tpu(repo, "up", *TPU_OPTS, env=env)
  assert r.returncode == 0, r.stderr
  assert "is READY: reusing it" in r.stdout
  assert "create" not in [c[3] for c in calls()]
  r = tpu(repo, "up", *[o for o in TPU_OPTS if "accelerator" not in o], "--accelerator-type=v4-8",
          env=env)
  assert r.returncode == 2 and "exists with accelerator type v4-32, not v4-8" in r.stderr


FAKE_PYTHON = """#!/usr/bin/env bash
trap 'echo "trainer: SIGTERM, checkpoint saved"; exit 143' TERM
echo "trainer args: $* DATA=$TFDS_DATA_DIR"
for i in $(seq "${STEPS:-3}"); do echo "step $i"; sleep 0.1 & wait $!; done
exit "${RC:-0}"
"""


def test_tpu_worker(tmp_path):
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text(FAKE_PYTHON)
  (venv / "bin" / "python").chmod(0o755)
  env = {"AMBIENT_VENV": str(venv), "AMBIENT_CODE_DIR": str(tmp_path),
         "AMBIENT_RUN_DIR": str(tmp_path / "run")}
  worker = ["bash", LAUNCH / "tpu_worker.sh"]
  dry = run([*worker, "run", "--dry-run", "--env=TFDS_DATA_DIR=gs://b/tfds", "--",
             "--config=configs/x.py", "--workdir=gs://b/r"], env=env)
  assert dry.stdout.strip() == (
      f"cd {tmp_path} && env TFDS_DATA_DIR=gs://b/tfds "
      f"{venv}/bin/python -m ambient_jax.main --distributed --config=configs/x.py --workdir=gs://b/r")
  setup = run([*worker, "setup", "--dry-run", "--jax-version=0.10.2"], env=env).stdout
  assert "uv pip install --python" in setup and "'jax[tpu]==0.10.2' -e" in setup and "[gcs]" in setup
  assert "uv venv --python 3.11" in setup

  r = run([*worker, "run", "--env=TFDS_DATA_DIR=d", "--", "--config=c", "--workdir=w"],
          env={**env, "RC": "4"})
  assert r.returncode == 4
  assert "[w0] trainer args: -m ambient_jax.main --distributed --config=c --workdir=w DATA=d" in r.stdout
  assert "[w0] step 3" in r.stdout
  assert run([*worker, "status"], env=env).stdout.strip() == "exited 4"

  # Detached start, a second `run` attaches instead of starting again, `stop` = SIGTERM.
  assert run([*worker, "run", "--detach", "--", "--config=c"], env={**env, "STEPS": "100"}).returncode == 0
  attach = subprocess.Popen([str(a) for a in worker] + ["run", "--", "--config=c"],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
  time.sleep(0.5)
  assert run([*worker, "status"], env=env).stdout.startswith("running")
  assert run([*worker, "stop"], env=env).returncode == 0
  out, _ = attach.communicate(timeout=30)
  assert attach.returncode == 143  # the trainer's status after a SIGTERM save
  assert "already running" in out and "trainer: SIGTERM, checkpoint saved" in out
  log = run([*worker, "cat-log"], env=env).stdout
  assert log.count("trainer args:") == 2
  bad = run([*worker, "run", "--env=bad", "--", "--config=c"], env=env)
  assert bad.returncode == 2 and "--env wants NAME=VALUE" in bad.stderr


# ---- SLURM -----------------------------------------------------------------------------

def test_slurm_dry_run():
  r = run(["bash", LAUNCH / "slurm.sbatch", "--dry-run", "--config=configs/cifar10.py",
           "--workdir=/shared/runs/c10", "--config.note=a b"])
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert "sbatch launch/slurm.sbatch --config=configs/cifar10.py --workdir=/shared/runs/c10 --config.note='a b'" in lines
  assert not any(line.startswith("export") for line in lines)
  assert ("srun --kill-on-bad-exit=1 --label python -m ambient_jax.main --distributed "
          "--config=configs/cifar10.py "
          "--workdir=/shared/runs/c10 --config.note='a b' &") in lines
  assert "mkdir -p /shared/runs/c10" in lines
  header = (LAUNCH / "slurm.sbatch").read_text()
  for directive in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --ntasks-per-node=8",
                    "#SBATCH --gpus-per-node=8", "#SBATCH --open-mode=append"):
    assert directive in header
  # One task per node with 4 GPUs: all four are that task's.
  r = run(["bash", LAUNCH / "slurm.sbatch", "--dry-run", "--config=c", "--workdir=gs://b/r"],
          env={"SLURM_JOB_ID": "7", "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "4",
               "SLURM_SUBMIT_DIR": "/repo"})
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in r.stdout.splitlines()
  assert "cd /repo" in r.stdout and "mkdir" not in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--workdir=/shared/x"], "give --config="),
    (["--config=c"], "give --workdir="),
    (["--config=c", "--workdir=relative/dir"], "must be an absolute path on shared storage"),
    (["--config", "c", "--workdir=/x"], "write --config=VALUE"),
    (["--config=c", "--workdir=/x", "--process_id=1"], "passes --distributed itself"),
])
def test_slurm_bad_options(args, message):
  r = run(["bash", LAUNCH / "slurm.sbatch", "--dry-run", *args])
  assert r.returncode == 2 and message in r.stderr


def test_slurm_not_in_job_without_dry_run():
  r = run(["bash", LAUNCH / "slurm.sbatch", "--config=c", "--workdir=/x"], env={"SLURM_JOB_ID": ""})
  assert r.returncode == 2 and "not inside a SLURM job" in r.stderr


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_slurm_forwards_sigterm_and_requeues(tmp_path, sig, requeued):
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "srun").write_text(textwrap.dedent("""\
      #!/usr/bin/env bash
      echo "$*" > "$FAKE/srun_args"
      trap 'echo TERM > "$FAKE/srun_signal"; exit 143' TERM  # as the trainers do after saving
      for i in $(seq 200); do sleep 0.05; done
      """))
  (fake / "scontrol").write_text('#!/usr/bin/env bash\necho "$*" >> "$FAKE/scontrol_calls"\n')
  for f in ("srun", "scontrol"):
    (fake / f).chmod(0o755)
  env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "FAKE": str(fake),
         "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(tmp_path)}
  p = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "--config=c",
                        f"--workdir={tmp_path / 'wd'}"], env=env, stdout=subprocess.PIPE, text=True)
  for _ in range(100):
    if (fake / "srun_args").exists():
      break
    time.sleep(0.05)
  p.send_signal(sig)
  out, _ = p.communicate(timeout=30)
  assert (fake / "srun_args").read_text().split()[:6] == [
      "--kill-on-bad-exit=1", "--label", "python", "-m", "ambient_jax.main", "--distributed"]
  assert (fake / "srun_signal").read_text().strip() == "TERM", out
  assert (tmp_path / "wd").is_dir()
  assert p.returncode == 143  # the job's status is the trainers': stopped, not finished
  if requeued:
    assert (fake / "scontrol_calls").read_text().strip() == "requeue 42"
  else:
    assert not (fake / "scontrol_calls").exists()


# ---- plain multi-process and local -------------------------------------------------------

def test_multiprocess_dry_run_env_names():
  r = run(["bash", LAUNCH / "multiprocess.sh", "--coordinator=10.0.0.1:1234", "--num-processes=4",
           "--process-id=3", "--local-device-ids=0,1", "--dry-run", "--", "--config=configs/x.py",
           "--workdir=/shared/r"])
  assert r.returncode == 0, r.stderr
  assert shlex.split(r.stdout) == [
      "env", "JAX_LOCAL_DEVICE_IDS=0,1", "python", "-m", "ambient_jax.main",
      "--coordinator_address=10.0.0.1:1234", "--num_processes=4", "--process_id=3",
      "--config=configs/x.py", "--workdir=/shared/r"]
  # The same values from the environment; a flag wins over the environment.
  r = run(["bash", LAUNCH / "multiprocess.sh", "--process-id=1", "--dry-run", "--", "--config=c",
           "--workdir=w"],
          env={"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
  assert r.stdout.strip() == ("python -m ambient_jax.main --coordinator_address=h:9 --num_processes=2 "
                              "--process_id=1 --config=c --workdir=w")


@pytest.mark.parametrize("args, message", [
    (["--num-processes=2", "--process-id=0"], "no coordinator address"),
    (["--coordinator=host", "--num-processes=2", "--process-id=0"], "must be HOST:PORT"),
    (["--coordinator=h:70000", "--num-processes=2", "--process-id=0"], "not in 1..65535"),
    (["--coordinator=h:1", "--process-id=0"], "no process count"),
    (["--coordinator=h:1", "--num-processes=0", "--process-id=0"], "must be a positive integer"),
    (["--coordinator=h:1", "--num-processes=2"], "no process id"),
    (["--coordinator=h:1", "--num-processes=2", "--process-id=2"], "must be smaller than"),
    (["--coordinator=h:1", "--num-processes=2", "--process-id=0", "--platform=fpga"], "platform 'fpga'"),
    (["--coordinator=h:1", "--num-processes=2", "--process-id=0", "--what"], "unknown option '--what'"),
    (["--coordinator=h:1", "--num-processes=2", "--process-id=0", "--", "--process_id=1"],
     "give the coordinator, process count and id to"),
])
def test_multiprocess_bad_options(args, message):
  env = {k: "" for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  r = run(["bash", LAUNCH / "multiprocess.sh", *args, "--dry-run", "--", "--config=c", "--workdir=w"],
          env=env)
  assert r.returncode == 2 and message in r.stderr, r.stderr


def test_local_dry_run(tmp_path):
  r = run(["bash", LAUNCH / "local.sh", "2", "--port=23456", "--cpu-devices=4", "--dry-run", "--",
           "--config=configs/default.py", f"--workdir={tmp_path}/run"])
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert "# 2 processes, coordinator 127.0.0.1:23456, 4 CPU device(s) each (8 in all)" in out
  for i in range(2):
    assert f'# proc {i}: log {tmp_path}/run/local_logs/proc_{i}.log, streamed with prefix "[proc {i}] "' in out
    assert (f"--coordinator=127.0.0.1:23456 --num-processes=2 --process-id={i} --platform=cpu "
            f"--cpu-devices=4 --module=ambient_jax.main -- --config=configs/default.py "
            f"--workdir={tmp_path}/run > {tmp_path}/run/local_logs/proc_{i}.log 2>&1 &") in out
    assert "#   which runs: env JAX_PLATFORMS=cpu " in out
    assert (f"python -m ambient_jax.main --coordinator_address=127.0.0.1:23456 --num_processes=2 "
            f"--process_id={i} --config=configs/default.py --workdir={tmp_path}/run\n") in out
  trainer = shlex.split(out.split("#   which runs: ")[1].splitlines()[0])
  xla = [a for a in trainer if a.startswith("XLA_FLAGS=")]
  assert len(xla) == 1 and xla[0].endswith(" --xla_force_host_platform_device_count=4"[1:])
  assert xla[0].count("device_count") == 1   # replaces, not adds to, an inherited count
  assert trainer[trainer.index("-m") - 1:][:3] == ["python", "-m", "ambient_jax.main"]


@pytest.mark.parametrize("args, message", [
    ([], "give the number of processes first"),
    (["two"], "must be a positive integer, got 'two'"),
    (["2", "--port=0", "--", "--config=c", "--workdir=/tmp/x"], "--port='0'"),
    (["2", "--cpu-devices=0", "--", "--config=c", "--workdir=/tmp/x"], "--cpu-devices='0'"),
    (["2", "--", "--config=c"], "give --log-dir=DIR"),
    (["2", "--log-dir=/tmp/x", "--", "--workdir=/tmp/x"], "give the trainer --config="),
])
def test_local_bad_options(args, message):
  r = run(["bash", LAUNCH / "local.sh", *args[:1], "--dry-run", *args[1:]] if args
          else ["bash", LAUNCH / "local.sh"])
  assert r.returncode == 2 and message in r.stderr, r.stderr
