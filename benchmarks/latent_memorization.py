"""The paper's latent experiment in miniature: fine-tuning of a pretrained latent diffusion
model on clean vs. noisy digits, quality and memorization (METHOD.md §8, §10).

    python benchmarks/latent_memorization.py --quick   # pipeline check, ≈ 6 min on 2 CPU cores
    python benchmarks/latent_memorization.py           # full: t_n = 500 and 800, ≈ 40 min

Sizes: "pretraining" 800 VAE + 1,500 UNet steps; 32 fine-tuning nines; 2,000 fine-tuning
steps per model (1,000 epochs at batch 16), the whole UNet (--lora_rank 0, lr 2e-4).
Why not LoRA: measured here, LoRA r = 8 on this tiny UNet (adapters on the attention
projections of its one cross-attention level) does not memorize even with clean
fine-tuning — 0 copies from 100 nines after 2,000 steps and from 32 nines after 2,000
steps (lr 1e-3) — so it could not show the paper's contrast; the full fine-tune of the
same model copies 94 % of its samples (`--lora_rank 8 --lr 1e-3` runs the LoRA version).
Measured step times (2 cores shared with other work, load 3–4): VAE step (batch 32)
≈ 0.1 s, UNet pretraining step ≈ 0.4 s, full fine-tuning step through the Trainer
(batch 16) ≈ 0.15 s plus ≈ 30 s start-up and compilation per run (fine-tunes with the same
loss share the step through a per-run XLA compilation cache). --quick (100 VAE / 150 UNet
/ 40 fine-tuning steps) checks the pipeline only.

1. "Pretraining", clean, on the bundled digits of classes 0–8 at 16×16 (RGB, R = G = B),
   with lean jitted loops: a small AutoencoderKL (f = 2: latents 8×8×4; reconstruction +
   a small KL), then a small SD-1.5-structured UNet2DConditionModel (cross-attention on a
   random, frozen 2-layer CLIP text encoder's states; captions "a handwritten digit
   seven"; plain ε loss on the VAE latents, 10 % prompt dropout). Everything is written as
   a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/ with a
   byte-level BPE learned from the captions, scheduler/ = SD 1.5's DDPM schedule), and
   everything after is the project's real path: `pipeline.load_pretrained`,
   `prepare_latents.prepare`, the ordinary Trainer with `configs/sdxl.py:family=sd15`
   (LatentTask: frozen base + LoRA adapters, or the whole UNet), and evaluation through
   `latent.evaluation` (`LatentRun`, `sample_images`, `memorization_report`).
2. Fine-tuning set: --train_size digits of class 9 (never seen in pretraining), caption
   "a handwritten digit nine"; prepared clean (t_n = 0, for the clean fine-tune) and once per
   corruption level (noisy latents only). Four ways, same model, steps, batch, lr and seed:
     clean                 plain ε loss on the clean latents (ordinary fine-tuning)
     naive                 plain ε loss on the noisy latents as if clean
     ambient               ambient_loss_vp, t uniform above t_n; truncated sampling
                           (Euler to σ_n, one Tweedie step)
     ambient_consistency   ambient + λ_c consistency from --consistency_start of the run;
                           full sampling (the paper's), and truncated as a second row
   A fine-tune that an earlier run with the same --workdir finished with the same config is
   reused (WORKDIR/runs/METHOD_tT_N/finetune_done.json holds its config and seconds), so an
   interrupted or extended run redoes no training. Fine-tunes and their evaluation run on one
   device: on several (the tests' 8 CPU devices) the attacks, which do not split their batch,
   would compute all of it on each, and the tiny UNet gains nothing from a split batch.
3. Measured on the decoded samples (--num_samples, guided Euler, --sample_steps steps, the
   fine-tuning prompt): FD of the digit classifier's features (`metrics.digit_features`,
   16×16) to held-out nines (not in the fine-tuning set); the share of samples that are
   copies of a fine-tuning image, calibrated on held-out nines (pixel RMSE to the nearest
   fine-tuning image below the 1 % quantile of held-out nines',
   `metrics.memorization.heldout_baseline`) and the feature-similarity fractions; the
   memorization attack (§8) in latent space (`latent.evaluation.attack_latents`): every
   fine-tuning image encoded (posterior mean), noised at DDPM step --attack_t (default
   800), reconstructed by one MMSE step and by posterior sampling, decoded, and compared
   with the fine-tuning images (copies, sim > 0.95, self-match = the nearest fine-tuning
   image is the attacked one).
Two reference rows need no fine-tuning: held-out real nines and the pretrained model
itself (it never saw a nine).
4. The paper's own instruments, through `python -m ambient_jax.attack`'s library path
   (`evaluation.attack`: null captions, VAE posterior sample, the hot sample of
   --hot_steps steps at guidance 5, the digit classifier's features instead of DINOv2):
   - the pretrained model attacked at --attack_t on --train_size digits it was pretrained
     on (classes 0–8) and on as many held-out nines it never saw, each set its own
     reference (a class it never saw is also harder to draw: the contrast is not only
     memorization);
   - Fig. 8's analogue: the fine-tuning nines noised at t = 900 and posterior-sampled by the
     clean and the t_n = 500 ambient fine-tunes, similarity histograms in one PNG
     (OUT/..._fig8.png);
   - Table 1's analogue: restoration MSE (latent and pixel) of the one-step MMSE denoiser
     at t_eval 900 / 800 / 500 / 100 for the clean, t_n = 500 and t_n = 800 fine-tunes. Writes OUT/latent_memorization{_quick}.txt (the log and
table), .json, _samples.png (samples above their nearest fine-tuning image), _samples.npz (every
row's samples, uint8: `--recompute` re-measures them with today's metric code, no model
run) and _fig8.png; OUT is
--out (default ./benchmark_results/latent_memorization, --quick: a temporary folder;
`--out benchmarks/results` updates the committed results), the stem --name.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from ambient_jax import precond, prepare_latents  # noqa: E402
from ambient_jax.latent import clip, unet, vae  # noqa: E402
from ambient_jax.evaluation import attack, common, latent as evaluation, restoration  # noqa: E402
from ambient_jax.latent import configs as latent_configs  # noqa: E402
from ambient_jax.latent.schedule import NoiseSchedule  # noqa: E402
from ambient_jax.metrics import digit_features, frechet, memorization  # noqa: E402
from ambient_jax.runtime import images as images_lib  # noqa: E402
import _output  # noqa: E402  (benchmarks/, beside this file)

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
HELD_CLASS = 9
METHODS = ("clean", "naive", "ambient", "ambient_consistency")
# How each is sampled: ambient truncated at σ_n (below it its network is untrained); ambient +
# consistency full (the paper's) and truncated too (the same model's Tweedie step at σ_n).
SAMPLING = dict(clean=("full",), naive=("full",), ambient=("truncated",),
                ambient_consistency=("full", "truncated"))
RES = 16

VAE_CONFIG = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3,
                  down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32],
                  layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=8,
                  sample_size=RES, scaling_factor=1.0, force_upcast=True,
                  mid_block_add_attention=True)
TEXT_CONFIG = dict(architectures=["CLIPTextModel"], attention_dropout=0.0, dropout=0.0,
                   hidden_act="quick_gelu", hidden_size=32, intermediate_size=64,
                   layer_norm_eps=1e-5, max_position_embeddings=77,
                   model_type="clip_text_model", num_attention_heads=2, num_hidden_layers=2,
                   projection_dim=32)
UNET_CONFIG = dict(_class_name="UNet2DConditionModel", sample_size=RES // 2, in_channels=4,
                   out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
                   down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                   cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
               "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"],
               "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"],
               "scheduler": ["diffusers", "EulerDiscreteScheduler"],
               "safety_checker": [None, None], "feature_extractor": [None, None],
               "requires_safety_checker": False}


LINES = []


def log(msg):
  LINES.append(str(msg))
  print(msg, flush=True)


def caption(label: int) -> str:
  return f"a handwritten digit {WORDS[label]}"


# ----------------------------------------------------------------------------- the tiny model


def write_tokenizer(folder: str) -> int:
  """A CLIP tokenizer folder in SD 1.5's layout (the tests' byte-level BPE, learned from a
  few sentences; the captions' words fall back to shorter pieces); returns its vocab size."""
  from tests.test_latent_tokenizer import write_clip_tokenizer  # pylint: disable=g-import-not-at-top
  write_clip_tokenizer(folder)
  with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
    return len(json.load(f))


def _adam_loop(model, loss_fn, batches, steps, lr, name, seed):
  """Trains every nnx.Param of `model` by Adam on loss_fn(model, batch, key); in place."""
  if steps <= 0:
    return 0.0
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps, lr / 10),
      weight_decay=0.0))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch, key):
    def f(p):
      return loss_fn(nnx.merge(graphdef, p, rest), batch, key)
    loss, grads = jax.value_and_grad(f)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  t0, recent = time.time(), []
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, batches(i), jax.random.key(seed * 7919 + i))
    recent.append(loss)
    if (i + 1) % max(steps // 4, 1) == 0:
      log(f"  pretrain {name}: step {i + 1}/{steps}  loss {float(np.mean(jax.device_get(recent))):.4f}"
          f"  ({time.time() - t0:.0f} s)")
      recent = []
  nnx.update(model, params)
  return time.time() - t0


def pretrain(folder: str, images: np.ndarray, labels: np.ndarray, args) -> dict:
  """Trains the VAE then the UNet on (images [N, 16, 16, 3] in [-1, 1], labels) and writes
  the diffusers folder. Returns timings and the latent scaling factor."""
  rng = np.random.default_rng(args.seed)
  n, b = len(images), args.pretrain_batch
  pick = lambda i: np.random.default_rng(args.seed * 100_003 + i).integers(0, n, b)

  vae_model = vae.AutoencoderKL(VAE_CONFIG, rngs=nnx.Rngs(args.seed))

  def vae_loss(m, x, key):
    mean, logvar = m.encode(x)
    z = m.sample_posterior(mean, logvar, key)
    rec = jnp.mean((m.decode(z) - x) ** 2)
    kl = 0.5 * jnp.mean(jnp.sum(mean ** 2 + jnp.exp(logvar) - 1 - logvar, axis=-1))
    return rec + args.kl_weight * kl

  t_vae = _adam_loop(vae_model, vae_loss, lambda i: images[pick(i)], args.vae_steps, 2e-3,
                     "VAE", args.seed)
  encode = jax.jit(lambda x: vae_model.encode(x))
  means = np.concatenate([np.asarray(encode(images[i:i + 500])[0]) for i in range(0, n, 500)])
  scale = float(1.0 / means.std())
  vae_cfg = dict(VAE_CONFIG, scaling_factor=round(scale, 5))
  vae_model.scaling_factor = float(vae_cfg["scaling_factor"])
  latents = means * vae_model.scaling_factor
  recon = np.asarray(jax.jit(lambda z: vae_model.from_latents(z))(latents[:500]))
  rec_rmse = float(np.sqrt(np.mean((recon - images[:500]) ** 2)))
  log(f"  VAE: latents {latents.shape[1:]}, scaling factor {scale:.4f}, reconstruction RMSE "
      f"{rec_rmse:.4f} (pixels in [-1, 1])")

  os.makedirs(folder, exist_ok=True)
  vocab = write_tokenizer(os.path.join(folder, "tokenizer"))
  text_cfg = dict(TEXT_CONFIG, vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=2,
                  pad_token_id=1)
  encoder = clip.text_encoder(text_cfg, rngs=nnx.Rngs(args.seed + 1))
  from ambient_jax.latent import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  tok = tok_lib.load_tokenizer(os.path.join(folder, "tokenizer"))
  states = np.asarray(encoder(jnp.asarray(tok([caption(i) for i in range(10)] + [""]))).last_hidden_state)
  label_states = jnp.asarray(states)  # [11, T, 32]; row 10 = the empty prompt

  schedule = NoiseSchedule.from_config(latent_configs.bundled_config("sd15", "scheduler"))
  vp = jnp.asarray(schedule.vp_sigmas, jnp.float32)
  model = unet.UNet2DConditionModel(UNET_CONFIG, rngs=nnx.Rngs(args.seed + 2))
  lat = jnp.asarray(latents)
  lab = jnp.asarray(labels)

  def eps_loss(m, idx, key):
    k_t, k_e, k_d = jax.random.split(key, 3)
    z0 = lat[idx]
    t = jax.random.randint(k_t, (z0.shape[0],), 0, vp.shape[0])
    s = vp[t][:, None, None, None]
    eps = jax.random.normal(k_e, z0.shape)
    x_t = jnp.sqrt(1 - s ** 2) * z0 + s * eps
    drop = jax.random.uniform(k_d, (z0.shape[0],)) < 0.1
    ctx = label_states[jnp.where(drop, 10, lab[idx])]
    return jnp.mean((m(x_t, t.astype(jnp.float32), ctx) - eps) ** 2)

  t_unet = _adam_loop(model, eps_loss, pick, args.unet_steps, args.pretrain_lr, "UNet",
                      args.seed + 1)
  with open(os.path.join(folder, "model_index.json"), "w") as f:
    json.dump(MODEL_INDEX, f, indent=2)
  unet.save_unet(model, os.path.join(folder, "unet"))
  vae.save_vae(vae_model, vae_cfg, os.path.join(folder, "vae"))
  clip.save_text_encoder(encoder, text_cfg, os.path.join(folder, "text_encoder"))
  os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
  sched_cfg = dict(latent_configs.bundled_config("sd15", "scheduler"),
                   _class_name="EulerDiscreteScheduler")
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(sched_cfg, f, indent=2)
  params = lambda m: sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
  del rng
  return dict(vae_seconds=t_vae, unet_seconds=t_unet, vae_rmse=rec_rmse, scaling_factor=scale,
              unet_params=params(model), vae_params=params(vae_model),
              text_params=params(encoder))


# ----------------------------------------------------------------------------- fine-tuning


def sdxl_config(arg: str):
  spec = importlib.util.spec_from_file_location("latent_mem_sdxl_cfg",
                                                os.path.join(ROOT, "configs", "sdxl.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def finetune_config(method: str, t_n: int, pretrained: str, dataset: str, args):
  """configs/sdxl.py:family=sd15,... with the miniature's sizes."""
  mode = {"clean": "clean", "naive": "naive", "ambient": "ambient_only",
          "ambient_consistency": ("" if args.consistency_weight is None
                                  else f"consistency={args.consistency_weight}")}[method]
  c = sdxl_config(f"family=sd15,t_n={t_n},{mode}")
  c.latent.pretrained, c.latent.dataset = pretrained, dataset
  c.latent.lora_rank = args.lora_rank  # 0: full fine-tuning of the UNet
  c.latent.param_dtype = c.latent.dtype = "float32"
  c.latent.cfg_dropout = 0.1
  c.num_train_steps = args.steps
  c.batch_size = args.batch
  c.optim.lr = args.lr
  c.optim.warmup_steps = 0
  c.consistency.start_step = int(args.steps * args.consistency_start)
  if args.consistency_step:  # the chains' step kind (default: the loss's own)
    c.consistency.kwargs.step = args.consistency_step
  if args.consistency_anchor:  # the network's anchor (default) or the data's
    c.consistency.kwargs.anchor = args.consistency_anchor
  c.consistency.batch_fraction = 0.25
  c.ema.halflife_kimg = (args.batch * args.steps / 1000 / 20,)
  c.mesh.fsdp, c.mesh.data = 1, -1
  c.log_every_steps = max(args.steps // 4, 1)
  c.checkpoint.every_steps = args.steps
  c.checkpoint.keep_every_steps = 0
  c.sample.every_steps = -1  # no grid: the benchmark draws and pictures its own samples
  c.seed = args.seed
  return c


FINISHED = "finetune_done.json"  # in a fine-tune's workdir: its config and seconds


def finetune(method, t_n, pretrained, dataset, workdir, args) -> float:
  """Runs the ordinary Trainer (checkpoint at the end); returns its seconds. A fine-tune
  that an earlier run with this --workdir finished with the same config is reused (its
  recorded seconds returned), so an interrupted or extended benchmark redoes no training."""
  from ambient_jax.training import trainer as train_lib  # pylint: disable=g-import-not-at-top
  config = finetune_config(method, t_n, pretrained, dataset, args)
  done = os.path.join(workdir, FINISHED)
  if os.path.exists(done):
    with open(done) as f:
      finished = json.load(f)
    if finished["config"] != config.to_json(sort_keys=True):
      raise SystemExit(f"{workdir} holds a finished fine-tune with another config: give "
                       "another --workdir, or remove that folder to train it again.")
    if not os.path.isdir(os.path.join(workdir, "checkpoints", str(config.num_train_steps))):
      raise SystemExit(f"{workdir} has {FINISHED} but not its step-{config.num_train_steps} "
                       "checkpoint: remove that folder to train it again.")
    log(f"  reusing the finished fine-tune in {workdir}")
    return finished["seconds"]
  t0 = time.time()
  train_lib.train_and_evaluate(config, workdir, devices=run_devices())
  seconds = time.time() - t0
  with open(done, "w") as f:
    json.dump(dict(config=config.to_json(sort_keys=True), seconds=seconds), f)
  return seconds


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
  """Measures each fine-tuned run through the project's own evaluation path
  (`latent.evaluation`: the restored LatentRun, its guided sampler and decoder, and the
  memorization report with the attack), plus FD to held-out nines. The pretrained model
  itself is a run whose adapters are all zero (B = 0: the base UNet's output)."""

  def __init__(self, heldout, args):
    self.args = args
    self.net = digit_features.get_digit_feature_net(RES, log=log)
    self.features = lambda x: self.net.features(np.asarray(x)[..., :1])
    self.heldout = heldout
    self.ref_features = self.features(heldout)
    self.copy_rmse = None
    self._fine_tuning_set = {}  # dataset path -> (clean images, their NearestNeighbourIndex)
    self._attacks = {}  # (workdir, step) -> the attack's figures: one per model, whatever sampling

  def fine_tuning_set(self, run):
    """The run's clean fine-tuning images and their index, read and built once per dataset."""
    path = run.config.latent.dataset
    if path not in self._fine_tuning_set:
      clean = evaluation.clean_images(run)
      self._fine_tuning_set[path] = clean, memorization.NearestNeighbourIndex(clean, self.features)
    return self._fine_tuning_set[path]

  def measure(self, run, mode: str):
    """(result row dict, decoded samples [n, 16, 16, 3], their nearest fine-tuning image
    indices): FD to held-out nines, samples' nearest fine-tuning images (copies calibrated
    on held-out nines) and the attack on every fine-tuning image at --attack_t."""
    a = self.args
    stop = float(precond.vp_to_ve_sigma(run.sigma_n_max)) if mode == "truncated" else 0.0
    samples = evaluation.sample_images(run, mode, a.num_samples, seed=a.seed + 1,
                                       num_steps=a.sample_steps, guidance_scale=a.guidance_scale,
                                       sigma_stop=stop, batch_size=a.num_samples)
    clean, index = self.fine_tuning_set(run)
    model = (str(run.root), run.step)
    if model in self._attacks:  # the same model sampled another way: its attack is the same
      self.copy_rmse = self._attacks[model]["copy_rmse"]
      samples_nn, _ = memorization.nearest_neighbours(samples, index=index,
                                                      copy_rmse=self.copy_rmse)
    else:
      report = evaluation.memorization_report(
          run, clean, samples, "digits", self.features, self.heldout,
          run.root / "eval" / str(run.step), attack_t=a.attack_t,
          key=jax.random.key(a.seed + 7), num_attacked=None, posterior_steps=a.posterior_steps,
          batch_size=len(clean), guidance_scale=1.0, index=index)["memorization"]
      self.copy_rmse, samples_nn = report["heldout"]["copy_rmse"], report["samples"]
      self._attacks[model] = dict(copy_rmse=self.copy_rmse, attack=dict(
          {m: report[m] for m in ("mmse", "posterior")}, t=a.attack_t,
          sigma_ve=report["attack_sigma_ve"]))
    fd = frechet.fd_from_features(self.features(samples), self.ref_features)
    res = dict(fd=fd, samples_nn=samples_nn, attack=dict(self._attacks[model]["attack"]))
    nn_idx = index.query(samples)["pixel_index"]
    return res, samples, nn_idx

  def measure_real(self, run, real):
    """The reference row: held-out real nines [n, 16, 16, 3] as if they were samples."""
    _, index = self.fine_tuning_set(run)
    self.copy_rmse = memorization.heldout_baseline(index, self.heldout)["copy_rmse"]
    res, nn_idx = sample_measures(real, self, index, self.copy_rmse)
    return res, real, nn_idx


def attack_folder(target, folder, out, t, args):
  """`python -m ambient_jax.attack`'s noise attack (`evaluation.attack.noise_attack`: null
  captions, hot sample, digit features) of every image in `folder` against that folder;
  returns (metrics dict, {method: similarities [n]})."""
  m = attack.noise_attack(target, folder, out, ts=(t,), feature="digits",
                          hot_steps=args.hot_steps, seed=args.seed + 11,
                          batch_size=args.train_size, log=lambda msg: None)
  with np.load(m["similarities"]) as f:
    sims = {k: f[f"t{t}_{k}_similarity"] for k in ("mmse", "posterior")}
  return m, sims


def pretrained_attack(folder, seen_dir, unseen_dir, work, args):
  """Extra 1: the pretrained model attacked at --attack_t on digits it was pretrained on
  (classes 0–8) and on digits it never saw (held-out nines), each set its own reference."""
  target = attack.load_target(pretrained=folder)
  rows = {}
  for name, images in (("seen (pretraining digits)", seen_dir), ("unseen (held-out nines)",
                                                                 unseen_dir)):
    m, _ = attack_folder(target, images, os.path.join(work, "attack_pretrained",
                                                      os.path.basename(images)), args.attack_t,
                         args)
    rows[name] = m["t"][str(args.attack_t)]
  return rows


def fmt_attack_rows(rows, t):
  lines = [f"| pretrained model, attack t={t} | MMSE: sim>0.9 / >0.95 / self / mean | posterior "
           "(hot): sim>0.9 / >0.95 / self / mean |", "|---|---|---|"]
  for name, entry in rows.items():
    cells = [f"{entry[m]['frac_sim_above_0.9']:.2f} / {entry[m]['frac_sim_above_0.95']:.2f} / "
             f"{entry[m]['self_match']:.2f} / {entry[m]['mean_similarity']:.3f}"
             for m in ("mmse", "posterior")]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def fig8(path, targets, images_dir, work, args):
  """Extra 2, Fig. 8's analogue: the fine-tuning images noised at t = 900 and posterior-
  sampled (hot) by each fine-tune ({(method, t_n): attack.Target}); their similarity
  histograms in one PNG."""
  sims = {}
  for (method, t_n), target in targets.items():
    _, s = attack_folder(target, images_dir, os.path.join(work, "attack_fig8",
                                                          f"{method}_t{t_n}"), 900, args)
    sims[f"{method} t_n={t_n}"] = s["posterior"]
  memorization.similarity_histogram_png(
      path, sims, "Fig. 8 analogue: fine-tuning digits noised at t=900, hot posterior sample")
  return {k: dict(mean=float(v.mean()), frac_above_0_95=float(np.mean(v > 0.95)))
          for k, v in sims.items()}


def restoration_rows(targets, images_dir, work, args):
  """Extra 3: Table 1's analogue (`evaluation.restoration`) for each model in `targets`
  ({(method, t_n): attack.Target})."""
  tables = {}
  for (method, t_n), target in targets.items():
    r = attack.restoration_table(target, images_dir,
                                 os.path.join(work, "restoration", f"{method}_t{t_n}"),
                                 num_images=args.train_size, seed=args.seed + 13,
                                 batch_size=args.train_size, log=lambda msg: None)
    tables[f"{method} t_n={t_n}"] = {int(t): v for t, v in r["t_eval"].items()}
  return tables


def pairs_png(path, rows, x_train):
  """Per model, a row of samples above the nearest (pixel) fine-tuning image of each: the
  pixel benchmark's picture (imported at the end: that module sets XLA_FLAGS on import,
  too late by then to matter)."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import memorization_comparison  # pylint: disable=g-import-not-at-top
  memorization_comparison.pairs_png(path, rows, x_train)


# ----------------------------------------------------------------------------- main


def runs_of(args) -> list[tuple[str, int]]:
  """The fine-tunes as (method, t_n), in order: clean (on t_n = 0), then per t_n the others."""
  runs = [("clean", 0)] if "clean" in args.methods else []
  return runs + [(m, t) for t in args.t_n for m in args.methods if m != "clean"]


def run_devices() -> list:
  """Where the fine-tunes train and are evaluated: one device (module docstring, 2)."""
  return jax.local_devices()[:1]


def split_digits(train_size: int, seed: int):
  """(pretraining images, labels; fine-tuning nines; held-out nines), RGB in [-1, 1]."""
  images, labels = digit_features.load_digits(RES)
  images = np.repeat(images, 3, axis=-1)
  rng = np.random.default_rng(seed)
  nines = rng.permutation(np.flatnonzero(labels == HELD_CLASS))
  rest = np.flatnonzero(labels != HELD_CLASS)
  return (images[rest], labels[rest], images[np.sort(nines[:train_size])],
          images[nines[train_size:]])


def write_images(folder: str, images: np.ndarray) -> str:
  """PNG files + metadata.jsonl captions (the imagefolder convention prepare_latents reads)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  lines = []
  for i, x in enumerate(images):
    Image.fromarray(images_lib.to_uint8(x)).save(os.path.join(folder, f"{i:04d}.png"))
    lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": caption(HELD_CLASS)}) + "\n")
  with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
    f.write("".join(lines))
  return folder


def fmt_row(name, t_n, mode, res, train_s):
  s = res["samples_nn"]
  row = (f"| {name} | {t_n} | {mode} | {res['fd']:.1f} | {s['frac_copies']:.2f} / "
         f"{s['frac_sim_above_0.9']:.2f} / {s['frac_sim_above_0.95']:.2f} |")
  if "attack" in res:
    for m in ("mmse", "posterior"):
      a = res["attack"][m]
      row += (f" {a['frac_copies']:.2f} / {a['frac_sim_above_0.95']:.2f} / "
              f"{a['self_match_pixels']:.2f} |")
  else:
    row += " – | – |"
  return row + (f" {train_s:.0f} |" if train_s else " – |")


def sample_measures(samples, ev, index, copy_rmse) -> tuple[dict, np.ndarray]:
  """A row's sample measures [n, 16, 16, 3]: FD to the held-out nines and the nearest
  fine-tuning image of each sample (copies below `copy_rmse`); and those images' indices."""
  nearest = index.query(samples)
  measures = dict(fd=frechet.fd_from_features(ev.features(samples), ev.ref_features),
                  samples_nn=memorization.summarize(nearest, copy_rmse=copy_rmse))
  return measures, nearest["pixel_index"]


def recompute(out: str) -> None:
  """--recompute: every row's sample measures (FD, nearest fine-tuning images, copies and
  their held-out calibration) from OUT_samples.npz with today's metric code, no model run.
  The attack's and the paper's instruments' figures are kept as recorded (they need the
  models). Updates OUT.json, appends the new table to OUT.txt, redraws OUT_samples.png."""
  saved, npz_path = _output.saved_run(out)
  a = argparse.Namespace(**saved["args"])
  _, _, x_train, heldout = split_digits(a.train_size, a.seed)
  x_train = common.quantize(x_train)  # as the fine-tuning set's PNG files hold it
  ev = Evaluator(heldout[len(heldout) // 2:], a)
  index = memorization.NearestNeighbourIndex(x_train, ev.features)
  copy_rmse = memorization.heldout_baseline(index, ev.heldout)["copy_rmse"]
  rows, pictures = [], []
  with np.load(npz_path) as arrays:
    for i, r in enumerate(saved["results"]):
      samples = images_lib.from_uint8(arrays[f"row_{i}"])
      measures, nn_idx = sample_measures(samples, ev, index, copy_rmse)
      r.update(measures)
      rows.append(fmt_row(r["name"], r["t_n"], r["sampling"], r, r["train_seconds"]))
      pictures.append((f"{r['name']} t_n={r['t_n']} ({r['sampling']}): FD {r['fd']:.1f}, "
                       f"copies {r['samples_nn']['frac_copies']:.2f}", samples[..., :1], nn_idx))
  saved["copy_rmse"] = copy_rmse
  saved["recomputed"] = time.strftime("%Y-%m-%d %H:%M:%S")
  with open(out + ".json", "w") as f:
    json.dump(saved, f, indent=1, default=float)
  block = [f"\nrecomputed from {os.path.basename(npz_path)} on {saved['recomputed']} "
           f"(copies: pixel RMSE < {copy_rmse:.3f}; attack columns as recorded):",
           TABLE_HEADER.format(t=a.attack_t), *rows]
  for line in block:
    print(line)
  with open(out + ".txt", "a") as f:
    f.write("\n".join(block) + "\n")
  pairs_png(out + "_samples.png", pictures, x_train[..., :1])


TABLE_HEADER = ("| model | t_n | sampling | FD ↓ | samples: copies / sim>0.9 / >0.95 | "
                "attack t={t} MMSE: copies / sim>0.95 / self | posterior: copies / "
                "sim>0.95 / self | fine-tune s |\n|---|---|---|---|---|---|---|---|")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="t_n = 800 only, fewer steps and samples")
  p.add_argument("--t_n", type=int, nargs="+", default=None, help="DDPM corruption steps")
  p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
  p.add_argument("--train_size", type=int, default=32, help="fine-tuning nines")
  p.add_argument("--vae_steps", type=int, default=None)
  p.add_argument("--unet_steps", type=int, default=None)
  p.add_argument("--pretrained", default=None,
                 help="a folder written by an earlier run (WORKDIR/pretrained): skip pretraining")
  p.add_argument("--pretrain_batch", type=int, default=32)
  p.add_argument("--pretrain_lr", type=float, default=2e-3)
  p.add_argument("--kl_weight", type=float, default=1e-4)
  p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per model")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--lr", type=float, default=2e-4,
                 help="learning rate (constant); LoRA wants more, e.g. 1e-3")
  p.add_argument("--lora_rank", type=int, default=0,
                 help="LoRA adapters of this rank; 0 (default): fine-tune the whole UNet")
  p.add_argument("--consistency_weight", type=float, default=None,
                 help="λ_c (default: configs/sdxl.py's, the paper's: 0.01, 1e-4 at t_n = 800)")
  p.add_argument("--consistency_start", type=float, default=0.5,
                 help="fraction of the fine-tuning run after which consistency is on")
  p.add_argument("--consistency_step", choices=("posterior", "posterior_cov"), default=None,
                 help="the consistency chains' steps (default: plain posterior steps; "
                      "posterior_cov draws Var[x0 | x] too, docs/results_toy.md)")
  p.add_argument("--consistency_anchor", choices=("network", "data"), default=None,
                 help="consistency's anchor: the network's D(x_s, σ_s) (default) or the data's "
                 "unbiased T (losses.consistency_loss anchor=\"data\")")
  p.add_argument("--num_samples", type=int, default=None)
  p.add_argument("--sample_steps", type=int, default=25)
  p.add_argument("--guidance_scale", type=float, default=2.0)
  p.add_argument("--attack_t", type=int, default=800)
  p.add_argument("--posterior_steps", type=int, default=8)
  p.add_argument("--hot_steps", type=int, default=None,
                 help="steps of the hot sample's pipeline (extras; default 50, --quick 10)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default=None, help="where the model, datasets and runs go "
                 "(default: a temporary folder, removed at the end)")
  p.add_argument("--recompute", action="store_true",
                 help="no model run: recompute every row's sample measures (FD, copies) from "
                      "the samples a run saved (OUT_samples.npz); give that run's --out, "
                      "--name and --quick")
  _output.add_out_flags(p, "latent_memorization", stem=True)
  args = p.parse_args(argv)
  if args.recompute and not args.out:
    p.error("--recompute reads a finished run's files: give its --out (and --name if set)")
  q = args.quick
  args.t_n = args.t_n or ([800] if q else [500, 800])
  args.vae_steps = args.vae_steps or (100 if q else 800)
  args.unet_steps = args.unet_steps or (150 if q else 1500)
  args.steps = args.steps or (40 if q else 2000)
  args.num_samples = args.num_samples or (64 if q else 200)
  args.hot_steps = args.hot_steps or (10 if q else 50)
  if q:
    args.posterior_steps = min(args.posterior_steps, 4)
  outputs = _output.OutputFolder(args.out, "latent_memorization", quick=q)
  out = outputs.prefix(args.name)
  if args.recompute:
    recompute(out)
    outputs.report()
    return
  work = args.workdir or tempfile.mkdtemp(prefix="latent_mem_")
  os.makedirs(work, exist_ok=True)
  t_all = time.time()
  # One compilation cache for the run: the fine-tunes that share a loss share their step.
  jax.config.update("jax_compilation_cache_dir", os.path.join(work, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  log(f"latent memorization miniature: {vars(args)}")

  x_pre, y_pre, x_train, heldout = split_digits(args.train_size, args.seed)
  log(f"digits {RES}x{RES}: pretraining {len(x_pre)} (classes 0-8), fine-tuning {len(x_train)} "
      f"nines, held-out nines {len(heldout)}")
  if args.pretrained:
    folder, info = args.pretrained, {}
    log(f"pretrained folder {folder} (given: step 1 skipped)")
  else:
    folder = os.path.join(work, "pretrained")
    info = pretrain(folder, x_pre, y_pre, args)
    log(f"pretrained folder {folder}: UNet {info['unet_params']:,} params, VAE "
        f"{info['vae_params']:,}, text encoder {info['text_params']:,} "
        f"(VAE {info['vae_seconds']:.0f} s, UNet {info['unet_seconds']:.0f} s)")

  images_dir = write_images(os.path.join(work, "finetune_images"), x_train)
  datasets = {}
  for t_n in sorted({t_n for _, t_n in runs_of(args)}):
    datasets[t_n] = prepare_latents.prepare(prepare_latents.Args(
        images=images_dir, pretrained=folder, out=os.path.join(work, f"latents_t{t_n}"),
        resolution=RES, t_n=t_n, batch_size=50), log=lambda m: None)
  log(f"prepared latents t_n = {sorted(datasets)} ({time.time() - t_all:.0f} s so far)")

  # Held-out nines: half the FD reference and copy calibration, half the "real" row.
  heldout_ref, heldout_real = heldout[len(heldout) // 2:], heldout[:len(heldout) // 2]
  ev = Evaluator(heldout_ref, args)
  header = TABLE_HEADER.format(t=args.attack_t)
  rows, pictures, results, saved_samples = [], [], [], {}

  def record(name, t_n, mode, measured, train_s):
    res, samples, nn_idx = measured
    rows.append(fmt_row(name, t_n, mode, res, train_s))
    pictures.append((f"{name} t_n={t_n} ({mode}): FD {res['fd']:.1f}, "
                     f"copies {res['samples_nn']['frac_copies']:.2f}", samples[..., :1], nn_idx))
    saved_samples[f"row_{len(results)}"] = images_lib.to_uint8(samples)
    results.append(dict(name=name, t_n=t_n, sampling=mode, train_seconds=train_s, **res))
    log(rows[-1])

  finetuned = {}  # (method, t_n) -> its restored LatentRun
  for method, t_n in runs_of(args):
    workdir = os.path.join(work, "runs", f"{method}_t{t_n}")
    log(f"fine-tuning {method} on latents_t{t_n} ({args.steps} steps)")
    secs = finetune(method, t_n, folder, datasets[t_n], workdir, args)
    run = finetuned[(method, t_n)] = evaluation.LatentRun(workdir, devices=run_devices())
    if not rows:  # the two reference rows, through the first run's evaluation path
      real = common.quantize(heldout_real[:args.num_samples])  # on the samples' grid
      record("held-out real nines", "–", "–", ev.measure_real(run, real), 0)
      log(f"copy threshold: pixel RMSE < {ev.copy_rmse:.3f} (1 % of held-out nines are closer)")
      record("pretrained (no fine-tune)", "–", "full", ev.measure(run.initial(), "full"), 0)
    for mode in SAMPLING[method]:
      record(method, t_n, mode, ev.measure(run, mode), secs)

  # The paper's three measurements (python -m ambient_jax.attack's library path).
  seen = np.random.default_rng(args.seed).choice(len(x_pre), args.train_size, replace=False)
  seen_dir = write_images(os.path.join(work, "seen_digits"), x_pre[np.sort(seen)])
  unseen_dir = write_images(os.path.join(work, "unseen_nines"), heldout_real[:args.train_size])
  attack_rows = pretrained_attack(folder, seen_dir, unseen_dir, work, args)
  log(fmt_attack_rows(attack_rows, args.attack_t))
  fig8_models = [k for k in finetuned if k[0] == "clean" or (
      k[1] == 500 and k[0].startswith("ambient"))] or list(finetuned)
  table_models = [k for k in finetuned if k[1] in (0, 500, 800)]
  # One attack target per fine-tune, its run as evaluated above: Fig. 8 and the table share
  # its compiled denoiser (with the evaluation's attack too).
  targets = {k: attack.load_target(workdir=run.workdir, run=run) for k, run in finetuned.items()
             if k in fig8_models or k in table_models}
  fig8_summary = fig8(out + "_fig8.png", {k: targets[k] for k in fig8_models}, images_dir,
                      work, args)
  log(f"Fig. 8 analogue (posterior similarity at t=900): {fig8_summary}")
  restoration_tables = restoration_rows({k: targets[k] for k in table_models}, images_dir,
                                        work, args)
  log(restoration.format_table(restoration_tables, f"restoration MSE (Table 1 analogue), "
                                                   f"{args.train_size} fine-tuning nines"))

  total = time.time() - t_all
  table = "\n".join([header] + rows)
  summary = (f"\n{table}\n\nFD: digit-classifier features of {args.num_samples} samples vs "
             f"held-out nines; copies: pixel RMSE to the nearest fine-tuning image < "
             f"{ev.copy_rmse:.3f}; self: the nearest fine-tuning image is the attacked one.\n"
             f"total wall time {total:.0f} s")
  log(summary)
  pairs_png(out + "_samples.png", pictures, x_train[..., :1])
  np.savez_compressed(out + "_samples.npz", **saved_samples)  # for --recompute
  with open(out + ".json", "w") as f:
    json.dump(dict(args=vars(args), pretrained=info, copy_rmse=ev.copy_rmse,
                   results=results, pretrained_attack=attack_rows, fig8=fig8_summary,
                   restoration={k: {str(t): v for t, v in tab.items()}
                                for k, tab in restoration_tables.items()},
                   seconds=total), f, indent=1, default=float)
  with open(out + ".txt", "w") as f:
    f.write("\n".join(LINES) + "\n")
  if args.workdir is None:
    shutil.rmtree(work, ignore_errors=True)
  outputs.report()


if __name__ == "__main__":
  main()
