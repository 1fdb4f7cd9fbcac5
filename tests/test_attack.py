"""`python -m ambient_jax.attack`: the paper's memorization measurements on a latent model.

One tiny SDXL folder, an 8-image captioned dataset and a fine-tuning workdir over them
(`latent_reference.tiny_latent_workdir`), a tiny random DINOv2 saved by transformers; made
once for the module.
- the noise attack end to end through the entry point's main(): on the pretrained folder (no
  workdir) with DINOv2 features and the hot sample, and on the workdir with pixels and the
  ancestral sampler (the library call main() makes); metrics.json, similarities.npz,
  histograms and grids;
- the hot sample's schedule: held until the inference step nearest t, as diffusers'
  schedulers place their steps, then DDPMScheduler's ancestral steps (checked against
  diffusers' own step with the same noise, and against a direct loop);
- --mode=restoration against a direct computation from the UNet's ε̂;
- every bad input is one line.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ambient_jax import attack as attack_cli, cli, sampling
from ambient_jax.evaluation import attack, latent_attack, restoration
from ambient_jax.latent import configs, guidance
from ambient_jax.latent.schedule import NoiseSchedule
from ambient_jax.metrics import memorization
from tests.latent_reference import tiny_latent_workdir

transformers = pytest.importorskip("transformers")
PROG = attack_cli.PROG


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """{"workdir", "pretrained", "images", "dinov2"}: paths of the module's tiny models."""
  import torch
  root = tmp_path_factory.mktemp("attack")
  workdir = tiny_latent_workdir(root, jax.devices()[:1])
  with open(os.path.join(workdir, "config.json")) as f:
    pretrained = json.load(f)["latent"]["pretrained"]
  torch.manual_seed(0)
  model = transformers.Dinov2Model(transformers.Dinov2Config(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
      image_size=224, layerscale_value=0.5))
  model.save_pretrained(root / "dinov2")
  return dict(workdir=workdir, pretrained=pretrained, images=str(root / "images"),
              dinov2=str(root / "dinov2"))


def _main(*args):
  """`python -m ambient_jax.attack ARGS` in this process: flags parsed as the CLI does, then
  main() with the CLI's error reporting (a mistake: one line on stderr and SystemExit)."""
  from absl import flags, logging
  if "mode" not in flags.FLAGS:
    attack_cli._define_flags()  # pylint: disable=protected-access
    cli.define_flags()
  # Resetting absl's --verbosity sets the absl logger to WARNING for the whole process, which
  # would hide INFO lines from later tests' caplog in this pytest worker: restore it after.
  level = logging.get_absl_logger().level
  try:
    flags.FLAGS.unparse_flags()
    argv = cli.parse_flags([PROG, *map(str, args)], PROG)
    return cli._main_reporting(attack_cli.main, PROG, argv)  # pylint: disable=protected-access
  finally:
    logging.get_absl_logger().setLevel(level)


def test_pretrained_folder_attack_with_dinov2_end_to_end(tiny, tmp_path):
  out = tmp_path / "out"
  _main(f"--pretrained={tiny['pretrained']}", f"--images={tiny['images']}", "--t=800",
        "--features=dinov2", f"--dinov2={tiny['dinov2']}", "--num_images=4", "--hot_steps=5",
        "--batch_size=4", f"--out={out}")
  m = json.loads((out / "metrics.json").read_text())
  assert m["model"] == {"pretrained": os.path.abspath(tiny["pretrained"])}
  assert m["features"] == "dinov2" and m["pooling"] == "cls" and not m["centered"]
  assert m["num_images"] == 4 and m["num_reference"] == 8 and m["posterior"] == "hot"
  assert m["captions"] is None  # null captions by default
  entry = m["t"]["800"]
  assert entry["hot_start_timestep"] == 801.0  # 5 leading steps + offset 1: 801, 601, ...
  for method in ("mmse", "posterior"):
    s = entry[method]
    assert s["count"] == 4 and 0 <= s["self_match"] <= 1
    assert 1 >= s["frac_sim_above_0.9"] >= s["frac_sim_above_0.95"] >= s["frac_sim_above_0.99"]
    assert s["count_sim_above_0.9"] == round(4 * s["frac_sim_above_0.9"])
    assert -1 <= s["mean_similarity"] <= 1
  for name in ("hist_t800_mmse.png", "hist_t800_posterior.png", "grid_t800.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_workdir_attack_with_pixels(tiny, tmp_path):
  """The library call main() makes, on one device (the smoke run's batch of 4 does not split
  over the 8 fake devices that the CLI's restore would take)."""
  out = tmp_path / "out"
  target = attack.load_target(workdir=tiny["workdir"], devices=jax.devices()[:1])
  attack.noise_attack(target, tiny["images"], str(out), ts=(900,), feature="pixels",
                      posterior="ancestral", posterior_steps=2, captions=True, batch_size=8)
  m = json.loads((out / "metrics.json").read_text())
  assert m["model"]["step"] == 2 and m["model"]["workdir"] == tiny["workdir"]
  assert m["features"] == "pixels" and m["centered"] and m["captions"].endswith("metadata.jsonl")
  assert sorted(m["t"]) == ["900"] and m["num_images"] == 8
  entry = m["t"]["900"]
  assert entry["posterior"]["count"] == 8 and "hot_start_timestep" not in entry
  assert entry["sigma_vp"] == pytest.approx(float(target.model.schedule.vp_sigmas[900]))
  with np.load(out / "similarities.npz") as f:
    sims = f["t900_posterior_similarity"]
    assert sims.shape == (8,) and f["t900_mmse_nearest"].shape == (8,)
  assert entry["posterior"]["mean_similarity"] == pytest.approx(float(sims.mean()), rel=1e-5)
  assert (out / "grid_t900.png").is_file()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_hot_sample_starts_at_the_inference_step_nearest_t_as_diffusers_places_them(spacing):
  import diffusers
  config = dict(configs.bundled_config("sdxl", "scheduler"), timestep_spacing=spacing)
  sched = NoiseSchedule.from_config(config)
  ref = diffusers.DDPMScheduler.from_config(config)
  ref.set_timesteps(50)
  steps = ref.timesteps.numpy().astype(np.float64)
  for t in (900, 800, 500, 100, 11, 990):
    sigmas, tau = sched.hot_sigmas(50, t)
    first = int(np.argmin(np.abs(steps - t)))
    assert tau == steps[first]
    assert len(sigmas) == 50 - first + 1 and sigmas[-1] == 0
    np.testing.assert_allclose(sigmas[:-1], sched.ve_sigmas[steps[first:].astype(int)])


def test_hot_sample_is_ddpm_ancestral_steps_from_the_held_latent():
  """guidance.hot_sample = the latent x_t taken as the state at the nearest inference step τ,
  then DDPMScheduler steps (checked: one step equals diffusers' with the same noise), written
  out here as a loop of VP DDPM posterior updates."""
  import diffusers
  import torch
  config = configs.bundled_config("sdxl", "scheduler")
  sched = NoiseSchedule.from_config(config)
  # One DDPMScheduler step in diffusers == the posterior step in the VE view.
  ref = diffusers.DDPMScheduler.from_config(config)
  ref.set_timesteps(50)
  rng = np.random.default_rng(0)
  x_t, eps_hat = rng.standard_normal((2, 1, 4, 3, 3)).astype(np.float32)
  t, t_prev = 801, 781
  out = ref.step(torch.from_numpy(eps_hat), t, torch.from_numpy(x_t),
                 generator=torch.Generator().manual_seed(3)).prev_sample.numpy()
  noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3)).numpy()
  ab = sched.alphas_cumprod
  x0 = (x_t - np.sqrt(1 - ab[t]) * eps_hat) / np.sqrt(ab[t])
  s_t, s_p = sched.ve_sigmas[t], sched.ve_sigmas[t_prev]
  ours = sampling.posterior_step(jnp.asarray(x0), jnp.asarray(x_t / np.sqrt(ab[t])),
                                 jnp.full((1,), s_t), jnp.full((1,), s_p), jnp.asarray(noise))
  np.testing.assert_allclose(np.asarray(ours) * np.sqrt(ab[t_prev]), out, rtol=1e-4, atol=1e-5)

  # The whole hot sample against a direct VP loop with the same per-image noise.
  denoise = lambda x, s: x / (1.0 + s[:, None, None, None] ** 2)  # x0 ~ N(0, I): exact D
  keys = jax.random.split(jax.random.key(1), 2)
  z0 = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
  t = 790  # between inference steps 801 and 781: nearest 781
  noisy = z0 + sched.ve_sigmas[t] * rng.standard_normal(z0.shape).astype(np.float32)
  got = np.asarray(guidance.hot_sample(denoise, sched, jnp.asarray(noisy), t, keys, 50))
  timesteps = [int(s) for s in sched.inference_timesteps(50)]
  start = timesteps.index(781)
  x = noisy / np.sqrt(1 + sched.ve_sigmas[t] ** 2)  # VP x_t, held: the state at τ = 781
  for i, tau in enumerate(timesteps[start:]):
    s = sched.ve_sigmas[tau]
    x0 = (x * np.sqrt(1 + s ** 2)) / (1 + s ** 2)  # the exact D in the VE view
    prev_ab = ab[timesteps[start + i + 1]] if start + i + 1 < len(timesteps) else 1.0
    beta = 1 - ab[tau] / prev_ab
    mean = (np.sqrt(prev_ab) * beta / (1 - ab[tau]) * x0
            + np.sqrt(1 - beta) * (1 - prev_ab) / (1 - ab[tau]) * x)
    std = np.sqrt((1 - prev_ab) / (1 - ab[tau]) * beta)
    xi = np.asarray(jax.vmap(lambda k, i=i: jax.random.normal(
        jax.random.fold_in(k, i), x.shape[1:]))(keys))
    x = mean + std * xi
  np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


def test_restoration_mode_equals_a_direct_computation(tiny, tmp_path, capsys):
  """--mode=restoration's table (printed and in restoration.json) = latent and pixel MSE of
  x̂0 = (x_t − σ_t ε̂(x_t, t)) / √(1 − σ_t²) computed here from the UNet, with the attack's
  keys (seed 0: VAE sample from key(1), noise from key(0)) and the null prompt."""
  out, n, t = tmp_path / "out", 3, 800
  _main("--mode=restoration", f"--pretrained={tiny['pretrained']}", f"--images={tiny['images']}",
        f"--t_eval={t}", f"--num_images={n}", "--batch_size=4", f"--out={out}")
  r = json.loads((out / "restoration.json").read_text())
  assert list(r["t_eval"]) == [str(t)] and r["num_images"] == n
  assert r["table"] in capsys.readouterr().out and "latent t=800" in r["table"]
  target = attack.load_target(pretrained=tiny["pretrained"])
  from ambient_jax.data.image_folder import ImageFolder
  images = ImageFolder(tiny["images"], 32).read(range(n))
  encode, decode = latent_attack.vae_coder(target.pipe.vae, 4, sample_key=jax.random.key(1))
  z0 = encode(images)
  prompts = attack.prompt_rows(target.pipe, [""] * n, (32, 32))
  cond = {k: jnp.asarray(v[np.arange(n)]) for k, v in prompts.items()}
  model = target.model
  s_vp, s_ve = float(model.schedule.vp_sigmas[t]), float(model.schedule.ve_sigmas[t])
  noise_key = jax.random.split(jax.random.key(0))[0]
  eps = (np.asarray(memorization.noise_images(z0, s_ve, noise_key, np.arange(n))) - z0) / s_ve
  x_t = np.sqrt(1 - s_vp ** 2) * z0 + s_vp * eps
  eps_hat = np.asarray(model.unet_fn(model.params, model.frozen)(
      jnp.asarray(x_t), jnp.full((n,), float(t)), cond["context"],
      text_embeds=cond["text_embeds"], time_ids=cond["time_ids"]))
  x0 = (x_t - s_vp * eps_hat) / np.sqrt(1 - s_vp ** 2)
  latent = restoration.per_image_mse(x0, z0)
  pixel = restoration.per_image_mse(decode(x0), images)
  row = r["t_eval"][str(t)]
  np.testing.assert_allclose(row["latent_mse_mean"], latent.mean(), rtol=1e-4)
  np.testing.assert_allclose(row["latent_mse_std"], latent.std(ddof=1), rtol=1e-3)
  np.testing.assert_allclose(row["pixel_mse_mean"], pixel.mean(), rtol=1e-4)
  np.testing.assert_allclose(row["pixel_mse_std"], pixel.std(ddof=1), rtol=1e-3)
  assert 0 < row["latent_mse_mean"] and row["count"] == n


def test_one_compile_serves_every_t_and_image_set(tiny):
  """attack_latents keeps its jitted functions on the model: the MMSE step and the ancestral
  sampler take σ as an argument (one compile for t = 800 and 500, and for another set of
  images of the batch's shape), the hot sample one per t; and the reused functions give
  what a fresh model's give (no σ or t left over from the first call)."""
  target = attack.load_target(pretrained=tiny["pretrained"])
  model = target.model
  rng = np.random.default_rng(0)
  z0 = rng.standard_normal((2, 4, 16, 16, 4)).astype(np.float32)
  prompts = attack.prompt_rows(target.pipe, [""] * 4, (32, 32))
  kw = dict(key=jax.random.key(3), posterior="ancestral", posterior_steps=1, batch_size=2)
  for t, images in ((800, z0[0]), (500, z0[0]), (500, z0[1])):
    _, shared = latent_attack.attack_latents(model, images, prompts, t=t, **kw)
  assert sorted(map(str, model.jit_cache)) == ["('ancestral', 5.0, 1)", "('mmse', 1.0)"]
  assert all(f._cache_size() == 1 for f in model.jit_cache.values())  # pylint: disable=protected-access
  fresh = latent_attack.AttackModel(model.unet_fn, model.params, model.frozen, model.schedule,
                                    model.uncond)
  _, alone = latent_attack.attack_latents(fresh, z0[1], prompts, t=500, **kw)
  for m in ("noisy_input", "mmse", "posterior"):
    np.testing.assert_allclose(shared[m], alone[m], rtol=1e-6, atol=1e-6, err_msg=m)
  latent_attack.attack_latents(model, z0[0], prompts, t=800, key=kw["key"], hot_steps=3,
                               batch_size=2)
  latent_attack.attack_latents(model, z0[0], prompts, t=500, key=kw["key"], hot_steps=3,
                               batch_size=2)
  assert ("hot", 5.0, 3, 800) in model.jit_cache and ("hot", 5.0, 3, 500) in model.jit_cache
  assert model.jit_cache[("mmse", 1.0)]._cache_size() == 1  # pylint: disable=protected-access


def _one_line(capsys, code, *fragments):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith(f"{PROG}: error: "), err
  for fragment in fragments:
    assert fragment in err[0], err[0]
  return code


def test_bad_inputs_are_one_line(tiny, tmp_path, capsys):
  from PIL import Image
  broken = tmp_path / "broken"
  broken.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(broken / "a.png")
  (broken / "b.png").write_bytes(b"not a png")
  base = [f"--pretrained={tiny['pretrained']}", f"--out={tmp_path / 'o'}"]
  cases = [
      (base + [f"--images={tiny['images']}", "--t=1000"], 2, ["--t=1000", "1..999"]),
      (base + [f"--images={tiny['images']}", "--t=abc"], 2, ["--t=abc", "integers"]),
      (base + [f"--images={tiny['images']}", f"--dinov2={tmp_path}"], 1,
       [str(tmp_path), "DINOv2 folder"]),
      (base + [f"--images={tiny['images']}"], 2, ["--features=dinov2 needs --dinov2=DIR"]),
      (base + [f"--images={broken}", "--features=pixels"], 1, [str(broken / "b.png"),
                                                              "cannot be read"]),
      (base + [f"--images={tmp_path / 'none'}", "--features=pixels"], 1, ["no such folder"]),
      ([f"--pretrained={tiny['images']}", f"--images={tiny['images']}", "--out=o"], 1,
       ["--pretrained", "is not a diffusers folder"]),
      ([f"--images={tiny['images']}", "--out=o"], 2, ["exactly one of --pretrained"]),
  ]
  for args, code, fragments in cases:
    with pytest.raises(SystemExit) as e:
      _main(*args)
    assert e.value.code == _one_line(capsys, code, *fragments), args


def test_the_command_line_reports_a_mistake_in_one_line(tmp_path):
  """The real entry point in a subprocess: not a diffusers folder, status 1, one line."""
  proc = subprocess.run([sys.executable, "-m", PROG, f"--pretrained={tmp_path}",
                         f"--images={tmp_path}", f"--out={tmp_path / 'o'}"],
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  lines = (proc.stdout + proc.stderr).strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1, proc.stdout + proc.stderr
  assert lines[0].startswith(f"{PROG}: error: --pretrained = ") and "diffusers" in lines[0]


def test_inpainting_attack_end_to_end_and_its_mistakes(tiny, tmp_path, capsys):
  """--mode=inpaint on a tiny SDXL inpainting folder (diffusers writes it): random boxes,
  captions as prompts; metrics.json agrees with similarities.npz; a workdir, a text-to-image
  folder and a mask folder without the images' masks are one line each."""
  from tests.test_latent_inpainting import SIZE, save_tiny_inpainting_folder
  _, folder = save_tiny_inpainting_folder(tmp_path / "model")
  out = tmp_path / "out"
  common = [f"--images={tiny['images']}", "--captions", f"--dinov2={tiny['dinov2']}",
            "--num_images=3", "--inpaint_steps=3", "--batch_size=4", f"--resolution={SIZE}"]
  _main("--mode=inpaint", f"--pretrained={folder}", *common, f"--out={out}")
  written = json.loads((out / "metrics.json").read_text())
  assert written["num_images"] == 3 and written["num_reference"] == 8
  assert written["masks"] == "random boxes" and written["count"] == 3
  assert written["num_steps"] == 3 and written["guidance_scale"] == 8.0
  assert written["strength"] == 0.99 and written["captions"].endswith("metadata.jsonl")
  arrays = np.load(out / "similarities.npz")
  np.testing.assert_array_equal(arrays["indices"], [0, 1, 2])
  kept = arrays["kept"]
  assert kept.any() and written["kept"] == int(kept.sum())
  assert written["source"]["mean_similarity"] == pytest.approx(
      float(arrays["source_similarity"][kept].mean()), rel=1e-6)
  assert written["nearest"]["mean_similarity"] == pytest.approx(
      float(arrays["nearest_similarity"][kept].mean()), rel=1e-6)
  assert np.all(arrays["nearest_similarity"] >= arrays["source_similarity"] - 1e-4)
  assert (out / "hist_inpaint.png").stat().st_size and (out / "grid_inpaint.png").stat().st_size
  capsys.readouterr()
  (tmp_path / "no_masks").mkdir()
  cases = [
      ([f"--workdir={tiny['workdir']}"], 2, ["--mode=inpaint", "not a workdir"]),
      ([f"--pretrained={tiny['pretrained']}"], 1, ["StableDiffusionXLPipeline",
                                                    "StableDiffusionXLInpaintPipeline"]),
      ([f"--pretrained={folder}", f"--masks={tmp_path / 'no_masks'}"], 1,
       ["no mask for image", "white = inpaint"]),
  ]
  for args, code, fragments in cases:
    with pytest.raises(SystemExit) as e:
      _main("--mode=inpaint", *args, *common, f"--out={tmp_path / 'o'}")
    assert e.value.code == _one_line(capsys, code, *fragments), args
