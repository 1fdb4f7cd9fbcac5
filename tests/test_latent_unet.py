"""UNet2DConditionModel: ours equals diffusers' on the same weights and inputs.

Tiny random models built by diffusers itself (SD-1.x and SDXL shapes), every parameter
perturbed, saved with `save_pretrained`; loaded by ambient_jax; outputs compared.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ambient_jax.latent import configs, unet, weights
from ambient_jax.models import count_params
from tests.latent_reference import relative_error, save_tiny_unet, torch_unet_output, unet_inputs

TOL = 1e-4


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def tiny(request, tmp_path_factory):
  folder = tmp_path_factory.mktemp(request.param) / "unet"
  reference = save_tiny_unet(folder, request.param)
  return request.param, folder, reference


def _ours(model, inputs):
  extra = {k: jnp.asarray(inputs[k]) for k in ("text_embeds", "time_ids") if k in inputs}
  return model(jnp.asarray(inputs["x"]), jnp.asarray(inputs["t"]), jnp.asarray(inputs["context"]),
               **extra)


def test_unet_matches_diffusers(tiny):
  kind, folder, reference = tiny
  # scan_layers: the SDXL shape's two-block transformer stack runs as one lax.scan.
  ours = unet.load_unet(str(folder), scan_layers=True)[0]
  inputs = unet_inputs(kind)
  err = relative_error(_ours(ours, inputs), torch_unet_output(reference, inputs))
  assert err < TOL, f"{kind}: relative error {err:.2e}"


def test_parity_detects_a_transposed_kernel(tiny):
  """The comparison is sharp: transposing one square attention kernel breaks it."""
  kind, folder, reference = tiny
  ours = unet.load_unet(str(folder))[0]
  block = [b for b in ours.down_blocks if b.attentions is not None][0]
  q = block.attentions[0].transformer_blocks[0].attn1.to_q.weight
  q[...] = q[...].T
  inputs = unet_inputs(kind)
  assert relative_error(_ours(ours, inputs), torch_unet_output(reference, inputs)) > 1e-3


def test_save_roundtrip_opens_in_diffusers(tiny, tmp_path):
  from diffusers import UNet2DConditionModel
  kind, folder, _ = tiny
  ours = unet.load_unet(str(folder))[0]
  unet.save_unet(ours, str(tmp_path / "saved"))
  reopened = UNet2DConditionModel.from_pretrained(str(tmp_path / "saved")).eval()
  inputs = unet_inputs(kind, seed=1)
  assert relative_error(_ours(ours, inputs), torch_unet_output(reopened, inputs)) < TOL


def test_bfloat16_load_is_close(tmp_path):
  """bf16 parameters and compute (SDXL shape; the dtype path is shared by both families)."""
  reference = save_tiny_unet(tmp_path, "sdxl")
  ours = unet.load_unet(str(tmp_path), param_dtype=jnp.bfloat16)[0]
  assert ours.conv_in.weight[...].dtype == jnp.bfloat16
  inputs = unet_inputs("sdxl")
  assert relative_error(_ours(ours, inputs), torch_unet_output(reference, inputs)) < 0.05


def test_sharded_load_places_each_tensor_in_its_shards(tiny):
  """FSDP over 8 devices straight from the file: every parameter equals the unsharded load,
  and large ones hold 1/8 of the tensor per device."""
  from ambient_jax.runtime import sharding
  kind, folder, _ = tiny
  mesh = jax.make_mesh((1, 8), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  ours, _ = unet.load_unet(
      str(folder), shardings=lambda state: sharding.param_sharding(mesh, state, min_size=256))
  plain = unet.load_unet(str(folder))[0]
  w = ours.up_blocks[0].resnets[0].conv1.weight[...]
  assert w.sharding.spec != jax.sharding.PartitionSpec() and len(w.addressable_shards) == 8
  assert w.addressable_shards[0].data.size * 8 == w.size
  for a, b in zip(jax.tree.leaves(nnx.state(ours, nnx.Param)), jax.tree.leaves(nnx.state(plain, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mismatched_checkpoint_names_the_tensor(tiny, tmp_path):
  kind, folder, _ = tiny
  tensors = dict(weights.open_checkpoint(str(folder)))
  del tensors["conv_in.weight"]
  tensors["conv_out.bias"] = np.zeros((5,), np.float32)
  tensors["extra.weight"] = np.zeros((1,), np.float32)
  abstract = weights.build_abstract(lambda: unet.UNet2DConditionModel(
      weights.read_config(str(folder)), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError) as e:
    weights.load_params(abstract, tensors, component="unet")
  msg = str(e.value)
  assert "missing tensor 'conv_in.weight'" in msg and "'conv_out.bias' has shape (5,)" in msg
  assert "unexpected tensor 'extra.weight'" in msg


@pytest.mark.parametrize("key,value", [("class_embed_type", "timestep"),
                                       ("down_block_types", ["SimpleCrossAttnDownBlock2D"]),
                                       ("resnet_time_scale_shift", "scale_shift"),
                                       ("some_new_option", 1)])
def test_unsupported_config_value_is_named(key, value):
  cfg = configs.bundled_config("sd15", "unet")
  cfg[key] = value
  with pytest.raises(ValueError, match=key):
    unet.UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))


def test_real_unet_parameter_counts():
  """eval_shape of the bundled public configs: no weights, nothing allocated."""
  for family, expected in (("sdxl", 2_567_463_684), ("sd15", 859_520_964)):
    cfg = configs.bundled_config(family, "unet")
    abstract = weights.build_abstract(lambda: unet.UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    assert count_params(abstract) == expected, family


def test_remat_gives_the_same_gradients(tmp_path):
  """remat=True recomputes each block in the backward pass: same loss and gradients (the
  scanned form: test_scanned_stack_with_fsdp_gathers_equals_the_plain_loop_...)."""
  save_tiny_unet(tmp_path, "sdxl_small")  # every block kind, half the compile
  inputs = {k: jnp.asarray(v) for k, v in unet_inputs("sdxl_small").items()}
  grads = []
  for remat in (False, True):
    model = unet.load_unet(str(tmp_path), remat=remat)[0]
    graphdef, params = nnx.split(model, nnx.Param)
    def loss(p):
      out = nnx.merge(graphdef, p)(inputs["x"], inputs["t"], inputs["context"],
                                  text_embeds=inputs["text_embeds"], time_ids=inputs["time_ids"])
      return jnp.mean(out**2)
    grads.append(jax.jit(jax.grad(loss))(params))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def _transformer_stack(depth: int, dim: int = 64):
  """`depth` BasicTransformerBlocks of width `dim` (4 heads, cross-attention to 16-wide
  context), float32."""
  return nnx.List([unet.BasicTransformerBlock(dim, 4, dim // 4, 16, upcast_attention=False,
                                              attention="xla", dtype=jnp.float32,
                                              param_dtype=jnp.float32, rngs=nnx.Rngs(i))
                   for i in range(depth)])


def test_scanned_stack_with_fsdp_gathers_equals_the_plain_loop_and_keeps_one_layer():
  """BlockCall.stack as lax.scan over FSDP-sharded weights gathered in the loop body
  (sharding.replicate_for_use): the loop's values, gradients and forward-mode derivative
  (posterior_cov chains differentiate the network forward); and XLA's plan holds one
  layer's gathered weights, not the stack's (the plain loop's plan grows with the depth)."""
  from ambient_jax.runtime import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
  mesh = jax.make_mesh((1, 8), ("data", "fsdp"), devices=jax.devices()[:8],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)  # as runtime.sharding's
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32)

  def setup(depth):
    graphdef, state = nnx.split(_transformer_stack(depth))
    shardings = sharding_lib.param_sharding(mesh, state, min_size=256)
    return graphdef, jax.device_put(state, shardings), sharding_lib.replicate_for_use(shardings)

  def forward(run, graphdef):
    return lambda state, h: run.stack(nnx.merge(graphdef, state), h, context)

  graphdef, state, gather = setup(3)
  plain = forward(unet.BlockCall(), graphdef)
  scanned = forward(unet.BlockCall(remat=True, scan=True, gather=gather), graphdef)
  loss = lambda f: jax.jit(jax.value_and_grad(lambda st, h: jnp.mean(f(st, h) ** 2), (0, 1)))
  (l0, g0), (l1, g1) = loss(plain)(state, x), loss(scanned)(state, x)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)
  probe = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  jvp = lambda f: jax.jit(lambda h: jax.jvp(lambda y: f(state, y), (h,), (probe,)))(x)
  for a, b in zip(jvp(plain), jvp(scanned)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)

  def temporaries(depth, run):
    graphdef, state, gather = setup(depth)
    f = forward(dataclasses.replace(run, gather=gather), graphdef)
    step = jax.jit(jax.grad(lambda st, h: jnp.mean(f(st, h) ** 2), 1))
    return step.lower(state, x).compile().memory_analysis().temp_size_in_bytes

  layer_bytes = sum(a.nbytes for a in jax.tree.leaves(nnx.state(_transformer_stack(1))))
  # 4 more layers: the scan holds the stacked copy of their shards (measured 0.27 of a layer
  # each). Unscanned, or with the gathers hoisted out of the loop, each one's gathered weights
  # stay for the backward pass (≥ 1 layer each; measured 1.34 for BlockCall(remat=True)).
  scan_run = unet.BlockCall(remat=True, scan=True)
  assert temporaries(6, scan_run) - temporaries(2, scan_run) < 4 * 0.4 * layer_bytes
  with pytest.raises(ValueError, match="differ in structure"):
    unet.BlockCall(scan=True).stack(
        [_transformer_stack(1)[0], unet.TimestepEmbedding(4, 4, rngs=nnx.Rngs(0))], x)
