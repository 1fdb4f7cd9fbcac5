"""Per-device memory of the paper's SDXL fine-tuning step, from shapes alone (no weights).

    python benchmarks/sdxl_memory.py                   # configs/sdxl.py: batch 16, 1024², fsdp 8
    python benchmarks/sdxl_memory.py --batch=8 --attention=chunked --remat=on --phases=ambient
    python benchmarks/sdxl_memory.py --resolution=512 --attention=xla --attention=chunked \
        --remat=off --remat=on --accum=1 --accum=2       # every combination, one row each
    python benchmarks/sdxl_memory.py --quick           # toy UNet at 64²: checks the script

The training step is the trainer's own (`latent.training.make_latent_step` jitted by
`training.step.jit_train_step`: state donated, batch on ("data", "fsdp"), frozen base UNet as a
fourth, non-donated argument). Its inputs are jax.ShapeDtypeStructs carrying their
shardings, built as `LatentTask` builds the real ones: the SDXL UNet of the bundled public
config (`latent/model_configs/sdxl/unet.json`) in config.latent.param_dtype (bf16) with
compute dtype config.latent.dtype, LoRA adapters (rank config.latent.lora_rank) attached
abstractly, `nnx.split(model, LoRAParam, ...)`; the frozen tree FSDP-sharded by
`sharding.param_sharding` (config.mesh.fsdp_min_size), the train state (adapters, AdamW
moments, EMAs) by `train_state.abstract_train_state`; the batch as the latent dataset
yields it. The step is lowered and compiled for N fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N, set before jax loads unless a count
is already there): nothing runs, nothing is allocated.

The table's axes (each flag repeatable; every combination is one compile per phase):
--attention (config.latent.attention: xla = whole score maps, chunked = blockwise online
softmax), --remat (config.latent.remat, per-block jax.checkpoint), --scan
(config.latent.scan_layers: each stack of transformer blocks as one lax.scan, its FSDP
weights gathered layer by layer inside the loop), --accum (k =
config.optim.grad_accum_steps: the step runs the batch as k micro-batches in a lax.scan,
as on GPU/TPU: config.optim.grad_accum_loop = "scan" whatever the backend),
--batch (global; per device = batch / devices, per micro-batch = that / k), --resolution,
and the phase (the plain ambient step, and the consistency phase's, a separate compile
since the flag is static). With remat on, the step is compiled with XLA:CPU's
concurrency-optimized scheduler off (`scheduler_options`; said on each such row): that
scheduler starts every block's recomputation early, so all the recomputed activations live
at once and remat barely moves the plan; on GPU / TPU nothing is changed.

Printed per row: XLA's `compiled.memory_analysis()` of one device's program — arguments
(state shard + frozen shard + batch shard), outputs, aliased (the donated state),
temporaries (activations kept for the backward pass, all-gathered weights, gradients) and
generated code — and "total" = arguments + outputs − aliased + temporaries, the bytes one
device holds at the step's peak by XLA's buffer assignment, with the compile time. The
verdict compares total with 16 GiB (TPU v5e) and 80 GiB (H100).

Read the figures as XLA:CPU's plan: the CPU backend schedules, fuses and assigns buffers
its own way and runs every dot and convolution in float32 (bf16 operands are converted),
so TPU/GPU temporaries differ — lower for the bf16 activations and weight copies, and the
fused cuDNN / Pallas attention kernels, which this CPU plan cannot show (chunked attention
is their stand-in here) — but the arguments (what the sharding puts on each device) are
exact, and the temporaries show the order of magnitude and how they scale with batch and
resolution. XLA:CPU's peak_memory_in_bytes only counts the arguments; it is printed, not
used. Compiling SDXL's step at 1024² takes 6-15 minutes on 2 quiet cores (~3.6 GiB RAM),
much longer on a loaded machine; the printed lines are appended to OUT/sdxl_memory.txt
(OUT: --out, default ./benchmark_results/sdxl_memory; committed results:
`--out benchmarks/results`).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import re
import sys
import time

import _output  # benchmarks/, beside this file

GIB = 2**30
# --quick: a toy SDXL-structured UNet (plain first level, linear projections, per-level heads,
# text_time embedding) on two levels at 64² pixels (8x8 latents); seconds to compile.
QUICK_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=(2, 4),
                  transformer_layers_per_block=(1, 2), use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8)
QUICK_RESOLUTION = 64
DEVICE_GIB = (("TPU v5e", 16), ("H100", 80))


def _setup_devices(n: int) -> None:
  """N fake CPU devices unless XLA_FLAGS already asks for a count (before jax loads)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def load_config(spec: str):
  """configs/X.py[:ARG] -> ConfigDict."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _nbytes(tree) -> tuple[int, int]:
  """(elements, bytes) of a tree of arrays / ShapeDtypeStructs."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  leaves = jax.tree.leaves(tree)
  n = sum(int(np.prod(x.shape, dtype=np.int64)) for x in leaves)
  return n, sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in leaves)


def _shard_bytes(tree) -> int:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return sum(int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64))
             * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def build(config, *, batch: int | None = None, resolution: int | None = None,
          fsdp: int | None = None, unet_config: dict | None = None,
          scheduler_config: dict | None = None, tokens: int = 77, devices=None,
          attention: str | None = None, remat: bool | None = None,
          scan: bool | None = None, accum: int | None = None) -> dict:
  """The jitted latent training step and abstract (state, batch, frozen) for the config.

  unet_config / scheduler_config: default the bundled ones of the config's family (SDXL;
  SD 1.5 for the family=sd15 variant; tests pass a tiny UNet). resolution: default 1024
  (SDXL) or 512 (SD 1.5). batch / fsdp default to the config's (16 and 8 for
  configs/sdxl.py); the mesh is data x fsdp with data = devices // fsdp. Returns a dict
  with "step", "args" (state, batch, frozen; the consistency flag goes between batch and
  frozen), "mesh", "config", and parameter counts / bytes. attention / remat / scan / accum
  override config.latent.attention, .remat, .scan_layers and config.optim.grad_accum_steps
  (the latter only where the config has the field: gradient accumulation).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ambient_jax.runtime import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from ambient_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  from ambient_jax.training import state as ts  # pylint: disable=g-import-not-at-top
  from ambient_jax.latent import configs, lora  # pylint: disable=g-import-not-at-top
  from ambient_jax.training import latent as training  # pylint: disable=g-import-not-at-top
  from ambient_jax.latent import unet, weights  # pylint: disable=g-import-not-at-top
  from ambient_jax.latent.schedule import NoiseSchedule  # pylint: disable=g-import-not-at-top
  from ambient_jax.latent import unet_config as ucfg  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  with config.unlocked():
    if batch:
      config.batch_size = int(batch)
    if fsdp:
      config.mesh.fsdp = int(fsdp)
    config.mesh.data = -1
    if attention is not None:
      config.latent.attention = str(attention)
    if remat is not None:
      config.latent.remat = bool(remat)
    if scan is not None:
      config.latent.scan_layers = bool(scan)
    if accum is not None and "grad_accum_steps" in config.optim:
      config.optim.grad_accum_steps = int(accum)
    if "grad_accum_loop" in config.optim:  # the accelerators' lax.scan, not CPU's unrolled
      config.optim.grad_accum_loop = "scan"
    elif accum not in (None, 1):
      raise ValueError(f"accum={accum}: this checkout has no config.optim.grad_accum_steps")
  devices = list(jax.devices() if devices is None else devices)
  f = int(config.mesh.fsdp)
  devices = devices[:len(devices) // f * f]
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  lc = config.latent
  family = "sd15" if str(config.data.name).startswith("sd15") else "sdxl"
  resolution = int(resolution or (512 if family == "sd15" else 1024))
  unet_config = unet_config or configs.bundled_config(family, "unet")
  scheduler_config = scheduler_config or configs.bundled_config(family, "scheduler")
  cfg = ucfg.resolve_unet_config(unet_config)
  param_dtype, dtype = training.DTYPES[lc.param_dtype], training.DTYPES[lc.dtype]
  rank = int(lc.lora_rank)
  attention_name = str(lc.get("attention", "auto"))
  scan_layers = bool(lc.get("scan_layers", False))

  def factory():
    model = unet.UNet2DConditionModel(unet_config, dtype=dtype, param_dtype=param_dtype,
                                      remat=bool(lc.remat), scan_layers=scan_layers,
                                      attention=attention_name, rngs=nnx.Rngs(0))
    if rank > 0:
      lora.add_lora(model, rank=rank, alpha=float(lc.lora_alpha) or None,
                    targets=tuple(lc.lora_targets), key=jax.random.key(0))
    return model

  t0 = time.time()
  model = weights.build_abstract(factory)
  if rank > 0:
    graphdef, trainable, frozen = nnx.split(model, lora.LoRAParam, ...)
    trainable = nnx.to_pure_dict(trainable)
  else:  # full fine-tuning: the whole UNet trains, in float32 (as LatentTask does)
    graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    trainable = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32),
                             nnx.to_pure_dict(trainable))
  frozen = nnx.to_pure_dict(frozen)
  min_size = int(config.mesh.get("fsdp_min_size", sharding_lib.FSDP_MIN_SIZE))
  frozen_shardings = sharding_lib.param_sharding(mesh, frozen, min_size=min_size)
  frozen = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        frozen, frozen_shardings)
  tx = ts.make_optimizer(config.optim)
  num_emas = len(tuple(config.ema.halflife_kimg))
  init = lambda params: ts.state_from_params(params, tx, num_emas)
  state, state_shardings = ts.abstract_train_state(config, mesh, tx, init, (trainable,))
  build_s = time.time() - t0

  b, bsh = int(config.batch_size), sharding_lib.batch_sharding(mesh)
  side = resolution // 8  # the VAE's factor (SD / SDXL)
  ctx_dim = cfg["cross_attention_dim"][0]
  sds = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt, sharding=bsh)
  batch_tree = {"latent": sds((b, side, side, cfg["in_channels"])), "sigma_n": sds((b,)),
                "index": sds((b,), jnp.int32), "context": sds((b, tokens, ctx_dim))}
  uncond = {"context": jnp.zeros((tokens, ctx_dim), jnp.float32)}
  if cfg["addition_embed_type"] == "text_time":
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    batch_tree.update(text_embeds=sds((b, pooled)), time_ids=sds((b, 6)))
    uncond["text_embeds"] = jnp.zeros((pooled,), jnp.float32)
  schedule = NoiseSchedule.from_config(scheduler_config)
  step_fn = training.make_latent_step(config, graphdef, schedule, uncond, tx, state_shardings,
                                      frozen_shardings)
  accum_steps = int(config.optim.get("grad_accum_steps", 1))
  step = step_lib.jit_train_step(step_fn, mesh, state_shardings, frozen_shardings)
  frozen_n, frozen_b = _nbytes(frozen)
  train_n, train_b = _nbytes(trainable)
  _, state_b = _nbytes(state)
  return dict(step=step, step_fn=step_fn, args=(state, batch_tree, frozen), mesh=mesh,
              config=config, batch=b, resolution=resolution, latent_side=side,
              attention=attention_name, remat=bool(lc.remat), scan=scan_layers,
              accum=accum_steps,
              frozen_params=frozen_n, frozen_bytes=frozen_b, trainable_params=train_n,
              trainable_bytes=train_b, state_bytes=state_b,
              state_shard_bytes=_shard_bytes(state), frozen_shard_bytes=_shard_bytes(frozen),
              batch_shard_bytes=_shard_bytes(batch_tree), build_s=build_s)


def scheduler_options(built: dict) -> dict:
  """XLA compile options for this step: with remat on XLA:CPU, the concurrency-optimized
  scheduler off. That scheduler starts every block's recomputation as early as it can, so
  the recomputed activations all live at once and remat barely moves the plan (512²,
  batch 16: 18.67 -> 18.53 GiB); with it off remat roughly halves it. Empty otherwise."""
  import jax  # pylint: disable=g-import-not-at-top
  if built["remat"] and jax.default_backend() == "cpu":
    return {"xla_cpu_enable_concurrency_optimized_scheduler": False}
  return {}


def measure(built: dict, consistency: bool) -> dict:
  """Lowers and compiles the step for one phase; XLA's per-device memory analysis."""
  state, batch, frozen = built["args"]
  t0 = time.time()
  lowered = built["step"].lower(state, batch, consistency, frozen)
  lower_s = time.time() - t0
  t0 = time.time()
  options = scheduler_options(built)
  compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
  compile_s = time.time() - t0
  m = compiled.memory_analysis()
  out = dict(phase="consistency" if consistency else "ambient", lower_s=lower_s,
             compile_s=compile_s, arguments=m.argument_size_in_bytes,
             outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
             temporaries=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes,
             peak=getattr(m, "peak_memory_in_bytes", 0))
  out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return out


def _gib(x: float) -> str:
  return f"{x / GIB:8.3f}"


def verdict(total: int) -> str:
  """'fits' / 'does not fit' per device class, with the headroom."""
  parts = []
  for name, gib in DEVICE_GIB:
    room = gib - total / GIB
    parts.append(f"{name} {gib} GiB: {'fits' if room >= 0 else 'DOES NOT FIT'} "
                 f"({'+' if room >= 0 else ''}{room:.1f} GiB)")
  return "; ".join(parts)


HEADER = (f"{'variant':14} {'attention':>9} {'remat':>5} {'scan':>4} {'k':>2} {'batch':>5} "
          f"{'/dev':>4} {'micro':>5} {'res':>5} {'mesh':>5} {'phase':>11} {'args':>8} "
          f"{'outputs':>8} "
          f"{'aliased':>8} {'temps':>8} {'code':>8} {'total':>8}  {'compile s':>9}  "
          f"(GiB per device)")


def row(built: dict, variant: str, r: dict) -> str:
  """One table line: the memory analysis of one compiled phase, in GiB per device. k: the
  gradient-accumulation micro-batches; /dev: examples per device per step; micro: per
  device per micro-batch (what the activations scale with)."""
  mesh = built["mesh"]
  per_device = built["batch"] // (mesh.shape["data"] * mesh.shape["fsdp"])
  onoff = lambda flag: "on" if flag else "off"
  return (f"{variant:14} {built['attention']:>9} {onoff(built['remat']):>5} "
          f"{onoff(built['scan']):>4} {built['accum']:2d} {built['batch']:5d} {per_device:4d} "
          f"{per_device // built['accum']:5d} {built['resolution']:5d} "
          f"{mesh.shape['data']}x{mesh.shape['fsdp']:<3d} {r['phase']:>11} {_gib(r['arguments'])} "
          f"{_gib(r['outputs'])} {_gib(r['aliased'])} {_gib(r['temporaries'])} {_gib(r['code'])} "
          f"{_gib(r['total'])}  {r['compile_s']:9.1f}")


def describe(built: dict) -> str:
  """Parameter counts and bytes (global and per device)."""
  return (f"frozen UNet {built['frozen_params']:,} params, {built['frozen_bytes'] / GIB:.3f} GiB "
          f"({built['frozen_shard_bytes'] / GIB:.3f} GiB/device); trainable "
          f"{built['trainable_params']:,} params, {built['trainable_bytes'] / 2**20:.1f} MiB; "
          f"train state (params + AdamW + EMAs) {built['state_bytes'] / 2**20:.1f} MiB "
          f"({built['state_shard_bytes'] / 2**20:.1f} MiB/device); batch shard "
          f"{built['batch_shard_bytes'] / 2**20:.1f} MiB/device; latents "
          f"{built['latent_side']}x{built['latent_side']}; abstract build {built['build_s']:.1f}s")


def report(built: dict, variant: str, phases, say=print) -> list[dict]:
  """Compiles each phase of `built` and says its table line and verdict; the results."""
  say(f"# {variant}: {describe(built)}")
  results = []
  for phase in phases:
    if phase == "consistency" and float(built["config"].consistency.weight) <= 0:
      say(f"# {variant}: consistency.weight = 0, no consistency phase")
      continue
    r = measure(built, phase == "consistency")
    results.append(r)
    say(row(built, variant, r))
    options = scheduler_options(built)
    say(f"    lowered in {r['lower_s']:.1f}s; XLA peak_memory_in_bytes {r['peak'] / GIB:.3f} GiB; "
        f"{verdict(r['total'])}"
        + ("; compiled with " + ", ".join(f"{k}={v}" for k, v in options.items())
           if options else ""))
  return results


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=None, help="configs/X.py (default configs/sdxl.py)")
  p.add_argument("--variant", action="append",
                 help="config variant (e.g. full_finetune, t_n=800); repeatable; default the "
                      "config's default ('default')")
  p.add_argument("--batch", type=int, action="append", help="global batch; repeatable "
                 "(default the config's: 16)")
  p.add_argument("--resolution", type=int, action="append",
                 help="image side in pixels (latents /8); repeatable (default 1024; SD 1.5: 512)")
  p.add_argument("--fsdp", type=int, action="append", help="FSDP size; repeatable (default the "
                 "config's: 8); data = devices // fsdp")
  p.add_argument("--attention", action="append",
                 help="attention implementation (xla, chunked, auto, ...); repeatable (default "
                      "the config's)")
  p.add_argument("--remat", action="append", choices=("on", "off"),
                 help="per-block remat; repeatable (default the config's). With remat on, "
                      "XLA:CPU compiles with its concurrency-optimized scheduler off")
  p.add_argument("--scan", action="append", choices=("on", "off"),
                 help="transformer stacks as lax.scan (config.latent.scan_layers); repeatable "
                      "(default the config's)")
  p.add_argument("--accum", type=int, action="append",
                 help="gradient-accumulation micro-batches k (config.optim.grad_accum_steps); "
                      "repeatable (default the config's)")
  p.add_argument("--devices", type=int, default=8, help="fake CPU devices (default 8)")
  p.add_argument("--phases", default=None,
                 help="comma-separated: ambient (plain step), consistency (λ_c on); default "
                      "both (--quick: ambient)")
  p.add_argument("--quick", action="store_true",
                 help=f"a toy SDXL-structured UNet at {QUICK_RESOLUTION}² (seconds per compile; "
                      "checks the script, not SDXL): default attention xla + chunked, remat "
                      "off + on, ambient phase; output to a temporary folder unless --out")
  _output.add_out_flags(p, "sdxl_memory")
  args = p.parse_args(argv)
  if args.quick:
    args.resolution = args.resolution or [QUICK_RESOLUTION]
    args.attention = args.attention or ["xla", "chunked"]
    args.remat = args.remat or ["off", "on"]
  args.phases = args.phases or ("ambient" if args.quick else "ambient,consistency")
  phases = [x.strip() for x in args.phases.split(",") if x.strip()]
  bad = [x for x in phases if x not in ("ambient", "consistency")]
  if bad:
    p.error(f"--phases: {bad[0]!r} is not ambient or consistency")
  _setup_devices(args.devices)
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, here)
  import jax  # pylint: disable=g-import-not-at-top
  config_path = args.config or os.path.join(here, "configs", "sdxl.py")
  lines = []

  def say(s=""):
    print(s, flush=True)
    lines.append(s)

  m = re.search(r"device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  say(f"# {' '.join(['benchmarks/sdxl_memory.py'] + list(argv or sys.argv[1:]))}")
  say(f"# jax {jax.__version__}, {len(jax.devices())} {jax.devices()[0].platform} devices"
      f"{' (forced ' + m.group(1) + ')' if m else ''}, config {os.path.relpath(config_path, here)}")
  say(HEADER)
  on = lambda flag: None if flag is None else flag == "on"
  for variant in args.variant or ["default"]:
    config = load_config(config_path + ("" if variant == "default" else ":" + variant))
    for fsdp, res, b, attention, remat, scan, accum in itertools.product(
        *(getattr(args, name) or [None] for name in (
            "fsdp", "resolution", "batch", "attention", "remat", "scan", "accum"))):
      built = build(config, batch=b, resolution=res, fsdp=fsdp, attention=attention,
                    remat=on(remat), scan=on(scan), accum=accum,
                    unet_config=QUICK_UNET if args.quick else None)
      report(built, variant, phases, say)
  outputs = _output.OutputFolder(args.out, "sdxl_memory", quick=args.quick)
  outputs.append("sdxl_memory.txt", lines)
  outputs.report()
  return 0


if __name__ == "__main__":
  sys.exit(main())
