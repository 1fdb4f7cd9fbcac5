"""What the pixel and latent evaluators share: sampling many images with one key per image,
the saved-image round trip, grids, Inception features / FID, and writing metrics.json.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ambient_jax import errors
from ambient_jax.evaluation.run import log_message
from ambient_jax.runtime import images as images_lib
from ambient_jax.runtime import storage

METRICS = ("fd", "kid", "fid", "memorization")


def generate(sample_fn, params, num_samples: int, *, seed: int = 0, batch_size: int = 256,
             batch_sharding=None, param_sharding=None, inputs=None, log=log_message) -> np.ndarray:
  """num_samples images, image k from fold_in(key(seed), k), in fixed-size batches.

  sample_fn(params, keys [B]) -> images [B, ...]; with `inputs`, a function of the image
  indices (int [B]) -> a pytree of host arrays [B, ...] (e.g. each image's prompt),
  sample_fn(params, keys, inputs(indices)). Multi-process: every process calls this with
  the same arguments and gets all images (the batch is split over every process's
  devices, then gathered).
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  n_dev = 1 if batch_sharding is None else int(np.prod(list(batch_sharding.mesh.shape.values())))
  batch_size = max(n_dev, (min(batch_size, num_samples) + n_dev - 1) // n_dev * n_dev)
  extra_sh = () if inputs is None else (batch_sharding,)
  jitted = jax.jit(sample_fn) if batch_sharding is None else jax.jit(
      sample_fn, in_shardings=(param_sharding, batch_sharding) + extra_sh,
      out_shardings=batch_sharding)

  def put(host):  # each process fills its own shards from the same host batch
    if batch_sharding is None:
      return jax.tree.map(jnp.asarray, host)
    return jax.tree.map(lambda a: jax.make_array_from_callback(
        a.shape, batch_sharding, lambda i: a[i]), host)

  base = jax.random.key(seed)
  # The keys are made inside jit, straight into their shards: device_put cannot place a
  # host array on devices that belong to other processes.
  make_keys = jax.jit(lambda start: jax.vmap(lambda i: jax.random.fold_in(base, start + i))(
      jnp.arange(batch_size)), out_shardings=batch_sharding)
  out, t0 = [], time.time()
  for start in range(0, num_samples, batch_size):  # the tail batch is padded with extra images
    extra = () if inputs is None else (put(inputs(np.arange(start, start + batch_size))),)
    images = jitted(params, make_keys(jnp.int32(start)), *extra)
    if not images.is_fully_addressable:
      images = multihost_utils.process_allgather(images, tiled=True)
    out.append(np.asarray(images)[:num_samples - start])
    done = min(start + batch_size, num_samples)
    if log:
      rate = done / max(time.time() - t0, 1e-9)
      log(f"sampled {done}/{num_samples} ({rate:.1f} img/s, ETA {(num_samples - done) / rate:.0f} s)")
  return np.concatenate(out)


def quantize(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> the uint8 grid and back (samples are evaluated as saved images)."""
  return images_lib.from_uint8(images_lib.to_uint8(images))


def save_grid(path: str, images: np.ndarray, title: str) -> str:
  """The first 64 images as a titled PNG (process 0 writes; every process gets the path)."""
  if jax.process_index() == 0:
    images_lib.save_png(path, [("", images_lib.tile(images[:64]))], title)
  return path


def inception_features(weights: Optional[str], log=log_message) -> Callable[..., np.ndarray]:
  """features(images [n, H, W, C] in [-1, 1], what="") -> FID Inception pool features
  [n, 2048], computed 100 at a time (--inception_weights; a missing file is one line)."""
  from ambient_jax.metrics import inception  # pylint: disable=g-import-not-at-top
  fn = inception.make_feature_fn(inception.load_fid_inception(weights))

  def features(images, what: str = "") -> np.ndarray:
    out, t0 = [], time.time()
    for i in range(0, len(images), 100):
      out.append(np.asarray(fn(jnp.asarray(images[i:i + 100]))))
      if log and what:
        log(f"Inception features of {what}: {min(i + 100, len(images))}/{len(images)} "
            f"({time.time() - t0:.0f} s)")
    return np.concatenate(out) if out else np.zeros((0, inception.FEATURE_DIM), np.float32)

  return features


def fid(samples: np.ndarray, weights: Optional[str], cache_dir: str, reference_name: str,
        reference_images: Callable[[], np.ndarray]) -> dict:
  """FID of `samples` [n, H, W, C] in [-1, 1] against `reference_images()` (the clean
  training set), whose statistics are cached under cache_dir/fid_refs/`reference_name`_
  <weights hash>.npz. Returns {"fid", "fid_reference_stats"}."""
  from ambient_jax.metrics import frechet, inception  # pylint: disable=g-import-not-at-top
  features = inception_features(weights)
  ref_path = os.path.join(cache_dir, "fid_refs",
                          f"{reference_name}_{inception.sha256_of(weights)[:12]}.npz")
  if os.path.exists(ref_path):
    with np.load(ref_path) as f:
      mu_ref, cov_ref = f["mu"], f["sigma"]
  else:
    ref = frechet.FeatureStats(inception.FEATURE_DIM)
    ref.update(features(reference_images(), "the clean training set (once, cached)"))
    os.makedirs(os.path.dirname(ref_path), exist_ok=True)
    ref.save(ref_path)
    mu_ref, cov_ref = ref.mean, ref.cov
  s = frechet.FeatureStats(inception.FEATURE_DIM)
  s.update(features(samples, "samples"))
  return {"fid": frechet.frechet_distance(s.mean, s.cov, mu_ref, cov_ref),
          "fid_reference_stats": ref_path}


def check_metrics(metrics: Sequence[str], inception_weights: Optional[str]) -> tuple[str, ...]:
  """The asked-for metrics, checked before any work: unknown names and a missing
  Inception weights file (for fid) are one line each."""
  metrics = tuple(metrics)
  bad = sorted(set(metrics) - set(METRICS))
  if bad:
    raise errors.UsageError(f"--metrics: {bad} not known; allowed: {METRICS}.")
  if "fid" in metrics and not (inception_weights and os.path.exists(inception_weights)):
    from ambient_jax.metrics import inception  # pylint: disable=g-import-not-at-top
    raise inception.MissingInceptionWeightsError(inception._missing_message(inception_weights))  # pylint: disable=protected-access
  return metrics


def write_metrics(out_dir, result: dict) -> None:
  """DIR/eval/STEP/metrics.json, and the numbers as "eval/..." TensorBoard scalars of the
  run (result["workdir"]) at the evaluated step (result["step"]); process 0."""
  from ambient_jax.runtime import metrics_io  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    path = storage.write_atomic(out_dir / "metrics.json",
                                json.dumps(result, indent=1, default=float))
    metrics_io.write_eval_scalars(result["workdir"], result["step"], result)
    log_message(f"wrote {path} and the run's TensorBoard scalars eval/* at step {result['step']}")
