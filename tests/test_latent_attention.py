"""latent.attention: every implementation computes "xla"'s attention; "auto" picks per backend.

"chunked" (blockwise online softmax) is compared with "xla" in values and in gradients
w.r.t. q, k and v, with block sizes small enough that every case runs several query and key
blocks, padded ones included. 1e-5 is sharp: an online softmax that forgot to rescale the
earlier blocks by exp(m_old − m_new) is off by the score spread between blocks (order 1 for
unit-normal q, k), and one that let padded keys in moves every weight by about
pad / S (≥ 1 %). The GPU / TPU kernels cannot run here: their selection is tested for
every backend, and the TPU wrapper's padding and layout run with the kernel module's own
pure-JAX reference in place of the kernel.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ambient_jax.latent import attention, unet, vae
from tests.latent_reference import relative_error, save_tiny_unet, torch_unet_output, unet_inputs

SMALL_BLOCKS = dict(q_block=16, kv_block=24)
# (batch, queries T, keys S, heads N, head dim D, mask, upcast): T and S not multiples of the
# blocks; cross-attention with CLIP's 77 keys; one head (the VAE) and many.
CASES = {
    "self_odd": (2, 50, 50, 3, 8, False, False),
    "cross_77": (2, 40, 77, 4, 8, False, False),
    "one_head": (1, 70, 70, 1, 16, False, False),
    "many_heads": (1, 33, 33, 10, 4, False, False),
    "masked": (2, 45, 77, 2, 8, True, False),
    "upcast_masked": (2, 37, 29, 3, 8, True, True),
}


def _inputs(batch, t, s, heads, dim, masked, dtype=jnp.float32, seed=0):
  """q [B, T, N, D], k / v [B, S, N, D] unit normal; mask [B, 1, T, S] with ~30 % masked
  and one query row masked entirely (its weights are uniform, as in "xla")."""
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((batch, n, heads, dim)), dtype) for n in (t, s, s))
  mask = None
  if masked:
    mask = jnp.asarray(rng.random((batch, 1, t, s)) > 0.3).at[0, 0, 3].set(False)
  return q, k, v, mask


def _attend(implementation, mask, upcast, **options):
  return lambda q, k, v: attention.dot_product_attention(
      q, k, v, mask=mask, upcast=upcast, implementation=implementation, **options)


def _grads(fn, q, k, v):
  """Gradients of a loss that weights every output element differently, w.r.t. q, k, v."""
  weights = jnp.cos(jnp.arange(q[..., :1].size * v.shape[-1]).reshape(q.shape[:-1] + v.shape[-1:]))
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _rel(a, b) -> float:
  """‖a − b‖ / ‖b‖ in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_equals_xla_in_values_and_gradients(case):
  batch, t, s, heads, dim, masked, upcast = CASES[case]
  q, k, v, mask = _inputs(batch, t, s, heads, dim, masked)
  chunked = _attend("chunked", mask, upcast, **SMALL_BLOCKS)
  xla = _attend("xla", mask, upcast)
  assert _rel(jax.jit(chunked)(q, k, v), xla(q, k, v)) < 1e-5
  for name, a, b in zip("qkv", _grads(chunked, q, k, v), _grads(xla, q, k, v)):
    assert _rel(a, b) < 1e-5, name


@pytest.mark.parametrize("case", ["self_odd", "cross_77", "masked"])
def test_chunked_bfloat16_is_close_to_xla(case):
  """bf16 q, k, v: both keep float32 softmax statistics; they round differently (xla rounds
  normalized weights to bf16, chunked unnormalized ones), so ~1e-2 relative."""
  batch, t, s, heads, dim, masked, upcast = CASES[case]
  q, k, v, mask = _inputs(batch, t, s, heads, dim, masked, dtype=jnp.bfloat16)
  chunked = _attend("chunked", mask, upcast, **SMALL_BLOCKS)
  xla = _attend("xla", mask, upcast)
  out = jax.jit(chunked)(q, k, v)
  assert out.dtype == jnp.bfloat16
  exact = _attend("xla", mask, upcast)(*(x.astype(jnp.float32) for x in (q, k, v)))
  assert _rel(out, exact) < 2e-2 and _rel(xla(q, k, v), exact) < 2e-2
  for name, a, b in zip("qkv", _grads(chunked, q, k, v), _grads(xla, q, k, v)):
    assert a.dtype == jnp.bfloat16 and _rel(a, b) < 3e-2, name


def test_chunked_single_block_is_xla_itself():
  """The fast path: T <= q_block and S <= kv_block runs "xla" (bit-identical)."""
  q, k, v, mask = _inputs(2, 20, 30, 2, 8, True)
  np.testing.assert_array_equal(attention.chunked_attention(q, k, v, mask=mask),
                                attention.xla_attention(q, k, v, mask=mask))


def test_chunked_gradient_keeps_no_score_map():
  """XLA's plan for forward + backward: "xla" keeps the [B, N, T, S] float32 maps (here
  4 x 2048² x 4 B = 64 MiB each), "chunked" about one query block's (1/4 of them)."""
  shape = jax.ShapeDtypeStruct((1, 2048, 4, 16), jnp.float32)
  def temp_bytes(implementation):
    fn = _attend(implementation, None, False)
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2))).lower(
        shape, shape, shape).compile().memory_analysis().temp_size_in_bytes
  xla, chunked = temp_bytes("xla"), temp_bytes("chunked")
  assert xla > 64 * 2**20 and chunked < xla / 3, (xla, chunked)


@pytest.mark.parametrize("backend,dtype,head_dim,masked,expected", [
    ("cpu", jnp.float32, 64, False, "chunked"),
    ("cpu", jnp.bfloat16, 64, True, "chunked"),
    ("gpu", jnp.bfloat16, 64, False, "cudnn"),
    ("gpu", jnp.float16, 128, False, "cudnn"),
    ("cuda", jnp.bfloat16, 40, False, "cudnn"),   # SD 1.5's head dim
    ("gpu", jnp.float32, 64, False, "chunked"),   # cuDNN takes 16-bit inputs only
    ("gpu", jnp.bfloat16, 512, False, "chunked"),  # the VAE's one 512-wide head
    ("gpu", jnp.bfloat16, 36, False, "chunked"),   # not a multiple of 8
    ("gpu", jnp.bfloat16, 64, True, "chunked"),    # a mask would be a dense bias
    ("tpu", jnp.bfloat16, 64, False, "pallas"),
    ("tpu", jnp.float32, 512, False, "pallas"),
    ("tpu", jnp.bfloat16, 64, True, "chunked"),
])
def test_auto_picks_per_backend(backend, dtype, head_dim, masked, expected):
  assert attention.resolve_implementation("auto", backend, dtype=dtype, head_dim=head_dim,
                                          masked=masked) == expected


def test_explicit_names_and_errors():
  for name in ("xla", "chunked"):
    for backend in ("cpu", "gpu", "tpu"):
      assert attention.resolve_implementation(name, backend) == name
  assert attention.resolve_implementation("cudnn", "gpu") == "cudnn"
  assert attention.resolve_implementation("pallas", "tpu") == "pallas"
  with pytest.raises(ValueError, match="needs a gpu backend"):
    attention.resolve_implementation("cudnn", "cpu")
  with pytest.raises(ValueError, match="needs a tpu backend"):
    attention.resolve_implementation("pallas", "gpu")
  with pytest.raises(ValueError) as e:
    attention.resolve_implementation("flash", "cpu")
  assert "\n" not in str(e.value) and all(n in str(e.value) for n in attention.ATTENTION_IMPLEMENTATIONS)
  with pytest.raises(ValueError, match="'flash' is not one of"):
    attention.Attention(8, heads=2, dim_head=4, attention="flash", rngs=nnx.Rngs(0))


def test_auto_runs_on_this_backend():
  q, k, v, mask = _inputs(2, 50, 77, 2, 8, True)
  for m in (None, mask):
    out = attention.dot_product_attention(q, k, v, mask=m, implementation="auto")
    assert _rel(out, attention.xla_attention(q, k, v, mask=m)) < 1e-5


@pytest.mark.parametrize("masked", [False, True])
def test_pallas_wrapper_pads_and_transposes(masked):
  """The TPU path's layout ([B, N, T, D]), 128-padding and segment ids, with the kernel
  module's reference implementation standing in for the kernel (same signature)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  q, k, v, mask = _inputs(2, 50, 77, 3, 8, masked)
  out = attention.pallas_attention(q, k, v, mask=mask, kernel=fa.mha_reference)
  assert _rel(out, attention.xla_attention(q, k, v, mask=mask)) < 1e-5


@pytest.fixture
def small_chunks(monkeypatch):
  """"chunked" with blocks small enough that the tiny models' 7 context tokens and 16-256
  image tokens span several padded blocks."""
  monkeypatch.setitem(attention.IMPLEMENTATIONS, "chunked",
                      functools.partial(attention.chunked_attention, q_block=24, kv_block=5))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_unet_with_chunked_attention_matches_diffusers(kind, tmp_path, small_chunks):
  reference = save_tiny_unet(tmp_path, kind)
  ours = unet.load_unet(str(tmp_path), attention="chunked")[0]
  inputs = unet_inputs(kind)
  extra = {k: jnp.asarray(inputs[k]) for k in ("text_embeds", "time_ids") if k in inputs}
  out = ours(jnp.asarray(inputs["x"]), jnp.asarray(inputs["t"]), jnp.asarray(inputs["context"]),
             **extra)
  assert relative_error(out, torch_unet_output(reference, inputs)) < 1e-4


def test_vae_with_chunked_attention_matches_xla(small_chunks):
  """The VAE's mid-block attention (one head over all h·w tokens), both ways, same weights."""
  config = {"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 4}
  x = jnp.asarray(np.tanh(np.random.default_rng(0).standard_normal((2, 18, 18, 3))), jnp.float32)
  out = {}
  for name in ("xla", "chunked"):
    model = vae.AutoencoderKL(config, attention=name, rngs=nnx.Rngs(0))
    mean, _ = model.encode(x)  # 9 x 9 = 81 tokens in the mid block
    out[name] = (mean, model.decode(mean))
  for a, b in zip(out["chunked"], out["xla"]):
    assert _rel(a, b) < 1e-5
