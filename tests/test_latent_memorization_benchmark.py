"""benchmarks/latent_memorization.py's building blocks (its --quick run takes minutes): the
tiny pretrained folder it writes is a diffusers SD folder that the project's loading path
opens, prepares latents from and samples with the right shapes."""

import importlib.util
import json
import pathlib

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _benchmark():
  spec = importlib.util.spec_from_file_location(
      "latent_memorization_bench", ROOT / "benchmarks" / "latent_memorization.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_pretrained_folder_loads_prepares_and_generates(tmp_path):
  bench = _benchmark()
  from ambient_jax import prepare_latents
  from ambient_jax.latent import dataset as dataset_lib, pipeline
  x_pre, y_pre, x_train, heldout = bench.split_digits(8, seed=0)
  assert x_pre.shape[1:] == (16, 16, 3) and not np.any(y_pre == bench.HELD_CLASS)
  assert len(x_train) == 8 and len(x_train) + len(heldout) == np.sum(
      bench.digit_features.load_digits(16)[1] == bench.HELD_CLASS)
  args = type("Args", (), dict(seed=0, pretrain_batch=4, vae_steps=0, unet_steps=0,
                               kl_weight=1e-4, pretrain_lr=1e-3))()
  folder = tmp_path / "pretrained"
  info = bench.pretrain(str(folder), x_pre[:64], y_pre[:64], args)
  assert info["unet_params"] > 0
  index = json.loads((folder / "model_index.json").read_text())
  assert index["_class_name"] == "StableDiffusionPipeline"
  pipe = pipeline.load_pretrained(folder)
  assert not pipe.is_sdxl and pipe.latent_scale_factor == 2
  images = pipe.generate([bench.caption(9)], jax.random.split(jax.random.key(0), 1), num_steps=2,
                         guidance_scale=2.0)
  assert images.shape == (1, 16, 16, 3) and np.all(np.isfinite(np.asarray(images)))
  out = prepare_latents.prepare(prepare_latents.Args(
      images=bench.write_images(str(tmp_path / "images"), x_train[:4]), pretrained=str(folder),
      out=str(tmp_path / "latents"), resolution=16, t_n=800, batch_size=4), log=lambda m: None)
  data = dataset_lib.open_latent_dataset(out)
  assert data.num_examples == 4 and data.latent_shape == (8, 8, 4)
  np.testing.assert_allclose(data.sigma_n, float(pipe.schedule.vp_sigmas[800]), rtol=1e-3)


def test_miniature_runs_end_to_end_through_the_project_path(tmp_path):
  """The whole benchmark at toy sizes (2 steps everywhere): pretraining, preparation, a
  Trainer fine-tune, evaluation through latent.evaluation (samples, attack) and the
  table/JSON/picture. The numbers mean nothing here; that they are produced does."""
  bench = _benchmark()
  out = tmp_path / "out"
  bench.main(["--vae_steps", "2", "--unet_steps", "2", "--steps", "2", "--train_size", "8",
              "--batch", "8", "--num_samples", "8", "--sample_steps", "10", "--posterior_steps", "1",
              "--t_n", "800", "--methods", "ambient", "--workdir", str(tmp_path / "work"),
              "--out", str(out)])
  result = json.loads((tmp_path / "out.json").read_text())
  names = [r["name"] for r in result["results"]]
  assert names == ["held-out real nines", "pretrained (no fine-tune)", "ambient"]
  ambient = result["results"][-1]
  assert ambient["t_n"] == 800 and ambient["sampling"] == "truncated"
  assert np.isfinite(ambient["fd"]) and ambient["samples_nn"]["count"] == 8
  for method in ("mmse", "posterior"):
    assert ambient["attack"][method]["count"] == 8  # every fine-tuning image attacked
  assert result["copy_rmse"] > 0
  assert (tmp_path / "out_samples.png").stat().st_size > 0
  assert "| ambient | 800 | truncated |" in (tmp_path / "out.txt").read_text()
