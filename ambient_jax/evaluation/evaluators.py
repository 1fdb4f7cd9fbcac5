"""`evaluate(workdir, ...)`: evaluates any run with the evaluator of its task.

The run's config.json names its task (`training.tasks.task_name`); EVALUATORS maps it to a
function, imported by name, so this module imports no evaluator. Options that belong to
the other kind of run are a usage error naming them.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence

from ambient_jax import errors
from ambient_jax.evaluation.common import check_metrics
from ambient_jax.evaluation.run import load_config
from ambient_jax.training import tasks

# task name -> "module:function"
EVALUATORS = {
    "pixel": "ambient_jax.evaluation.pixel:evaluate_pixel",
    "latent": "ambient_jax.evaluation.latent:evaluate_latent",
}
LATENT_OPTIONS = ("attack_t", "heldout_images", "guidance_scale", "attack_guidance",
                  "attack_features")
PIXEL_OPTIONS = ("attack_sigma", "s_churn")


def evaluator(name: str):
  """The evaluation function registered for task `name`."""
  module, _, fn = EVALUATORS[name].partition(":")
  return getattr(importlib.import_module(module), fn)


def evaluate(workdir: str, *, metrics: Sequence[str] = ("fd", "kid", "memorization"),
             inception_weights: Optional[str] = None, run: Any = None, **options) -> dict:
  """Evaluates a workdir; returns the metrics dict also written to DIR/eval/STEP/metrics.json.

  Options (keyword, None = the evaluator's default): step, sampling, num_samples, ema,
  seed, num_steps, batch_size, truncate_sigma, inception_weights, attack_images,
  posterior_steps, kid_subset_size, cache_dir, feature_steps; pixel runs also attack_sigma,
  s_churn and sampling="stochastic"; latent runs attack_t, heldout_images, guidance_scale,
  attack_guidance, attack_features. Defaults that differ by kind: num_steps 18 (latent:
  config.latent.sample_steps), attack_images 500 (latent: all). `run`: an already restored
  run of this workdir (skips the restore).
  """
  metrics = check_metrics(metrics, inception_weights)  # before the workdir is read
  config = run.config if run is not None else load_config(workdir)
  name = tasks.task_name(config)
  given = {k: v for k, v in options.items() if v is not None}
  if name == "latent":
    wrong = sorted(k for k in given if k in PIXEL_OPTIONS)
    if options.get("sampling") == "stochastic":
      wrong.append("sampling=stochastic")
    if wrong:
      raise errors.UsageError(f"{', '.join('--' + k for k in wrong)}: for pixel runs only; a "
                              "latent run is attacked at a DDPM step (--attack_t) and sampled "
                              "full or truncated.")
  else:
    wrong = sorted(k for k in given if k in LATENT_OPTIONS)
    if wrong:
      raise errors.UsageError(f"{', '.join('--' + k for k in wrong)}: for latent runs only "
                              f"({workdir} is a pixel-space run).")
  return evaluator(name)(workdir, metrics=metrics, inception_weights=inception_weights,
                         run=run, **given)
