"""LoRA adapters: a separate trainable tree, exported in the format diffusers loads.

Parity: a tiny diffusers UNet (SD-1.x and SDXL shapes) loaded by ambient_jax, adapted
with rank 4 (α = 4 and α = 8), every adapter matrix random and non-zero (B too, else the
comparison is blind), saved with `save_lora`; PyTorch loads the same base UNet and that
file as a user does, through a pipeline's `load_lora_weights` (diffusers 0.42.1 + PEFT),
and the UNet outputs agree within 1e-4 relative. The other direction: an adapter that
PEFT made with α ≠ r, saved by `save_lora_weights` with its metadata, loads into ours.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ambient_jax.runtime import sharding
from ambient_jax.latent import configs, lora, unet, weights
from ambient_jax.latent.layers import Linear
from ambient_jax.latent.lora import LoRAParam
from ambient_jax.latent.safetensors_io import save_file
from ambient_jax.models import logical_axis_rules
from tests.latent_reference import relative_error, save_tiny_unet, torch_unet_output, unet_inputs

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

TOL = 1e-4
RANK = 4


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def tiny(request, tmp_path_factory):
  folder = tmp_path_factory.mktemp(request.param) / "unet"
  reference = save_tiny_unet(folder, request.param)
  return request.param, folder, reference


def _load(folder, **kw):
  return unet.load_unet(str(folder), **kw)[0]


def _ours(model, inputs) -> jax.Array:
  extra = {k: jnp.asarray(inputs[k]) for k in ("text_embeds", "time_ids") if k in inputs}
  return model(jnp.asarray(inputs["x"]), jnp.asarray(inputs["t"]), jnp.asarray(inputs["context"]),
               **extra)


def _randomize(model, seed=0):
  """Every adapter matrix random and non-zero: A ~ N(0, 1/r²) as at init, B ~ N(0, 0.2²)."""
  for i, layer in enumerate(lora.adapted_layers(model).values()):
    ka, kb = jax.random.split(jax.random.fold_in(jax.random.key(seed), i))
    layer.lora_A[...] = jax.random.normal(ka, layer.lora_A.shape) / RANK
    layer.lora_B[...] = 0.2 * jax.random.normal(kb, layer.lora_B.shape)


def _pipeline(kind, torch_unet):
  """A diffusers pipeline around `torch_unet` (no other weights needed for LoRA loading)."""
  scheduler = diffusers.EulerDiscreteScheduler(steps_offset=1)  # SD 1.5's (0 warns "outdated")
  if kind == "sdxl":
    return diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=torch_unet, scheduler=scheduler)
  return diffusers.StableDiffusionPipeline(
      vae=None, text_encoder=None, tokenizer=None, unet=torch_unet, scheduler=scheduler,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("alpha", [None, 8.0])
def test_exported_lora_loads_in_diffusers_with_equal_output(tiny, alpha, tmp_path):
  kind, folder, reference = tiny
  ours = _load(folder)
  inputs = unet_inputs(kind)
  base = _ours(ours, inputs)
  layers, count = lora.add_lora(ours, rank=RANK, alpha=alpha, key=jax.random.key(1))
  assert layers == len(lora.adapted_layers(ours)) and count > 0
  _randomize(ours)
  lora.save_lora(ours, tmp_path / "lora.safetensors")
  pipe = _pipeline(kind, copy.deepcopy(reference))
  pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
  adapted, theirs = np.asarray(_ours(ours, inputs)), torch_unet_output(pipe.unet, inputs)
  err = relative_error(adapted, theirs)
  print(f"{kind} alpha={alpha}: max abs {np.max(np.abs(adapted - theirs)):.2e}, rel {err:.2e}")
  assert err <= TOL, f"{kind} alpha={alpha}: relative error {err:.2e}"
  assert relative_error(base, theirs) > 1e-2  # the adapters matter: the test is not blind


def test_peft_adapter_with_alpha_loads_into_ours(tiny, tmp_path):
  """PEFT's own adapter (α = 8 ≠ r, in its metadata), saved by the pipeline, loads into ours;
  our re-export of it (α / r folded into B) loads back to the same output."""
  import torch
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict
  kind, folder, reference = tiny
  theirs = copy.deepcopy(reference)
  theirs.add_adapter(LoraConfig(r=RANK, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=list(lora.ATTENTION_TARGETS)))
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in theirs.named_parameters():
      if "lora_B" in name:
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
  _pipeline(kind, theirs).save_lora_weights(
      str(tmp_path), unet_lora_layers=get_peft_model_state_dict(theirs),
      unet_lora_adapter_metadata=theirs.peft_config["default"].to_dict())
  ours = _load(folder)
  assert lora.load_lora(ours, tmp_path / "pytorch_lora_weights.safetensors") == 4 * sum(
      1 for n, _ in theirs.named_modules() if n.endswith("to_q.lora_A"))
  assert {l.lora_scale for l in lora.adapted_layers(ours).values()} == {2.0}
  inputs = unet_inputs(kind, seed=1)
  expected = torch_unet_output(theirs, inputs)
  assert relative_error(_ours(ours, inputs), expected) <= TOL
  lora.save_lora(ours, tmp_path / "again.safetensors")
  again = _load(folder)
  lora.load_lora(again, tmp_path / "again.safetensors")
  assert relative_error(_ours(again, inputs), expected) <= TOL


def test_zero_B_is_the_base_exactly_and_A_is_gaussian(tiny):
  kind, folder, _ = tiny
  ours = _load(folder)
  inputs = unet_inputs(kind)
  base = _ours(ours, inputs)
  lora.add_lora(ours, rank=RANK, key=jax.random.key(0))
  np.testing.assert_array_equal(_ours(ours, inputs), base)
  a = np.concatenate([np.ravel(l.lora_A[...]) for l in lora.adapted_layers(ours).values()])
  assert abs(a.std() - 1 / RANK) < 0.1 / RANK and abs(a.mean()) < 0.01  # PEFT "gaussian"


def test_lora_tree_is_separate_and_trains_alone(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tree") / "unet"
  save_tiny_unet(folder, "sd15")
  ours = _load(folder)
  base_names = set(weights.state_dict(ours))
  layers, count = lora.add_lora(ours, rank=RANK, key=jax.random.key(0))
  assert layers == 8 * (2 + 1 + 3)  # 8 Linears per transformer block: down, mid, up
  _randomize(ours)
  assert set(weights.state_dict(ours)) == base_names  # nnx.Param: the base weights only
  graphdef, trainable, frozen = nnx.split(ours, LoRAParam, ...)
  flat = list(nnx.to_flat_state(trainable))
  assert len(flat) == 2 * layers and all(isinstance(v, LoRAParam) for _, v in flat)
  assert sum(v.size for _, v in flat) == count
  assert not any(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(frozen))
  # Adapters shard by shape like everything else; their logical "lora_rank" axis maps to None.
  mesh = jax.make_mesh((1, 8), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  assert len(jax.tree.leaves(sharding.param_sharding(mesh, trainable))) == 2 * layers
  with nnx.logical_axis_rules(logical_axis_rules("fsdp")):
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(trainable)))
  path = ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "attn1", "to_q")
  assert tuple(specs[path + ("lora_A",)].get_value()) == (None, None)
  assert tuple(specs[path + ("lora_B",)].get_value()) == ("fsdp", None)

  # Gradient w.r.t. the LoRA tree only, through the merged model (one cross-attention
  # Transformer2DModel of it, to keep the test fast): non-zero for that block's A and B,
  # exactly zero for the adapters it does not use; the base is an input, untouched.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 8, 8, 16)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((1, 7, 24)), jnp.float32)
  frozen_before = [np.asarray(v) for v in jax.tree.leaves(frozen)]

  def loss(tree):
    model = nnx.merge(graphdef, tree, frozen)
    return jnp.mean(jnp.square(model.down_blocks[0].attentions[0](x, context)))

  grads = jax.grad(loss)(trainable)
  for path, g in nnx.to_flat_state(grads):
    used = path[:3] == ("down_blocks", 0, "attentions") and path[3] == 0
    assert (float(jnp.max(jnp.abs(g[...]))) > 0) == used, path
  assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(frozen_before, jax.tree.leaves(frozen)))


def test_bfloat16_base_with_float32_adapters():
  """bf16 weights and compute, float32 adapters: the adapter branch runs in bf16 too (no
  float32 upcast of the activations) and stays close to the float32 product."""
  layer = Linear(24, 32, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  lora.add_lora(layer, rank=RANK, alpha=8, targets=("",), key=jax.random.key(0))
  _randomize(layer)
  assert layer.weight[...].dtype == jnp.bfloat16 and layer.lora_A[...].dtype == jnp.float32
  x = jax.random.normal(jax.random.key(1), (2, 5, 24))
  y = layer(x)
  w, b = (np.asarray(v[...], np.float32) for v in (layer.weight, layer.bias))
  a, bb = np.asarray(layer.lora_A[...]), np.asarray(layer.lora_B[...])
  expected = np.asarray(x) @ w.T + b + 2.0 * (np.asarray(x) @ a.T) @ bb.T
  assert y.dtype == jnp.bfloat16 and relative_error(y, expected) < 2e-2


def test_sdxl_adapter_count():
  """The paper's adapters on the real SDXL UNet, abstractly: 70 transformer blocks x 8
  attention Linears; r · Σ(in + out) = 5,806,080, what PEFT's LoraConfig(r=4,
  target_modules=to_q/to_k/to_v/to_out.0) gives on diffusers' SDXL UNet."""
  cfg = configs.bundled_config("sdxl", "unet")
  result = {}

  def build():
    model = unet.UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
    result["added"] = lora.add_lora(model, rank=RANK, key=jax.random.key(0))
    return model

  abstract = weights.build_abstract(build)  # nnx.eval_shape without random draws
  leaves = jax.tree.leaves(nnx.state(abstract, LoRAParam))
  assert result["added"] == (560, 5_806_080)
  assert len(leaves) == 1120 and sum(x.size for x in leaves) == 5_806_080


def test_load_formats_and_errors_naming_the_keys(tmp_path):
  folder = tmp_path / "unet"
  save_tiny_unet(folder, "sd15")
  ours = _load(folder)
  lora.add_lora(ours, rank=RANK, key=jax.random.key(0))
  good = lora.lora_state_dict(ours)
  fresh = _load(folder)
  # Another component's adapters are skipped; unprefixed (bare PEFT) keys load too.
  extra = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
           np.zeros((RANK, 8), np.float32)}
  assert lora.load_lora(fresh, {**good, **extra}) == len(good) // 2
  bare = {k.removeprefix("unet."): v for k, v in good.items()}
  assert lora.load_lora(_load(folder), bare, prefix=None) == len(good) // 2
  # PEFT's save_pretrained layout: base_model.model. keys, α in adapter_config.json beside.
  (tmp_path / "peft").mkdir()
  save_file({"base_model.model." + k: v for k, v in bare.items()},
            tmp_path / "peft" / "adapter_model.safetensors", {"format": "pt"})
  (tmp_path / "peft" / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
  peft_style = _load(folder)
  lora.load_lora(peft_style, tmp_path / "peft" / "adapter_model.safetensors")
  assert {l.lora_scale for l in lora.adapted_layers(peft_style).values()} == {2.0}

  some_a = next(k for k in good if k.endswith("lora_A.weight"))
  bad = {**good, "unet.down_blocks.0.attentions.0.nope.lora_A.weight": good[some_a],
         "unet.down_blocks.0.attentions.0.nope.lora_B.weight": good[some_a.replace("_A", "_B")]}
  save_file(bad, tmp_path / "bad.safetensors", {"format": "pt"})
  with pytest.raises(ValueError, match=r"nope\.lora_A\.weight' matches no Linear"):
    lora.load_lora(_load(folder), tmp_path / "bad.safetensors")
  with pytest.raises(ValueError, match="has no lora_B"):
    lora.load_lora(_load(folder), {some_a: good[some_a]})
  with pytest.raises(ValueError, match="do not fit the Linear"):
    lora.load_lora(_load(folder), {some_a: good[some_a][:, :-1],
                                   some_a.replace("_A", "_B"): good[some_a.replace("_A", "_B")]})
  with pytest.raises(ValueError, match="is not a PEFT"):
    lora.load_lora(_load(folder), {"unet.down_blocks.0.attentions.0.proj_in.alpha": np.ones(())})
  with pytest.raises(ValueError, match="already carry an adapter"):
    lora.add_lora(ours, rank=RANK, key=jax.random.key(0))
  with pytest.raises(ValueError, match="no Linear layer's path ends with"):
    lora.add_lora(_load(folder), targets=("to_nothing",), key=jax.random.key(0))
