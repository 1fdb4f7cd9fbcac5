"""Multi-host for real: several CPU processes on this machine, started by launch/local.sh,
form one JAX job (jax.distributed + gloo) and train together.

- the launcher contract: local.sh -> multiprocess.sh -> `--coordinator_address/--num_processes/
  --process_id` -> sharding.initialize_distributed; a global array spans both processes;
- a failing process makes local.sh stop the others and exit non-zero;
- `python -m ambient_jax.main` with 2 processes: a few steps complete, both processes log the
  same losses, metrics.jsonl / config.json / the sample grid are written once (by process 0),
  and the one checkpoint is complete and readable.
"""

import json
import os
import pathlib
import re
import subprocess
import textwrap
import time

import numpy as np

from tests import xla_test_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCAL = ROOT / "launch" / "local.sh"

# A stand-in for ambient_jax.main that takes the same distributed flags and reduces over a
# batch whose rows live on different processes.
PROBE = textwrap.dedent("""\
    import sys, types
    import numpy as np
    flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    if flags.get("fail_early") == flags["process_id"]:
      sys.exit(5)
    from ambient_jax.runtime import sharding
    sharding.initialize_distributed(flags["coordinator_address"], int(flags["num_processes"]),
                                    int(flags["process_id"]))
    import jax
    mesh = sharding.make_mesh(types.SimpleNamespace(data=-1, fsdp=1))
    batch = sharding.batch_sharding(mesh)
    start, stop = sharding.host_rows(batch, 8)
    x = sharding.global_batch_from_host(batch, np.arange(start, stop, dtype=np.float32), 8)
    total = float(jax.jit(lambda v: (v * v).sum())(x))
    print(f"PROBE process={jax.process_index()}/{jax.process_count()} devices={jax.device_count()} "
          f"rows={start}:{stop} total={total}", flush=True)
    """)

# The default config, shrunk so that two processes on two shared cores finish quickly: a small
# MLP on 8x8 digits, 4 steps, one checkpoint at the end.
TINY_CONFIG = textwrap.dedent(f"""\
    import importlib.util
    import ml_collections
    _spec = importlib.util.spec_from_file_location("_default_config", {str(ROOT / "configs" / "default.py")!r})
    _default = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_default)

    def get_config(arg=None):
      c = _default.get_config()
      c.num_train_steps = 4
      c.batch_size = 8
      c.data.resolution = 8
      c.data.max_examples = 64
      c.model = ml_collections.ConfigDict(
          dict(name="mlp", data_dim=64, model_channels=32, num_blocks=1))
      c.optim.warmup_steps = 1
      c.consistency.weight = 0.0
      c.log_every_steps = 2
      c.checkpoint.every_steps = 4
      c.sample.every_steps = 0
      c.sample.num_images = 4
      c.sample.num_steps = 2
      return c
    """)


def local(n, *args, env=None, timeout=240):
  full_env = {**os.environ, **(env or {})}
  full_env["XLA_FLAGS"] = xla_test_flags.COMPILE_FLAGS  # local.sh adds the device count per process
  t0 = time.time()
  r = subprocess.run(["bash", str(LOCAL), str(n), *map(str, args)], capture_output=True,
                     text=True, env=full_env, cwd=ROOT, timeout=timeout)
  return r, time.time() - t0


def test_probe_two_processes_share_one_array(tmp_path):
  (tmp_path / "mp_probe.py").write_text(PROBE)
  r, wall = local(2, "--cpu-devices=2", "--module=mp_probe", f"--log-dir={tmp_path / 'logs'}",
                  "--timeout=120", env={"PYTHONPATH": f"{tmp_path}:{ROOT}"})
  assert r.returncode == 0, r.stdout + r.stderr
  probes = sorted(line for line in r.stdout.splitlines() if "PROBE" in line)
  assert probes == [
      "[proc 0] PROBE process=0/2 devices=4 rows=0:4 total=140.0",
      "[proc 1] PROBE process=1/2 devices=4 rows=4:8 total=140.0",  # sum of 0² .. 7²
  ], r.stdout
  assert "# proc 0: exit 0" in r.stdout and "# proc 1: exit 0" in r.stdout
  print(f"probe: 2 processes x 2 devices in {wall:.1f}s")


def test_one_failing_process_stops_all(tmp_path):
  (tmp_path / "mp_probe.py").write_text(PROBE)
  r, wall = local(2, "--module=mp_probe", f"--log-dir={tmp_path / 'logs'}", "--timeout=120", "--",
                  "--fail_early=1", env={"PYTHONPATH": f"{tmp_path}:{ROOT}"})
  assert r.returncode == 5, r.stdout + r.stderr
  assert "proc 1 exited with status 5; stopping the others" in r.stderr
  assert "# proc 1: exit 5" in r.stdout
  assert wall < 60  # process 0 was stopped, not left waiting for its peer


def _losses(log_text):
  return re.findall(r"step (\d+)/\d+\s+loss (\S+)", log_text)


def test_train_two_processes(tmp_path):
  config = tmp_path / "tiny.py"
  config.write_text(TINY_CONFIG)
  workdir = tmp_path / "run"
  r, wall = local(2, "--cpu-devices=1", "--quiet", "--timeout=200", "--",
                  f"--config={config}", f"--workdir={workdir}")
  logs = {i: (workdir / "local_logs" / f"proc_{i}.log").read_text() for i in range(2)}
  tails = "\n".join(f"--- proc {i} ---\n" + "\n".join(t.splitlines()[-25:]) for i, t in logs.items())
  assert r.returncode == 0, r.stdout + r.stderr + tails
  print(f"2-process training ({config.name}, 4 steps): {wall:.1f}s wall")

  # Both processes ran the same global steps and saw the same (replicated) loss.
  losses = [_losses(logs[i]) for i in range(2)]
  assert [s for s, _ in losses[0]] == ["2", "4"], tails
  assert losses[0] == losses[1]
  for i in range(2):
    assert "on 2 devices (mesh {'data': 2, 'fsdp': 1})" in logs[i]

  # Files of the run are written once, by process 0.
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows] == [2, 4]
  for row, (_, logged) in zip(rows, losses[0]):
    assert np.isfinite(row["loss"]) and abs(row["loss"] - float(logged)) < 1e-3
  assert json.loads((workdir / "config.json").read_text())["num_train_steps"] == 4
  assert sorted(p.name for p in (workdir / "samples").iterdir()) == ["step_0000004.png"]

  # One complete checkpoint (no leftover temporary directory), readable here.
  ckpt = workdir / "checkpoints"
  assert sorted(p.name for p in ckpt.iterdir()) == ["4"]
  assert (ckpt / "4" / "commit_success.txt").exists() or (ckpt / "4" / "_CHECKPOINT_METADATA").exists()
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.PyTreeCheckpointer()
  structure = checkpointer.metadata(ckpt / "4" / "state")
  structure = getattr(getattr(structure, "item_metadata", structure), "tree", structure)
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), structure)
  state = checkpointer.restore(ckpt / "4" / "state", args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  checkpointer.close()
  assert sorted(state) == ["ema", "opt_state", "params", "step"]
  assert int(state["step"]) == 4
  leaves = jax.tree.leaves(state["params"])
  assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)
  meta = json.loads(next((ckpt / "4" / "meta").glob("metadata")).read_text())
  assert meta["step"] == 4 and meta["num_devices"] == 2
