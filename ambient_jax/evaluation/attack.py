"""The paper's memorization measurements on any latent model: the noise attack and the
restoration table (`python -m ambient_jax.attack`; METHOD.md §8, §10).

The model is a diffusers SD / SDXL folder (`load_target(pretrained=DIR)`) or a latent
fine-tuning workdir (`load_target(workdir=DIR)`: its adapters, or full fine-tune, over its
pretrained folder; EMA `ema` of checkpoint `step` as `evaluate`). Either way the prompts are
encoded by the pretrained folder's text encoders and images by its VAE.

noise_attack: for the first `num_images` images of an image folder (all by default) and each
DDPM step t: encode (one VAE posterior sample per image, key fold_in(key(seed + 1), i), as
the paper's `latent_dist.sample()`), noise at t (per-image key from key(seed)), reconstruct by
one MMSE step and by posterior sampling (`latent_attack.attack_latents`; the paper's hot sample
by default), decode, and compare each reconstruction with every image of the folder in the
chosen feature space (`evaluation.features`; max inner product, `metrics.memorization`).
Writes to `out`:
  metrics.json            per t and method: fractions and counts of reconstructions whose
                          nearest dataset image has similarity > 0.9 / 0.95 / 0.99, the
                          self-match rate (that nearest image is the attacked one), mean and
                          median similarity; and every option
  hist_t{T}_{method}.png  the similarity histogram
  grid_t{T}.png           original | noised (decoded) | MMSE | posterior | nearest dataset
                          image (to the posterior sample) for the highest-similarity cases
  similarities.npz        per t and method, each attacked image's similarity to its nearest
                          dataset image and that image's index (t{T}_{method}_similarity,
                          _nearest): to draw other histograms (Fig. 8: two models in one)
restoration: `evaluation.restoration.restoration_mse` of the first `num_images` images,
printed as the paper's Table 1 and written to `out`/restoration.json.
Memory: the folder's features [N, D] and the attacked latents (4 × [n, h, w, C]) are held;
images are read, decoded and featurized a chunk at a time.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from ambient_jax import errors
from ambient_jax.data.image_folder import ImageFolder
from ambient_jax.evaluation import common, features, latent_attack, restoration, run as run_lib
from ambient_jax.runtime import storage

THRESHOLDS = (0.9, 0.95, 0.99)
GRID_SIZE = 8
_INPAINT_NEEDS_FOLDER = ("--mode=inpaint attacks a diffusers inpainting folder (--pretrained=DIR, "
                         "a UNet with 9 input channels), not a workdir.")


@dataclasses.dataclass
class Target:
  """The attacked model: how the attack runs it (`model`), its pipeline without UNet
  (VAE, text encoders, tokenizers), the images' default side, and what it is (for the
  report: pretrained folder, workdir, step, weights)."""
  model: latent_attack.AttackModel
  pipe: Any
  resolution: int
  about: dict


def load_target(pretrained: Optional[str] = None, workdir: Optional[str] = None, *,
                step: Optional[int] = None, ema: int = 0, devices=None,
                inpainting: bool = False, run: Any = None) -> Target:
  """The model of a diffusers folder or of a fine-tuning workdir (exactly one); a folder that
  is not a diffusers SD / SDXL folder (`inpainting`: an SD / SDXL inpainting folder), or a
  workdir that is not a latent run, is one line. `run`: the workdir's already restored
  `evaluation.latent.LatentRun` (not restored again; the target shares its compiled attack
  functions)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ambient_jax.latent import pipeline  # pylint: disable=g-import-not-at-top
  from ambient_jax.training import latent as training  # pylint: disable=g-import-not-at-top
  if (pretrained is None) == (workdir is None):
    raise errors.UsageError("give exactly one of --pretrained=DIR (a diffusers SD / SDXL folder) "
                            "and --workdir=DIR (a latent fine-tuning run).")
  if inpainting and workdir is not None:
    raise errors.UsageError(_INPAINT_NEEDS_FOLDER)
  if workdir is not None:
    from ambient_jax.evaluation.latent import LatentRun, attack_model  # pylint: disable=g-import-not-at-top
    run = run if run is not None else LatentRun(workdir, step, ema, devices=devices)
    pipe = _load_pipeline(pipeline, run.task.pretrained, with_unet=False)
    about = dict(workdir=run.workdir, step=run.step, weights=run.weights,
                 pretrained=run.task.pretrained, objective=run.objective())
    return Target(attack_model(run), pipe, int(run.dataset.meta["resolution"]), about)
  training.check_pretrained(pretrained, name="--pretrained", classes=(
      training.INPAINTING_CLASSES if inpainting else training.PIPELINE_CLASSES))
  pipe = _load_pipeline(pipeline, pretrained, with_unet=True)
  graphdef, params = nnx.split(pipe.unet)
  cond, uncond = pipe.encode_prompts([""])
  del cond
  uncond = {"context": np.asarray(uncond.context[0])} | (
      {} if uncond.text_embeds is None else {"text_embeds": np.asarray(uncond.text_embeds[0])})
  model = latent_attack.AttackModel(lambda p, f: nnx.merge(graphdef, p), params, (),
                                    pipe.schedule, uncond)
  return Target(model, pipe, pipe.default_size[0], dict(pretrained=os.path.abspath(pretrained)))


def _load_pipeline(pipeline, folder: str, with_unet: bool):
  try:
    return pipeline.load_pretrained(folder, with_unet=with_unet)
  except FileNotFoundError as e:
    raise errors.UserError(f"--pretrained={folder}: {e}") from None


def prompt_rows(pipe: Any, captions: Sequence[str], size: tuple[int, int],
                batch_size: int = 32) -> dict:
  """Each image's conditioning from its caption: {"context", SDXL "text_embeds", "time_ids"}
  as `latent_attack.IndexedRows` over the unique captions (encoded once each, `batch_size` at
  a time, by the pipeline's text encoders; SDXL time ids: original = target = `size`, no crop,
  as the paper's `run_unet`)."""
  unique = list(dict.fromkeys(captions))
  where = {c: i for i, c in enumerate(unique)}
  index = np.asarray([where[c] for c in captions])
  parts = [pipe.encode_text(unique[i:i + batch_size], size)
           for i in range(0, len(unique), batch_size)]
  rows = {"context": latent_attack.IndexedRows(
      np.concatenate([np.asarray(p.context, np.float32) for p in parts]), index)}
  if parts[0].text_embeds is not None:
    rows["text_embeds"] = latent_attack.IndexedRows(
        np.concatenate([np.asarray(p.text_embeds, np.float32) for p in parts]), index)
    rows["time_ids"] = latent_attack.IndexedRows(np.asarray(parts[0].time_ids[:1], np.float32),
                                                 np.zeros(len(captions), np.int64))
  return rows


def check_steps(ts: Sequence[int], target: Target, flag: str = "--t") -> list[int]:
  """The DDPM steps, each in [1, T − 1] of the model's schedule (else one line)."""
  num = target.model.schedule.num_train_timesteps
  bad = [t for t in ts if not 0 < int(t) < num]
  if bad or not ts:
    raise errors.UsageError(f"{flag}={','.join(map(str, ts))}: DDPM steps of the attack must lie "
                            f"in the schedule, 1..{num - 1} (the paper: 800, 900).")
  return [int(t) for t in ts]


def _images(target: Target, images: str, resolution: Optional[int], captions: bool):
  f = 2 ** (len(target.pipe.configs["vae"]["block_out_channels"]) - 1)
  side = int(resolution or target.resolution)
  if side % f:
    raise errors.UsageError(f"--resolution={side} must be a multiple of {f}, the VAE's "
                            "downsampling factor.")
  return ImageFolder(images, side, flag="--images", captions=captions)


def noise_attack(target: Target, images: str, out: str, *, ts: Sequence[int] = (800, 900),
                 feature: str = "dinov2", dinov2: Optional[str] = None, pooling: str = "cls",
                 inception_weights: Optional[str] = None, num_images: Optional[int] = None,
                 posterior: str = "hot", hot_steps: int = 50, posterior_steps: int = 32,
                 guidance_scale: float = 5.0, mmse_guidance: float = 1.0, seed: int = 0,
                 batch_size: int = 8, captions: bool = False, resolution: Optional[int] = None,
                 cache_dir: Optional[str] = None, feature_steps: Optional[int] = None,
                 log=run_lib.log_message) -> dict:
  """The noise attack (see the module docstring); returns the metrics.json dict."""
  t_start = time.time()
  ts = check_steps(ts, target)
  folder = _images(target, images, resolution, captions)
  n = len(folder) if num_images is None else min(int(num_images), len(folder))
  gray = all(features.is_grayscale(x) for _, x in folder.chunks(batch_size, 4 * batch_size))
  space = features.feature_space(feature, gray=gray, resolution=folder.resolution,
                                 inception_weights=inception_weights, dinov2=dinov2,
                                 pooling=pooling, cache_dir=cache_dir,
                                 feature_steps=feature_steps, flag="--features", log=log)
  from ambient_jax.metrics import memorization  # pylint: disable=g-import-not-at-top
  feature_fn = space.fn or memorization.pixel_features
  encode, decode = latent_attack.vae_coder(target.pipe.vae, batch_size,
                                           sample_key=jax.random.key(seed + 1))
  log(f"attacking {n} of {len(folder)} images of {folder.folder} at {folder.resolution}² "
      f"(features {space.name}, t = {ts}, posterior: {posterior})")
  feats, z0 = [], []
  t0 = time.time()
  for idx, x in folder.chunks(max(batch_size, 32)):
    feats.append(np.asarray(feature_fn(x), np.float32))
    if idx[0] < n:
      z0.append(encode(x[:n - idx[0]], idx[:n - idx[0]]))
    log(f"  features of the dataset: {idx[-1] + 1}/{len(folder)} ({time.time() - t0:.0f} s)")
  index = memorization.NearestNeighbourIndex.from_features(np.concatenate(feats), feature_fn,
                                                           center=space.center)
  z0 = np.concatenate(z0)
  prompts = prompt_rows(target.pipe, folder.captions[:n], (folder.resolution,) * 2)
  attacked, arrays = np.arange(n), {}
  result: dict[str, Any] = dict(
      _about(target, folder, n), features=space.name,
      pooling=pooling if space.name == "dinov2" else None,
      centered=space.center, encode="VAE posterior sample", posterior=posterior,
      hot_steps=hot_steps if posterior == "hot" else None,
      posterior_steps=posterior_steps if posterior == "ancestral" else None,
      guidance_scale=guidance_scale, mmse_guidance=mmse_guidance, seed=seed,
      thresholds=list(THRESHOLDS), t={}, histograms={}, grids={})
  for t in ts:
    sched = target.model.schedule
    _, recon = latent_attack.attack_latents(
        target.model, z0, prompts, t=t, key=jax.random.key(seed), posterior=posterior,
        hot_steps=hot_steps, posterior_steps=posterior_steps, guidance_scale=guidance_scale,
        mmse_guidance=mmse_guidance, batch_size=batch_size, indices=attacked,
        log=lambda m, t=t: log(f"t={t}:{m}"))
    entry = dict(sigma_vp=float(sched.vp_sigmas[t]), sigma_ve=float(sched.ve_sigmas[t]))
    if posterior == "hot":
      entry["hot_start_timestep"] = sched.hot_sigmas(hot_steps, t)[1]
    found = {}
    for m in latent_attack.METHODS:
      sims, nearest = [], []
      for start in range(0, n, batch_size):
        r = index.query(_decoded(decode, recon[m][start:start + batch_size]))
        sims.append(r["similarity"])
        nearest.append(r["index"])
      found[m] = dict(similarity=np.concatenate(sims), index=np.concatenate(nearest))
      arrays[f"t{t}_{m}_similarity"], arrays[f"t{t}_{m}_nearest"] = found[m].values()
      entry[m] = summary(found[m], attacked)
      result["histograms"][f"{t}_{m}"] = memorization.similarity_histogram_png(
          os.path.join(out, f"hist_t{t}_{m}.png"), {m: found[m]["similarity"]},
          f"{space.name} similarity to the nearest dataset image: {m}, t={t} "
          f"(σ VP {entry['sigma_vp']:.3f})")
      log(f"t={t} {m}: " + ", ".join(f">{th} {entry[m][f'frac_sim_above_{th}']:.3f}"
                                     for th in THRESHOLDS)
          + f", self-match {entry[m]['self_match']:.3f}, mean {entry[m]['mean_similarity']:.3f}")
    result["t"][str(t)] = entry
    result["grids"][str(t)] = grid_png(os.path.join(out, f"grid_t{t}.png"), folder, decode,
                                       recon, found, target.model.schedule, t)
  return _write_outputs(out, result, arrays, t_start)


def summary(found: dict, attacked: np.ndarray) -> dict:
  """`memorization.summarize` at the paper's three thresholds, plus counts above each."""
  from ambient_jax.metrics import memorization  # pylint: disable=g-import-not-at-top
  s = memorization.summarize(found, attacked, thresholds=THRESHOLDS)
  s["self_match"] = s.pop("self_match_features")
  s.update({f"count_sim_above_{th}": int(np.sum(found["similarity"] > th)) for th in THRESHOLDS})
  return s


def grid_png(path: str, folder: ImageFolder, decode, recon: dict, found: dict, schedule,
             t: int, k: int = GRID_SIZE) -> str:
  """original | noised (decoded) | MMSE | posterior | nearest dataset image (to the posterior
  sample), one row per attacked image, for the `k` of highest posterior similarity."""
  from ambient_jax.runtime.images import save_png, tile  # pylint: disable=g-import-not-at-top
  sims = found["posterior"]["similarity"]
  top = np.argsort(-sims, kind="stable")[:k]
  column = lambda x: tile(np.asarray(x), cols=1)
  panels = [("original", column(folder.read(top))),
            (f"noised at t={t}", column(_decoded(decode, latent_attack.vp_view(
                recon["noisy_input"][top], schedule, t)))),
            ("MMSE", column(_decoded(decode, recon["mmse"][top]))),
            ("posterior", column(_decoded(decode, recon["posterior"][top]))),
            ("nearest to posterior", column(folder.read(found["posterior"]["index"][top])))]
  if jax.process_index() == 0:
    save_png(path, panels, "highest similarity: " + ", ".join(f"{s:.3f}" for s in sims[top]))
  return path


def restoration_table(target: Target, images: str, out: str, *,
                      t_evals: Sequence[int] = restoration.T_EVAL, num_images: int = 32,
                      seed: int = 0, batch_size: int = 8, captions: bool = False,
                      resolution: Optional[int] = None, name: Optional[str] = None,
                      log=run_lib.log_message) -> dict:
  """Table 1 for the model: `restoration.restoration_mse` of the first `num_images` images;
  printed and written to `out`/restoration.json. Returns that dict."""
  t_evals = check_steps(t_evals, target, flag="--t_eval")
  folder = _images(target, images, resolution, captions)
  n = min(int(num_images), len(folder))
  coder = latent_attack.vae_coder(target.pipe.vae, batch_size, sample_key=jax.random.key(seed + 1))
  prompts = prompt_rows(target.pipe, folder.captions[:n], (folder.resolution,) * 2)
  table = restoration.restoration_mse(target.model, coder, folder.read(range(n)), prompts,
                                      t_evals=t_evals, key=jax.random.key(seed),
                                      batch_size=batch_size, log=log)
  name = name or os.path.basename(os.path.normpath(target.about.get("workdir")
                                                   or target.about["pretrained"]))
  text = restoration.format_table({name: table}, f"restoration MSE of the one-step MMSE "
                                  f"denoiser, {n} images of {folder.folder} (mean ± std)")
  print(text, flush=True)
  result = dict(_about(target, folder, n), seed=seed, encode="VAE posterior sample",
                t_eval={str(t): v for t, v in table.items()}, table=text)
  write_json(os.path.join(out, "restoration.json"), result)
  return result


def inpaint_attack(target: Target, images: str, out: str, *, dinov2: Optional[str],
                   masks: Optional[str] = None, num_images: Optional[int] = None,
                   num_steps: int = 20, guidance_scale: float = 8.0, strength: float = 0.99,
                   seed: int = 0, batch_size: int = 4, captions: bool = False,
                   resolution: Optional[int] = None, nearest: bool = True,
                   log=run_lib.log_message) -> dict:
  """The inpainting attack (`evaluation.inpainting.attack_image_folder`) of a pretrained
  inpainting folder on an image folder; writes to `out` metrics.json (its summary and every
  option), hist_inpaint.png (similarity to the source and to the nearest dataset image),
  grid_inpaint.png (original | masked | inpainted, most similar first) and similarities.npz
  (per attacked image: index, mask ratio, kept, source and nearest similarity, nearest
  index). Returns the metrics.json dict."""
  from ambient_jax.evaluation import inpainting as inpainting_attack  # pylint: disable=g-import-not-at-top
  from ambient_jax.latent import inpainting  # pylint: disable=g-import-not-at-top
  from ambient_jax.metrics import dinov2 as dinov2_lib, memorization  # pylint: disable=g-import-not-at-top
  from ambient_jax.runtime.images import save_png, tile  # pylint: disable=g-import-not-at-top
  if "workdir" in target.about:
    raise errors.UsageError(_INPAINT_NEEDS_FOLDER)
  inpainting.check_inpainting(target.pipe)
  if not dinov2:
    raise errors.UsageError("--mode=inpaint compares DINOv2 patch tokens: give --dinov2=DIR (a "
                            "transformers DINOv2 folder, e.g. facebook/dinov2-giant).")
  t_start = time.time()
  folder = _images(target, images, resolution, captions)
  model, _ = dinov2_lib.load_dinov2(dinov2)
  log(f"inpainting attack on {num_images or len(folder)} of {len(folder)} images of "
      f"{folder.folder} at {folder.resolution}² (masks: {masks or 'random boxes'}, "
      f"{num_steps} steps, guidance {guidance_scale}, strength {strength})")
  result, grid = inpainting_attack.attack_image_folder(
      target.pipe, folder, dinov2=model, seed=seed, mask_folder=masks, num_images=num_images,
      nearest=nearest, chunk_size=max(batch_size, 16), log=log, num_steps=num_steps,
      guidance_scale=guidance_scale, strength=strength, batch_size=batch_size)
  summary_ = result.summary
  metrics = dict(_about(target, folder, len(result.indices)),
                 masks=os.path.abspath(masks) if masks else "random boxes",
                 num_steps=num_steps, guidance_scale=guidance_scale, strength=strength,
                 seed=seed, min_mask_ratio=inpainting_attack.MIN_MASK_RATIO,
                 thresholds=list(THRESHOLDS), **summary_)
  kept = result.kept
  histogram = {"source": result.source_similarity[kept]}
  if result.nearest_similarity is not None:
    histogram["nearest"] = result.nearest_similarity[kept]
  metrics["histogram"] = memorization.similarity_histogram_png(
      os.path.join(out, "hist_inpaint.png"), histogram,
      "DINOv2 masked-patch similarity of the inpainted images")
  metrics["grid"] = os.path.join(out, "grid_inpaint.png")
  if jax.process_index() == 0 and len(grid["indices"]):
    column = lambda x: tile(np.clip(np.asarray(x), -1.0, 1.0), cols=1)
    save_png(metrics["grid"], [("original", column(grid["original"])),
                               ("masked", column(grid["masked"])),
                               ("inpainted", column(grid["inpainted"]))],
             "most similar inpainted images: " + ", ".join(map(str, grid["indices"])))
  arrays = dict(indices=result.indices, mask_ratio=result.mask_ratio, kept=kept,
                source_similarity=result.source_similarity)
  if result.nearest_similarity is not None:
    arrays.update(nearest_similarity=result.nearest_similarity,
                  nearest_index=result.nearest_index)
  for name in ("source", "nearest"):
    if name in summary_:
      log(f"inpainting {name}: " + ", ".join(
          f">{th} {summary_[name][f'frac_sim_above_{th}']:.3f}" for th in THRESHOLDS)
          + f", mean {summary_[name]['mean_similarity']:.3f} ({summary_['kept']} of "
          f"{summary_['count']} images with masks over {inpainting_attack.MIN_MASK_RATIO:.0%})")
  return _write_outputs(out, metrics, arrays, t_start)


def _about(target: Target, folder: ImageFolder, num_images: int) -> dict:
  """The fields every attack's metrics.json starts with: the model and the images attacked."""
  return dict(model=target.about, images=os.path.abspath(folder.folder),
              num_images=int(num_images), num_reference=len(folder),
              resolution=folder.resolution, captions=folder.captions_path)


def _write_outputs(out: str, metrics: dict, arrays: dict, t_start: float) -> dict:
  """An attack's similarities.npz and metrics.json (with its wall time) in `out`; returns
  `metrics`."""
  metrics["similarities"] = write_npz(os.path.join(out, "similarities.npz"), arrays)
  metrics["seconds"] = time.time() - t_start
  write_json(os.path.join(out, "metrics.json"), metrics)
  return metrics


def write_json(path: str, value: dict) -> str:
  """`value` as indented JSON at `path`, atomically (process 0); returns the path."""
  if jax.process_index() == 0:
    storage.write_atomic(path, json.dumps(value, indent=1, default=float))
  return path


def write_npz(path: str, arrays: dict) -> str:
  """numpy arrays as an .npz at `path`, atomically (process 0); returns the path."""
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_atomic(path, buffer.getvalue())
  return path


def _decoded(decode, latents: np.ndarray) -> np.ndarray:
  """Decoded latents as saved images: clipped to [-1, 1] and quantized to 8 bits."""
  return common.quantize(np.clip(decode(latents), -1.0, 1.0))
