"""Evaluate a trained run: `python -m ambient_jax.evaluate --workdir=DIR [options]`.

Restores DIR's checkpoint (latest, or --step; `evaluation.run`), takes an
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

Latent fine-tuning runs (config.json with latent.pretrained) are evaluated by
`evaluation.latent.evaluate_latent`: guided samples for the fine-tuning prompts, decoded;
fid (and fd / kid for gray digits-like images); the memorization attack in latent space
at DDPM step --attack_t, optionally calibrated on --heldout_images. Their LoRA adapters
are exported for diffusers by `python -m ambient_jax.export_lora`.

A mistake (a flag, a workdir that is not a run, missing weights) is one line and exit
status 2 or 1, as for ambient_jax.main (`ambient_jax.cli`); --traceback shows the traceback.
This module parses flags and dispatches (`evaluation.evaluators.evaluate`, also importable
from here as `ambient_jax.evaluate.evaluate`).
"""

from __future__ import annotations

from ambient_jax import cli
from ambient_jax.evaluation.common import METRICS, check_metrics
from ambient_jax.evaluation.evaluators import LATENT_OPTIONS, PIXEL_OPTIONS, evaluate  # pylint: disable=unused-import
from ambient_jax.evaluation.pixel import SAMPLING_MODES
from ambient_jax.evaluation.run import load_config
from ambient_jax.training import tasks


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {argv[1:]}: flags are written --name=value.")
  f = flags.FLAGS
  metrics = f.metrics
  if metrics is not None:  # a mistake in the flags first, before the workdir is read
    check_metrics([m for m in metrics.split(",") if m], f.inception_weights)
  else:  # the default: what applies to the run's kind
    metrics = ("memorization" if tasks.is_latent(load_config(f.workdir))
               else "fd,kid,memorization")
  evaluate(f.workdir, step=f.step, sampling=f.sampling, num_samples=f.num_samples,
           metrics=[m for m in metrics.split(",") if m], ema=f.ema, seed=f.seed,
           num_steps=f.num_steps, batch_size=f.batch_size, truncate_sigma=f.truncate_sigma,
           inception_weights=f.inception_weights, attack_images=f.attack_images,
           posterior_steps=f.posterior_steps, cache_dir=f.cache_dir or None,
           # kind-specific flags only when given (the evaluator refuses the other kind's)
           **{k: f[k].value for k in LATENT_OPTIONS + PIXEL_OPTIONS if f[k].present})


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Training workdir to evaluate.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_enum("sampling", "full", SAMPLING_MODES, "Sampler.")
  flags.DEFINE_integer("num_samples", 1000, "Number of generated images.")
  flags.DEFINE_string("metrics", None, f"Comma-separated subset of {METRICS} (default: "
                      "fd,kid,memorization; latent runs: memorization).")
  flags.DEFINE_integer("ema", 0, "Which EMA (index into config.ema.halflife_kimg); -1 = raw params.")
  flags.DEFINE_integer("seed", 0, "Sample k uses fold_in(key(seed), k).")
  flags.DEFINE_integer("num_steps", None, "Sampler steps (default: 18 EDM Heun steps; latent "
                       "runs: config.latent.sample_steps Euler steps).")
  flags.DEFINE_integer("batch_size", 256, "Images per sampler call (does not change the images).")
  flags.DEFINE_float("truncate_sigma", -1.0, "Truncated sampling level (VE σ; latent runs: of "
                     "the latent VE view); -1 = the run's largest σ_n.")
  flags.DEFINE_float("s_churn", 40.0, "S_churn of --sampling=stochastic.")
  flags.DEFINE_string("inception_weights", None, "FID Inception weights (.npz from the converter, "
                      "or pytorch-fid's .pth with torch installed).")
  flags.DEFINE_float("attack_sigma", None, "Memorization attack noise level (VE σ, [-1, 1] pixels; "
                     "default 5; pixel runs). "
                     "5 ≈ SDXL's t = 800 (METHOD.md §8); near σ = 1 the posterior still sees the "
                     "attacked image, so matches there measure reconstruction as much as memory.")
  flags.DEFINE_integer("attack_images", None, "How many training images to attack (default: 500; "
                       "latent runs: every fine-tuning image).")
  flags.DEFINE_integer("posterior_steps", 32, "Posterior-sampling steps of the attack.")
  # Latent runs only (evaluation/latent.py).
  flags.DEFINE_integer("attack_t", None, "Latent runs: DDPM step of the attack's noise (default "
                       "800, the paper's; VP σ = schedule.vp_sigmas[t]).")
  flags.DEFINE_string("heldout_images", None, "Latent runs: a folder of images NOT in the "
                      "fine-tuning set, to calibrate what counts as a copy.")
  flags.DEFINE_float("guidance_scale", None, "Latent runs: classifier-free guidance of the samples "
                     "(default config.latent.guidance_scale).")
  flags.DEFINE_float("attack_guidance", None, "Latent runs: guidance of the attack's denoiser "
                     "(default 1: the conditional MMSE denoiser under the image's own prompt).")
  flags.DEFINE_enum("attack_features", None, ["auto", "pixels", "digits", "inception"],
                    "Latent runs: features of the nearest-neighbour search (default auto: "
                    "Inception with --inception_weights, digit net for gray images, else pixels).")
  flags.DEFINE_string("cache_dir", "", "Cache for the digit feature net and FID reference stats "
                      "(default $AMBIENT_JAX_CACHE or ~/.cache/ambient_jax).")


if __name__ == "__main__":
  _define_flags()
  cli.run(main, "ambient_jax.evaluate")
