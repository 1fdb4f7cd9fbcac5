"""Exponential moving averages of the parameters with EDM's half-life parameterisation.

EDM (Karras et al. 2022, training_loop.py) specifies an EMA by its half-life in images:
after the step that brings the images seen from n to n + B,
    h    = halflife_kimg · 1000,   capped at rampup_ratio · n when rampup_ratio > 0
    beta = 0.5 ** (B / max(h, 1e-8))
    ema  = beta · ema + (1 − beta) · params
The ramp-up makes early EMAs short (the first step copies the parameters), so an EMA is
useful from the start of a run. Several half-lives may be tracked at once.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp


def beta(step: jax.Array, batch_size: int, halflife_kimg: float, rampup_ratio: float) -> jax.Array:
  """EMA decay for the update after step `step` (0-based: `step · B` images seen before it)."""
  nimg = jnp.asarray(step, jnp.float32) * batch_size
  halflife = jnp.asarray(halflife_kimg * 1000.0, jnp.float32)
  if rampup_ratio and rampup_ratio > 0:
    halflife = jnp.minimum(halflife, nimg * rampup_ratio)
  return jnp.power(0.5, batch_size / jnp.maximum(halflife, 1e-8))


def update(emas: Sequence[Any], params: Any, step: jax.Array, batch_size: int,
           halflives_kimg: Sequence[float], rampup_ratio: float) -> tuple:
  """New EMAs (a tuple, one per half-life) after a step that produced `params`."""
  out = []
  for ema, h in zip(emas, halflives_kimg):
    b = beta(step, batch_size, h, rampup_ratio)
    out.append(jax.tree.map(lambda e, p, b=b: (b * e + (1.0 - b) * p).astype(e.dtype), ema, params))
  return tuple(out)
