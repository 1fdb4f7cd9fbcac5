"""Evaluation and LoRA export of a latent run: a configs/sdxl.py:smoke workdir (step 2) on
the tiny SDXL folder (tests/latent_reference.py), made once for the module.

- `python -m ambient_jax.evaluate` on it writes metrics.json with the memorization attack's
  figures (held-out calibrated), the sample grid and the histogram;
- the attack's MMSE reconstruction is x0 = (x_t − σ_t ε̂(x_t, t)) / √(1 − σ_t²) computed
  here from the UNet directly (VP, t = 800);
- the exported LoRA file gives the run's UNet output in ours and in diffusers;
- mistakes are one line.
The run is the smoke Trainer's state with random adapters, saved by the Trainer at step 2
(see the `workdir` fixture).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ambient_jax import cli, evaluate, export_lora
from ambient_jax.evaluation import latent as evaluation
from ambient_jax.latent import lora, unet
from tests.latent_reference import relative_error, tiny_latent_workdir, torch_unet_output

DEVICES = 1  # one device: the cheapest compiles (sharding is tested in test_latent_training)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A latent run's workdir at step 2 (`latent_reference.tiny_latent_workdir`)."""
  return tiny_latent_workdir(tmp_path_factory.mktemp("latent_eval"), jax.devices()[:DEVICES])


@pytest.fixture(scope="module")
def run(workdir):
  return evaluation.LatentRun(workdir, devices=jax.devices()[:DEVICES])


@pytest.fixture(scope="module")
def unet_fn():
  """(model, inputs) -> UNet output, jitted once for every model of the run's structure."""
  cache = {}

  def apply(model, inputs):
    graphdef, state = nnx.split(model)
    if graphdef not in cache:
      cache[graphdef] = jax.jit(lambda st, x, t, c, p, ids: nnx.merge(graphdef, st)(
          x, t, c, text_embeds=p, time_ids=ids))
    return np.asarray(cache[graphdef](state, inputs["x"], inputs["t"], inputs["context"],
                                      inputs["text_embeds"], inputs["time_ids"]))

  return apply


def _inputs(run, t=(800.0, 300.0)):
  """UNet inputs with the fine-tuning set's first two prompts and random latents."""
  batch = run.dataset.get_batch(np.arange(2))
  x = np.random.default_rng(0).standard_normal((2, *run.dataset.latent_shape)).astype(np.float32)
  return dict(x=x, t=np.asarray(t, np.float32), context=batch["context"],
              text_embeds=batch["text_embeds"], time_ids=batch["time_ids"])


def test_exported_lora_reproduces_the_run_in_ours_and_in_diffusers(workdir, run, unet_fn,
                                                                   tmp_path):
  import diffusers
  out = export_lora.export(workdir, str(tmp_path / "lora.safetensors"),
                           devices=jax.devices()[:DEVICES])  # restores without base weights
  inputs = _inputs(run)
  expected = unet_fn(run.model(), inputs)  # EMA 0 over the frozen base, as evaluation uses it
  base, _ = unet.load_unet(os.path.join(run.task.pretrained, "unet"))
  assert lora.load_lora(base, out) == len(lora.adapted_layers(run.model()))
  assert relative_error(unet_fn(base, inputs), expected) <= 1e-6
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(run.task.pretrained)
  plain = torch_unet_output(pipe.unet, inputs)
  assert relative_error(plain, expected) > 1e-3  # the adapters matter: the test is not blind
  pipe.load_lora_weights(out)
  err = relative_error(expected, torch_unet_output(pipe.unet, inputs))
  print(f"export parity vs diffusers: relative {err:.2e}")
  assert err <= 1e-4


def test_initial_run_is_the_pretrained_unet_and_leaves_the_run_alone(run, unet_fn):
  """LatentRun.initial(): step 0, zero-B adapters, so exactly the base UNet's output."""
  first = run.initial()
  inputs = _inputs(run)
  base, _ = unet.load_unet(os.path.join(run.task.pretrained, "unet"))
  expected = unet_fn(base, inputs)
  assert first.step == 0 and run.step == 2
  assert relative_error(unet_fn(first.model(), inputs), expected) <= 1e-6
  assert relative_error(unet_fn(run.model(), inputs), expected) > 1e-3  # the run keeps its adapters


def test_export_restore_reads_no_base_weights(workdir, run):
  light = evaluation.LatentRun(workdir, devices=jax.devices()[:DEVICES], base_weights=False)
  frozen = jax.tree.leaves(light.task.frozen)
  assert frozen and all(isinstance(a, jax.ShapeDtypeStruct) for a in frozen)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(light.params),
               jax.device_get(run.params))


@pytest.fixture(scope="module")
def pixel_workdir(workdir, tmp_path_factory):
  """A workdir whose config.json is the run's without latent.pretrained (a pixel run's)."""
  pixel = tmp_path_factory.mktemp("pixel")
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  config["latent"]["pretrained"] = ""
  (pixel / "config.json").write_text(json.dumps(config))
  return str(pixel)


def test_evaluate_writes_the_attack_figures_and_pngs(workdir, run, tmp_path):
  from PIL import Image
  heldout = tmp_path / "heldout"
  heldout.mkdir()
  rng = np.random.default_rng(1)
  for i in range(4):
    Image.fromarray(np.clip(rng.normal(128, 60, (40, 36, 3)), 0, 255).astype(np.uint8)).save(
        heldout / f"h{i}.png")
  result = evaluate.evaluate(workdir, run=run, sampling="truncated", num_samples=8, batch_size=8,
                             metrics=("memorization",), posterior_steps=2, attack_t=800,
                             heldout_images=str(heldout), cache_dir=str(tmp_path))
  with open(os.path.join(workdir, "eval", "2", "metrics.json")) as f:
    saved = json.load(f)
  assert saved["kind"] == "latent" and saved["step"] == 2 and saved["num_steps"] == 3
  assert saved["sigma_stop"] == pytest.approx(run.schedule.ve_sigmas[500], rel=1e-3)  # t_n = 500
  mem = saved["memorization"]
  assert mem["attack_t"] == 800 and mem["features"] == "pixels"
  assert mem["attack_sigma_vp"] == pytest.approx(float(run.schedule.vp_sigmas[800]))
  for m in ("mmse", "posterior", "samples"):
    assert 0.0 <= mem[m]["frac_sim_above_0.95"] <= mem[m]["frac_sim_above_0.9"] <= 1.0
    assert 0.0 <= mem[m]["frac_copies"] <= 1.0
  for m in ("mmse", "posterior"):
    assert mem[m]["count"] == 8 and 0.0 <= mem[m]["self_match_features"] <= 1.0
  assert mem["samples"]["count"] == 8 and mem["heldout"]["count"] == 4
  print({m: {k: round(v, 3) for k, v in mem[m].items()} for m in ("mmse", "posterior", "samples")})
  for key in ("samples_png", "memorization_png", "attack_png"):
    with open(result[key], "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_attack_mmse_is_the_eps_formula(run, unet_fn):
  """D(x, σ^VE_t) of the attack = (x_t − σ_t ε̂(x_t, t)) / √(1 − σ_t²), ε̂ from the UNet."""
  encode, _ = run.coder
  z0 = encode(evaluation.clean_images(run))  # all 8: the shapes evaluation compiled
  _, recon = evaluation.attack_latents(run, z0, attack_t=800, key=jax.random.key(3),
                                       methods=("mmse",))
  z0, recon = z0[:2], {k: v[:2] for k, v in recon.items()}
  s_vp, s_ve = float(run.schedule.vp_sigmas[800]), float(run.schedule.ve_sigmas[800])
  eps = (recon["noisy_input"] - z0) / s_ve
  x_t = np.sqrt(1 - s_vp ** 2) * z0 + s_vp * eps
  eps_hat = unet_fn(run.model(), dict(_inputs(run, t=(800.0, 800.0)), x=x_t))
  x0 = (x_t - s_vp * eps_hat) / np.sqrt(1 - s_vp ** 2)
  assert relative_error(recon["mmse"], x0) <= 1e-4
  assert relative_error(recon["mmse"], z0) > 1e-2  # a reconstruction, not the input


def test_evaluate_mistakes_are_one_line(workdir, run, pixel_workdir, tmp_path):
  for kwargs, error, match in [
      (dict(sampling="stochastic"), cli.UsageError, "for pixel runs"),
      (dict(attack_t=1000), cli.UsageError, "attack_t=1000"),
      (dict(metrics=("fd",)), cli.UsageError, "gray digits-like"),
      (dict(heldout_images=str(tmp_path / "none")), cli.UserError, "no such folder"),
      (dict(metrics=("fid",), inception_weights=str(tmp_path / "no.npz")), cli.UserError,
       "Nothing is downloaded")]:
    with pytest.raises(error, match=match):
      evaluate.evaluate(workdir, run=run, num_samples=1, **kwargs)
  with pytest.raises(cli.UsageError, match="--attack_t: for latent runs only"):
    evaluate.evaluate(pixel_workdir, attack_t=800)


def test_export_mistakes_are_one_line(workdir, pixel_workdir, tmp_path):
  cmd = [sys.executable, "-m", "ambient_jax.export_lora", f"--workdir={pixel_workdir}",
         f"--out={tmp_path / 'x.safetensors'}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr
  assert lines[0].startswith("ambient_jax.export_lora: error: ") and "pixel-space run" in lines[0]
  with pytest.raises(ValueError, match="safetensors"):
    export_lora.export(workdir, str(tmp_path / "x.bin"))
