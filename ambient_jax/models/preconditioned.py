"""EDM preconditioning wrapper D(x, σ) = c_skip x + c_out F(c_in x, c_noise) (METHOD.md §2).

Works for image backbones ([B, H, W, C], NHWC) and the MLP ([B, D]). The skip path and
the output are float32; only F runs in the backbone's compute dtype.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ambient_jax import precond


class EDMPrecond(nnx.Module):
  """Wraps a backbone F(x, c_noise, class_labels, augment_labels) into the denoiser D.

  Train / eval: `model.train()` enables dropout (the default on construction, like
  `nnx.Dropout`), `model.eval()` disables it; `nnx.view(model, deterministic=True)` gives
  an eval view without mutating. Dropout keys come from the nnx.Rngs stream "dropout";
  inside a pure jitted step use `make_denoise_fn(..., dropout_key=key)`, or
  `nnx.merge(graphdef, *states, copy=True)` then `nnx.reseed(model, dropout=key)`.
  """

  def __init__(self, backbone: nnx.Module, sigma_data: float = precond.SIGMA_DATA):
    self.backbone = backbone
    self.sigma_data = float(sigma_data)
    self.label_dim = int(getattr(backbone, "label_dim", 0))

  def _labels(self, labels: jax.Array | None, batch: int) -> jax.Array | None:
    """None | int class ids [B] | one-hot / soft labels [B, label_dim] -> [B, label_dim]."""
    if self.label_dim == 0:
      if labels is not None:
        raise ValueError("labels were given but the model is unconditional (label_dim=0).")
      return None
    if labels is None:
      return jnp.zeros((batch, self.label_dim), jnp.float32)
    labels = jnp.asarray(labels)
    if labels.ndim == 1 and jnp.issubdtype(labels.dtype, jnp.integer):
      return jax.nn.one_hot(labels, self.label_dim, dtype=jnp.float32)
    return labels.astype(jnp.float32).reshape(batch, self.label_dim)

  def __call__(self, x: jax.Array, sigma: jax.Array, labels: jax.Array | None = None,
               augment_labels: jax.Array | None = None) -> jax.Array:
    """x [B, ...] (noisy), sigma [B] or scalar -> x0_hat [B, ...] float32."""
    x = jnp.asarray(x, jnp.float32)
    batch = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (batch,))
    c_skip, c_out, c_in, c_noise = precond.edm_coefficients(sigma, self.sigma_data)
    f = self.backbone(precond.expand(c_in, x) * x, c_noise, self._labels(labels, batch),
                      augment_labels)
    return precond.expand(c_skip, x) * x + precond.expand(c_out, x) * f.astype(jnp.float32)


def make_denoise_fn(graphdef: nnx.GraphDef, *states: Any, labels: jax.Array | None = None,
                    augment_labels: jax.Array | None = None,
                    dropout_key: jax.Array | None = None
                    ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """A pure `denoise_fn(x, sigma) -> x0_hat` from `graphdef, *states = nnx.split(model, ...)`.

  Safe inside jax.jit, grad, scan and cond: every call merges a fresh copy of the module
  (`nnx.merge(..., copy=True)`; without the copy, a train-mode forward under `jax.grad`
  raises TraceContextError because dropout advances RNG state created at another trace
  level) and never mutates the caller's model or states. Train/eval mode is whatever the
  model was in when split (it lives in `graphdef`). In train mode, call k of this
  denoise_fn uses dropout key fold_in(dropout_key, k) (k counts traced calls) if
  `dropout_key` is given, else the RNG state carried in `states`.
  """
  calls = [0]

  def denoise_fn(x: jax.Array, sigma: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, *states, copy=True)
    if dropout_key is not None:
      nnx.reseed(model, dropout=jax.random.fold_in(dropout_key, calls[0]))
      calls[0] += 1
    return model(x, sigma, labels, augment_labels)

  return denoise_fn
