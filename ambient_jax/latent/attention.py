"""diffusers' `Attention` (self- and cross-attention, optional GroupNorm and residual), and
one attention entry point with several implementations.

Parameter names as diffusers: `to_q`, `to_k`, `to_v`, `to_out.0`, `group_norm`. Serves the
UNet's transformer blocks and the VAE's mid-block attention.

`dot_product_attention(q, k, v, implementation=...)` on [B, T, N, D] queries and [B, S, N, D]
keys / values; the implementations (ATTENTION_IMPLEMENTATIONS) compute the same function:
  "xla"      einsum scores, float32 softmax, einsum: the whole [B, N, T, S] score map is
             materialized (and kept for the backward pass).
  "chunked"  pure JAX blockwise attention with an online softmax (Rabe & Staats 2021,
             "Self-attention does not need O(n²) memory"): query blocks in `lax.map`, key
             blocks in `lax.scan`, float32 running max / sum; a custom VJP recomputes the
             weights block by block (FlashAttention's backward), so neither pass holds more
             than one block of scores. Every backend.
  "cudnn"    `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention
             (NVIDIA GPUs; bfloat16 / float16, head dim a multiple of 8, at most 128).
  "pallas"   the Pallas TPU flash attention kernel (`jax.experimental.pallas.ops.tpu.
             flash_attention`, imported when first used); tokens are padded to its 128 blocks.
  "auto"     the best of these the backend has (`resolve_implementation`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ambient_jax.latent.layers import GroupNorm, Linear, Placeholder

Dtype = Any

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "pallas")
# Where an explicit choice can run (jax.default_backend() names; "xla" and "chunked": all).
NEEDS_BACKEND = {"cudnn": "gpu", "pallas": "tpu"}
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper; 128 holds on every cuDNN flash GPU
PALLAS_BLOCK = 128  # the TPU kernel's default block: tokens are padded to a multiple
Q_BLOCK, KV_BLOCK = 1024, 512  # "chunked": queries per lax.map step, keys per lax.scan step
NEG = jnp.finfo(jnp.float32).min  # score of a masked-out key (as "xla": a fully masked row
                                  # is uniform over its keys)


def check_implementation(name: str) -> str:
  """`name` if it is one of ATTENTION_IMPLEMENTATIONS, else a one-line ValueError."""
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {name!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
  return name


def resolve_implementation(name: str, backend: str | None = None, *, dtype: Dtype = jnp.float32,
                           head_dim: int | None = None, masked: bool = False) -> str:
  """The implementation `name` runs as on `backend` (default: jax.default_backend()).

  "auto": "cudnn" on GPU when the dtype is bfloat16 / float16, the head dim a multiple of 8
  and at most 128, and there is no mask (cuDNN would get it as a dense [B, N, T, S] bias);
  "pallas" on TPU without a mask (same reason); otherwise, CPU included, "chunked" (which
  itself runs "xla" when the problem is one block, see `chunked_attention`). `dtype`,
  `head_dim`: of the queries as the kernel sees them. An explicit name is returned as it is,
  after checking that the backend can run it. ValueError for an unknown name.
  """
  check_implementation(name)
  backend = {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend) or jax.default_backend()
  if name in NEEDS_BACKEND and backend != NEEDS_BACKEND[name]:
    raise ValueError(f"attention implementation {name!r} needs a {NEEDS_BACKEND[name]} backend, "
                     f"this is {backend!r}; use 'auto', 'chunked' or 'xla'")
  if name != "auto":
    return name
  if backend == "gpu" and not masked and jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES] \
      and head_dim is not None and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM:
    return "cudnn"
  if backend == "tpu" and not masked:
    return "pallas"
  return "chunked"


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool = False,
                  mask: jax.Array | None = None) -> jax.Array:
  """Softmax(q kᵀ / √d) v on [B, T, N, D] (queries) and [B, S, N, D] (keys, values) -> [B, T, N, D].

  Scores are float32 when `upcast` (diffusers' upcast_attention) and the softmax always is.
  `mask`: optional boolean [B or 1, N or 1, T, S], True where attention is allowed.
  Materializes the [B, N, T, S] float32 score map.
  """
  dtype = v.dtype
  if upcast:
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  scores = jnp.einsum("btnd,bsnd->bnts", q * (q.shape[-1] ** -0.5), k).astype(jnp.float32)
  if mask is not None:
    scores = jnp.where(mask, scores, NEG)
  weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
  return jnp.einsum("bnts,bsnd->btnd", weights, v)


def _blocks(x: jax.Array, size: int, axis: int) -> jax.Array:
  """Pads `axis` of x up to a multiple of `size` (zeros / False) and splits it into blocks,
  leading: e.g. [B, T, N, D] on axis 1 -> [ceil(T / size), B, size, N, D]."""
  n = -(-x.shape[axis] // size)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n * size - x.shape[axis])
  x = jnp.pad(x, pad)
  x = x.reshape(x.shape[:axis] + (n, size) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _scores(q: jax.Array, k: jax.Array, valid: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Masked float32 scores of a query block [B, Tq, N, D] (already scaled) against a key
  block [B, Sk, N, D]: [B, N, Tq, Sk], NEG where `mask` [B|1, N|1, Tq, Sk] is False or the
  key is padding (`valid` [Sk] False). Every key block holds a real key, so a row's block
  maximum is a real score (or NEG when the mask removes all of them, as in "xla")."""
  s = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    s = jnp.where(mask, s, NEG)
  return jnp.where(valid, s, NEG)


def _weights(s: jax.Array, shift: jax.Array, valid: jax.Array) -> jax.Array:
  """exp(s − shift) [B, N, Tq, Sk] with padded keys at exactly 0 (shift [B, N, Tq])."""
  return jnp.where(valid, jnp.exp(s - shift[..., None]), 0.0)


def _heads_last(x: jax.Array) -> jax.Array:
  """Per-row statistic [B, N, Tq] -> [B, Tq, N, 1], to scale outputs [B, Tq, N, D]."""
  return jnp.moveaxis(x, 1, 2)[..., None]


def _forward_block(k_blocks, v_blocks, valid, q, mask):
  """One query block q [B, Tq, N, D] over all key blocks k / v [nk, B, Sk, N, D] (valid
  [nk, Sk], mask [nk, B|1, N|1, Tq, Sk] or None) with an online softmax in lax.scan: the
  running max m, sum l and unnormalized output acc are float32, and the earlier blocks are
  rescaled by exp(m_old − m_new) whenever the max grows. Returns the output [B, Tq, N, D]
  float32 and (m, l) [B, N, Tq], all the backward pass needs (not log-sum-exp m + log l:
  for a fully masked row m = NEG, and NEG + log l rounds back to NEG)."""
  b, tq, n, d = q.shape

  def step(carry, block):
    m, l, acc = carry
    k, v, ok, mask_block = block
    s = _scores(q, k, ok, mask_block)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = _weights(s, m_new, ok)
    rescale = jnp.exp(m - m_new)
    pv = jnp.einsum("bnts,bsnd->btnd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (m_new, l * rescale + p.sum(axis=-1), acc * _heads_last(rescale) + pv), None

  init = (jnp.full((b, n, tq), NEG, jnp.float32), jnp.zeros((b, n, tq), jnp.float32),
          jnp.zeros((b, tq, n, d), jnp.float32))
  (m, l, acc), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, valid, mask))
  return acc / _heads_last(l), (m, l)


def _backward_block(k_blocks, v_blocks, valid, q, mask, out, stats, d_out):
  """The gradients of one query block's attention (FlashAttention's backward): the weights
  p = exp(s − m) / l are recomputed key block by key block (stats = (m, l)); with δ = rowsum(dO · O),
  dV = pᵀ dO, dS = p (dO Vᵀ − δ), dQ = dS K, dK = dSᵀ Q. Returns dq [B, Tq, N, D] and this
  block's share of dk, dv [nk, B, Sk, N, D], all float32."""
  m, l = stats
  delta = jnp.moveaxis(jnp.sum(d_out * out, axis=-1), 1, 2)  # [B, N, Tq]
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

  def step(dq, block):
    k, v, ok, mask_block = block
    p = _weights(_scores(q, k, ok, mask_block), m, ok) / l[..., None]
    dv = f32("bnts,btnd->bsnd", p.astype(v.dtype), d_out.astype(v.dtype))
    ds = p * (f32("btnd,bsnd->bnts", d_out.astype(v.dtype), v) - delta[..., None])
    if mask_block is not None:  # masked scores are constants (a fully masked row: p = 1/S)
      ds = jnp.where(mask_block, ds, 0.0)
    dq = dq + f32("bnts,bsnd->btnd", ds.astype(k.dtype), k)
    return dq, (f32("bnts,btnd->bsnd", ds.astype(q.dtype), q), dv)

  return jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), (k_blocks, v_blocks, valid, mask))


@jax.custom_vjp
def _blockwise(q_blocks, k_blocks, v_blocks, valid, mask_blocks):
  """Attention of blocked queries [nq, B, Tq, N, D] (scaled) over blocked keys and values
  [nk, B, Sk, N, D]: [nq, B, Tq, N, D] float32. Query blocks run one at a time (lax.map).
  Its gradient is `_backward_block` per query block, from the saved output and softmax
  statistics: no [T, S] map is kept or rebuilt, forward or backward."""
  return _blockwise_fwd(q_blocks, k_blocks, v_blocks, valid, mask_blocks)[0]


def _blockwise_fwd(q_blocks, k_blocks, v_blocks, valid, mask_blocks):
  one = functools.partial(_forward_block, k_blocks, v_blocks, valid)
  out, stats = jax.lax.map(lambda xs: one(*xs), (q_blocks, mask_blocks))
  return out, (q_blocks, k_blocks, v_blocks, valid, mask_blocks, out, stats)


def _blockwise_bwd(residuals, d_out):
  q_blocks, k_blocks, v_blocks, valid, mask_blocks, out, stats = residuals
  one = functools.partial(_backward_block, k_blocks, v_blocks, valid)

  def step(dkv, xs):  # query block by query block, dk and dv summed in float32
    dq, (dk, dv) = one(*xs)
    return (dkv[0] + dk, dkv[1] + dv), dq

  zeros = jnp.zeros(k_blocks.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(step, (zeros, zeros), (q_blocks, mask_blocks, out, stats, d_out))
  return (dq.astype(q_blocks.dtype), dk.astype(k_blocks.dtype), dv.astype(v_blocks.dtype),
          None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool = False,
                      mask: jax.Array | None = None, q_block: int = Q_BLOCK,
                      kv_block: int = KV_BLOCK) -> jax.Array:
  """`xla_attention`'s result in O(q_block · kv_block) memory instead of O(T · S), forward
  and backward.

  q [B, T, N, D], k / v [B, S, N, D], mask boolean [B|1, N|1, T, S] or None -> [B, T, N, D].
  Queries go `q_block` at a time (lax.map); for each, keys `kv_block` at a time through an
  online softmax (lax.scan) with float32 running max, sum and output. Token counts need not
  be multiples of the blocks: the last block is zero-padded and padded keys get weight 0.
  A custom VJP saves only the output and the softmax max and sum per query ([B, N, T]) and
  recomputes the weights block by block in the backward pass (FlashAttention's backward),
  so a training step keeps no score map per layer.
  Fast path: when T <= q_block and S <= kv_block the problem is a single block, and this
  is "xla" itself (same numbers, no loop overhead for small maps).
  """
  t, s = q.shape[1], k.shape[1]
  if t <= q_block and s <= kv_block:
    return xla_attention(q, k, v, upcast=upcast, mask=mask)
  if upcast:
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  q_block, kv_block = min(q_block, t), min(kv_block, s)
  q_blocks = _blocks(q * (q.shape[-1] ** -0.5), q_block, 1)  # [nq, B, q_block, N, D]
  k_blocks, v_blocks = _blocks(k, kv_block, 1), _blocks(v, kv_block, 1)
  valid = _blocks(jnp.ones((s,), bool), kv_block, 0)  # [nk, kv_block]
  mask_blocks = None
  if mask is not None:  # [Bm, Nm, T, S] -> [nq, nk, Bm, Nm, q_block, kv_block]
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (t, s))
    mask_blocks = jnp.moveaxis(_blocks(_blocks(mask, q_block, 2), kv_block, 4), 0, 1)
  out = _blockwise(q_blocks, k_blocks, v_blocks, valid, mask_blocks)  # [nq, B, q_block, N, D]
  out = jnp.moveaxis(out, 0, 1).reshape(q.shape[0], -1, *q.shape[2:])[:, :t]
  return out.astype(v.dtype)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool = False,
                    mask: jax.Array | None = None) -> jax.Array:
  """cuDNN flash attention via `jax.nn.dot_product_attention` (same [B, T, N, D] layout).

  cuDNN takes bfloat16 / float16 q, k, v and accumulates scores and softmax in float32, which
  is what `upcast` asks for, so upcast needs no cast here. A mask becomes a dense bias.
  """
  del upcast  # cuDNN's scores are float32 already
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool = False,
                     mask: jax.Array | None = None, kernel: Callable | None = None) -> jax.Array:
  """The Pallas TPU flash attention kernel on [B, T, N, D] / [B, S, N, D] -> [B, T, N, D].

  The kernel works on [B, N, T, D] with token counts that are multiples of its 128 blocks:
  queries and keys are zero-padded, and padded keys are cut off with segment ids (real 1,
  padding 0). A mask becomes a dense [B, N, T, S] bias. The kernel's scores and softmax are
  float32, so `upcast` needs no cast. `kernel`: the flash_attention function (default
  imported lazily; tests pass the module's pure-JAX `mha_reference`). Under a mesh the
  kernel is not partitioned by XLA: call it inside `shard_map` over the batch axes.
  """
  del upcast
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top
  kernel = kernel or fa.flash_attention
  b, t, n, d = q.shape
  s = k.shape[1]
  pad = lambda x, size: jnp.pad(x, ((0, 0), (0, 0), (0, -size % PALLAS_BLOCK), (0, 0)))
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, N, D] <-> [B, N, T, D]
  qp, kp, vp = pad(heads_first(q), t), pad(heads_first(k), s), pad(heads_first(v), s)
  tp, sp = qp.shape[2], kp.shape[2]
  segments = fa.SegmentIds(q=jnp.ones((b, tp), jnp.int32),
                           kv=(jnp.arange(sp) < s).astype(jnp.int32)[None].repeat(b, 0))
  bias = None
  if mask is not None:
    bias = jnp.where(jnp.broadcast_to(mask, (b, n, t, s)), 0.0, NEG / 2).astype(jnp.float32)
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, tp - t), (0, sp - s)))
  out = kernel(qp, kp, vp, bias, segments, sm_scale=d**-0.5)
  return heads_first(out[:, :, :t]).astype(v.dtype)


IMPLEMENTATIONS = {"xla": xla_attention, "chunked": chunked_attention, "cudnn": cudnn_attention,
                   "pallas": pallas_attention}


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool = False,
                          mask: jax.Array | None = None, implementation: str = "xla",
                          **options) -> jax.Array:
  """Softmax(q kᵀ / √d) v on [B, T, N, D] (queries) and [B, S, N, D] (keys, values).

  Scores are float32 when `upcast` (diffusers' upcast_attention) and the softmax always is.
  `mask`: optional boolean [B or 1, N or 1, T, S], True where attention is allowed.
  `implementation`: one of ATTENTION_IMPLEMENTATIONS ("auto" is resolved for the default
  backend by `resolve_implementation`); `options` go to it (e.g. "chunked"'s q_block,
  kv_block).
  """
  name = resolve_implementation(implementation, dtype=q.dtype, head_dim=q.shape[-1], masked=mask is not None)
  return IMPLEMENTATIONS[name](q, k, v, upcast=upcast, mask=mask, **options)


class Attention(nnx.Module):
  """Multi-head attention over tokens [B, T, C] or an image [B, H, W, C].

  `cross_attention_dim` set: keys/values come from `context` [B, S, cross_attention_dim].
  `norm_num_groups` set: GroupNorm on the input first (VAE). `residual_connection`: the
  input is added back, and the sum divided by `rescale_output_factor` (diffusers' order).
  `attention`: the `dot_product_attention` implementation (ATTENTION_IMPLEMENTATIONS).
  """

  def __init__(self, query_dim: int, *, heads: int, dim_head: int,
               cross_attention_dim: int | None = None, bias: bool = False, out_bias: bool = True,
               upcast_attention: bool = False, norm_num_groups: int | None = None,
               eps: float = 1e-5, residual_connection: bool = False,
               rescale_output_factor: float = 1.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, attention: str = "auto", rngs: nnx.Rngs):
    check_implementation(attention)
    inner = heads * dim_head
    kv_dim = cross_attention_dim or query_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads, self.dim_head, self.dtype = heads, dim_head, dtype
    self.upcast_attention, self.attention = upcast_attention, attention
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
                                split(self.to_v(context)), upcast=self.upcast_attention,
                                implementation=self.attention)
    out = self.to_out[0](out.reshape(out.shape[0], out.shape[1], -1)).reshape(shape)
    if self.residual_connection:
      out = out + residual.astype(out.dtype)
    return out / self.rescale_output_factor if self.rescale_output_factor != 1.0 else out
