"""Shared pieces of the latent-model parity tests: PyTorch references built in the test.

torch, diffusers and transformers come from the `test` extra (torch pinned to 2.13.0, a
CPU wheel); nothing here downloads anything. Tiny random models are made by those
libraries themselves, every parameter perturbed (so that a swapped GroupNorm / LayerNorm
or a zero-initialised layer cannot hide a mis-mapped name), and saved with
`save_pretrained`; ambient_jax then loads the folder as a user's checkpoint.
"""

import numpy as np
import torch


def perturb_(module: "torch.nn.Module", seed: int = 0, scale: float = 0.2) -> "torch.nn.Module":
  """Adds seeded noise to every parameter in place (scale · max(std, 0.05) · N(0, 1))."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      spread = max(float(p.float().std()) if p.numel() > 1 else 0.0, 0.05)
      p.add_(scale * spread * torch.randn(p.shape, generator=gen, dtype=p.dtype))
  return module.eval()


def nchw_to_nhwc(t) -> np.ndarray:
  """torch [B, C, H, W] -> numpy [B, H, W, C]."""
  return np.transpose(t.detach().float().numpy(), (0, 2, 3, 1))


def nhwc_to_nchw(a) -> "torch.Tensor":
  """numpy/jax [B, H, W, C] -> torch [B, C, H, W] float32."""
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(a, np.float32), (0, 3, 1, 2))))


def relative_error(ours, reference) -> float:
  """max |ours − reference| / max |reference|: the parity figure the tests bound by 1e-4."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  assert ours.shape == reference.shape, (ours.shape, reference.shape)
  return float(np.max(np.abs(ours - reference)) / max(np.max(np.abs(reference)), 1e-12))


# Tiny UNet configs that keep every structural feature of the two families.
TINY_UNETS = {
    # SD 1.x: cross-attention down/up blocks, 1x1-conv projections, one head count for all.
    "sd15": dict(block_out_channels=(16, 32), layers_per_block=2, sample_size=16,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8),
    # SDXL: plain first level, linear projections, per-block heads and transformer depths,
    # text_time added embedding (pooled text 12 + 6 time ids x 4), upcast attention.
    "sdxl": dict(block_out_channels=(16, 32, 32), layers_per_block=1, sample_size=16,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=24, attention_head_dim=(2, 4, 4),
                 transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=12 + 6 * 4, norm_num_groups=8,
                 upcast_attention=True),
    # SDXL's features (text_time embedding, linear projections, per-block heads, upcast) on
    # two levels with one transformer each: the training, evaluation and attack tests, where
    # XLA's compile of a train step or sampler is the cost (about half of "sdxl"'s).
    "sdxl_small": dict(block_out_channels=(16, 32), layers_per_block=1, sample_size=16,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                       cross_attention_dim=24, attention_head_dim=(2, 4),
                       transformer_layers_per_block=(1, 1), use_linear_projection=True,
                       addition_embed_type="text_time", addition_time_embed_dim=4,
                       projection_class_embeddings_input_dim=12 + 6 * 4, norm_num_groups=8,
                       upcast_attention=True),
}
TINY_POOLED = 12  # SDXL-shaped tiny UNet: pooled text width


def save_tiny_unet(folder, kind: str, seed: int = 0):
  """diffusers builds, perturbs and saves a tiny UNet2DConditionModel; returns it (eval mode)."""
  from diffusers import UNet2DConditionModel
  torch.manual_seed(seed)
  model = perturb_(UNet2DConditionModel(**TINY_UNETS[kind]), seed)
  model.save_pretrained(folder)
  return model


def unet_inputs(kind: str, batch: int = 2, seed: int = 0, tokens: int = 7):
  """Numpy inputs for a tiny UNet: x [B, 16, 16, 4], t [B], context [B, T, 24] and, for the
  SDXL shape, text_embeds [B, 12] and time_ids [B, 6]."""
  rng = np.random.default_rng(seed)
  inputs = dict(x=rng.standard_normal((batch, 16, 16, 4)).astype(np.float32),
                t=rng.uniform(0, 999, batch).astype(np.float32),
                context=rng.standard_normal((batch, tokens, 24)).astype(np.float32))
  if kind.startswith("sdxl"):
    inputs["text_embeds"] = rng.standard_normal((batch, TINY_POOLED)).astype(np.float32)
    inputs["time_ids"] = np.tile(np.array([[128, 128, 0, 0, 128, 128]], np.float32), (batch, 1))
    inputs["time_ids"][0] = [96, 112, 4, 8, 128, 128]
  return inputs


def torch_unet_output(model, inputs) -> np.ndarray:
  """The diffusers UNet's output on `unet_inputs`, as numpy NHWC."""
  added = None
  if "text_embeds" in inputs:
    added = {"text_embeds": torch.from_numpy(inputs["text_embeds"]),
             "time_ids": torch.from_numpy(inputs["time_ids"])}
  with torch.no_grad():
    out = model(nhwc_to_nchw(inputs["x"]), torch.from_numpy(inputs["t"]),
                torch.from_numpy(inputs["context"]), added_cond_kwargs=added).sample
  return nchw_to_nhwc(out)


def save_tiny_sdxl_pipeline(root, unet: str = "sdxl"):
  """A complete tiny SDXL diffusers folder (two CLIP tokenizers and text encoders, a
  2-level VAE with SDXL's scaling factor, the tiny UNet `TINY_UNETS[unet]`, Euler
  scheduler), built and written by diffusers' own save_pretrained under `root/sdxl`.

  Returns (the diffusers StableDiffusionXLPipeline, the folder as a str). Images of 32×32
  have latents of 16×16×4; text context is 8 + 16 = 24 wide, pooled 12.
  """
  import pathlib
  import diffusers
  import transformers
  from ambient_jax.latent import configs
  from tests.test_latent_tokenizer import write_clip_tokenizer
  root = pathlib.Path(root)
  tok_1 = write_clip_tokenizer(root / "src_tok")
  tok_2 = write_clip_tokenizer(root / "src_tok_2", pad_token="!", sdxl_style=True)
  vocab = len(transformers.CLIPTokenizer.from_pretrained(tok_1).get_vocab())
  common = dict(vocab_size=vocab, max_position_embeddings=77, intermediate_size=37,
                num_hidden_layers=2, eos_token_id=2, bos_token_id=vocab - 2)
  torch.manual_seed(0)
  enc_1 = perturb_(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      hidden_size=8, num_attention_heads=2, hidden_act="quick_gelu", **common)), 1)
  enc_2 = perturb_(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      hidden_size=16, num_attention_heads=2, projection_dim=TINY_POOLED, hidden_act="gelu",
      **common)), 2)
  vae = perturb_(diffusers.AutoencoderKL(
      block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
      up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4,
      latent_channels=4, sample_size=32, scaling_factor=0.13025), 3)
  unet_ref = save_tiny_unet(root / "src_unet", unet)
  pipe = diffusers.StableDiffusionXLPipeline(
      vae=vae, text_encoder=enc_1, text_encoder_2=enc_2,
      tokenizer=transformers.CLIPTokenizer.from_pretrained(tok_1),
      tokenizer_2=transformers.CLIPTokenizer.from_pretrained(tok_2), unet=unet_ref,
      scheduler=diffusers.EulerDiscreteScheduler.from_config(configs.bundled_config("sdxl", "scheduler")))
  pipe.save_pretrained(root / "sdxl")
  return pipe, str(root / "sdxl")


def prepare_tiny_sdxl_dataset(root, t_n: int = 500, num_images: int = 8,
                              unet: str = "sdxl_small"):
  """(tiny SDXL folder, noisy-latent dataset at `t_n`) of `num_images` captioned 32×32 RGB
  images (seeded noise around grey; captions "image number {i % 3}"), made under `root`
  by `save_tiny_sdxl_pipeline` (with the two-level UNet unless `unet` says otherwise) and
  `prepare_latents`. Returns both paths as str."""
  import pathlib
  from PIL import Image
  from ambient_jax import prepare_latents
  root = pathlib.Path(root)
  images = root / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  lines = []
  for i in range(num_images):
    pixels = np.clip(rng.normal(128, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(images / f"{i}.png")
    lines.append(f'{{"file_name": "{i}.png", "text": "image number {i % 3}"}}\n')
  (images / "metadata.jsonl").write_text("".join(lines))
  _, folder = save_tiny_sdxl_pipeline(root / "model", unet)
  out = prepare_latents.prepare(prepare_latents.Args(
      images=str(images), pretrained=folder, out=str(root / "latents"), resolution=32, t_n=t_n,
      batch_size=4), log=lambda m: None)
  return folder, out


def sdxl_config(arg: str = "smoke"):
  """configs/sdxl.py's get_config(arg) (the configs folder is not a package)."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parent.parent / "configs" / "sdxl.py"
  spec = importlib.util.spec_from_file_location("sdxl_cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_latent_workdir(root, devices) -> str:
  """A latent run's workdir at step 2 under `root`, as configs/sdxl.py:smoke's Trainer leaves
  it, on the tiny SDXL folder and an 8-image dataset at t_n = 500
  (`prepare_tiny_sdxl_dataset`), with random non-zero adapters (B too: an export parity or an
  attack would be blind with B ≈ 0) in the parameters and the EMA. The state is the Trainer's
  own and saved by it; only the train step is skipped (its compile is most of a smoke run's
  time; tests/test_latent_training.py runs it). Returns the workdir."""
  import pathlib
  import jax
  from ambient_jax.runtime import metrics_io
  from ambient_jax.training import trainer as train
  root = pathlib.Path(root)
  folder, dataset = prepare_tiny_sdxl_dataset(root)
  config = sdxl_config()
  config.latent.pretrained, config.latent.dataset = folder, dataset
  config.num_train_steps, config.sample.every_steps = 2, -1
  wd = str(root / "run")
  trainer = train.Trainer(config, wd, devices=devices)
  state = trainer.initial_state()
  leaves, treedef = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = jax.tree.unflatten(treedef, [
      jax.device_put(a + 0.1 * jax.random.normal(k, a.shape, a.dtype), a.sharding)
      for a, k in zip(leaves, keys)])
  state = state.replace(step=jax.device_put(state.step + 2, state.step.sharding),
                        params=params, ema=(params,))
  metrics_io.write_config_json(wd, config)
  trainer.save(2, state)
  trainer.close()
  return wd
