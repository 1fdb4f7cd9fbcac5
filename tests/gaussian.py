"""Closed forms for Gaussian data x0 ~ N(μ, s² I) (METHOD.md §7), shared by the tests."""

import jax.numpy as jnp

MU, S = 0.3, 0.3


def clean_shrinkage(sigma, s=S):
  """E[x0 | x_σ] = μ + a (x − μ) with a = s²/(s² + σ²)."""
  return s**2 / (s**2 + sigma**2)


def naive_shrinkage(sigma, sigma_n, s=S):
  """What plain EDM learns from data noised at σ_n: (s² + σ_n²)/(s² + σ_n² + σ²)."""
  return (s**2 + sigma_n**2) / (s**2 + sigma_n**2 + sigma**2)


def exact_denoiser(mu=MU, s=S):
  """The exact VE denoiser D(x, σ) = E[x0 | x_σ = x]; x: [B, ...], σ: [B]."""

  def denoise(x, sigma):
    a = clean_shrinkage(sigma, s).reshape((-1,) + (1,) * (x.ndim - 1))
    return mu + a * (x - mu)

  return denoise


def exact_vp_denoiser(mu=MU, s=S):
  """The exact VP denoiser E[x0 | x_t], x_t = √(1 − σ_t²) x0 + σ_t z."""

  def denoise(x_t, sigma_t):
    scale = jnp.sqrt(1.0 - sigma_t**2)
    a = scale * s**2 / (scale**2 * s**2 + sigma_t**2)
    a, scale = (v.reshape((-1,) + (1,) * (x_t.ndim - 1)) for v in (a, scale))
    return mu + a * (x_t - scale * mu)

  return denoise
