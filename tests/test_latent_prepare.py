"""Noisy-latent dataset preparation (ambient_jax.prepare_latents) and its reader
(ambient_jax.data.latent), on a tiny SDXL folder diffusers writes and a dozen small
generated images of several sizes: the stored latents are the documented VAE sample noised
at t_n with the documented noise, the prompt tables are the pipeline's encodings, a stopped
run resumes to the same bytes, and every mistake is one clear line.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ambient_jax import cli, prepare_latents
from ambient_jax.data import latent as ds
from ambient_jax.latent import pipeline
from tests.latent_reference import save_tiny_sdxl_pipeline

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESOLUTION, T_N, SEED, BATCH = 32, 500, 3, 4
# (relative path, (height, width), caption or None): wide, tall, square, odd and too-small
# images; a subfolder and a JPEG; repeated captions (5 unique prompts with "").
IMAGES = [("a.png", (40, 48), "a red blob"), ("b.png", (48, 40), "a red blob"),
          ("c.png", (32, 32), None), ("d.png", (36, 64), "two blobs, one blue"),
          ("e.png", (64, 36), None), ("f.png", (33, 47), "a red blob"),
          ("g.png", (20, 24), "small"), ("h.png", (50, 50), None),
          ("sub/i.jpg", (45, 40), "two blobs, one blue"), ("sub/j.png", (32, 40), "last")]


def _blobs(rng, height: int, width: int) -> np.ndarray:
  """uint8 [H, W, 3]: a few soft coloured Gaussian blobs on a grey background."""
  y, x = np.mgrid[:height, :width]
  image = np.full((height, width, 3), 90.0)
  for _ in range(3):
    cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(4, 12)
    image += rng.uniform(-120, 160, 3) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / r**2)[..., None]
  return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """(images folder, pretrained folder, the prepared dataset of an uninterrupted run)."""
  root = tmp_path_factory.mktemp("prepare")
  images = root / "images"
  rng = np.random.default_rng(0)
  with_captions = []
  for name, (h, w), caption in IMAGES:
    (images / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_blobs(rng, h, w)).save(images / name)
    if caption is not None:
      with_captions.append({"file_name": name, "text": caption})
  with_captions.append({"file_name": "not_there.png", "text": "ignored"})
  (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in with_captions))
  (images / "notes.txt").write_text("not an image")
  _, folder = save_tiny_sdxl_pipeline(root / "model")
  out = prepare_latents.prepare(_args(images, folder, root / "full"), log=lambda m: None)
  return str(images), folder, out


def _args(images, pretrained, out, **changes) -> prepare_latents.Args:
  base = dict(images=str(images), pretrained=str(pretrained), out=str(out),
              resolution=RESOLUTION, t_n=T_N, corruption_seed=SEED, batch_size=BATCH)
  return prepare_latents.Args(**{**base, **changes})


@pytest.fixture(scope="module")
def reference(inputs):
  """Our own pipeline loaded from the folder (the independent computation)."""
  return pipeline.load_pretrained(inputs[1])


def test_latents_are_the_documented_noisy_vae_samples(inputs, reference):
  """x_n[i] = √(1−σ_n²)·vae.to_latents(image_i, fold_in(key(seed ^ 0x5A17), i)) + σ_n·ε[i],
  ε[i] ~ N(0, I) from fold_in(key(seed), i); σ_n = the scheduler's VP σ at t_n."""
  images, _, out = inputs
  data = ds.open_latent_dataset(out)
  sigma = float(reference.schedule.vp_sigmas[T_N])
  assert data.num_examples == len(IMAGES) and data.latent_shape == (16, 16, 4) and data.is_sdxl
  np.testing.assert_array_equal(data.sigma_n, np.full(len(IMAGES), sigma, np.float32))
  assert data.meta["t_n"] == T_N and data.meta["sigma_n"] == pytest.approx(0.851, abs=1e-3)
  assert data.meta["file_names"] == sorted(n for n, _, _ in IMAGES)
  to_latents = jax.jit(lambda x, key: reference.vae.to_latents(x, key))
  residuals, noises = [], []
  for i, name in enumerate(data.meta["file_names"]):
    pixels = ds.load_image(os.path.join(images, name), RESOLUTION)[0]
    x = jnp.asarray(pixels, jnp.float32)[None] / 127.5 - 1.0
    z0 = to_latents(x, jax.random.fold_in(jax.random.key(SEED ^ 0x5A17), i))[0]
    eps = jax.random.normal(jax.random.fold_in(jax.random.key(SEED), i), z0.shape)
    stored = data.get_batch(np.array([i]))["latent"][0]
    np.testing.assert_allclose(stored, np.sqrt(1 - sigma**2) * z0 + sigma * eps,
                               atol=2e-3, rtol=2e-3)  # float16 storage
    residuals.append(stored - np.sqrt(1 - sigma**2) * np.asarray(z0))
    noises.append(np.asarray(eps))
  # The convention: what remains after the signal is σ_n·ε, unit-variance noise.
  residuals, noises = np.stack(residuals), np.stack(noises)
  np.testing.assert_allclose(residuals / sigma, noises, atol=5e-3)
  assert abs(np.std(residuals) / sigma - 1) < 0.05


def test_prompt_tables_are_the_pipelines_encodings(inputs, reference):
  """Each example's context / pooled rows = pipeline.encode_text of its caption; time ids =
  (original size, crop after the resize, target); SDXL base drops the prompt as zeros."""
  images, _, out = inputs
  data = ds.open_latent_dataset(out)
  captions = {n: c or "" for n, _, c in IMAGES}
  assert data.meta["captions"] == [captions[n] for n in data.meta["file_names"]]
  assert data.meta["num_prompts"] == 5 == len(data.meta["prompts"])
  batch = data.get_batch(np.arange(data.num_examples))
  expected = reference.encode_text(data.meta["captions"], (RESOLUTION, RESOLUTION))
  np.testing.assert_allclose(batch["context"], expected.context, rtol=2e-3, atol=2e-3)  # float16
  np.testing.assert_allclose(batch["text_embeds"], expected.text_embeds, rtol=1e-5, atol=1e-6)
  by_name = dict(zip(data.meta["file_names"], batch["time_ids"]))
  # 40×48 -> 32×38, crop left round(6/2) = 3; 64×36 (tall) -> 56×32, crop top 12; 20×24 up.
  np.testing.assert_array_equal(by_name["a.png"], [40, 48, 0, 3, 32, 32])
  np.testing.assert_array_equal(by_name["e.png"], [64, 36, 12, 0, 32, 32])
  np.testing.assert_array_equal(by_name["g.png"], [20, 24, 0, 3, 32, 32])
  uncond = data.uncond()
  assert data.meta["uncond"] == "zeros"
  assert uncond["context"].shape == (77, 24) and not uncond["context"].any()
  assert uncond["text_embeds"].shape == (12,) and not uncond["text_embeds"].any()


def test_reader_batches_and_clean_images(inputs):
  images, _, out = inputs
  data = ds.open_latent_dataset(out)
  batch = data.get_batch(np.array([9, 0, 9]))
  shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
  assert shapes == {"latent": ((3, 16, 16, 4), np.float32), "sigma_n": ((3,), np.float32),
                    "index": ((3,), np.int32), "context": ((3, 77, 24), np.float32),
                    "text_embeds": ((3, 12), np.float32), "time_ids": ((3, 6), np.float32)}
  np.testing.assert_array_equal(batch["index"], [9, 0, 9])
  np.testing.assert_array_equal(batch["latent"][0], batch["latent"][2])
  clean = data.clean_image(8)
  assert clean.dtype == np.uint8 and clean.shape == (32, 32, 3)
  assert data.meta["file_names"][8] == "sub/i.jpg"
  np.testing.assert_array_equal(clean, ds.load_image(os.path.join(images, "sub/i.jpg"), 32)[0])
  with pytest.raises(IndexError):
    data.get_batch(np.array([10]))


def test_stopped_run_resumes_to_the_same_files(inputs, tmp_path):
  """Stopped after the two prompt chunks and one latent chunk: the reader says how far it got
  and how to resume; the same arguments again finish it, byte for byte an uninterrupted run;
  then the command line finds it complete (the flags make the same arguments)."""
  images, folder, full = inputs
  out = tmp_path / "resumed"
  lines = []
  prepare_latents.prepare(_args(images, folder, out), stop_after_chunks=3, log=lines.append)
  assert "stopped after 3 chunks" in lines[-1]
  with pytest.raises(ValueError, match=r"not finished \(4 of 10 examples done\).*"
                                       r"python -m ambient_jax.prepare_latents --images="):
    ds.open_latent_dataset(out)
  with pytest.raises(cli.UsageError, match="--corruption_seed=3, this run has --corruption_seed=4"):
    prepare_latents.prepare(_args(images, folder, out, corruption_seed=4), log=lines.append)
  prepare_latents.prepare(_args(images, folder, out), log=lines.append)
  assert "finished" in lines[-1]
  for name in sorted(os.listdir(full)):
    if name.endswith(".npy"):
      assert (out / name).read_bytes() == (pathlib.Path(full) / name).read_bytes(), name
  meta = lambda path: {k: v for k, v in ds.read_meta(str(path)).items() if k != "command"}
  assert meta(out) == meta(full)
  proc = _run("--images", images, "--pretrained", folder, "--out", out, "--resolution", 32,
              "--t_n", T_N, "--corruption_seed", SEED, "--batch_size", BATCH)
  assert proc.returncode == 0, proc.stderr
  assert "already complete" in proc.stdout and len(proc.stdout.splitlines()) == 1


def test_unusable_datasets_are_named(inputs, tmp_path):
  _, _, full = inputs
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ds.open_latent_dataset(tmp_path / "nothing")
  broken = tmp_path / "broken"
  shutil.copytree(full, broken)
  os.remove(broken / "time_ids.npy")
  with pytest.raises(FileNotFoundError, match="time_ids.npy is missing"):
    ds.open_latent_dataset(broken)
  np.save(broken / "time_ids.npy", np.zeros((3, 6), np.float32))
  with pytest.raises(ValueError, match=r"time_ids.npy: float32 \(3, 6\), but meta.json says"):
    ds.open_latent_dataset(broken)


def _run(*args) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
  argv = [f"{a}={b}" for a, b in zip(args[::2], args[1::2])]
  return subprocess.run([sys.executable, "-m", "ambient_jax.prepare_latents", *argv], cwd=ROOT,
                        env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                        timeout=120)


@pytest.mark.parametrize("change, code, fragment", [
    ({"--t_n": 1000}, 2, "--t_n=1000 is out of range: the scheduler has DDPM steps 0..999"),
    ({"--images": "/nonexistent/images"}, 1, "--images=/nonexistent/images: no such folder"),
    ({"--attention": "cudnn"}, 2, "--attention=cudnn: attention implementation 'cudnn' needs a "
                                  "gpu backend, this is 'cpu'"),
])
def test_command_line_mistakes_are_one_line(inputs, tmp_path, change, code, fragment):
  images, folder, _ = inputs
  args = {"--images": images, "--pretrained": folder, "--out": tmp_path / "o", "--t_n": T_N,
          "--resolution": 32, **change}
  proc = _run(*[x for kv in args.items() for x in kv])
  out = proc.stdout + proc.stderr
  assert proc.returncode == code, out
  assert out.splitlines() == [f"ambient_jax.prepare_latents: error: {out.split('error: ')[1].strip()}"]
  assert fragment in out and "Traceback" not in out


def test_sd_folder_clean_latents(inputs, tmp_path):
  """An SD-family folder (one text encoder; made from the SDXL one, whose UNet preparation
  never loads): context = last_hidden_state, the dropped prompt = the encoding of "", no
  SDXL tables; --sigma_n=0 stores the scaled VAE samples themselves."""
  images, folder, _ = inputs
  sd = tmp_path / "sd"
  shutil.copytree(folder, sd, ignore=shutil.ignore_patterns("*_2"))
  index = json.loads((sd / "model_index.json").read_text())
  (sd / "model_index.json").write_text(json.dumps(
      {**index, "text_encoder_2": [None, None], "tokenizer_2": [None, None]}))
  out = prepare_latents.prepare(_args(images, sd, tmp_path / "out", t_n=None, sigma_n=0.0,
                                      max_examples=3), log=lambda m: None)
  data = ds.open_latent_dataset(out)
  assert not data.is_sdxl and data.meta["family"] == "sd" and data.meta["uncond"] == "empty prompt"
  assert sorted(f for f in os.listdir(out) if f.endswith(".npy")) == [
      "context.npy", "latents.npy", "prompt_index.npy", "sigma_n.npy", "uncond_context.npy"]
  batch = data.get_batch(np.arange(3))
  assert set(batch) == {"latent", "sigma_n", "index", "context"} and not batch["sigma_n"].any()
  components = prepare_latents.load_components(str(sd))
  encoder, tok = components.text_encoders[0], components.tokenizers[0]
  texts = data.meta["captions"][:3] + [""]
  states = np.asarray(encoder(jnp.asarray(tok(texts))).last_hidden_state)
  np.testing.assert_allclose(batch["context"], states[:3], rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(data.uncond()["context"], states[3], rtol=2e-3, atol=2e-3)
  pixels = ds.load_image(data.image_path(2), RESOLUTION)[0]
  z0 = components.vae.to_latents(jnp.asarray(pixels, jnp.float32)[None] / 127.5 - 1.0,
                                 jax.random.fold_in(jax.random.key(SEED ^ 0x5A17), 2))[0]
  np.testing.assert_allclose(batch["latent"][2], z0, rtol=2e-3, atol=2e-3)
