"""Checkpoints: exact resume, restore onto another device count, half-written checkpoints are
never used, SIGTERM saves before exit, a killed run resumes."""

import json
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from ambient_jax.runtime import checkpoint, sharding
from ambient_jax.training import trainer as train
from ambient_jax.training import state as ts
from tests import xla_test_flags
from tests.test_train import ROOT, shared_tfds_dir, tiny_config


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return shared_tfds_dir(tmp_path_factory)


def _assert_bit_identical(a, b):
  leaves_a, leaves_b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)


def test_resume_is_bit_exact_and_restores_onto_fewer_devices(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir)
  straight = train.Trainer(config, str(tmp_path / "straight"))
  full = straight.run()  # 6 steps, checkpoints at 2, 4, 6
  straight.close()
  assert not (tmp_path / "straight" / "samples").exists()  # sample.every_steps = -1: no grid

  half = tiny_config(tfds_dir, num_train_steps=3)
  first = train.Trainer(half, str(tmp_path / "resumed"))
  assert int(first.run().step) == 3  # ends with a checkpoint at 3
  first.close()
  second = train.Trainer(config, str(tmp_path / "resumed"))  # a fresh start: restores step 3
  assert int(second.initial_state().step) == 3
  resumed = second.run()
  second.close()
  _assert_bit_identical(full, resumed)  # params, optimizer state, both EMAs, step
  # The metrics log describes one run: 2 (first), 3 (end of first), 4, 6.
  steps = [json.loads(l)["step"] for l in (tmp_path / "resumed" / "metrics.jsonl").open()]
  assert steps == [2, 3, 4, 6]

  # Written on 8 devices, restored onto 2: same values, laid out on the 2-device mesh.
  two = train.Trainer(config, str(tmp_path / "straight"), devices=jax.devices()[:2])
  restored = two.initial_state()
  _assert_bit_identical(full, restored)
  assert len(restored.params["backbone"]["proj_in"]["kernel"].sharding.device_set) == 2
  two.close()


def test_resume_is_bit_exact_with_gradient_accumulation(tfds_dir, tmp_path):
  """k = 2 micro-batches over 8 devices: 4 steps straight equal 2 steps, a restart and 2
  more, bit for bit (the consistency term on from step 2)."""
  config = tiny_config(tfds_dir, num_train_steps=4, **{"optim.grad_accum_steps": 2})
  straight = train.Trainer(config, str(tmp_path / "straight"))
  full = straight.run()
  straight.close()
  first = train.Trainer(tiny_config(tfds_dir, num_train_steps=2, **{"optim.grad_accum_steps": 2}),
                        str(tmp_path / "resumed"))
  first.run()
  first.close()
  second = train.Trainer(config, str(tmp_path / "resumed"))
  assert int(second.initial_state().step) == 2
  resumed = second.run()
  second.close()
  _assert_bit_identical(full, resumed)


def test_keep_last_n_plus_every_k_and_half_written_checkpoints_are_never_picked_up(
    tfds_dir, tmp_path):
  config = tiny_config(tfds_dir, num_train_steps=5, **{
      "checkpoint.every_steps": 1, "checkpoint.max_to_keep": 1,
      "checkpoint.keep_every_steps": 2})
  trainer = train.Trainer(config, str(tmp_path / "w"))
  state = trainer.run()
  trainer.close()
  ckpt_dir = tmp_path / "w" / "checkpoints"
  # Listed read-only and closed: a writable manager left open would clean temporary
  # directories in the background, racing with the half-written one made below.
  listed = checkpoint.Checkpointer(str(ckpt_dir), read_only=True)
  assert listed.all_steps() == [2, 4, 5]  # every 2nd + last
  listed.close()
  # What a crash mid-save leaves behind: Orbax's temporary directory, never renamed.
  tmp = ckpt_dir / "6.orbax-checkpoint-tmp"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "garbage").write_bytes(b"\x00" * 100)
  reader = checkpoint.Checkpointer(str(ckpt_dir), read_only=True)  # e.g. evaluation
  assert reader.latest_step() == 5
  mesh = sharding.make_mesh(config.mesh)
  abstract, _ = ts.abstract_train_state(config, mesh, ts.make_optimizer(config.optim))
  _assert_bit_identical(state.params, reader.restore(abstract)[0].params)
  reader.close()
  assert tmp.exists()  # a reader never touches what a live run may be writing
  manager = checkpoint.Checkpointer(str(ckpt_dir))
  assert manager.latest_step() == 5 and manager.all_steps() == [2, 4, 5]
  deadline = time.time() + 30
  while tmp.exists() and time.time() < deadline:  # Orbax cleans it up in the background
    time.sleep(0.2)
  assert not tmp.exists()
  restarted = train.Trainer(config, str(tmp_path / "w"))
  _assert_bit_identical(state, restarted.initial_state())
  restarted.close()
  manager.close()


def test_close_finishes_an_async_save_and_leaves_no_thread_behind(tmp_path):
  """After close() the checkpoint is complete and Orbax's background threads (and their
  event loops) end, so nothing of it runs on, or fails, during later tests. (A closed
  loop's executor thread exits a moment after close() returns: joined, not counted.)"""
  before = set(threading.enumerate())

  def threads_left():
    for t in set(threading.enumerate()) - before:
      t.join(timeout=10)
    return [t.name for t in set(threading.enumerate()) - before]

  writer = checkpoint.Checkpointer(str(tmp_path / "c"))
  state = {"w": jax.numpy.arange(4.0)}
  writer.save(3, state)
  writer.close()
  assert threads_left() == []
  reader = checkpoint.Checkpointer(str(tmp_path / "c"), read_only=True)
  abstract = checkpoint.abstract_like(state, {"w": state["w"].sharding})
  restored, meta = reader.restore(abstract)
  reader.close()
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert meta["step"] == 3 and threads_left() == []


def test_a_leaf_of_another_shape_is_named_by_its_path(tmp_path):
  """Shapes swapped between two leaves (the same multiset of shapes) are refused from the
  metadata, naming each changed leaf, before Orbax reads anything."""
  writer = checkpoint.Checkpointer(str(tmp_path / "c"))
  writer.save(1, {"a": jax.numpy.zeros((2, 3)), "b": {"c": jax.numpy.zeros((3, 2))}})
  writer.close()
  reader = checkpoint.Checkpointer(str(tmp_path / "c"), read_only=True)
  swapped = {"a": jax.numpy.zeros((3, 2)), "b": {"c": jax.numpy.zeros((2, 3))}}
  abstract = checkpoint.abstract_like(swapped, jax.tree.map(lambda x: x.sharding, swapped))
  with pytest.raises(ValueError) as e:
    reader.restore(abstract)
  reader.close()
  assert str(e.value) == ("2 of its 2 arrays have other shapes than this config builds (a: "
                          "checkpoint (2, 3), config (3, 2); b/c: checkpoint (3, 2), config (2, 3))")


def _write_config_file(path: pathlib.Path, tfds_dir) -> pathlib.Path:
  """A config file for subprocess runs: the tiny MLP config, long enough to be interrupted."""
  path.write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(ROOT)!r})\n"
      "from tests.test_train import tiny_config\n\n"
      "def get_config():\n"
      f"  return tiny_config({str(tfds_dir)!r}, num_train_steps=100000, log_every_steps=1,\n"
      "                     **{'checkpoint.every_steps': 1, 'checkpoint.max_to_keep': 2})\n")
  return path


def _start(config_file, workdir, log_path):
  env = xla_test_flags.child_env(1)
  log = open(log_path, "w")  # a file, not a pipe: a full pipe would block the child
  return subprocess.Popen(
      [sys.executable, "-m", "ambient_jax.main", f"--config={config_file}", f"--workdir={workdir}"],
      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _complete_steps(ckpt_dir: pathlib.Path) -> list[int]:
  """Finished checkpoints, read from the directory names only (opening a CheckpointManager
  here would clean up the running job's temporary directories)."""
  return sorted(int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit()) if ckpt_dir.exists() else []


def _wait_for_checkpoint(proc, ckpt_dir: pathlib.Path, log_path, at_least: int, timeout=400):
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, pathlib.Path(log_path).read_text()[-3000:]
    steps = _complete_steps(ckpt_dir)
    if steps and steps[-1] >= at_least:
      return steps[-1]
    time.sleep(0.5)
  proc.kill()
  raise TimeoutError(f"no checkpoint >= {at_least} after {timeout}s:\n"
                     + pathlib.Path(log_path).read_text()[-3000:])


def test_sigterm_saves_and_a_killed_run_resumes(tfds_dir, tmp_path):
  config_file = _write_config_file(tmp_path / "tiny_config.py", tfds_dir)
  workdir = tmp_path / "w"
  ckpt_dir = workdir / "checkpoints"

  # 1. SIGTERM (preemption): the run saves a checkpoint at the step it reached and exits with
  # status 143 (128 + SIGTERM), so that resume loops run it again.
  log1 = tmp_path / "run1.log"
  proc = _start(config_file, workdir, log1)
  _wait_for_checkpoint(proc, ckpt_dir, log1, 3)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=120)
  out = log1.read_text()
  assert proc.returncode == 143, out[-3000:]
  assert "Traceback" not in out
  stopped = int(out.split("ambient_jax.main: stopped at step ")[1].split("/")[0])
  assert _complete_steps(ckpt_dir)[-1] == stopped
  last_logged = [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").open()][-1]
  assert last_logged == stopped

  # 2. The same command resumes from there; SIGKILL it (no chance to clean up) while it
  # writes one checkpoint a step.
  log2 = tmp_path / "run2.log"
  proc = _start(config_file, workdir, log2)
  _wait_for_checkpoint(proc, ckpt_dir, log2, stopped + 3)
  proc.kill()
  proc.wait(timeout=60)
  assert f"Resumed from {ckpt_dir / str(stopped)}" in log2.read_text()

  # 3. Whatever the kill left, the newest complete checkpoint restores, and is newer.
  trainer = train.Trainer(tiny_config(tfds_dir), str(workdir), devices=jax.devices()[:1])
  latest = trainer.checkpointer.latest_step()
  assert latest >= stopped + 3
  assert int(trainer.initial_state().step) == latest
  trainer.close()
