"""Workdirs in a bucket: every file the trainer and the evaluator write outside Orbax goes
through etils.epath, so `--workdir=gs://...` works. Nothing here reaches Google Cloud:
`fake_gcs` routes epath's gs:// backend to a local directory, and a file written with the
plain `open`/`os` functions instead would land in the working directory (as `gs:/...`),
which every test checks stays empty."""

import contextlib
import json
import os

import ml_collections
import numpy as np
import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing

from ambient_jax.runtime import checkpoint, metrics_io, storage
from ambient_jax.runtime import images as images_lib
from ambient_jax.metrics import memorization

BUCKET = "gs://test-bucket/runs/r1"


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://X -> tmp_path/bucket/X for epath; yields where BUCKET lands. The cwd is a
  separate directory that must stay empty."""
  root, cwd = tmp_path / "bucket", tmp_path / "cwd"
  root.mkdir()
  cwd.mkdir()
  monkeypatch.chdir(cwd)

  def translate(p):
    s = os.fspath(p) if isinstance(p, (str, os.PathLike)) else p
    return str(root / s[len("gs://"):]) if isinstance(s, str) and s.startswith("gs://") else p

  def routed(original_fn, *args, **kwargs):
    return original_fn(*map(translate, args), **kwargs)

  @contextlib.contextmanager
  def open_like_tf(original_fn, path, mode):
    """Like epath's TF backend (the one gs:// uses): `open` gives a context manager, so
    code that calls `path.open()` without `with` fails here as it would on GCS."""
    with original_fn(translate(path), mode) as f:
      yield f

  names = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "remove",
           "rename", "replace", "rmtree", "stat", "walk")
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else gs:// goes to tf.io.gfile
  with epath_testing.mock_epath(open=open_like_tf, **{n: routed for n in names}):
    yield root / BUCKET[len("gs://"):]
  assert not os.listdir(cwd), f"something bypassed epath and wrote {os.listdir(cwd)}"


def test_resolve_keeps_bucket_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  assert str(storage.resolve(BUCKET)) == BUCKET
  assert storage.is_remote(BUCKET) and not storage.is_remote("runs/r1")
  monkeypatch.chdir(tmp_path)
  assert str(storage.resolve("runs/r1")) == str(tmp_path / "runs" / "r1")


def test_write_atomic_leaves_no_temporary_file(fake_gcs):
  storage.write_atomic(f"{BUCKET}/a/b.txt", "hello")
  storage.write_atomic(f"{BUCKET}/a/b.txt", "hello again")
  storage.write_atomic(f"{BUCKET}/a/c.bin", b"\x00\x01")
  d = fake_gcs / "a"
  assert sorted(os.listdir(d)) == ["b.txt", "c.bin"]
  assert (d / "b.txt").read_text() == "hello again"
  assert (d / "c.bin").read_bytes() == b"\x00\x01"


def test_config_json_and_metrics_jsonl_in_a_bucket(fake_gcs, monkeypatch):
  cfg = ml_collections.ConfigDict({"lr": 1e-3, "model": {"name": "mlp"}})
  metrics_io.write_config_json(BUCKET, cfg)
  cfg.lr = 2e-3
  metrics_io.write_config_json(BUCKET, cfg)  # second start: reads the old one back
  run_dir = fake_gcs
  assert json.loads((run_dir / "config.json").read_text())["lr"] == 2e-3

  # The jsonl part of MetricsWriter (CLU's TensorBoard writer would talk to real GCS).
  from clu import metric_writers
  monkeypatch.setattr(metric_writers, "create_default_writer",
                      lambda *a, **k: metric_writers.LoggingWriter())
  w = metrics_io.MetricsWriter(BUCKET, start_step=0, is_main=True)
  for step in (1, 2, 3):
    w.write_scalars(step, {"loss": 1.0 / step})
  w.close()
  w = metrics_io.MetricsWriter(BUCKET, start_step=2, is_main=True)  # resumed at step 2
  w.write_scalars(3, {"loss": 0.25})
  w.close()
  lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3] and lines[-1]["loss"] == 0.25


def test_pictures_in_a_bucket(fake_gcs):
  mosaic = np.zeros((8, 8, 1), np.uint8)
  images_lib.save_png(f"{BUCKET}/samples/step_0000010.png", [("a", mosaic)], "title")
  memorization.similarity_histogram_png(f"{BUCKET}/eval/10/hist.png",
                                        {"mmse": np.linspace(0, 1, 20)})
  for rel in ("samples/step_0000010.png", "eval/10/hist.png"):
    data = (fake_gcs / rel).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpointer_hands_orbax_the_bucket_path(fake_gcs, monkeypatch):
  """Orbax gets the gs:// path itself (an abspath would turn it into a local directory);
  without google-cloud-storage the error says how to install it."""
  monkeypatch.setattr(storage, "_has_gcs_client", lambda: False)
  with pytest.raises(ImportError, match=r"pip install -e '\.\[gcs\]'"):
    checkpoint.Checkpointer(f"{BUCKET}/checkpoints")
  storage.check_checkpoint_backend(str(fake_gcs))  # local paths never need it

  seen = []

  class RecordingManager:  # stands in for ocp.CheckpointManager: records, talks to no bucket
    def __init__(self, directory, **kwargs):
      seen.append((directory, kwargs))

  monkeypatch.setattr(storage, "_has_gcs_client", lambda: True)
  monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", RecordingManager)
  ckpt = checkpoint.Checkpointer(f"{BUCKET}/checkpoints")
  assert [str(d) for d, _ in seen] == [f"{BUCKET}/checkpoints"]
  assert ckpt.path(7) == f"{BUCKET}/checkpoints/7"
