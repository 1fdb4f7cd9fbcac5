"""Latent fine-tuning of Stable Diffusion XL (or SD 1.5) on noisy images only: the paper's §4 experiment.

    python -m ambient_jax.prepare_latents --images=IMAGES --pretrained=SDXL --out=LATENTS --t_n=500
    python -m ambient_jax.main --config=configs/sdxl.py --workdir=DIR \\
        --config.latent.pretrained=SDXL --config.latent.dataset=LATENTS

SDXL is the user's diffusers folder (stabilityai/stable-diffusion-xl-base-1.0 as saved by
diffusers); LATENTS the noisy latents `prepare_latents` wrote from it (the corruption level
t_n is the dataset's). Settings (METHOD.md §10): LoRA r = 4, α = r on the attention
projections to_q/to_k/to_v/to_out.0; Adam β (0.9, 0.999), weight decay 0.01, lr 1e-5
constant, batch 16, bf16 base weights; t uniform over the DDPM steps above t_n, plain MSE
on x̂_n; 200k steps, the consistency loss from step 150k with λ_c = 0.01 (1e-4 at
t_n = 800); 1024², 25-step sampling. The mesh shards the frozen UNet over 8 devices (FSDP,
a v5e-8 / v4-8 slice or an 8-GPU box); on one GPU add --config.mesh.fsdp=1, and to fit
the batch of 16 there run it as micro-batches: `:accum=4` (--config.optim.grad_accum_steps;
each micro-batch needs 1/batch_fraction = 4 examples for the consistency term).
Memory: every UNet block is recomputed in the backward pass (latent.remat; `:remat=False`
turns it off), each stack of transformer blocks runs as one lax.scan that gathers its FSDP
weights layer by layer (latent.scan_layers), and attention is memory-efficient
(latent.attention = "auto": cuDNN flash on GPU, Pallas flash on TPU, chunked elsewhere);
what fits where: docs/latent.md "What fits".
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "ambient_jax_configs_edm_paper", pathlib.Path(__file__).with_name("edm_paper.py"))
edm_paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(edm_paper)

PAPER_LAMBDA, PAPER_LAMBDA_HIGHEST_NOISE = 0.01, 1e-4
VARIANTS = {
    "t_n=800": "the dataset's DDPM corruption step (100, 500 or 800; default 500): sets λ_c "
               "(1e-4 at 800) and labels the run; the noise itself is in the dataset",
    "clean": "ordinary fine-tuning baseline: plain ε loss (prepare the dataset with --t_n=0)",
    "naive": "naive baseline: plain ε loss on the noisy latents as if they were clean",
    "ambient_only": "ambient loss without the consistency term",
    "consistency=0.01": "λ_c (0 = off; default the paper's: 0.01, 1e-4 at t_n = 800)",
    "family=sd15": "Stable Diffusion 1.5 instead of SDXL: 512², batch 16, the same recipe",
    "full_finetune": "train the whole UNet (float32) instead of LoRA adapters",
    "remat=False": "keep every UNet block's activations for the backward pass instead of "
                   "recomputing them (remat is on by default: same "
                   "gradients, one more forward pass of compute, a fraction of the activation "
                   "memory; docs/latent.md \"What fits\")",
    "accum=4": "gradient accumulation: each step's batch as 4 micro-batches (of 4 on one "
               "device: the same update in a quarter of the activation memory; the consistency "
               "term takes every 4th example of each, so 4 is the most for batch 16); default 1",
    "smoke": "a few CPU steps on a tiny diffusers folder (tests): float32, rank 2, batch 4, "
             "no remat",
}


def get_config(arg=None):
  a = edm_paper.parse_arg(arg, t_n=500, consistency=-1.0, consistency_start=150_000,
                          mode="ambient", family="sdxl", full_finetune=False, remat=True,
                          accum=1, smoke=False)
  if a["family"] not in ("sdxl", "sd15"):
    raise ValueError(f"Config variant family={a['family']!r} is unknown; allowed: sdxl, sd15.")
  if a["consistency"] < 0 and a["consistency"] != -1.0:
    raise ValueError(f"Config variant consistency={a['consistency']}: λ_c must be >= 0.")
  if a["consistency"] < 0:
    a["consistency"] = PAPER_LAMBDA_HIGHEST_NOISE if a["t_n"] >= 800 else PAPER_LAMBDA
  c = edm_paper._default_module().base_config()  # pylint: disable=protected-access
  c.num_train_steps = 200_000
  c.batch_size = 16
  c.data.name = f"{a['family']}_latents_t{a['t_n']}"  # a label: the data is latent.dataset
  c.latent.lora_rank = 0 if a["full_finetune"] else 4
  c.latent.lora_alpha = 0.0               # = rank: scale 1
  c.latent.param_dtype = "float32" if a["full_finetune"] else "bfloat16"
  c.latent.dtype = "bfloat16"
  c.latent.remat = a["remat"]             # per-block remat: the activation memory of 1024²
  c.latent.scan_layers = True             # stacks of transformer blocks as lax.scan: with remat
                                          # and FSDP, one layer's weights gathered at a time
  c.latent.attention = "auto"             # cudnn (GPU) / pallas (TPU) / chunked flash attention
  c.latent.timesteps = "uniform"
  c.latent.sample_steps = 25
  c.latent.guidance_scale = 5.0 if a["family"] == "sdxl" else 7.5
  c.loss.kind = "naive" if a["mode"] in ("naive", "clean") else "ambient"
  use_consistency = a["mode"] == "ambient" and a["consistency"] > 0
  c.consistency.weight = a["consistency"] if use_consistency else 0.0
  c.consistency.start_step = a["consistency_start"]
  c.consistency.batch_fraction = 0.25
  c.consistency.kwargs = edm_paper._default_module().below_sigma_n_kwargs(chain_steps=1)  # pylint: disable=protected-access
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 0                # constant
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 0.0
  c.optim.grad_accum_steps = a["accum"]
  c.ema.halflife_kimg = (50.0,)
  c.mesh.fsdp = 8
  c.mesh.fsdp_min_size = 2**16
  c.log_every_steps = 100
  c.checkpoint.every_steps = 5000
  c.checkpoint.keep_every_steps = 50_000
  c.sample.every_steps = 10_000
  c.sample.num_images = 8
  if a["smoke"]:
    c.num_train_steps = 4
    c.batch_size = 4
    c.latent.lora_rank = 0 if a["full_finetune"] else 2
    c.latent.param_dtype = c.latent.dtype = "float32"
    c.latent.sample_steps = 3
    c.latent.remat = False                # tiny model: memory is no issue, compile time is
    c.consistency.start_step = 2
    c.consistency.batch_fraction = 0.5
    c.ema.halflife_kimg = (0.01,)
    c.mesh.fsdp = 1
    c.mesh.fsdp_min_size = 256
    c.log_every_steps = 1
    c.checkpoint.every_steps = 2
    c.sample.every_steps = 0
    c.sample.num_images = 2
  return c
