"""Evaluation of a latent fine-tuning run (`python -m ambient_jax.evaluate` on its workdir).

A run whose task is "latent" comes here (`evaluation.evaluators.evaluate` dispatches;
`evaluation.run` restores it). What it does, with the paper's settings (METHOD.md
§6, §8, §10):
  - samples: guided Euler over diffusers' σ list (config.latent.sample_steps, guidance
    config.latent.guidance_scale unless given), `full` down to σ = 0 or `truncated` at the
    dataset's σ_n with one Tweedie step (`training.latent_grid.guided_sample`); sample k starts from
    the latent of fold_in(key(seed), k) under the prompt of fine-tuning example k mod N
    (its precomputed embeddings); decoded by the VAE.
  - fid: FID of the decoded samples against the clean fine-tuning images (Inception weights
    file as for pixel runs). fd / kid: the digit feature network, only when the
    fine-tuning images are grayscale (digits-like data; R = G = B), else a clear error.
  - memorization: the attack of §8 in latent space. Fine-tuning image i (re-read from its
    folder) is encoded to its posterior-mean latent z0[i], noised at DDPM step t
    (--attack_t): VP x_t = √(1 − σ_t²) z0 + σ_t ε, i.e. VE x = z0 + σ^VE_t ε with
    σ^VE_t = schedule.ve_sigmas[t], ε from fold_in(key, i); reconstructed by one MMSE
    step D(x, σ^VE_t) = (x_t − σ_t ε̂(x_t, t)) / √(1 − σ_t²) and by posterior sampling
    from σ^VE_t down to the schedule's smallest σ, under the image's own prompt (guidance
    --attack_guidance, 1 = the conditional MMSE denoiser) — `latent_attack.attack_latents`,
    the implementation `python -m ambient_jax.attack` runs too; decoded and compared with the
    clean fine-tuning images by `metrics.memorization` (nearest neighbour by centred
    feature cosine and pixel RMSE, fractions above 0.9 / 0.95, self-match rate). With
    --heldout_images=DIR (images not in the fine-tuning set) a copy is calibrated as for
    pixel runs (`memorization.heldout_baseline`); without, the raw similarities only.
    Features (--attack_features): auto = Inception pool features when --inception_weights
    is given, else the digit network for gray images, else pixels (centred cosine).
--truncate_sigma is a VE σ here too (the latent model's VE view; default: the dataset's
σ_n converted, σ_VP / √(1 − σ_VP²)). --num_samples cycles over the fine-tuning prompts.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ambient_jax import errors
from ambient_jax.evaluation import common, features, latent_attack, run as run_lib
from ambient_jax.runtime import storage
from ambient_jax.latent import lora
from ambient_jax.training import latent_grid, tasks

SAMPLING_MODES = ("full", "truncated")
METRICS = ("fd", "kid", "fid", "memorization")
FEATURES = ("auto", "pixels", "digits", "inception")  # --attack_features (features.FEATURES)


class NotLatentRunError(errors.UserError, ValueError):
  """A latent-only command (LoRA export) was given a pixel run's workdir."""


class LatentRun:
  """A restored latent run: its LatentTask (frozen base UNet, prepared dataset, schedule)
  and the chosen trainable tree (LoRA adapters, or the whole UNet for a full fine-tune).

  params: EMA `ema` of the trainable tree, or the raw parameters when ema < 0.
  `model()` is the UNet with them over the frozen base. base_weights=False leaves the base
  abstract (nothing read; LoRA export needs only the adapters).
  """

  def __init__(self, workdir: str, step: Optional[int] = None, ema: int = 0,
               devices: Optional[Sequence[jax.Device]] = None, config: Any = None,
               base_weights: bool = True):
    from ambient_jax.runtime import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    from ambient_jax.training import state as ts  # pylint: disable=g-import-not-at-top
    from ambient_jax.training import latent as training  # pylint: disable=g-import-not-at-top
    self.root = storage.resolve(workdir)
    self.workdir = str(self.root)
    self.config = config if config is not None else run_lib.load_config(self.workdir)
    if not tasks.is_latent(self.config):
      raise NotLatentRunError(f"--workdir={workdir} is a pixel-space run (its config.json has no "
                              "latent.pretrained); this needs a latent fine-tuning run "
                              "(configs/sdxl.py).")
    self.mesh = run_lib.eval_mesh(self.config, devices)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh)
    self.task = training.LatentTask(self.config, self.mesh, base_weights=base_weights)
    tx = ts.make_optimizer(self.config.optim)
    init, init_args = self.task.init(tx)
    abstract, shardings = ts.abstract_train_state(self.config, self.mesh, tx, init, init_args)
    state, self.meta = run_lib.restore_state(self.root, abstract, step)
    self.step = int(jax.device_get(state.step))
    self.params, self.param_shardings, self.weights = run_lib.select_weights(
        state, shardings, self.config, ema)
    self.dataset, self.schedule = self.task.dataset, self.task.schedule
    self.sigma_n_max = self.task.sigma_n_max  # VP
    self._vae = self._coder = None
    self.attack_jit_cache = {}  # the attack's jitted functions, shared with initial()

  @property
  def vae(self):
    """The pretrained folder's VAE (float32), loaded on first use."""
    if self._vae is None:
      from ambient_jax.latent import vae as vae_lib  # pylint: disable=g-import-not-at-top
      self._vae, _ = vae_lib.load_vae(os.path.join(self.task.pretrained, "vae"),
                                      attention=str(self.config.latent.get("attention", "auto")))
    return self._vae

  @property
  def coder(self):
    """`vae_coder(self)`, made once (its compiled functions are reused)."""
    if self._coder is None:
      self._coder = vae_coder(self)
    return self._coder

  def initial(self) -> "LatentRun":
    """This run at step 0 with its initial trainable tree (zero-B adapters, or the
    pretrained UNet of a full fine-tune): the pretrained model, judged by the same path.
    Shares the task, VAE and compiled coder; only the parameters differ."""
    other = copy.copy(self)
    other.params = jax.tree.map(
        lambda a, like: jax.device_put(jnp.asarray(a, like.dtype), like.sharding),
        self.task.trainable_init, self.params)
    other.step = 0
    return other

  def model(self):
    """The UNet with the restored trainable tree over the frozen base."""
    return self.task.unet(self.params, self.task.frozen)

  def objective(self) -> str:
    from ambient_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
    return step_lib.objective(self.config, self.step, self.sigma_n_max)


def export_lora(run: LatentRun, out: str, dtype: Any = None) -> str:
  """Writes the run's adapters (α / r folded into B) as a diffusers LoRA safetensors file
  that `pipe.load_lora_weights` loads; returns its path. A full fine-tune has none."""
  if int(run.config.latent.lora_rank) <= 0:
    raise errors.UsageError(f"{run.workdir} is a full fine-tune (config.latent.lora_rank = 0): it "
                         "has no LoRA adapters to export.")
  lora.save_lora(run.model(), out, dtype=dtype)
  return out


# ----------------------------------------------------------------------------- pieces


def _cond_keys(batch: dict) -> dict:
  """The conditioning arrays of a dataset batch (context; SDXL text_embeds, time_ids)."""
  return {k: batch[k] for k in ("context", "text_embeds", "time_ids") if k in batch}


def vae_coder(run: LatentRun, batch_size: int = 32):
  """(encode, decode): images [n, R, R, 3] in [-1, 1] <-> latents [n, h, w, C] (the
  posterior mean, × scaling factor), jitted with the VAE weights as arguments
  (`latent_attack.vae_coder`)."""
  return latent_attack.vae_coder(run.vae, batch_size)


def clean_images(run: LatentRun, indices: Optional[Sequence[int]] = None) -> np.ndarray:
  """The clean fine-tuning images [n, R, R, 3] in [-1, 1], re-read from their folder."""
  ds = run.dataset
  indices = range(ds.num_examples) if indices is None else indices
  return np.stack([ds.clean_image(int(i)) for i in indices]).astype(np.float32) / 127.5 - 1.0


def read_image_folder(folder: str, resolution: int) -> np.ndarray:
  """Every image under `folder`, resized and cropped as the fine-tuning set was:
  [n, R, R, 3] in [-1, 1]. A missing or empty folder is one line."""
  from ambient_jax.data.image_folder import ImageFolder  # pylint: disable=g-import-not-at-top
  images = ImageFolder(folder, resolution, flag="--heldout_images")
  return images.read(range(len(images)))


def make_sampler(run: LatentRun, mode: str, sigmas: np.ndarray, sigma_stop: float,
                 guidance_scale: float):
  """sample_fn((trainable, frozen), keys [B], batch) -> x0 latents [B, h, w, C] for
  `common.generate`: image b starts from latents_from_keys(keys[b]) under the prompt
  in `batch` (its context / text_embeds / time_ids rows)."""
  from ambient_jax import sampling  # pylint: disable=g-import-not-at-top
  shape, uncond, task = run.dataset.latent_shape, run.task.uncond, run.task
  stop = sigma_stop if mode == "truncated" else 0.0

  def sample(params, keys, batch):
    cond, unc = latent_grid.batch_conditioning(batch, uncond)
    return latent_grid.guided_sample(task.unet(*params), run.schedule, cond, unc, guidance_scale,
                                     sampling.latents_from_keys(keys, shape), sigmas, stop)

  return sample


def attack_model(run: LatentRun) -> "latent_attack.AttackModel":
  """The run's UNet (trainable tree over the frozen base), schedule and dropped prompt, as
  the attack runs them."""
  return latent_attack.AttackModel(run.task.unet, run.params, run.task.frozen, run.schedule,
                                   run.task.uncond, jit_cache=run.attack_jit_cache)


def attack_latents(run: LatentRun, z0: np.ndarray, *, attack_t: int, key: jax.Array,
                   num_attacked: Optional[int] = None, posterior_steps: int = 32,
                   batch_size: int = 16, guidance_scale: float = 1.0,
                   methods=("mmse", "posterior"), log=None):
  """The attack's reconstructions in latent space (VE view: latent = z0 + σ^VE_t ε), by
  `latent_attack.attack_latents` with evaluate's choices: each fine-tuning example's own
  prompt, one guidance for both methods, ancestral posterior sampling from σ^VE_t down to
  the schedule's smallest σ in `posterior_steps` steps.

  z0: clean latents [N, h, w, C] of fine-tuning examples 0..N−1 (their prompts condition
  the model). Returns (attacked indices [n], {"noisy_input", *methods: latents [n, h, w, C]}).
  """
  n = len(z0) if num_attacked is None else min(num_attacked, len(z0))
  prompts = _cond_keys(run.dataset.get_batch(np.arange(n)))
  return latent_attack.attack_latents(
      attack_model(run), z0[:n], prompts, t=attack_t, key=key, methods=methods,
      posterior="ancestral", posterior_steps=posterior_steps, guidance_scale=guidance_scale,
      mmse_guidance=guidance_scale, batch_size=batch_size, log=log)


def sample_images(run: LatentRun, mode: str, num_samples: int, *, seed: int, num_steps: int,
                  guidance_scale: float, sigma_stop: float, batch_size: int = 256) -> np.ndarray:
  """Decoded samples [num_samples, R, R, 3] in [-1, 1], quantized as saved images: image k
  from fold_in(key(seed), k) under the prompt of fine-tuning example k mod N, guided Euler
  over diffusers' σ list, `full` or `truncated` at VE `sigma_stop` (one Tweedie step)."""
  ds = run.dataset
  sample_fn = make_sampler(run, mode, run.schedule.inference_sigmas(num_steps), sigma_stop,
                           guidance_scale)
  frozen_sh = jax.tree.map(lambda a: a.sharding, run.task.frozen)
  latents = common.generate(
      sample_fn, (run.params, run.task.frozen), num_samples, seed=seed, batch_size=batch_size,
      batch_sharding=run.batch_sharding, param_sharding=(run.param_shardings, frozen_sh),
      inputs=lambda idx: _cond_keys(ds.get_batch(idx % ds.num_examples)))
  return common.quantize(np.clip(run.coder[1](latents), -1.0, 1.0))


def evaluate_latent(workdir: str, *, step: Optional[int] = None, sampling: str = "full",
                    num_samples: int = 1000, metrics: Sequence[str] = ("memorization",),
                    ema: int = 0, seed: int = 0, num_steps: Optional[int] = None,
                    batch_size: int = 256, truncate_sigma: float = -1.0,
                    guidance_scale: Optional[float] = None,
                    inception_weights: Optional[str] = None, attack_t: int = 800,
                    attack_images: Optional[int] = None, posterior_steps: int = 32,
                    attack_guidance: float = 1.0, attack_features: str = "auto",
                    heldout_images: Optional[str] = None, kid_subset_size: int = 1000,
                    cache_dir: Optional[str] = None, feature_steps: Optional[int] = None,
                    run: Optional[LatentRun] = None, devices=None) -> dict:
  """Evaluates a latent workdir (see the module docstring); returns the metrics dict also
  written to DIR/eval/STEP/metrics.json. `run`: an already restored LatentRun."""
  from ambient_jax import precond  # pylint: disable=g-import-not-at-top
  from ambient_jax.metrics import digit_features, frechet  # pylint: disable=g-import-not-at-top
  log = run_lib.log_message
  if sampling not in SAMPLING_MODES:
    raise errors.UsageError(f"--sampling={sampling!r}: latent runs sample {SAMPLING_MODES} "
                         "(guided Euler, as diffusers).")
  metrics = common.check_metrics(metrics, inception_weights)
  if attack_features not in FEATURES:
    raise errors.UsageError(f"--attack_features={attack_features!r}: expected one of {FEATURES} "
                            "(DINOv2: python -m ambient_jax.attack --workdir=DIR "
                            "--features=dinov2).")
  if attack_features == "inception" and not inception_weights:
    raise errors.UsageError("--attack_features=inception needs --inception_weights=FILE.")
  if heldout_images is not None and not os.path.isdir(heldout_images):
    raise errors.UserError(f"--heldout_images={heldout_images}: no such folder.")
  cache_dir = cache_dir or digit_features.default_cache_dir()
  t_start = time.time()
  run = run if run is not None else LatentRun(workdir, step, ema, devices=devices)
  sched, ds, lc = run.schedule, run.dataset, run.config.latent
  num_t = sched.num_train_timesteps
  if not 0 < attack_t < num_t:
    raise errors.UsageError(f"--attack_t={attack_t}: a DDPM step in [1, {num_t - 1}] (paper: 800).")
  sigma_stop = (float(precond.vp_to_ve_sigma(run.sigma_n_max)) if truncate_sigma < 0
                else float(truncate_sigma))
  if sampling == "truncated" and not sigma_stop > 0:
    raise errors.UsageError("--sampling=truncated needs a noise level > 0 (the run was fine-tuned on "
                         "clean latents; pass --truncate_sigma=S, VE, to truncate anyway).")
  num_steps = int(num_steps or lc.sample_steps)
  g = float(lc.guidance_scale if guidance_scale is None else guidance_scale)
  log(f"restored {run.workdir} step {run.step} ({run.weights}); {ds.num_examples} fine-tuning "
      f"latents {ds.latent_shape} from {ds.path}, σ_n VP max {run.sigma_n_max:g}")
  clean = clean_images(run)
  feature_name, feature_fn, net = None, None, None
  space = functools.partial(features.feature_space, gray=features.is_grayscale(clean),
                            resolution=clean.shape[1], inception_weights=inception_weights,
                            cache_dir=cache_dir, feature_steps=feature_steps)
  if {"fd", "kid"} & set(metrics):
    net = space("digits").net
  if "memorization" in metrics:
    feature_name, feature_fn, net_m, _ = space(attack_features)
    net = net or net_m
  heldout = None if heldout_images is None else read_image_folder(heldout_images, clean.shape[1])
  t0 = time.time()
  samples = sample_images(run, sampling, num_samples, seed=seed, num_steps=num_steps,
                          guidance_scale=g, sigma_stop=sigma_stop, batch_size=batch_size)
  out_dir = run.root / "eval" / str(run.step)
  result: dict[str, Any] = dict(
      workdir=run.workdir, step=run.step, weights=run.weights, kind="latent",
      pretrained=run.task.pretrained, dataset=ds.path, num_examples=ds.num_examples,
      sigma_n_vp=run.sigma_n_max, objective=run.objective(), sampling=sampling,
      num_samples=num_samples, seed=seed, num_steps=num_steps, guidance_scale=g,
      sigma_stop=sigma_stop if sampling == "truncated" else None,
      sample_seconds=time.time() - t0,
      samples_png=common.save_grid(str(out_dir / f"samples_{sampling}.png"), samples,
                                     f"{os.path.basename(run.workdir)} step {run.step} "
                                     f"({run.objective()}), {sampling}, guidance {g:g}"))
  if {"fd", "kid"} & set(metrics):
    result["feature_net_test_accuracy"] = net.test_accuracy
    ref_feats, sample_feats = net.features(clean[..., :1]), net.features(samples[..., :1])
    if "fd" in metrics:
      result["fd_digits"] = frechet.fd_from_features(sample_feats, ref_feats)
    if "kid" in metrics:
      result["kid_digits"], result["kid_digits_std"] = frechet.kernel_inception_distance(
          sample_feats, ref_feats, num_subsets=50, subset_size=kid_subset_size, seed=seed)
  if "fid" in metrics:
    r = clean.shape[1]
    where = hashlib.sha256(ds.path.encode()).hexdigest()[:8]  # same-named datasets differ
    name = f"latent_{os.path.basename(ds.path)}_{where}_{r}x{r}_n{ds.num_examples}"
    result.update(common.fid(samples, inception_weights, cache_dir, name, lambda: clean))
    log(f"FID = {result['fid']:.3f}")
  if "memorization" in metrics:
    result.update(memorization_report(
        run, clean, samples, feature_name, feature_fn, heldout, out_dir,
        attack_t=attack_t, key=jax.random.key(seed + 1), num_attacked=attack_images,
        posterior_steps=posterior_steps, batch_size=min(batch_size, 64),
        guidance_scale=attack_guidance))
  result["seconds"] = time.time() - t_start
  common.write_metrics(out_dir, result)
  return result


def memorization_report(run, clean, samples, feature_name, feature_fn, heldout, out_dir, *,
                        attack_t, key, num_attacked, posterior_steps, batch_size,
                        guidance_scale, index=None) -> dict:
  """The attack on the clean fine-tuning images [N, R, R, 3] + the nearest fine-tuning
  image of each sample, copies calibrated on `heldout` images when given (else None):
  {"memorization": {..., "samples": {...}}, "memorization_png", "attack_png": paths}.
  `index`: a `NearestNeighbourIndex` over `clean` with `feature_fn` already built (runs
  judged against one fine-tuning set can share it)."""
  from ambient_jax.metrics import memorization  # pylint: disable=g-import-not-at-top
  from ambient_jax.runtime.images import save_png, tile  # pylint: disable=g-import-not-at-top
  log, sched = run_lib.log_message, run.schedule
  index = index or memorization.NearestNeighbourIndex(clean, feature_fn)
  calibration = copy_rmse = None
  if heldout is not None:
    calibration = memorization.heldout_baseline(index, heldout)
    copy_rmse = calibration["copy_rmse"]
  encode, decode = run.coder
  z0 = encode(clean)
  attacked, recon = attack_latents(run, z0, attack_t=attack_t, key=key,
                                   num_attacked=num_attacked, posterior_steps=posterior_steps,
                                   batch_size=batch_size, guidance_scale=guidance_scale, log=log)
  sigma_vp, sigma_ve = float(sched.vp_sigmas[attack_t]), float(sched.ve_sigmas[attack_t])
  # The noisy input is decoded as the model sees it: VP x_t = √(1 − σ_t²) (z0 + σ^VE ε).
  recon["noisy_input"] = latent_attack.vp_view(recon["noisy_input"], sched, attack_t)
  images = {m: common.quantize(np.clip(decode(z), -1.0, 1.0)) for m, z in recon.items()}
  attack = memorization.compare(images, index, attacked, sigma_ve, copy_rmse)
  nn_summary, nn_sims = memorization.nearest_neighbours(samples, index=index, copy_rmse=copy_rmse)
  summary = dict(attack.summary, samples=nn_summary, attack_t=attack_t, attack_sigma_vp=sigma_vp,
                 attack_sigma_ve=sigma_ve, attack_guidance=guidance_scale,
                 posterior_steps=posterior_steps, features=feature_name, heldout=calibration,
                 attacked_clean_images=True)
  sims = {m: attack.similarities[m] for m in ("mmse", "posterior")}
  sims["samples"] = nn_sims
  out = {"memorization": summary, "memorization_png": str(out_dir / "memorization_hist.png"),
         "attack_png": str(out_dir / f"attack_t{attack_t}.png")}
  if jax.process_index() == 0:
    memorization.similarity_histogram_png(
        out["memorization_png"], sims,
        f"step {run.step}: attack at t={attack_t} (σ VP {sigma_vp:.3f}), {feature_name}")
    k = min(16, len(attacked))
    save_png(out["attack_png"], [("clean", tile(clean[:k])),
                                 (f"noised at t={attack_t}", tile(images["noisy_input"][:k])),
                                 ("MMSE", tile(images["mmse"][:k])),
                                 (f"posterior ({posterior_steps} steps)",
                                  tile(images["posterior"][:k]))],
             f"memorization attack, step {run.step}")
  log("memorization: " + ", ".join(
      f"{m} >0.95 {summary[m]['frac_sim_above_0.95']:.3f} self-match "
      f"{summary[m]['self_match_features']:.3f}" for m in ("mmse", "posterior")))
  return out
