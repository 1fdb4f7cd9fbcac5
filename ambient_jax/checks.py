"""Argument validation shared by the losses and samplers.

Shape checks are static and always run; value checks (σ ≥ 0) run only when the
array is concrete, i.e. outside `jax.jit`, so a traced call costs nothing.
"""

from typing import Any

import jax
import numpy as np


def batch_size(name: str, x: Any) -> int:
  """Returns the leading (batch) size of `x`, or raises a ValueError naming `name`."""
  shape = np.shape(x)
  if len(shape) < 1:
    raise ValueError(f"`{name}` must have a leading batch axis [B, ...]; got shape {shape}.")
  return shape[0]


def per_example(name: str, value: Any, batch: int, *, allow_scalar: bool = False,
                nonnegative: bool = True, positive: bool = False) -> None:
  """Checks that `value` has shape [B] (or is a scalar when allowed) and a valid sign."""
  shape = np.shape(value)
  if shape != (batch,) and not (allow_scalar and shape == ()):
    allowed = f"[{batch}]" + (" or a scalar" if allow_scalar else "")
    raise ValueError(f"`{name}` must have shape {allowed} (one value per example); got shape {shape}.")
  try:
    concrete = np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return  # traced under jit: shapes were checked, values cannot be.
  if positive and not np.all(concrete > 0):
    raise ValueError(f"`{name}` must be > 0 everywhere; got min {concrete.min()}.")
  if nonnegative and not np.all(concrete >= 0):
    raise ValueError(f"`{name}` must be >= 0 everywhere (0 = clean example); got min {concrete.min()}.")
  if not np.all(np.isfinite(concrete)):
    raise ValueError(f"`{name}` must be finite everywhere.")


def one_of(name: str, value: Any, allowed: tuple) -> None:
  """Raises a ValueError naming `name` unless `value` is one of `allowed`."""
  if value not in allowed:
    raise ValueError(f"`{name}` must be one of {allowed}; got {value!r}.")
