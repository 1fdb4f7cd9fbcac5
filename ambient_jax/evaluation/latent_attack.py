"""The noise attack's reconstructions in latent space (METHOD.md §8): one implementation for
`evaluate`'s latent attack (`evaluation.latent`), `python -m ambient_jax.attack` and the
restoration table (`evaluation.restoration`).

    model = AttackModel(unet_fn, params, frozen, schedule, uncond)   # any SD / SDXL UNet
    recon = attack_latents(model, z0, prompts, t=900, key=jax.random.key(seed))

z0 [N, h, w, C] are clean latents (× the VAE's scaling factor). Image i is noised at DDPM
step t in the VE view, x = z0 + σ^VE_t ε (VP: x_t = √(1 − σ_t²) z0 + σ_t ε), ε drawn from
fold_in(k, index_i) with k = split(key)[0] (`metrics.memorization.reconstruct`: one fixed key
per image, whatever the batch), and reconstructed
  - mmse:       one step, D(x, σ^VE_t) = (x_t − σ_t ε̂(x_t, t)) / √(1 − σ_t²), under the
                image's prompt at guidance `mmse_guidance` (1: the conditional denoiser, as the
                paper's `run_unet`);
  - posterior:  "hot" (the paper's): a `hot_steps`-step DDPM pipeline held at x_t until the
                inference step nearest t, then run to 0 (`latent.guidance.hot_sample`), at
                guidance `guidance_scale` (the SDXL pipeline's default 5 in the paper's code);
                or "ancestral": `posterior_steps` geometric posterior steps from σ^VE_t exactly
                down to the schedule's smallest σ (`evaluate`'s default).
Everything returned stays in the VE view: decode `noisy_input` × √(1 − σ_t²) to see x_t.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ambient_jax.latent import guidance
from ambient_jax.latent.schedule import NoiseSchedule, ve_denoiser
from ambient_jax.training import latent_grid

POSTERIORS = ("hot", "ancestral")
METHODS = ("mmse", "posterior")


@dataclasses.dataclass
class AttackModel:
  """A latent diffusion model as the attack runs it.

  unet_fn(params, frozen) -> the UNet module (a LatentTask's `unet`, or nnx.merge of a
  pretrained UNet with frozen = ()); schedule: its DDPM schedule; uncond: the dropped prompt
  of classifier-free guidance, {"context" [77, D], SDXL also "text_embeds" [Dp]}.
  jit_cache keeps the jitted reconstructions, so that attacks at several t, on several image
  sets or for several tables compile each once (an SDXL UNet's compile takes minutes);
  models may share one only where they differ in params and frozen alone.
  """
  unet_fn: Callable[[Any, Any], Any]
  params: Any
  frozen: Any
  schedule: NoiseSchedule
  uncond: dict
  jit_cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def compiled(self, key: tuple, build: Callable[[], Any]) -> Any:
    """build(), made once per `key` in jit_cache."""
    if key not in self.jit_cache:
      self.jit_cache[key] = build()
    return self.jit_cache[key]


class IndexedRows:
  """Rows of a table picked by an index, gathered only when sliced: `rows[i]` =
  table[index[i]]. Per-image prompt embeddings as [P, ...] unique prompts + [N] indices
  (10k SDXL prompts expanded per image would be 6 GB)."""

  def __init__(self, table, index):
    self.table, self.index = np.asarray(table), np.asarray(index)

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, rows) -> np.ndarray:
    return self.table[self.index[rows]]


def _denoiser(model: AttackModel, guidance_scale: float):
  """D(x, σ, params, frozen, prompts) of the model under each image's prompt (`prompts`:
  context [B, 77, D], SDXL text_embeds [B, Dp] and time_ids [B, 6])."""

  def denoise(x, sigma, params, frozen, prompts):
    cond, unc = latent_grid.batch_conditioning(prompts, model.uncond)
    fn = guidance.guided_model_fn(model.unet_fn(params, frozen), cond, unc, guidance_scale)
    return ve_denoiser(fn, model.schedule)(x, sigma)

  return denoise


def attack_latents(model: AttackModel, z0: np.ndarray, prompts: dict, *, t: int,
                   key: jax.Array, methods: Sequence[str] = METHODS, posterior: str = "hot",
                   hot_steps: int = 50, posterior_steps: int = 32, guidance_scale: float = 5.0,
                   mmse_guidance: float = 1.0, batch_size: int = 16,
                   indices: Optional[np.ndarray] = None,
                   log=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The attack's reconstructions of latents z0 [N, h, w, C] (see the module docstring).

  prompts: {"context" [N, 77, D] (+ SDXL "text_embeds" [N, Dp], "time_ids" [N, 6])}, each
  leaf an array or `IndexedRows`; indices [N]: each image's index in its dataset (its noise
  key; default 0..N−1). Returns (indices [N], {"noisy_input", *methods: [N, h, w, C]}).
  """
  from ambient_jax.metrics import memorization  # pylint: disable=g-import-not-at-top
  if posterior not in POSTERIORS:
    raise ValueError(f"posterior {posterior!r} is not one of {POSTERIORS}.")
  sched = model.schedule
  if not 0 < t < sched.num_train_timesteps:
    raise ValueError(f"t={t}: a DDPM step in [1, {sched.num_train_timesteps - 1}].")
  sigma, sigma_min = float(sched.ve_sigmas[t]), float(sched.ve_sigmas[0])
  mmse = model.compiled(("mmse", mmse_guidance), lambda: memorization.jit_mmse(
      _denoiser(model, mmse_guidance)))
  sample_denoise = _denoiser(model, guidance_scale)

  def hot_posterior(x, sigma, keys, *args):
    del sigma  # the hot sample starts from DDPM step t
    return guidance.hot_sample(lambda y, s: sample_denoise(y, s, *args), sched, x, t, keys,
                               hot_steps)

  posterior_fn = hot_posterior if posterior == "hot" else memorization.ancestral_posterior(
      sample_denoise, posterior_steps, sigma_to=sigma_min)

  # The hot sample's σ list depends on t (one compile per t); the ancestral sampler takes σ
  # as an argument (one compile for every t).
  key_post = (posterior, guidance_scale) + (
      (hot_steps, t) if posterior == "hot" else (posterior_steps,))
  post = model.compiled(key_post, lambda: memorization.jit_posterior(posterior_fn))
  return memorization.reconstruct(
      None, z0, sigma=sigma, key=key, batch_size=max(1, min(batch_size, len(z0))),
      methods=tuple(methods), shared=(model.params, model.frozen), per_image=(prompts,),
      jitted=(mmse, post), indices=indices, log=log)


def vp_view(noisy: np.ndarray, schedule: NoiseSchedule, t: int) -> np.ndarray:
  """The VE-view noisy latents [N, ...] as the model sees them, VP x_t = √(1 − σ_t²) x (what
  decoding should show)."""
  return noisy * np.float32(np.sqrt(1.0 - float(schedule.vp_sigmas[t]) ** 2))


def vae_coder(vae: Any, batch_size: int = 32, sample_key: Optional[jax.Array] = None):
  """(encode(images, indices=None), decode(latents)): images [n, R, R, 3] in [-1, 1] <->
  latents [n, h, w, C] (× scaling factor), jitted with the VAE weights as arguments, in
  batches of `batch_size` (the tail padded: one compiled shape). VAEs of one structure share
  the compiles (`_encode`, `_decode` are keyed on the graph, not the weights).

  sample_key None: the posterior mean (deterministic; `evaluate`'s attack). Else image i's
  latent is a posterior sample drawn from fold_in(sample_key, indices[i]) (the paper's code:
  `latent_dist.sample()`), so an image encodes the same in any batch.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(vae)

  def encode(x, indices=None):
    x = np.asarray(x, np.float32)
    idx = np.arange(len(x)) if indices is None else np.asarray(indices)
    return batched(lambda b, i: _encode(graphdef, state, b, i, sample_key), batch_size, x,
                   idx.astype(np.int32))

  def decode(z):
    return batched(lambda b: _decode(graphdef, state, b), batch_size, np.asarray(z, np.float32))

  return encode, decode


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, x, idx, sample_key):
  """`vae_coder`'s encoder: the posterior mean (sample_key None) or image i's posterior
  sample from fold_in(sample_key, idx[i]), × scaling factor: [B, R, R, 3] -> [B, h, w, C]."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  m = nnx.merge(graphdef, state)
  if sample_key is None:
    return m.to_latents(x)
  mean, logvar = m.encode(x)
  keys = jax.vmap(lambda i: jax.random.fold_in(sample_key, i))(idx)
  sample = jax.vmap(lambda mu, lv, k: m.sample_posterior(mu[None], lv[None], k)[0])(
      mean, logvar, keys)
  return (sample - m.shift_factor) * m.scaling_factor


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, z):
  """`vae_coder`'s decoder: latents [B, h, w, C] (× scaling factor) -> images [B, R, R, 3]."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.merge(graphdef, state).from_latents(z)


def batched(fn: Callable[..., jax.Array], batch_size: int, *arrays: np.ndarray) -> np.ndarray:
  """fn over arrays [n, ...] (sliced alike) in batches of `batch_size`; the tail padded by
  repeating its last row, so one shape compiles."""
  n, out = len(arrays[0]), []
  for i in range(0, n, batch_size):
    parts = [a[i:i + batch_size] for a in arrays]
    pad = batch_size - len(parts[0]) if n > batch_size else 0
    if pad:
      parts = [np.concatenate([p, np.repeat(p[-1:], pad, axis=0)]) for p in parts]
    out.append(np.asarray(fn(*map(jnp.asarray, parts)))[:batch_size - pad])
  return np.concatenate(out)
