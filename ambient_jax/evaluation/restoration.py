"""Restoration MSE of a latent model's one-step MMSE denoiser: the paper's Table 1 (METHOD.md
§8, official `eval_scripts/eval_denoisers.py`).

For N images and each t_eval (default 900, 800, 500, 100): image i is encoded to z0[i] (one
VAE posterior sample, as the official script), noised at DDPM step t_eval with the attack's
per-image noise, and denoised in one step, x̂0 = D(x, σ^VE_t) (`latent_attack.attack_latents`,
method "mmse"); then
    latent MSE_i = mean over latent entries of (x̂0[i] − z0[i])²
    pixel MSE_i  = mean over pixels of (decode(x̂0[i]) − image_i)²   (images in [-1, 1],
                                                                      decoded unclipped)
and the table reports their mean and standard deviation over the N images (ddof = 1, as
torch's `.std()`). The paper's values: ≈ 0.30–0.34 latent, 0.057–0.080 pixel at t_eval
800–900 for SDXL fine-tunes on FFHQ, nearly equal across t_n.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from ambient_jax.evaluation import latent_attack

T_EVAL = (900, 800, 500, 100)


def restoration_mse(model: latent_attack.AttackModel, coder, images: np.ndarray, prompts: dict,
                    *, t_evals: Sequence[int] = T_EVAL, key: jax.Array, batch_size: int = 16,
                    indices=None, log=None) -> dict:
  """{t: {latent_mse_mean, latent_mse_std, pixel_mse_mean, pixel_mse_std, count}} for
  images [N, R, R, 3] in [-1, 1] under `prompts` (as `latent_attack.attack_latents`);
  coder = (encode(images, indices), decode(latents)) (`latent_attack.vae_coder`). The
  noise of image i at every t_eval comes from the same per-image key."""
  encode, decode = coder
  images = np.asarray(images, np.float32)
  indices = np.arange(len(images)) if indices is None else np.asarray(indices)
  z0 = encode(images, indices)
  table = {}
  for t in t_evals:
    _, recon = latent_attack.attack_latents(model, z0, prompts, t=int(t), key=key,
                                            methods=("mmse",), batch_size=batch_size,
                                            indices=indices)
    latent = per_image_mse(recon["mmse"], z0)
    pixel = per_image_mse(decode(recon["mmse"]), images)
    table[int(t)] = dict(latent_mse_mean=float(latent.mean()), latent_mse_std=_std(latent),
                         pixel_mse_mean=float(pixel.mean()), pixel_mse_std=_std(pixel),
                         count=int(len(images)))
    if log:
      log(f"restoration at t_eval={t}: latent MSE {latent.mean():.4f}, pixel MSE "
          f"{pixel.mean():.4f} ({len(images)} images)")
  return table


def per_image_mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Mean squared difference per image: [N, ...] × [N, ...] -> [N] float64."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return np.mean(d.reshape(len(d), -1) ** 2, axis=1)


def _std(x: np.ndarray) -> float:
  return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def format_table(tables: dict[str, dict], title: str = "") -> str:
  """Markdown table as the paper's Table 1: one row per model (name -> `restoration_mse`
  result), a latent and a pixel column per t_eval, "mean ± std"."""
  ts = sorted({t for table in tables.values() for t in table}, reverse=True)
  head = "| model | " + " | ".join(f"latent t={t}" for t in ts) + " | " + " | ".join(
      f"pixel t={t}" for t in ts) + " |"
  lines = ([title] if title else []) + [head, "|" + "---|" * (1 + 2 * len(ts))]
  for name, table in tables.items():
    cell = lambda t, kind: (f"{table[t][kind + '_mse_mean']:.4f} ± {table[t][kind + '_mse_std']:.4f}"
                            if t in table else "–")
    lines.append(f"| {name} | " + " | ".join(cell(t, "latent") for t in ts) + " | " +
                 " | ".join(cell(t, "pixel") for t in ts) + " |")
  return "\n".join(lines)
