"""Isotropic Gaussian mixtures with a closed-form denoiser (METHOD.md §7).

Data for the toy benchmark and the tests: Σ_k π_k N(μ_k, s_k² I). The exact denoiser
E[x0 | x_σ = x] = Σ_k p(k | x) (μ_k + s_k²/(s_k² + σ²) (x − μ_k)) with
p(k | x) ∝ π_k N(x; μ_k, (s_k² + σ²) I). Pure jax.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  """means: [K, D]; stds: [K]; weights: [K] (sum to 1)."""

  means: np.ndarray
  stds: np.ndarray
  weights: np.ndarray

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  def sample(self, key: jax.Array, n: int) -> jax.Array:
    """n clean samples: [n, D]."""
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.choice(k_comp, len(self.weights), (n,), p=jnp.asarray(self.weights))
    noise = jax.random.normal(k_noise, (n, self.dim))
    return jnp.asarray(self.means)[comp] + jnp.asarray(self.stds)[comp, None] * noise

  def _posterior(self, x: jax.Array, sigma: jax.Array):
    """p(x0 | x_σ = x) = Σ_k p(k | x) N(m_k, v_k I): (logits of p(k | x) [B, K], the
    components' means m_k [B, K, D] and variances v_k [B, K])."""
    means, var = jnp.asarray(self.means), jnp.asarray(self.stds) ** 2
    total = var[None, :] + sigma[:, None] ** 2  # [B, K]
    sq = jnp.sum(jnp.square(x[:, None, :] - means[None]), -1)  # [B, K]
    logits = jnp.log(jnp.asarray(self.weights))[None] - 0.5 * sq / total - 0.5 * self.dim * jnp.log(total)
    shrink = var[None] / total  # [B, K]
    per_comp = means[None] + shrink[..., None] * (x[:, None, :] - means[None])  # [B, K, D]
    return logits, per_comp, shrink * sigma[:, None] ** 2

  def denoise(self, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """Exact E[x0 | x_σ = x]: x [B, D], σ [B] -> [B, D]."""
    logits, per_comp, _ = self._posterior(x, sigma)
    post = jax.nn.softmax(logits, axis=-1)  # p(k | x): [B, K]
    return jnp.sum(post[..., None] * per_comp, axis=1)

  def posterior_sample(self, x: jax.Array, sigma: jax.Array, key: jax.Array) -> jax.Array:
    """One exact draw of x0 ~ p(x0 | x_σ = x) per row: x [B, D], σ [B] -> [B, D] (a
    component k ~ p(k | x), then its Gaussian posterior; the reference the approximate
    reverse steps are measured against)."""
    logits, per_comp, var = self._posterior(x, sigma)
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.categorical(k_comp, logits)  # [B]
    rows = jnp.arange(x.shape[0])
    return per_comp[rows, comp] + jnp.sqrt(var[rows, comp])[:, None] * jax.random.normal(
        k_noise, x.shape)


def four_clusters_2d(std: float = 0.08) -> GaussianMixture:
  """Four equal clusters at (±0.5, ±0.5): the 2-D picture case."""
  means = np.array([[0.5, 0.5], [-0.5, 0.5], [0.5, -0.5], [-0.5, -0.5]], np.float32)
  return GaussianMixture(means, np.full(4, std, np.float32), np.full(4, 0.25, np.float32))


def random_clusters(dim: int = 16, num: int = 8, std: float = 0.08, radius: float = 1.0,
                    seed: int = 0) -> GaussianMixture:
  """`num` equal clusters with means at distance `radius` from 0, in random directions."""
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(num, dim))
  means = radius * means / np.linalg.norm(means, axis=1, keepdims=True)
  return GaussianMixture(means.astype(np.float32), np.full(num, std, np.float32),
                         np.full(num, 1.0 / num, np.float32))
