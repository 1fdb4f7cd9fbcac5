"""ambient_jax.models: EDM parameter counts, shapes, preconditioning, modes, precision, jit."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ambient_jax import models, precond
from ambient_jax.models import layers

# Tiny configs: forward passes compile in a couple of seconds on CPU.
TINY28 = dict(name="ddpmpp", img_resolution=28, in_channels=1, model_channels=16,
              channel_mult=(1, 2, 2), num_blocks=1, label_dim=10, dropout=0.5)
TINY32 = dict(name="ncsnpp", img_resolution=32, in_channels=3, model_channels=16,
              channel_mult=(1, 2, 2), num_blocks=1, augment_dim=9)
TINY64 = dict(name="adm", img_resolution=64, in_channels=3, model_channels=32,
              channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(16,), channels_per_head=16)


TRACES = []  # one entry per trace of `_apply`.
KEY = jax.random.key(0)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, sigma, labels, key):
  """The pure forward a trainer jits: merge inside jit, reseed dropout from `key`.

  Every test calls it with the same argument structure, so models with equal graphdefs
  share one compilation.
  """
  TRACES.append((graphdef, x.shape))
  model = nnx.merge(graphdef, state)
  nnx.reseed(model, dropout=key)
  return model(x, sigma, labels)


def _perturbed(model, scale=0.05, seed=1):
  """Adds noise to every parameter so zero-initialised output layers do not hide F.

  Host numpy noise: no per-shape XLA compilation in the tests.
  """
  rng = np.random.default_rng(seed)
  params = nnx.state(model, nnx.Param)
  noisy = jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(
      p.shape, np.float32)), params)
  nnx.update(model, noisy)
  return model


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _tiny28(dtype="float32"):
  """A perturbed tiny class-conditional DDPM++ (same params for every dtype)."""
  return _perturbed(models.build_model(dict(TINY28, dtype=dtype),
                                       rngs=nnx.Rngs(params=0, dropout=1)))


@pytest.fixture(scope="module")
def tiny28():
  """(graphdef_train, graphdef_eval, state) of `_tiny28()`."""
  model = _tiny28()
  graphdef_train, state = nnx.split(model)
  model.eval()
  graphdef_eval, _ = nnx.split(model)
  return graphdef_train, graphdef_eval, state


# ----------------------------------------------------------------------------- structure

EDM_COUNTS = [
    (dict(name="ddpmpp", img_resolution=32, in_channels=3, augment_dim=9), 55_733_891),
    (dict(name="ncsnpp", img_resolution=32, in_channels=3, augment_dim=9), 56_397_827),
    (dict(name="ddpmpp", img_resolution=64, in_channels=3, channel_mult=(1, 2, 2, 2),
          augment_dim=9), 61_805_571),
    (dict(name="ncsnpp", img_resolution=64, in_channels=3, channel_mult=(1, 2, 2, 2),
          augment_dim=9), 62_761_091),
    (dict(name="adm", img_resolution=64, in_channels=3, augment_dim=9), 295_132_995),
    (dict(name="adm", img_resolution=64, in_channels=3, label_dim=1000), 295_899_267),
    (dict(name="ddpmpp", img_resolution=28, in_channels=1, model_channels=32,
          channel_mult=(1, 2, 2), num_blocks=2, augment_dim=9), 1_702_977),
]


@pytest.mark.parametrize("config,expected", EDM_COUNTS,
                         ids=["ddpmpp32", "ncsnpp32", "ddpmpp64", "ncsnpp64", "adm64",
                              "adm64cond", "ddpmpp28reduced"])
def test_param_count_matches_edm(config, expected):
  assert models.abstract_param_count(config) == expected


def test_buffers_are_not_params():
  model = nnx.eval_shape(lambda: models.build_model(
      dict(TINY32, name="ncsnpp"), rngs=nnx.Rngs(0)))
  buffers = jax.tree.leaves(nnx.state(model, layers.Buffer))
  assert len(buffers) == 1 and buffers[0].shape == (16,)  # Fourier freqs, C·mult_noise/2.


def test_params_carry_logical_axis_names():
  model = nnx.eval_shape(lambda: models.build_model(TINY28, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(params):
    axes = var.get_metadata()["out_sharding"]
    assert len(axes) == len(var.shape), path
    assert set(axes) <= set(models.LOGICAL_AXES), path
    assert var.dtype == jnp.float32
  with nnx.logical_axis_rules(models.logical_axis_rules("fsdp")):
    specs = nnx.get_partition_spec(params)
  conv = specs["backbone"]["enc"]["28x28_conv"]["weight"]
  dense = specs["backbone"]["map_layer0"]["kernel"]
  assert tuple(conv.get_value()) == (None, None, None, "fsdp")
  assert tuple(dense.get_value()) == (None, "fsdp")


def test_config_dict_and_errors():
  cfg = ml_collections.ConfigDict(dict(TINY28, name="mlp", data_dim=2))
  model = nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0)))
  assert isinstance(model, models.EDMPrecond) and isinstance(model.backbone, models.MLP)

  with pytest.raises(ValueError, match=r"model\.img_resolution=30.*multiple of .*=4"):
    models.build_model(dict(TINY28, img_resolution=30), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"model\.img_resolution=28.*multiple of .*=8"):
    models.build_model(dict(TINY28, channel_mult=(1, 2, 2, 2)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"model\.name='unet'.*'adm'.*'ddpmpp'.*'mlp'.*'ncsnpp'"):
    models.build_model(dict(TINY28, name="unet"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"model\.dtype='float16'.*bfloat16"):
    models.build_model(dict(TINY28, dtype="float16"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"model\.chanel_mult is not a model option"):
    models.build_model(dict(TINY28, chanel_mult=(1, 2)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"model\.dropout=1\.5"):
    models.build_model(dict(TINY28, dropout=1.5), rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- layers vs EDM


def _torch_conv_transpose_depthwise(x, f, stride, pad):
  """Direct NCHW definition of torch conv_transpose2d(groups=C) for a 2-D kernel f."""
  n, c, h, w = x.shape
  k = f.shape[0]
  full = np.zeros((n, c, (h - 1) * stride + k, (w - 1) * stride + k), np.float64)
  for i in range(h):
    for j in range(w):
      full[:, :, i * stride:i * stride + k, j * stride:j * stride + k] += (
          x[:, :, i, j][:, :, None, None] * f)
  return full[:, :, pad:full.shape[2] - pad, pad:full.shape[3] - pad]


def _torch_conv_depthwise(x, f, stride, pad):
  """Direct NCHW definition of torch conv2d(groups=C) (cross-correlation)."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  k = f.shape[0]
  ho, wo = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
  out = np.zeros(x.shape[:2] + (ho, wo))
  for i in range(ho):
    for j in range(wo):
      out[:, :, i, j] = (x[:, :, i * stride:i * stride + k, j * stride:j * stride + k] * f).sum(
          (2, 3))
  return out


@pytest.mark.parametrize("filt", [(1, 1), (1, 3, 3, 1)])
def test_resampling_matches_torch_definition(filt):
  x = np.asarray(_images((2, 8, 6, 3)))  # NHWC.
  x_nchw = x.transpose(0, 3, 1, 2)
  f = layers.resample_kernel(filt)
  pad = (len(filt) - 1) // 2
  up = np.asarray(layers.upsample2d(jnp.asarray(x), filt, pad))
  down = np.asarray(layers.downsample2d(jnp.asarray(x), filt, pad))
  ref_up = _torch_conv_transpose_depthwise(x_nchw, f * 4, 2, pad).transpose(0, 2, 3, 1)
  ref_down = _torch_conv_depthwise(x_nchw, f, 2, pad).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(up, ref_up, atol=1e-5)
  np.testing.assert_allclose(down, ref_down, atol=1e-5)


def _group_norm_nchw(x, weight, bias, groups, eps):
  """torch.nn.functional.group_norm's definition on NCHW float64 arrays."""
  n, c = x.shape[:2]
  xg = x.reshape(n, groups, -1)
  y = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + eps)
  return y.reshape(x.shape) * weight[None, :, None, None] + bias[None, :, None, None]


@pytest.mark.parametrize("channels,offset", [(32, 0.0), (24, 0.0), (64, 50.0)])
def test_group_norm_matches_torch_definition(channels, offset):
  """Values and gradients (input, scale, bias) of the per-channel-then-group reduction."""
  norm = layers.GroupNorm(channels, eps=1e-6)
  groups = norm.num_groups
  assert groups == min(32, channels // 4)
  rng = np.random.default_rng(channels)
  norm.scale[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(channels), jnp.float32)
  norm.bias[...] = jnp.asarray(0.3 * rng.standard_normal(channels), jnp.float32)
  x = offset + 3 * rng.standard_normal((2, 5, 7, channels))  # NHWC, non-square, large mean
  dy = rng.standard_normal(x.shape)

  def ref(x, w, b):
    return _group_norm_nchw(x.transpose(0, 3, 1, 2), w, b, groups, 1e-6).transpose(0, 2, 3, 1)

  w, b = np.asarray(norm.scale[...], np.float64), np.asarray(norm.bias[...], np.float64)
  out = norm(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(out, ref(x, w, b), atol=2e-5)

  graphdef, state = nnx.split(norm)
  loss = lambda x, state: jnp.sum(nnx.merge(graphdef, state)(x) * dy)
  dx, dstate = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x, jnp.float32), state)
  xhat = (ref(x, w, b) - b) / w
  np.testing.assert_allclose(dstate["bias"][...], dy.sum((0, 1, 2)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dstate["scale"][...], (dy * xhat).sum((0, 1, 2)), rtol=1e-4,
                             atol=1e-4)
  h, probe = 1e-6, rng.standard_normal(x.shape)  # directional derivative of the reference
  numeric = ((ref(x + h * probe, w, b) - ref(x - h * probe, w, b)) * dy).sum() / (2 * h)
  np.testing.assert_allclose(float(jnp.sum(dx * probe)), numeric, rtol=1e-3)


def test_attention_matches_edm_channel_layout():
  attn = layers.Attention(8, 2, eps=1e-6, init_qkv=layers.Init("xavier_uniform"),
                          init_proj=layers.Init("xavier_uniform"), dtype=jnp.float32,
                          param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = _images((2, 3, 3, 8))
  out = np.asarray(attn(x))
  # EDM: qkv [N, 3C, HW] -> reshape(N*heads, C/heads, 3, HW), softmax over keys.
  qkv = np.asarray(attn.qkv(attn.norm(x))).reshape(2, 9, 24).transpose(0, 2, 1)
  q, k, v = np.moveaxis(qkv.reshape(4, 4, 3, 9), 2, 0)
  logits = np.einsum("ncq,nck->nqk", q, k / 2.0)
  w = np.exp(logits - logits.max(2, keepdims=True))
  w /= w.sum(2, keepdims=True)
  a = np.einsum("nqk,nck->ncq", w, v).reshape(2, 8, 9).transpose(0, 2, 1).reshape(2, 3, 3, 8)
  np.testing.assert_allclose(out, np.asarray(attn.proj(jnp.asarray(a))), atol=1e-5)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("config,shape", [(TINY32, (2, 32, 32, 3)), (TINY64, (2, 64, 64, 3))],
                         ids=["ncsnpp32x32x3", "adm64x64x3"])
def test_output_shape_equals_input_shape(config, shape):
  model = models.build_model(config, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  y = _apply(graphdef, state, _images(shape), jnp.full((shape[0],), 2.0), None, KEY)
  assert y.shape == shape and y.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y)))


def test_output_shape_28x28x1(tiny28):
  _, graphdef, state = tiny28
  x = _images((2, 28, 28, 1))
  y = _apply(graphdef, state, x, jnp.full((2,), 2.0), jnp.array([0, 1]), KEY)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y)))


def test_mlp_denoiser_on_vectors():
  model = _perturbed(models.build_model(dict(name="mlp", data_dim=2, model_channels=32,
                                             num_blocks=2), rngs=nnx.Rngs(0)))
  model.eval()
  graphdef, state = nnx.split(model)
  x = _images((5, 2))
  y1, y2 = (jax.jit(models.make_denoise_fn(graphdef, state))(x, jnp.full((5,), s))
            for s in (0.5, 2.0))
  assert y1.shape == (5, 2) and y1.dtype == jnp.float32
  assert not np.allclose(y1, y2)
  np.testing.assert_allclose(y1, _apply(graphdef, state, x, jnp.full((5,), 0.5), None, KEY),
                             rtol=1e-6)


def test_denoise_fn_under_grad_in_train_mode():
  model = _perturbed(models.build_model(dict(name="mlp", data_dim=3, model_channels=16,
                                             num_blocks=1, dropout=0.5), rngs=nnx.Rngs(0)),
                     scale=0.3)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x, sigma = _images((4, 3)), jnp.full((4,), 1.0)

  @jax.jit
  def loss_and_grad(params, key):
    def loss(params):
      denoise = models.make_denoise_fn(graphdef, params, rest, dropout_key=key)
      return jnp.mean(jnp.square(denoise(x, sigma))) + jnp.mean(denoise(x, 2 * sigma))
    return jax.value_and_grad(loss)(nnx.to_pure_dict(params))

  (l1, g1), (l2, _), (l1b, _) = (loss_and_grad(params, jax.random.key(k)) for k in (1, 2, 1))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g1))
  assert float(l1) != float(l2) and float(l1) == float(l1b)


def test_labels_accept_ids_and_one_hot():
  model = nnx.eval_shape(lambda: models.build_model(TINY28, rngs=nnx.Rngs(0)))
  ids = jnp.array([3, 0])
  np.testing.assert_array_equal(model._labels(ids, 2), jax.nn.one_hot(ids, 10))
  np.testing.assert_array_equal(model._labels(None, 2), jnp.zeros((2, 10)))
  with pytest.raises(ValueError, match="unconditional"):
    models.EDMPrecond(models.MLP(2, model_channels=8, rngs=nnx.Rngs(0)))._labels(ids, 2)


def _residual(graphdef, state, x, sigma, labels):
  """F(c_in x, c_noise) recovered from D: (D − c_skip x) / c_out."""
  c_skip, c_out, _, _ = precond.edm_coefficients(sigma)
  d = _apply(graphdef, state, x, sigma, labels, KEY)
  return (d - c_skip[:, None, None, None] * x) / c_out[:, None, None, None]


def test_denoiser_depends_on_sigma_and_labels(tiny28):
  _, graphdef, state = tiny28
  x, labels = _images((2, 28, 28, 1)), jnp.array([1, 2])
  s1, s2 = jnp.full((2,), 0.5), jnp.full((2,), 3.0)
  # Same network input c_in·x for both σ, so only c_noise differs.
  x2 = x * jnp.sqrt((3.0**2 + 0.25) / (0.5**2 + 0.25))
  f1, f2 = _residual(graphdef, state, x, s1, labels), _residual(graphdef, state, x2, s2, labels)
  assert float(jnp.abs(f1 - f2).mean()) > 1e-2 * float(jnp.abs(f1).mean())
  ya = _apply(graphdef, state, x, s1, labels, KEY)
  yb = _apply(graphdef, state, x, s1, jnp.array([7, 7]), KEY)
  assert float(jnp.abs(ya - yb).mean()) > 1e-3


def test_tiny_sigma_returns_input(tiny28):
  _, graphdef, state = tiny28
  x = _images((2, 28, 28, 1))
  y = _apply(graphdef, state, x, jnp.full((2,), 1e-4), jnp.array([0, 1]), KEY)
  np.testing.assert_allclose(y, x, atol=2e-3)


def test_dropout_only_in_train_mode(tiny28):
  graphdef_train, graphdef_eval, state = tiny28
  x, sigma, labels = _images((2, 28, 28, 1)), jnp.full((2,), 1.0), jnp.array([3, 4])
  k1, k2 = jax.random.key(1), jax.random.key(2)
  train1 = _apply(graphdef_train, state, x, sigma, labels, k1)
  train2 = _apply(graphdef_train, state, x, sigma, labels, k2)
  assert float(jnp.abs(train1 - train2).max()) > 1e-4  # fresh masks per key
  np.testing.assert_array_equal(train1, _apply(graphdef_train, state, x, sigma, labels, k1))
  eval1 = _apply(graphdef_eval, state, x, sigma, labels, k1)
  np.testing.assert_array_equal(eval1, _apply(graphdef_eval, state, x, sigma, labels, k2))
  assert float(jnp.abs(train1 - eval1).max()) > 1e-4


def test_dropout_keys_are_the_streams_own_and_tracing_them_never_builds_an_error_message(monkeypatch):
  """layers.next_key draws what `stream()` draws and counts alike; traced, it never reads
  a tracer's `sharding` (flax's indexed write did, and that AttributeError's message walks
  the whole trace: benchmarks/trace_cost.py)."""
  ours, flax_own = (nnx.RngStream(jax.random.key(3), tag="dropout") for _ in range(2))
  for _ in range(3):
    np.testing.assert_array_equal(jax.random.key_data(layers.next_key(ours)),
                                  jax.random.key_data(flax_own()))
  assert int(ours.count[...]) == int(flax_own.count[...]) == 3

  # A probe on the costly message (a private jax method: pinned jax, see setup.py).
  from jax._src.interpreters import partial_eval  # pylint: disable=g-import-not-at-top
  messages, real = [], partial_eval.DynamicJaxprTracer._origin_msg
  monkeypatch.setattr(partial_eval.DynamicJaxprTracer, "_origin_msg",
                      lambda self: messages.append(1) or real(self))

  def three_draws(key):
    stream = nnx.RngStream(key, tag="dropout")
    return [layers.next_key(stream) for _ in range(3)], stream.count[...]
  jax.make_jaxpr(three_draws)(jax.random.key(3))
  assert not messages

  def flax_draws(key):
    stream = nnx.RngStream(key, tag="dropout")
    return [stream() for _ in range(3)], stream.count[...]
  jax.make_jaxpr(flax_draws)(jax.random.key(3))
  assert messages  # the probe sees the cost next_key avoids


def test_train_eval_toggle_all_dropouts():
  model = nnx.eval_shape(lambda: models.build_model(dict(TINY28, label_dropout=0.1),
                                                    rngs=nnx.Rngs(0)))
  flags = lambda m: {mod.deterministic for _, mod in nnx.iter_modules(m)
                     if isinstance(mod, (nnx.Dropout, layers.LabelDropout))}
  assert flags(model) == {False}  # built in training mode
  model.eval()
  assert flags(model) == {True}
  model.train()
  assert flags(model) == {False}
  assert flags(nnx.view(model, deterministic=True)) == {True} and flags(model) == {False}


def test_bfloat16_matches_float32(tiny28):
  _, graphdef, state = tiny28
  x, sigma, labels = _images((2, 28, 28, 1)), jnp.full((2,), 1.0), jnp.array([0, 5])
  y32 = _apply(graphdef, state, x, sigma, labels, KEY)
  model = _tiny28("bfloat16")
  model.eval()
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  y16 = _apply(*nnx.split(model), x, sigma, labels, KEY)
  assert y16.dtype == jnp.float32
  err = float(jnp.abs(y16 - y32).max())
  assert 0 < err < 0.03 * float(jnp.abs(y32).max())


def test_jitted_forward_traces_once_per_shape(tiny28):
  _, graphdef, state = tiny28
  labels, start = jnp.array([0, 1]), len(TRACES)
  for i in range(3):
    _apply(graphdef, state, _images((2, 28, 28, 1), seed=i), jnp.full((2,), 1.0 + i), labels,
           jax.random.key(i))
  assert len(TRACES) - start <= 1  # zero if an earlier test already traced this shape.
  start = len(TRACES)
  for i in range(2):
    _apply(graphdef, state, _images((3, 28, 28, 1)), jnp.full((3,), 0.5), jnp.array([0, 1, 2]),
           jax.random.key(i))
  assert len(TRACES) == start + 1


def test_mlp_starts_off_the_saddle_its_hidden_layers_get_gradient():
  """With a zero-initialised output layer (and near-zero residual branches) the hidden
  layers of the toy MLP get no gradient at the start: the saddle on which one output
  coordinate used to stay for a whole toy run. Its output layer starts small, not zero."""
  import jax
  import jax.numpy as jnp
  from ambient_jax import losses
  model = models.build_model(dict(name="mlp", data_dim=2, model_channels=32, num_blocks=2),
                             rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(1), (256, 2)) * 0.5

  def loss(p):
    fn = lambda y, s: nnx.merge(graphdef, p, rest)(y, s)
    return jnp.mean(losses.edm_loss(fn, x, jax.random.key(2))[0])

  grads = jax.grad(loss)(params)
  hidden = float(jnp.linalg.norm(grads["backbone"]["proj_in"]["kernel"].get_value()))
  out = float(jnp.linalg.norm(grads["backbone"]["proj_out"]["kernel"].get_value()))
  assert hidden > 0.01 * out, (hidden, out)
