"""CLIP text encoders and prompt conditioning: parity with transformers 5.23.0 / diffusers 0.42.1.

Tiny random CLIPTextModel / CLIPTextModelWithProjection built by transformers itself,
perturbed (tests/latent_reference.perturb_) and saved with `save_pretrained`; ambient_jax
loads the folder as a user's checkpoint. last_hidden_state, every hidden state, the pooled
output and text_embeds agree within 1e-4 relative (fp32). SDXL's prompt encoding is
checked against StableDiffusionXLPipeline.encode_prompt on the same tiny encoders and
tokenizer files. Nothing is downloaded.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ambient_jax.runtime import sharding
from ambient_jax.latent import safetensors_io, weights
from ambient_jax.latent.clip import (CLIPTextModel, CLIPTextModelWithProjection, check_config,
                                     load_text_encoder, save_text_encoder, text_encoder)
from ambient_jax.latent.configs import bundled_config
from ambient_jax.latent.prompts import encode_prompt_sd, encode_prompt_sdxl, sdxl_time_ids
from ambient_jax.latent.tokenizer import load_tokenizer
from tests.latent_reference import perturb_, relative_error
from tests.test_latent_tokenizer import write_clip_tokenizer

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
VOCAB, BOS, EOS, OTHER_EOS = 1000, 998, 999, 997
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=16,
            bos_token_id=BOS, pad_token_id=1)
# (activation, eos_token_id): 2 is the pre-#24773 value SD / SDXL configs carry (pooling at
# the highest id); any other value pools at the first occurrence of that id.
VARIANTS = {"quick_gelu-eos2": ("quick_gelu", 2), "gelu-eos997": ("gelu", OTHER_EOS)}
CLASSES = {"plain": "CLIPTextModel", "projection": "CLIPTextModelWithProjection"}


def reference(architecture, act, eos_token_id, seed=0, **overrides):
  torch.manual_seed(seed)
  config = transformers.CLIPTextConfig(**{**TINY, "hidden_act": act, "eos_token_id": eos_token_id,
                                          **overrides})
  return perturb_(getattr(transformers, architecture)(config), seed=seed)


def token_ids(eos, length=77, seed=0):
  """[4, length] ids as a tokenizer pads them: bos, text, eos, then eos padding (SD 1.5's
  tokenizer) or 0 padding (SDXL's tokenizer_2); the text holds ids above `eos` too, so
  the two pooling rules pick different positions."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((4, length), np.int64)
  for row, (used, pad) in enumerate([(5, eos), (length, eos), (12, 0), (1, 0)]):
    text = rng.integers(2, VOCAB - 3, size=max(used - 2, 0))
    text[::4] = VOCAB - 1 if eos != VOCAB - 1 else text[::4]
    seq = [BOS, *text[:length - 2], eos]
    ids[row] = pad
    ids[row, :len(seq)] = seq
  return ids


def torch_outputs(model, ids, attention_mask=None):
  """The reference's (last_hidden_state, pooled, hidden_states, text_embeds) as numpy."""
  ids_t = torch.from_numpy(ids)
  mask_t = None if attention_mask is None else torch.from_numpy(attention_mask)
  with torch.no_grad():
    out = model(ids_t, attention_mask=mask_t, output_hidden_states=True)
    text = model.text_model if hasattr(model, "text_projection") else model
    pooled = text(ids_t, attention_mask=mask_t).pooler_output
  embeds = getattr(out, "text_embeds", None)
  return (out.last_hidden_state.numpy(), pooled.numpy(), [h.numpy() for h in out.hidden_states],
          None if embeds is None else embeds.numpy())


def compare(ours, ref, figures=None):
  """Relative error of every output (asserted <= TOLERANCE); `figures` collects them."""
  last, pooled, hidden, embeds = ref
  assert len(ours.hidden_states) == len(hidden) == TINY["num_hidden_layers"] + 1
  pairs = [("last_hidden_state", ours.last_hidden_state, last), ("pooled", ours.pooled, pooled)]
  pairs += [(f"hidden_states[{i}]", o, r) for i, (o, r) in enumerate(zip(ours.hidden_states, hidden))]
  if embeds is not None:
    pairs.append(("text_embeds", ours.text_embeds, embeds))
  else:
    assert ours.text_embeds is None
  for name, o, r in pairs:
    rel = relative_error(o, r)
    if figures is not None:
      figures[name] = (float(np.max(np.abs(np.asarray(o) - r))), rel)
    assert rel <= TOLERANCE, (name, rel)


@pytest.fixture(scope="module", params=[(c, v) for c in CLASSES for v in VARIANTS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request, tmp_path_factory):
  """(torch reference, our model loaded from its save_pretrained folder, folder, eos id)."""
  kind, variant = request.param
  act, eos_token_id = VARIANTS[variant]
  folder = str(tmp_path_factory.mktemp(f"clip_{kind}_{variant}"))
  model = reference(CLASSES[kind], act, eos_token_id)
  model.save_pretrained(folder)
  ours, config = load_text_encoder(folder)
  assert type(ours).__name__ == CLASSES[kind] and config["hidden_act"] == act
  return model, ours, folder, (EOS if eos_token_id == 2 else OTHER_EOS)


def test_outputs_match_transformers(pair):
  model, ours, _, eos = pair
  for length in (77, 9):
    ids = token_ids(eos, length)
    figures = {}
    compare(ours(jnp.asarray(ids)), torch_outputs(model, ids), figures)
    worst = {k: v for k, v in figures.items() if not k.startswith("hidden_states")}
    worst["hidden_states (worst)"] = max((v for k, v in figures.items()
                                          if k.startswith("hidden_states")), key=lambda v: v[1])
    print(f"\n{type(ours).__name__} T={length}: " + ", ".join(
        f"{k} max|Δ| {a:.2e} rel {r:.2e}" for k, (a, r) in worst.items()))


def test_attention_mask_matches_transformers(pair):
  """An optional padding mask [B, T] (SD / SDXL pass none) is applied as transformers does."""
  model, ours, _, eos = pair
  ids = token_ids(eos, 16)
  mask = (np.arange(16)[None] < np.array([[5], [16], [12], [2]])).astype(np.int64)
  compare(ours(jnp.asarray(ids), jnp.asarray(mask)), torch_outputs(model, ids, mask))


def test_jit_and_round_trip(pair, tmp_path):
  """Our save -> transformers from_pretrained (nothing missing or unexpected) -> same outputs;
  and the encoder runs under nnx.jit."""
  model, ours, folder, eos = pair
  ids = token_ids(eos)
  _, config = load_text_encoder(folder)
  save_text_encoder(ours, config, tmp_path)
  names = set(safetensors_io.SafetensorsFile(os.path.join(tmp_path, "model.safetensors")))
  assert "text_model.final_layer_norm.weight" in names and not any("position_ids" in n for n in names)
  reloaded, info = getattr(transformers, type(ours).__name__).from_pretrained(
      tmp_path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  compare(nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(ids)), torch_outputs(reloaded.eval(), ids))


def test_hub_layout_loads(pair, tmp_path):
  """The files SD / SDXL folders ship: `text_model.` prefix everywhere and, from
  transformers < 4.31, an int64 `position_ids` buffer; both read as the same model."""
  model, ours, folder, eos = pair
  file = safetensors_io.SafetensorsFile(os.path.join(folder, "model.safetensors"))
  tensors = {(n if n.startswith(("text_model.", "text_projection.")) else "text_model." + n):
             np.array(file[n]) for n in file}
  tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
  os.makedirs(tmp_path / "hub")
  safetensors_io.save_file(tensors, tmp_path / "hub" / "model.safetensors", {"format": "pt"})
  with open(os.path.join(folder, "config.json")) as src, open(tmp_path / "hub" / "config.json", "w") as dst:
    dst.write(src.read())
  hub, _ = load_text_encoder(tmp_path / "hub")
  ids = jnp.asarray(token_ids(eos, 9))
  np.testing.assert_array_equal(hub(ids).last_hidden_state, ours(ids).last_hidden_state)


def test_sharded_and_bfloat16_loads(pair):
  """Straight into FSDP shards over 8 fake devices: the same numbers. In bfloat16: bf16
  parameters and activations, within bf16 rounding of fp32."""
  _, ours, folder, eos = pair
  ids = jnp.asarray(token_ids(eos, 9))
  mesh = sharding.make_mesh(type("Mesh", (), {"data": 1, "fsdp": 8})())
  sharded, _ = load_text_encoder(folder, shardings=lambda s: sharding.param_sharding(mesh, s, min_size=64))
  assert len(sharded.text_model.embeddings.token_embedding.weight[...].sharding.device_set) == 8
  # One jitted program, as real use runs it (op-by-op dispatch of sharded arrays runs dozens
  # of small 8-device programs, each a rendezvous of the fake devices' threads).
  forward = nnx.jit(lambda m, x: m(x).last_hidden_state)
  np.testing.assert_allclose(forward(sharded, ids), ours(ids).last_hidden_state,
                             rtol=1e-5, atol=1e-5)
  half, _ = load_text_encoder(folder, dtype=jnp.bfloat16)
  out = half(ids)
  assert half.text_model.encoder.layers[0].self_attn.q_proj.weight[...].dtype == jnp.bfloat16
  assert out.last_hidden_state.dtype == jnp.bfloat16
  assert relative_error(out.last_hidden_state, ours(ids).last_hidden_state) < 5e-2


def test_missing_or_misshapen_tensor_is_named(tmp_path):
  reference("CLIPTextModelWithProjection", "gelu", 2).save_pretrained(tmp_path)
  path = os.path.join(tmp_path, "model.safetensors")
  file = safetensors_io.SafetensorsFile(path)
  tensors = {name: np.array(file[name]) for name in file}
  del file
  missing, wrong = "text_model.encoder.layers.1.self_attn.k_proj.bias", "text_projection.weight"
  del tensors[missing]
  tensors[wrong] = tensors[wrong][:, :8]
  safetensors_io.save_file(tensors, path, {"format": "pt"})
  with pytest.raises(ValueError) as err:
    load_text_encoder(tmp_path)
  assert missing in str(err.value) and wrong in str(err.value)


@pytest.mark.parametrize("key,value", [
    ("hidden_act", "relu"), ("architectures", ["CLIPModel"]), ("model_type", "clip"),
    ("num_attention_heads", 5), ("attention_dropout", 0.1), ("vocab_size", None)])
def test_unsupported_config_is_named(key, value):
  config = {**TINY, "hidden_act": "gelu", "eos_token_id": 2, "layer_norm_eps": 1e-5,
            "architectures": ["CLIPTextModel"],
            key: value}
  if value is None:
    del config[key]
  with pytest.raises(ValueError, match=key):
    check_config(config)


@pytest.mark.parametrize("family,component,count", [
    ("sdxl", "text_encoder", 123_060_480), ("sdxl", "text_encoder_2", 694_659_840),
    ("sd15", "text_encoder", 123_060_480)])
def test_real_parameter_counts(family, component, count):
  """eval_shape of the bundled public configs (CLIP ViT-L/14 text, OpenCLIP bigG text)."""
  config = bundled_config(family, component)
  abstract = weights.build_abstract(lambda: text_encoder(config, rngs=nnx.Rngs(0)))
  assert sum(p.size for p in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == count
  want = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
  assert type(abstract) is want


PROMPTS = ["a photograph of an astronaut riding a horse!", "", "Portrait, oil painting"]


@pytest.fixture(scope="module")
def sdxl_parts(tmp_path_factory):
  """Tokenizer folders as SDXL ships them and two tiny encoders sized to their vocabulary:
  (our tokenizers, our encoders, transformers tokenizers, torch encoders)."""
  root = tmp_path_factory.mktemp("sdxl")
  tok_1 = write_clip_tokenizer(root / "tokenizer")
  tok_2 = write_clip_tokenizer(root / "tokenizer_2", pad_token="!", sdxl_style=True)
  ours_tok = load_tokenizer(tok_1), load_tokenizer(tok_2)
  vocab = len(ours_tok[0].vocab)
  common = dict(vocab_size=vocab, bos_token_id=ours_tok[0].bos_token_id, eos_token_id=2)
  torch_enc = (reference("CLIPTextModel", "quick_gelu", **common, seed=1),
               reference("CLIPTextModelWithProjection", "gelu", hidden_size=48,
                         num_attention_heads=3, projection_dim=24, **common, seed=2))
  ours_enc = []
  for name, model in zip(("text_encoder", "text_encoder_2"), torch_enc):
    model.save_pretrained(root / name)
    ours_enc.append(load_text_encoder(root / name)[0])
  torch_tok = tuple(transformers.CLIPTokenizer.from_pretrained(t) for t in (tok_1, tok_2))
  return ours_tok, ours_enc, torch_tok, torch_enc


def test_sdxl_prompt_encoding_matches_diffusers(sdxl_parts):
  """prompt_embeds [B, 77, 32 + 48] and pooled [B, 24] equal StableDiffusionXLPipeline's
  encode_prompt, from the prompts' text (our tokenizers too), with and without clip_skip."""
  diffusers = pytest.importorskip("diffusers")
  (tok_1, tok_2), (enc_1, enc_2), torch_tok, torch_enc = sdxl_parts
  pipe = diffusers.StableDiffusionXLPipeline(
      vae=None, text_encoder=torch_enc[0], text_encoder_2=torch_enc[1], tokenizer=torch_tok[0],
      tokenizer_2=torch_tok[1], unet=None, scheduler=diffusers.EulerDiscreteScheduler())
  for clip_skip in (None, 1):
    with torch.no_grad():
      embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", clip_skip=clip_skip,
                                                do_classifier_free_guidance=False)
    ours_embeds, ours_pooled = encode_prompt_sdxl(jnp.asarray(tok_1(PROMPTS)), jnp.asarray(tok_2(PROMPTS)),
                                                  enc_1, enc_2, clip_skip=clip_skip)
    assert ours_embeds.shape == (3, 77, 80) and ours_pooled.shape == (3, 24)
    assert relative_error(ours_embeds, embeds.numpy()) <= TOLERANCE
    assert relative_error(ours_pooled, pooled.numpy()) <= TOLERANCE


def test_sd_prompt_encoding_matches_diffusers(sdxl_parts):
  """SD 1.x: the context is last_hidden_state, as StableDiffusionPipeline.encode_prompt.
  With clip_skip, an earlier layer through final_layer_norm: diffusers 0.42.1 reaches for
  `text_encoder.text_model.final_layer_norm`, which transformers 5.x's CLIPTextModel no
  longer has, so that reference is written out here."""
  diffusers = pytest.importorskip("diffusers")
  (tok_1, _), (enc_1, _), (torch_tok, _), (torch_enc, _) = sdxl_parts
  pipe = diffusers.StableDiffusionPipeline(
      vae=None, text_encoder=torch_enc, tokenizer=torch_tok, unet=None,
      scheduler=diffusers.EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  ids = tok_1(PROMPTS)
  with torch.no_grad():
    embeds, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    hidden = torch_enc(torch.from_numpy(ids).long(), output_hidden_states=True).hidden_states
    skipped = torch_enc.final_layer_norm(hidden[-2])
  assert relative_error(encode_prompt_sd(jnp.asarray(ids), enc_1), embeds.numpy()) <= TOLERANCE
  assert relative_error(encode_prompt_sd(jnp.asarray(ids), enc_1, clip_skip=1),
                        skipped.numpy()) <= TOLERANCE


def test_sdxl_time_ids_match_diffusers():
  """(original size, crop top-left, target size) in diffusers' order."""
  diffusers = pytest.importorskip("diffusers")
  fake = type("Pipe", (), {})()
  fake.unet = type("U", (), {})()
  fake.unet.config = type("C", (), {"addition_time_embed_dim": 256})()
  fake.unet.add_embedding = type("E", (), {})()
  fake.unet.add_embedding.linear_1 = torch.nn.Linear(6 * 256 + 1280, 1)
  expected = diffusers.StableDiffusionXLPipeline._get_add_time_ids(
      fake, (896, 1152), (16, 32), (1024, 1024), torch.float32, text_encoder_projection_dim=1280)
  np.testing.assert_array_equal(sdxl_time_ids((896, 1152), (16, 32), (1024, 1024)), expected.numpy()[0])
  with pytest.raises(ValueError):
    sdxl_time_ids((1024, 1024), (0,), (1024, 1024))
