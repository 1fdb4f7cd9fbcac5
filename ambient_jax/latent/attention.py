"""diffusers' `Attention` (self- and cross-attention, optional GroupNorm and residual).

Parameter names as diffusers: `to_q`, `to_k`, `to_v`, `to_out.0`, `group_norm`. Serves the
UNet's transformer blocks and the VAE's mid-block attention.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ambient_jax.latent.layers import GroupNorm, Linear, Placeholder

Dtype = Any


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool = False,
                          mask: jax.Array | None = None) -> jax.Array:
  """Softmax(q kᵀ / √d) v on [B, T, N, D] (queries) and [B, S, N, D] (keys, values).

  Scores are float32 when `upcast` (diffusers' upcast_attention) and the softmax always is.
  `mask`: optional boolean [B or 1, N or 1, T, S], True where attention is allowed.
  """
  dtype = v.dtype
  if upcast:
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  scores = jnp.einsum("btnd,bsnd->bnts", q * (q.shape[-1] ** -0.5), k).astype(jnp.float32)
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
  return jnp.einsum("bnts,bsnd->btnd", weights, v)


class Attention(nnx.Module):
  """Multi-head attention over tokens [B, T, C] or an image [B, H, W, C].

  `cross_attention_dim` set: keys/values come from `context` [B, S, cross_attention_dim].
  `norm_num_groups` set: GroupNorm on the input first (VAE). `residual_connection`: the
  input is added back, and the sum divided by `rescale_output_factor` (diffusers' order).
  """

  def __init__(self, query_dim: int, *, heads: int, dim_head: int,
               cross_attention_dim: int | None = None, bias: bool = False, out_bias: bool = True,
               upcast_attention: bool = False, norm_num_groups: int | None = None,
               eps: float = 1e-5, residual_connection: bool = False,
               rescale_output_factor: float = 1.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    inner = heads * dim_head
    kv_dim = cross_attention_dim or query_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads, self.dim_head, self.dtype = heads, dim_head, dtype
    self.upcast_attention = upcast_attention
    self.residual_connection, self.rescale_output_factor = residual_connection, rescale_output_factor
    self.group_norm = nnx.data(
        GroupNorm(norm_num_groups, query_dim, eps=eps, dtype=dtype, param_dtype=param_dtype)
        if norm_num_groups else None)
    self.to_q = Linear(query_dim, inner, bias=bias, **kw)
    self.to_k = Linear(kv_dim, inner, bias=bias, **kw)
    self.to_v = Linear(kv_dim, inner, bias=bias, **kw)
    self.to_out = nnx.List([Linear(inner, query_dim, bias=out_bias, **kw), Placeholder()])

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    shape = x.shape
    residual = x
    tokens = x.reshape(shape[0], -1, shape[-1])  # [B, H, W, C] -> [B, HW, C]
    if self.group_norm is not None:
      tokens = self.group_norm(tokens)
    context = tokens if context is None else context
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)
    out = dot_product_attention(split(self.to_q(tokens)), split(self.to_k(context)),
                                split(self.to_v(context)), upcast=self.upcast_attention)
    out = self.to_out[0](out.reshape(out.shape[0], out.shape[1], -1)).reshape(shape)
    if self.residual_connection:
      out = out + residual.astype(out.dtype)
    return out / self.rescale_output_factor if self.rescale_output_factor != 1.0 else out
