"""The memorization attack of METHOD.md §8, and nearest-neighbour search of samples.

Attack: take training images x0, noise them hard, x = x0 + σ z (VE; σ an option), and
reconstruct them twice with the model:
  - one-step MMSE:        D(x, σ)
  - posterior sampling:   `sampling.ancestral_sampler` started at x at level σ.
Each reconstruction is compared with every training image: cosine similarity of
normalised features (by default features are centred by the training-set mean before
normalising: post-ReLU features are all positive, and without centring every pair of
digits looks alike), and pixel distance. We report the similarity histogram, the
fraction of reconstructions whose nearest training image has similarity > 0.9 ("close
match") and > 0.95 ("almost identical"), and how often that nearest image is the attacked
image itself (self-match). `nearest_neighbours` does the same for plain samples.

Noise draws are one key per attacked image (`fold_in(key, index)`), so results do not
depend on the batch size.
"""

from __future__ import annotations

import dataclasses
import functools
import textwrap
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ambient_jax import sampling
from ambient_jax.runtime import storage

THRESHOLDS = (0.9, 0.95)
FeatureFn = Callable[[np.ndarray], np.ndarray]


def pixel_features(images) -> np.ndarray:
  """Flattened pixels: the feature space when no network is given."""
  images = np.asarray(images, np.float32)
  return images.reshape(images.shape[0], -1)


def gaussian_blur(images, sigma_px: float) -> np.ndarray:
  """Images [N, H, W, C] low-passed by a separable Gaussian of std `sigma_px` pixels
  (edges reflected): the fixed denoiser of the denoised copy measure."""
  images = np.asarray(images, np.float32)
  radius = max(1, int(np.ceil(3 * sigma_px)))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2)
  taps /= taps.sum()
  for axis in (1, 2):
    pad = [(0, 0)] * images.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(images, pad, mode="reflect")
    n = images.shape[axis]
    images = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(taps))
  return images.astype(np.float32)


def matching_noise_sigma(images, clean_images, sigma_max: float,
                         as_output: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                         seed: int = 0, iterations: int = 30) -> float:
  """The Gaussian noise std σ in [0, sigma_max] at which `clean_images` noised (and stored
  by `as_output`) have the same mean high-pass power (x − blur₁ₚₓ(x))² as `images`.

  A model trained on data noised at σ_n may draw outputs with less noise than σ_n (an
  undertrained one draws smoother images); a copy criterion calibrated at σ_n then calls
  them copies. Calibrating at the noise they actually carry avoids that. Bisection on a
  fixed noise draw (`seed`), monotone in σ.
  """
  clean = np.asarray(clean_images, np.float32)
  z = np.random.default_rng(seed).standard_normal(clean.shape).astype(np.float32)
  store = as_output or (lambda x: x)

  def power(x):
    x = np.asarray(x, np.float32)
    return float(np.mean((x - gaussian_blur(x, 1.0)) ** 2))

  target = power(images)
  lo, hi = 0.0, float(sigma_max)
  if power(store(clean + hi * z)) <= target:
    return hi
  for _ in range(iterations):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if power(store(clean + mid * z)) < target else (lo, mid)
  return 0.5 * (lo + hi)


class _PixelNN:
  """Pixel-L2 nearest neighbours among flattened reference images [M, D]."""

  def __init__(self, images):
    self.pixels = np.asarray(images, np.float64).reshape(len(images), -1)
    self.sq = np.sum(self.pixels ** 2, axis=1)

  def query(self, images) -> tuple[np.ndarray, np.ndarray]:
    """(RMSE to the nearest [n], its index [n])."""
    px = np.asarray(images, np.float64).reshape(len(images), -1)
    d2 = np.maximum(np.sum(px ** 2, 1, keepdims=True) - 2 * px @ self.pixels.T + self.sq[None], 0)
    return np.sqrt(d2.min(1) / px.shape[1]), d2.argmin(1)

  def nearest_ratio(self, images) -> np.ndarray:
    """Distance to the nearest reference image over the distance to the second nearest [n]:
    ≈ 0 for a copy of one reference image, ≈ 1 for an image no closer to one of them than
    to the next, however smooth or noisy it is."""
    px = np.asarray(images, np.float64).reshape(len(images), -1)
    d2 = np.maximum(np.sum(px ** 2, 1, keepdims=True) - 2 * px @ self.pixels.T + self.sq[None], 0)
    two = np.sqrt(np.partition(d2, 1, axis=1)[:, :2])
    return two[:, 0] / np.maximum(two[:, 1], 1e-12)


def nearest_distance_ratio(images, reference_images) -> np.ndarray:
  """Per image [n, ...]: pixel distance to its nearest reference image over the distance to
  the second nearest (a copy test that does not depend on the images' noise power)."""
  return _PixelNN(reference_images).nearest_ratio(images)


def max_inner_product(queries, references, *, mesh: Optional[jax.sharding.Mesh] = None,
                      block_size: int = 4096, query_block: int = 1024
                      ) -> tuple[np.ndarray, np.ndarray]:
  """For each query [n, D], its largest inner product with the references [M, D] and the
  index of that reference (the first on ties): ((max [n] float32, argmax [n] int)).

  The cosine nearest neighbour of unit-norm features (the paper's DINOv2 similarity) for
  datasets of 10k+ images without an [n, M] matrix: the references are split over all axes
  of `mesh` (default: this process's devices on one axis) and scanned `block_size` (rounded to the
  mesh size) at a time, the queries `query_block` at a time; each step keeps the running
  best. Equal to numpy's dense `(q @ r.T).max(1)` / `.argmax(1)` up to float32 rounding.
  """
  q = np.asarray(queries, np.float32)
  r = np.asarray(references, np.float32)
  if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1] or not len(r):
    raise ValueError(f"queries [n, D] and references [M >= 1, D] needed; got {q.shape} and "
                     f"{r.shape}.")
  if mesh is None:
    mesh = jax.make_mesh((jax.local_device_count(),), ("data",), devices=jax.local_devices(),
                         axis_types=(jax.sharding.AxisType.Auto,))
  block = -(-min(block_size, len(r)) // mesh.size) * mesh.size
  blocks = -(-len(r) // block)
  padded = np.zeros((blocks * block, r.shape[1]), np.float32)
  padded[:len(r)] = r
  spec = jax.sharding.PartitionSpec(None, mesh.axis_names, None)
  refs = jax.device_put(padded.reshape(blocks, block, -1), jax.sharding.NamedSharding(mesh, spec))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  chunk = min(query_block, max(len(q), 1))
  best, where = [], []
  for start in range(0, len(q), chunk):
    part = q[start:start + chunk]
    part = np.concatenate([part, np.zeros((chunk - len(part), q.shape[1]), np.float32)])
    b, i = _scan_blocks(jax.device_put(part, replicated), refs, len(r), replicated)
    best.append(np.asarray(b)[:len(q) - start])
    where.append(np.asarray(i)[:len(q) - start])
  if not best:
    return np.zeros((0,), np.float32), np.zeros((0,), np.int32)
  return np.concatenate(best), np.concatenate(where)


@functools.partial(jax.jit, static_argnames=("count", "out"))
def _scan_blocks(q: jax.Array, refs: jax.Array, count: int,
                 out: jax.sharding.Sharding) -> tuple[jax.Array, jax.Array]:
  """Running (max, argmax) of q [n, D] · refs[b] [block, D]ᵀ over the blocks b; reference
  rows at or past `count` (padding) never win. Results placed as `out` (replicated, so
  every process can read them)."""
  block = refs.shape[1]

  def step(carry, xs):
    best, where = carry
    rows, offset = xs
    scores = jnp.dot(q, rows.T, precision=jax.lax.Precision.HIGHEST)      # [n, block]
    scores = jnp.where(offset + jnp.arange(block) < count, scores, -jnp.inf)
    top, arg = jnp.max(scores, axis=1), jnp.argmax(scores, axis=1) + offset
    better = top > best
    return (jnp.where(better, top, best), jnp.where(better, arg, where)), None

  init = (jnp.full((q.shape[0],), -jnp.inf, jnp.float32), jnp.zeros((q.shape[0],), jnp.int32))
  offsets = jnp.arange(refs.shape[0], dtype=jnp.int32) * block
  (best, where), _ = jax.lax.scan(step, init, (refs, offsets))
  return jax.lax.with_sharding_constraint((best, where), out)


class NearestNeighbourIndex:
  """Cosine nearest neighbours in a feature space, plus pixel L2 nearest neighbours.

  `denoise` (e.g. `functools.partial(gaussian_blur, sigma_px=1.0)`): also the pixel
  nearest neighbours after the same fixed denoising of query and reference images. A
  model trained on noisy images may reproduce a training image *with* its noise; its
  plain pixel distance to the clean image is then about the noise's size and the plain
  copy criterion misses it; after low-passing both, the noise mostly averages out.
  `mesh`: the devices that the feature search (`max_inner_product`) spreads over.
  """

  def __init__(self, reference_images, feature_fn: Optional[FeatureFn] = None,
               center: bool = True, denoise: Optional[Callable[[np.ndarray], np.ndarray]] = None,
               mesh: Optional[jax.sharding.Mesh] = None):
    self.mesh = mesh
    self.images = np.asarray(reference_images, np.float32)
    self.feature_fn = feature_fn or pixel_features
    feats = np.asarray(self.feature_fn(self.images), np.float64)
    self.center = feats.mean(0) if center else np.zeros(feats.shape[1])
    self.feats = self._normalise(feats)
    self.pixel_nn = _PixelNN(self.images)
    self.denoise = denoise
    self.denoised_nn = None if denoise is None else _PixelNN(denoise(self.images))

  @classmethod
  def from_features(cls, features, feature_fn: FeatureFn, center: bool = False,
                    mesh: Optional[jax.sharding.Mesh] = None) -> "NearestNeighbourIndex":
    """An index over reference *features* [M, D] only (no images kept, no pixel search): for
    datasets too large to hold as images (10k LAION images at 1024²), whose features were
    computed chunk by chunk. `query` then returns only similarity and index. center=False:
    plain cosine of the features, as the paper's DINOv2 similarity."""
    index = cls.__new__(cls)
    feats = np.asarray(features, np.float64)
    index.mesh, index.images, index.feature_fn = mesh, None, feature_fn
    index.center = feats.mean(0) if center else np.zeros(feats.shape[1])
    index.feats = index._normalise(feats)
    index.pixel_nn = index.denoise = index.denoised_nn = None
    return index

  def _normalise(self, feats):
    f = np.asarray(feats, np.float64) - self.center
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

  def query(self, images, chunk: int = 1000) -> dict[str, np.ndarray]:
    """images [n, ...] -> {similarity, index (feature NN), pixel_rmse, pixel_index}, and
    with `denoise` {denoised_rmse, denoised_index} (no pixel keys for `from_features`)."""
    images = np.asarray(images, np.float32)
    q = self._normalise(self.feature_fn(images))
    sim, index = max_inner_product(q, self.feats, mesh=self.mesh, query_block=chunk)
    out = dict(similarity=sim, index=index)
    if self.pixel_nn is not None:
      out["pixel_rmse"], out["pixel_index"] = self.pixel_nn.query(images)
    if self.denoised_nn is not None:
      out["denoised_rmse"], out["denoised_index"] = self.denoised_nn.query(self.denoise(images))
    return out


def summarize(result: dict[str, np.ndarray], attacked: Optional[np.ndarray] = None,
              copy_rmse: Optional[float] = None,
              copy_rmse_denoised: Optional[float] = None, thresholds=THRESHOLDS) -> dict:
  """Fractions above the similarity `thresholds`, means, self-match rates (when `attacked`
  gives the attacked indices) and, with `copy_rmse`, the fraction of copies: images whose
  nearest training image is closer in pixels than `copy_rmse` (see `heldout_baseline`);
  with `copy_rmse_denoised`, the same after the index's fixed denoising of both. Pixel
  figures only when `result` has them (an index `from_features` has none)."""
  sims = result["similarity"]
  out = {f"frac_sim_above_{t}": float(np.mean(sims > t)) for t in thresholds}
  out.update(mean_similarity=float(np.mean(sims)), median_similarity=float(np.median(sims)),
             count=int(len(sims)))
  if "pixel_rmse" in result:
    out["mean_nn_pixel_rmse"] = float(np.mean(result["pixel_rmse"]))
  if copy_rmse is not None:
    out["frac_copies"] = float(np.mean(result["pixel_rmse"] < copy_rmse))
  if copy_rmse_denoised is not None:
    out["frac_copies_denoised"] = float(np.mean(result["denoised_rmse"] < copy_rmse_denoised))
  if attacked is not None:
    out["self_match_features"] = float(np.mean(result["index"] == attacked))
    if "pixel_index" in result:
      out["self_match_pixels"] = float(np.mean(result["pixel_index"] == attacked))
  return out


def heldout_baseline(index: "NearestNeighbourIndex", heldout_images,
                     quantile: float = 0.01, noise_sigma: float = 0.0, seed: int = 0,
                     as_output: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> dict:
  """How close *new* real images come to the training set: the yardstick for copies.

  Real images that are not in the training set have nearest training neighbours too, and
  with a small classifier's features many are "almost identical" (similarity > 0.95) to
  one. Calibrate instead: `copy_rmse` is the `quantile` of the held-out images' nearest-
  neighbour pixel RMSE, so a model that generalizes like fresh data has ~`quantile` of
  its outputs closer than that, and a memorizer ~1. With a denoising index, also
  `copy_rmse_denoised`: the same quantile after the fixed denoising, of held-out images
  first noised with std `noise_sigma` (normal draws from `seed`) — as noisy as the
  outputs being judged, e.g. σ_n for a model trained on noisy data, so that fresh noisy
  images again count ~`quantile` and noisy copies of training images far more.
  `as_output` stores the noised held-out images as the outputs were stored (e.g. clipped
  to [-1, 1] and quantized to 8 bits): clipping removes much of heavy noise (most of it
  at σ ≥ 1), and a calibration on unclipped noise would call every clipped output a copy.
  Returns the held-out summary too.
  """
  r = index.query(heldout_images)
  copy_rmse = float(np.quantile(r["pixel_rmse"], quantile))
  out = dict(copy_rmse=copy_rmse, quantile=quantile)
  if "denoised_rmse" in r:  # the index denoises: calibrate that criterion too
    heldout = np.asarray(heldout_images, np.float32)
    noisy = heldout + np.float32(noise_sigma) * np.random.default_rng(seed).standard_normal(
        heldout.shape).astype(np.float32)
    if as_output is not None:
      noisy = np.asarray(as_output(noisy), np.float32)
    denoised = index.query(noisy)["denoised_rmse"] if noise_sigma > 0 else r["denoised_rmse"]
    out.update(copy_rmse_denoised=float(np.quantile(denoised, quantile)),
               noise_sigma=float(noise_sigma))
  return dict(summarize(r, copy_rmse=copy_rmse,
                        copy_rmse_denoised=out.get("copy_rmse_denoised")), **out)


def noise_images(images, sigma: float, key: jax.Array, indices) -> jax.Array:
  """x0 + σ z, z drawn from fold_in(key, index) per image."""
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices))
  z = sampling.per_image_normal(keys, tuple(images.shape[1:]))
  return jnp.asarray(images, jnp.float32) + sigma * z


@dataclasses.dataclass
class AttackResult:
  summary: dict                        # {"mmse": {...}, "posterior": {...}, "noisy_input": {...}}
  similarities: dict[str, np.ndarray]  # per method, [n]
  reconstructions: dict[str, np.ndarray]
  attacked: np.ndarray                 # indices into the training set


def jit_mmse(denoise_fn) -> Callable:
  """The attack's one-step reconstruction, jitted: (x [B, ...], σ [B], shared, per_image) ->
  denoise_fn(x, σ, *shared, *per_image). σ is an argument, so one compile serves every σ;
  keep the result to reuse it across calls of `reconstruct` (`jitted=`)."""
  return jax.jit(lambda x, sigma, shared, extra: denoise_fn(x, sigma, *shared, *extra))


def jit_posterior(posterior_fn) -> Callable:
  """The attack's posterior sample, jitted: (x [B, ...], σ [B], key, indices [B], shared,
  per_image) -> posterior_fn(x, σ, keys, *shared, *per_image), image i's key
  fold_in(key, indices[i]) (whatever its batch)."""

  def posterior(x, sigma, key, idx, shared, extra):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
    return posterior_fn(x, sigma, keys, *shared, *extra)

  return jax.jit(posterior)


def ancestral_posterior(denoise_fn, posterior_steps: int = 32, sigma_to: float = 0.002):
  """posterior_fn(x, σ [B], keys [B], *args) of `sampling.ancestral_sampler`: `posterior_steps`
  geometric steps from σ down to `sigma_to` under denoise_fn(y, s, *args)."""

  def posterior_fn(x, sigma, keys, *args):
    return sampling.ancestral_sampler(lambda y, s: denoise_fn(y, s, *args), x, sigma, keys,
                                      posterior_steps, sigma_to=sigma_to)

  return posterior_fn


def reconstruct(denoise_fn, images, *, sigma: float, key: jax.Array, num_attacked: Optional[int] = None,
                posterior_steps: int = 32, batch_size: int = 128,
                methods=("mmse", "posterior"), shared: tuple = (), per_image: tuple = (),
                sigma_to: float = 0.002, posterior_fn=None, indices=None, jitted=None,
                log=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The attack's reconstructions of the first `num_attacked` images (all by default).

  images [N, ...] (VE space: pixels in [-1, 1], or a latent model's VE view of latents)
  are noised to x = x0 + σ z (z from fold_in(key', i) for image i) and reconstructed by
  one-step MMSE D(x, σ) and by `sampling.ancestral_sampler` from σ down to `sigma_to`.
  denoise_fn(x [B, ...], σ [B], *shared, *per_image_batch) -> x0_hat, jitted here:
  `shared` (e.g. parameters) and `per_image` (pytrees of [N, ...] arrays, e.g. each
  image's prompt embeddings, sliced to the batch; any leaf with numpy-style row indexing
  works) are passed as arguments, not baked in. `posterior_fn(x [B, ...] at σ, σ [B],
  keys [B], *shared, *per_image_batch) -> x0` replaces the ancestral sampler (e.g. a latent
  model's hot sample, `latent.guidance.hot_sample`). `jitted`: (`jit_mmse(...)`,
  `jit_posterior(...)`) kept by the caller, so that the compiles are reused across calls
  (other σ, other images of the same batch shape); then denoise_fn and posterior_fn are
  not used. `indices` [N]: each image's index in its dataset, which picks its noise and
  sampler keys (default 0..N−1), so that a subset or a chunk of a dataset is noised as the
  whole would be.
  Returns (attacked indices [n], {"noisy_input", *methods: [n, ...]}).
  """
  images = np.asarray(images, np.float32)
  n = len(images) if num_attacked is None else min(num_attacked, len(images))
  attacked = np.arange(n) if indices is None else np.asarray(indices)[:n]
  k_noise, k_post = jax.random.split(key)
  if jitted is None:
    jitted = (jit_mmse(denoise_fn), jit_posterior(
        posterior_fn or ancestral_posterior(denoise_fn, posterior_steps, sigma_to)))
  mmse, posterior = jitted

  recon = {m: [] for m in ("noisy_input",) + tuple(methods)}
  t0 = time.time()
  for start in range(0, n, batch_size):
    rows = np.arange(start, min(start + batch_size, n))
    pad = batch_size - len(rows) if n > batch_size else 0  # one compiled shape
    rows = np.concatenate([rows, np.repeat(rows[-1:], pad)]) if pad else rows
    idx, idx_p = attacked[rows[:len(rows) - pad]], attacked[rows]
    x = noise_images(images[rows], sigma, k_noise, idx_p)
    sigmas = jnp.full((len(rows),), sigma, jnp.float32)
    extra = jax.tree.map(lambda a: jnp.asarray(a[rows]), tuple(per_image))
    recon["noisy_input"].append(np.asarray(x)[:len(idx)])
    if "mmse" in methods:
      recon["mmse"].append(np.asarray(mmse(x, sigmas, shared, extra))[:len(idx)])
    if "posterior" in methods:
      recon["posterior"].append(np.asarray(
          posterior(x, sigmas, k_post, jnp.asarray(idx_p), shared, extra))[:len(idx)])
    if log:
      log(f"  memorization attack: {min(start + batch_size, n)}/{n} images "
          f"({time.time() - t0:.0f} s)")
  return attacked, {m: np.concatenate(v) for m, v in recon.items()}


def compare(reconstructions: dict[str, np.ndarray], index: NearestNeighbourIndex,
            attacked: np.ndarray, sigma: float, copy_rmse: Optional[float] = None) -> AttackResult:
  """Each method's reconstructions [n, ...] against the training set of `index` (the
  images the attack started from are `attacked`, indices into it)."""
  summary, sims = {}, {}
  for m, images in reconstructions.items():
    r = index.query(images)
    summary[m], sims[m] = summarize(r, attacked, copy_rmse), r["similarity"]
  summary["sigma"] = float(sigma)
  return AttackResult(summary, sims, reconstructions, attacked)


def memorization_attack(denoise_fn, train_images, *, sigma: float, key: jax.Array,
                        feature_fn: Optional[FeatureFn] = None, num_attacked: Optional[int] = None,
                        posterior_steps: int = 32, batch_size: int = 128, center: bool = True,
                        index: Optional[NearestNeighbourIndex] = None,
                        methods=("mmse", "posterior"), copy_rmse: Optional[float] = None,
                        log=None) -> AttackResult:
  """Runs the attack on the first `num_attacked` training images (all by default).

  denoise_fn(x [B, ...], sigma [B]) -> x0_hat must be jax-traceable (it is jitted here).
  train_images: the clean training set [N, H, W, C] in [-1, 1], the nearest-neighbour
  reference. `feature_fn` maps images to features (default: pixels).
  """
  train_images = np.asarray(train_images, np.float32)
  index = index or NearestNeighbourIndex(train_images, feature_fn, center)
  attacked, recon = reconstruct(denoise_fn, train_images, sigma=sigma, key=key,
                                num_attacked=num_attacked, posterior_steps=posterior_steps,
                                batch_size=batch_size, methods=methods, log=log)
  return compare(recon, index, attacked, sigma, copy_rmse)


def nearest_neighbours(samples, train_images=None, *, feature_fn: Optional[FeatureFn] = None,
                       index: Optional[NearestNeighbourIndex] = None, center: bool = True,
                       copy_rmse: Optional[float] = None,
                       copy_rmse_denoised: Optional[float] = None):
  """Nearest training image of each generated sample: (summary, similarities [n])."""
  index = index or NearestNeighbourIndex(train_images, feature_fn, center)
  r = index.query(samples)
  return summarize(r, copy_rmse=copy_rmse, copy_rmse_denoised=copy_rmse_denoised), r["similarity"]


def similarity_histogram_png(path: str, similarities: dict[str, np.ndarray], title: str = "") -> str:
  """Overlaid histograms of nearest-neighbour similarity, one per method."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 3.5))
  bins = np.linspace(-0.2, 1.0, 61)
  for name, s in similarities.items():
    ax.hist(np.clip(s, -0.2, 1.0), bins=bins, alpha=0.5, label=f"{name} (n={len(s)})")
  for t in THRESHOLDS:
    ax.axvline(t, color="k", ls="--", lw=0.8)
  ax.set_xlabel("cosine similarity to nearest training image")
  ax.set_ylabel("count")
  ax.set_title(textwrap.fill(title, 70), fontsize=9)  # a long title wraps, not cropped
  ax.legend(fontsize=8)
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=100)
  plt.close(fig)
  return path


def empirical_denoiser(train_images) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The exact MMSE denoiser of the empirical training distribution: the perfect memorizer.

  D(x, σ) = Σ_i softmax_i(−‖x − x_i‖² / 2σ²) x_i. A diffusion model that fits its
  training set exactly learns this; sampling with it returns training images.
  """
  ref = jnp.asarray(train_images, jnp.float32).reshape(len(train_images), -1)
  ref_sq = jnp.sum(ref ** 2, 1)

  def denoise(x, sigma):
    flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
    d2 = jnp.sum(flat ** 2, 1, keepdims=True) - 2 * flat @ ref.T + ref_sq[None]
    w = jax.nn.softmax(-d2 / (2 * jnp.reshape(sigma, (-1, 1)) ** 2), axis=1)
    return (w @ ref).reshape(x.shape)

  return denoise
