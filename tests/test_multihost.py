"""Two local CPU processes form one multi-host JAX job (jax.distributed + gloo), train a few
steps together, and end with the same parameters as one process with the same 4 devices;
then they sample from the checkpoint together (`eval_common.generate`) and get the same images
as one process.

Run as a script (`python tests/test_multihost.py worker ...`) this file is one of the workers.
"""

import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 4
NUM_SAMPLES = 12  # not a multiple of the 4 devices: the padded tail batch is exercised too


def _sample_from_checkpoint(workdir, devices=None):
  """Images 0..NUM_SAMPLES-1 of the run's EMA, 4-step deterministic sampler."""

  from ambient_jax.evaluation import common as eval_common  # pylint: disable=g-import-not-at-top
  from ambient_jax.evaluation import pixel as pixel_eval  # pylint: disable=g-import-not-at-top
  run = pixel_eval.Run(workdir, devices=devices)
  fn = pixel_eval.make_sampler(run.model_def, run.dataset.image_shape, "full", num_steps=4)
  return eval_common.generate(fn, run.params, NUM_SAMPLES, seed=3, batch_size=8,
                           batch_sharding=run.batch_sharding, param_sharding=run.param_shardings,
                           log=None)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker(process_id: int, port: int, workdir: str, tfds_dir: str) -> None:
  sys.path.insert(0, str(ROOT))
  from ambient_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  import jax  # pylint: disable=g-import-not-at-top
  from ambient_jax.training import trainer as train  # pylint: disable=g-import-not-at-top
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top
  state = train.train_and_evaluate(tiny_config(tfds_dir, num_train_steps=STEPS), workdir)
  leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
  digest = hashlib.sha256(b"".join(l.tobytes() for l in leaves)).hexdigest()
  np.savez(os.path.join(workdir, f"params_{process_id}.npz"), *leaves)
  np.save(os.path.join(workdir, f"samples_{process_id}.npy"), _sample_from_checkpoint(workdir))
  print("RESULT " + json.dumps(dict(process=jax.process_index(), processes=jax.process_count(),
                                    devices=jax.device_count(), local=jax.local_device_count(),
                                    step=int(state.step), digest=digest)), flush=True)
  jax.distributed.shutdown()


def test_two_processes_train_together_and_agree(tmp_path, tmp_path_factory):
  import jax  # pylint: disable=g-import-not-at-top
  from ambient_jax.training import trainer as train  # pylint: disable=g-import-not-at-top
  from tests import xla_test_flags  # pylint: disable=g-import-not-at-top
  from tests.test_train import shared_tfds_dir, tiny_config  # pylint: disable=g-import-not-at-top
  tfds_dir = shared_tfds_dir(tmp_path_factory)
  workdir = tmp_path / "multihost"
  port = _free_port()
  env = xla_test_flags.child_env(2)
  logs = [open(tmp_path / f"proc_{i}.log", "w") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, __file__, "worker", str(i), str(port), str(workdir),
                             str(tfds_dir)], cwd=ROOT, env=env, stdout=logs[i],
                            stderr=subprocess.STDOUT) for i in range(2)]
  try:
    for p in procs:
      p.wait(timeout=600)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outputs = [(tmp_path / f"proc_{i}.log").read_text() for i in range(2)]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  results = [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
             for out in outputs]
  assert [r["process"] for r in results] == [0, 1]
  for r in results:
    assert (r["processes"], r["devices"], r["local"], r["step"]) == (2, 4, 2, STEPS)
  assert results[0]["digest"] == results[1]["digest"]  # both hosts hold the same parameters
  # Process 0 wrote the run's files; the checkpoint is shared.
  assert [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").open()] == [2, 4]
  assert (workdir / "checkpoints" / str(STEPS)).is_dir()

  # One process with the same 4 devices (same mesh shape) gets the same parameters.
  single = train.Trainer(tiny_config(tfds_dir, num_train_steps=STEPS), str(tmp_path / "single"),
                         devices=jax.devices()[:4])
  state = single.run()
  single.close()
  multi = np.load(workdir / "params_0.npz")
  leaves = jax.tree.leaves(jax.device_get(state.params))
  for i, leaf in enumerate(leaves):
    np.testing.assert_allclose(multi[f"arr_{i}"], leaf, rtol=1e-5, atol=1e-7)

  # Sampling: both processes got all images, the same ones one process gets.
  s0, s1 = np.load(workdir / "samples_0.npy"), np.load(workdir / "samples_1.npy")
  assert s0.shape == (NUM_SAMPLES, 8, 8, 1)
  np.testing.assert_array_equal(s0, s1)
  alone = _sample_from_checkpoint(str(workdir), devices=jax.devices()[:4])
  np.testing.assert_allclose(s0, alone, rtol=1e-5, atol=1e-5)
  assert np.std(s0) > 0.1  # real images, not a constant


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
