"""The paper's memorization measurements on a latent model: `python -m ambient_jax.attack`.

    python -m ambient_jax.attack --pretrained=sdxl-base-1.0/ --images=laion_10k/ \\
        --t=800,900 --features=dinov2 --dinov2=dinov2-giant/ --out=attack_sdxl/
    python -m ambient_jax.attack --workdir=runs/sdxl_t500 --images=ffhq_1024/ --t=900 ...
    python -m ambient_jax.attack --mode=restoration --workdir=runs/sdxl_t500 \\
        --images=ffhq_1024/ --num_images=32 --out=restoration_t500/
    python -m ambient_jax.attack --mode=inpaint --pretrained=sdxl-inpainting-0.1/ \\
        --images=laion_10k/ --captions --dinov2=dinov2-giant/ --out=inpaint_sdxl/

--mode=noise (default): each image of --images (the first --num_images; all by default) is
VAE-encoded (one posterior sample), noised at each DDPM step of --t with a fixed key per image,
reconstructed by one MMSE step and by posterior sampling (--posterior=hot: the paper's
--hot_steps pipeline held at the noised latent until the nearest inference step; ancestral:
--posterior_steps posterior steps from t exactly), decoded and compared with every image of the
folder by --features (dinov2 with --dinov2=DIR, the paper's; digits; inception with
--inception_weights; pixels). Null captions unless --captions (IMAGES/metadata.jsonl). Writes
--out/metrics.json, hist_t{T}_{method}.png and grid_t{T}.png (`evaluation.attack`).
--mode=restoration: latent and pixel MSE of the one-step MMSE reconstruction at --t_eval
(default 900,800,500,100), mean ± std over --num_images (default 32) images, printed as the
paper's Table 1 and written to --out/restoration.json (`evaluation.restoration`).
--mode=inpaint: --pretrained is a diffusers SDXL inpainting folder (9-channel UNet); each image
is repainted under its mask (--masks=DIR, or one random box of 1-50 % of the image) prompted
by its caption (give --captions, as the paper), --inpaint_steps 20, --inpaint_guidance 8,
--strength 0.99, and compared with its source and the nearest dataset image by DINOv2 patch
tokens pooled under the mask; writes --out/metrics.json, hist_inpaint.png, grid_inpaint.png
and similarities.npz (`evaluation.inpainting`).

The model: --pretrained=DIR (a diffusers SD / SDXL folder) or --workdir=DIR (a latent fine-
tuning run: its adapters over its pretrained folder; --step, --ema as `evaluate`).
A mistake is one line and exit status 2 (the command line) or 1 (a folder, file or image);
--traceback shows the traceback. This module parses flags and dispatches: a new mode is one
entry in MODES (and its flags).
"""

from __future__ import annotations

from ambient_jax import cli

PROG = "ambient_jax.attack"


def _noise(target, f, out):
  from ambient_jax.evaluation import attack  # pylint: disable=g-import-not-at-top
  return attack.noise_attack(
      target, f.images, out, ts=_ints(f.t, "t"), feature=f.features, dinov2=f.dinov2,
      pooling=f.pooling, inception_weights=f.inception_weights, num_images=f.num_images,
      posterior=f.posterior, hot_steps=f.hot_steps, posterior_steps=f.posterior_steps,
      guidance_scale=f.guidance_scale, mmse_guidance=f.mmse_guidance, seed=f.seed,
      batch_size=f.batch_size, captions=f.captions, resolution=f.resolution,
      cache_dir=f.cache_dir or None)


def _restoration(target, f, out):
  from ambient_jax.evaluation import attack  # pylint: disable=g-import-not-at-top
  return attack.restoration_table(
      target, f.images, out, t_evals=_ints(f.t_eval, "t_eval"), num_images=f.num_images or 32,
      seed=f.seed, batch_size=f.batch_size, captions=f.captions, resolution=f.resolution)


def _inpaint(target, f, out):
  from ambient_jax.evaluation import attack  # pylint: disable=g-import-not-at-top
  return attack.inpaint_attack(
      target, f.images, out, dinov2=f.dinov2, masks=f.masks, num_images=f.num_images,
      num_steps=f.inpaint_steps, guidance_scale=f.inpaint_guidance, strength=f.strength,
      seed=f.seed, batch_size=f.batch_size, captions=f.captions, resolution=f.resolution)


# --mode -> what runs it: fn(target, flags, out) -> the result dict it also wrote to --out.
MODES = {"noise": _noise, "restoration": _restoration, "inpaint": _inpaint}


def _ints(values, name: str) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError:
    raise cli.UsageError(f"--{name}={','.join(values)}: DDPM steps are integers, e.g. "
                         "--t=800,900.") from None


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ambient_jax.evaluation import attack, run as run_lib  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {argv[1:]}: flags are written --name=value.")
  f = flags.FLAGS
  target = attack.load_target(f.pretrained, f.workdir, step=f.step, ema=f.ema,
                              inpainting=f.mode == "inpaint")
  MODES[f.mode](target, f, f.out)
  run_lib.log_message(f"wrote to {f.out}")


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("mode", "noise", list(MODES), "noise: the noise attack; restoration: the "
                    "restoration MSE table; inpaint: the inpainting attack (--pretrained is an "
                    "inpainting folder).")
  flags.DEFINE_string("pretrained", None, "A diffusers SD / SDXL folder (model_index.json, unet/, "
                      "vae/, text_encoder*/, tokenizer*/, scheduler/).")
  flags.DEFINE_string("workdir", None, "A latent fine-tuning run instead of --pretrained.")
  flags.DEFINE_integer("step", None, "--workdir: checkpoint step (default: latest).")
  flags.DEFINE_integer("ema", 0, "--workdir: which EMA; -1 = the raw parameters.")
  flags.DEFINE_string("images", None, "The dataset: a folder of images (png/jpg/jpeg/webp).",
                      required=True)
  flags.DEFINE_bool("captions", False, "Condition on IMAGES/metadata.jsonl captions (default: "
                    "null captions, as the paper's noise attack).")
  flags.DEFINE_string("out", None, "Output folder.", required=True)
  flags.DEFINE_list("t", ["800", "900"], "--mode=noise: DDPM steps of the attack's noise.")
  flags.DEFINE_list("t_eval", ["900", "800", "500", "100"], "--mode=restoration: DDPM steps.")
  flags.DEFINE_enum("features", "dinov2", ["dinov2", "digits", "inception", "pixels"],
                    "Feature space of the nearest-neighbour search.")
  flags.DEFINE_string("dinov2", None, "--features=dinov2: a transformers DINOv2 folder "
                      "(config.json + model.safetensors; the paper: facebook/dinov2-giant).")
  flags.DEFINE_enum("pooling", "cls", ["cls", "patch_sum"], "DINOv2 features: the CLS token or "
                    "the sum of the patch tokens.")
  flags.DEFINE_string("inception_weights", None, "--features=inception: the FID Inception "
                      "weights file.")
  flags.DEFINE_integer("num_images", None, "Images attacked (the first N; default all; "
                       "restoration: 32).")
  flags.DEFINE_enum("posterior", "hot", ["hot", "ancestral"], "Posterior sampler: hot = the "
                    "paper's held --hot_steps DDPM pipeline; ancestral = --posterior_steps "
                    "posterior steps from t.")
  flags.DEFINE_integer("hot_steps", 50, "Inference steps of the hot sample's pipeline.")
  flags.DEFINE_integer("posterior_steps", 32, "Steps of --posterior=ancestral.")
  flags.DEFINE_float("guidance_scale", 5.0, "Guidance of the posterior sample (SDXL pipeline "
                     "default, as the paper's hot sample).")
  flags.DEFINE_float("mmse_guidance", 1.0, "Guidance of the MMSE step (1: conditional, as the "
                     "paper).")
  flags.DEFINE_integer("resolution", None, "Image side (default: the model's; a workdir: its "
                       "fine-tuning resolution).")
  flags.DEFINE_integer("seed", 0, "Every key derives from key(seed), one per image index "
                       "(noise, VAE sample, posterior sampler).")
  flags.DEFINE_integer("batch_size", 8, "Images per model call (does not change results).")
  flags.DEFINE_string("masks", None, "--mode=inpaint: a folder of masks, one per image with its "
                      "name (white = repaint, the attacked size); default: one random box per "
                      "image, 1-50 percent of its area.")
  flags.DEFINE_integer("inpaint_steps", 20, "--mode=inpaint: Euler steps (the paper: 20).")
  flags.DEFINE_float("inpaint_guidance", 8.0, "--mode=inpaint: guidance scale (the paper: 8).")
  flags.DEFINE_float("strength", 0.99, "--mode=inpaint: diffusers' strength (the paper: 0.99).")
  flags.DEFINE_string("cache_dir", "", "--features=digits: where the digit network is cached.")


if __name__ == "__main__":
  _define_flags()
  cli.run(main, PROG)
