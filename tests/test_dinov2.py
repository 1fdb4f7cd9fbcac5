"""DINOv2 (metrics/dinov2.py) against transformers 5.23.0's Dinov2Model, the paper's feature
pipeline (metrics/dinov2_features.py) and the sharded nearest-neighbour search
(memorization.max_inner_product).

Tiny random Dinov2Models built by transformers itself, ViT-S-shaped (GELU MLP) and
ViT-g-shaped (SwiGLU), every parameter perturbed, saved with `save_pretrained` and loaded
here as a user's folder. CLS and patch tokens agree within 1e-4 relative at the
pre-training size (224²) and at a size whose position grid is interpolated (98×252: rows
down, columns up). Real sizes: parameter counts of ViT-L/14 and ViT-g/14 from
`jax.eval_shape` equal transformers' own (built on torch's meta device). Nothing downloads.
"""

import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from ambient_jax.latent import safetensors_io
from ambient_jax.metrics import dinov2, memorization
from ambient_jax.metrics.dinov2_features import dinov2_features
from tests.latent_reference import nhwc_to_nchw, perturb_, relative_error

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
            image_size=224, layerscale_value=0.5, initializer_range=0.2)
SHAPES = {"S": dict(use_swiglu_ffn=False), "g": dict(use_swiglu_ffn=True)}
# facebook/dinov2-large and facebook/dinov2-giant.
REAL = {"L": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
        "g": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                  use_swiglu_ffn=True)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """shape -> (perturbed transformers model, the folder it was saved to)."""
  out = {}
  for i, (name, extra) in enumerate(SHAPES.items()):
    torch.manual_seed(i)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY, **extra))
    perturb_(model, seed=i, scale=0.5)
    folder = tmp_path_factory.mktemp(f"dinov2_{name}")
    model.save_pretrained(folder)
    out[name] = model, str(folder)
  return out


def _jitted(model):
  """model(pixels) compiled once per input shape (eager dispatch compiles every op)."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, pixels: nnx.merge(graphdef, state)(pixels)[:2])
  return lambda pixels: forward(state, pixels)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_tokens_match_transformers_with_and_without_position_interpolation(tiny, shape):
  """224² is the pre-training grid (16²); 98×252 (7×18) interpolates rows down, columns up."""
  reference, folder = tiny[shape]
  ours = _jitted(dinov2.load_dinov2(folder)[0])
  rng = np.random.default_rng(0)
  for height, width in ((224, 224), (98, 252)):
    pixels = rng.standard_normal((2, height, width, 3)).astype(np.float32)
    with torch.no_grad():
      want = reference(pixel_values=nhwc_to_nchw(pixels))
    last, pooled = ours(pixels)
    assert last.shape == (2, (height // 14) * (width // 14) + 1, TINY["hidden_size"])
    want_tokens = want.last_hidden_state.numpy()
    assert relative_error(last[:, 0], want_tokens[:, 0]) < TOLERANCE
    assert relative_error(last[:, 1:], want_tokens[:, 1:]) < TOLERANCE
    assert relative_error(pooled, want.pooler_output.numpy()) < TOLERANCE


def test_swiglu_width_is_transformers_rule():
  """h = 2/3 of D·mlp_ratio rounded up to 8: 4096 for ViT-g, 88 for the tiny g."""
  assert dinov2.swiglu_hidden_size(1536, 4) == 4096
  assert dinov2.swiglu_hidden_size(32, 4) == 88


@pytest.mark.parametrize("size", list(REAL))
def test_parameter_count_of_real_sizes_equals_transformers(size):
  config = transformers.Dinov2Config(image_size=518, patch_size=14, mlp_ratio=4, **REAL[size])
  with torch.device("meta"):
    reference = transformers.Dinov2Model(config)
  theirs = sum(p.numel() for p in reference.parameters())
  theirs -= reference.embeddings.mask_token.numel()  # pre-training only; not built here
  abstract = dinov2.build_abstract(config.to_dict())
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert ours == theirs


def _dinov2_pipeline_in_torch(reference, images, pooling):
  """The official script's features: F.interpolate(224, bilinear, align_corners=False),
  ImageNet normalisation, CLS or summed normalised patch tokens, L2-normalised."""
  x = nhwc_to_nchw(images)
  x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
  x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
  mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
  std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
  with torch.no_grad():
    tokens = reference(pixel_values=((x + 1) / 2 - mean) / std).last_hidden_state
  f = tokens[:, 0] if pooling == "cls" else tokens[:, 1:].sum(1)
  return torch.nn.functional.normalize(f, dim=-1).numpy()


@pytest.mark.parametrize("pooling,channels,size", [("cls", 3, (96, 160)),
                                                   ("patch_sum", 1, (300, 250))])
def test_features_match_the_papers_pipeline(tiny, pooling, channels, size):
  reference, folder = tiny["S"]
  model, _ = dinov2.load_dinov2(folder)
  images = np.random.default_rng(1).uniform(-1, 1, (5, *size, channels)).astype(np.float32)
  got = dinov2_features(model, images, pooling=pooling, batch_size=8)
  assert got.dtype == np.float32 and got.shape == (5, TINY["hidden_size"])
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  assert relative_error(got, _dinov2_pipeline_in_torch(reference, images, pooling)) < TOLERANCE


def test_features_do_not_depend_on_batching_or_devices(tiny):
  model, _ = dinov2.load_dinov2(tiny["S"][1])
  images = np.random.default_rng(2).uniform(-1, 1, (11, 28, 42, 3)).astype(np.float32)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  one = dinov2_features(model, images, batch_size=4)
  np.testing.assert_allclose(dinov2_features(model, images, batch_size=8, mesh=mesh), one,
                             atol=1e-6)


@pytest.mark.parametrize("mesh_shape", [(8,), (4, 2)])
def test_max_inner_product_equals_dense_numpy_over_many_blocks(mesh_shape):
  names = ("data", "fsdp")[:len(mesh_shape)]
  mesh = jax.make_mesh(mesh_shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))
  rng = np.random.default_rng(3)
  refs = rng.standard_normal((1000, 16)).astype(np.float32)
  queries = np.concatenate([rng.standard_normal((30, 16)), refs[[7, 999, 500]]]).astype(np.float32)
  best, index = memorization.max_inner_product(queries, refs, mesh=mesh, block_size=96,
                                               query_block=16)
  dense = queries.astype(np.float64) @ refs.T.astype(np.float64)
  np.testing.assert_array_equal(index, dense.argmax(1))
  np.testing.assert_allclose(best, dense.max(1), rtol=1e-5)


def test_not_a_dinov2_folder_is_one_line(tmp_path):
  with pytest.raises(dinov2.NotDinov2Error, match="is not a directory") as e:
    dinov2.load_dinov2(tmp_path / "nope")
  assert "\n" not in str(e.value)
  (tmp_path / "config.json").write_text('{"model_type": "clip_vision_model"}')
  with pytest.raises(dinov2.NotDinov2Error, match="'clip_vision_model' is not 'dinov2'") as e:
    dinov2.load_dinov2(tmp_path)
  assert "\n" not in str(e.value)


def test_every_bad_tensor_is_named(tiny, tmp_path):
  folder = tiny["S"][1]
  tensors = dict(safetensors_io.SafetensorsFile(os.path.join(folder, "model.safetensors")))
  del tensors["encoder.layer.1.norm2.bias"]
  tensors["encoder.layer.0.mlp.fc1.weight"] = tensors["encoder.layer.0.mlp.fc1.weight"].T
  tensors["encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
  safetensors_io.save_file(tensors, tmp_path / "model.safetensors", {"format": "pt"})
  (tmp_path / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
  with pytest.raises(dinov2.Dinov2WeightsError) as e:
    dinov2.load_dinov2(tmp_path)
  for name in ("encoder.layer.1.norm2.bias", "encoder.layer.0.mlp.fc1.weight",
               "encoder.layer.0.extra.weight"):
    assert name in str(e.value)
