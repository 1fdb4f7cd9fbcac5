"""The SDXL LoRA step on the accelerator at hand: step time, images/s, peak device memory.

    python benchmarks/sdxl_device_check.py                      # every attention the backend has
    python benchmarks/sdxl_device_check.py --attention=auto --per_device_batch=1
    python benchmarks/sdxl_device_check.py --quick              # CPU smoke test, toy UNet at 64²

NOT YET RUN ON AN ACCELERATOR: written and smoke-tested on CPU (--quick) only, so its figures
exist nowhere yet; the first GPU / TPU run is its real test.

What it runs: the trainer's own step (`training.latent.make_latent_step`, jitted by
`training.step.jit_train_step`, state donated), built by `benchmarks/sdxl_memory.py` for the
real SDXL UNet of the bundled public config (2.57 B parameters; no download) with the
defaults of configs/sdxl.py — bf16 frozen base, LoRA r = 4, AdamW, per-block remat,
attention as asked — at 1024² (128x128 latents, 77 tokens), ambient phase (--consistency:
the consistency phase). The weights are random (normal, std 0.02; the adapters too, so the
LoRA path is not a no-op), made on the devices in their FSDP shardings (fsdp = the device
count, at most 8, as the config's mesh), and the batch is random latents at VP σ_n = 0.851
(t_n = 500). Per (attention, per-device batch) it prints the compile time, XLA's compiled
memory plan (the figure benchmarks/results/sdxl_memory.txt gives for XLA:CPU), the mean
step time over --steps steps after one warm-up, images/s and the device's
`memory_stats()["peak_bytes_in_use"]` (the largest over the local devices). On an
accelerator each pair runs in its own Python process, so that each peak is its own
(the allocator's peak never resets); a pair that fails (out of memory, say) prints its
error's last line and the rest go on.

Attention: "auto" (the default's: cuDNN flash on GPU, Pallas flash on TPU), "xla" (whole
score maps) and "chunked" (pure-JAX blockwise) on every backend, plus "cudnn" on GPU and
"pallas" on TPU. With torch + CUDA installed it also times diffusers' UNet2DConditionModel
(random weights, bf16, its default SDPA attention, gradient checkpointing, every base weight
frozen and the gradient taken with respect to the input latents: the activations a LoRA
step keeps, without adapters) forward + backward on the same GPU at the same batch sizes,
with `torch.cuda.max_memory_allocated()`, in a process of its own.

Budget: each pair compiles the 2.6 B UNet's step once (minutes on a GPU host); `--timeout`
bounds each pair (default 300 s). On a machine with 15 minutes of device time run the
default attention first (`--attention=auto`), then the others. On CPU it refuses (the real
step takes hours there); `--quick` runs the same path on a toy SDXL-structured UNet at 64²
on one CPU device (tests/test_sdxl_device_check.py). Output: printed, and written to
OUT/sdxl_device_check.txt (benchmarks/_output.py: --out).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

import _output  # benchmarks/, beside this file
import sdxl_memory

GIB = 2**30
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND_ATTENTION = {"gpu": ("auto", "xla", "chunked", "cudnn"),
                     "tpu": ("auto", "xla", "chunked", "pallas"), "cpu": ("xla", "chunked")}
TOKENS, VP_SIGMA_N = 77, 0.851


def _materialize(abstract, key, scale: float = 0.02):
  """Random arrays for a tree of sharded ShapeDtypeStructs, made on the devices in their
  shardings: floating leaves normal * scale, others zeros. One small jitted maker per
  (shape, dtype, sharding), reused across leaves: one jit over all the leaves of a UNet
  takes XLA minutes to compile."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree.flatten(abstract)
  arrays = [_maker(a.shape, a.dtype, a.sharding, scale)(jax.random.fold_in(key, i))
            for i, a in enumerate(leaves)]
  return jax.tree.unflatten(treedef, arrays)


@functools.cache
def _maker(shape, dtype, sharding, scale: float):
  """jit(key -> one random leaf of `shape`, `dtype`, placed in `sharding`)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def make(key):
    if jnp.issubdtype(dtype, jnp.floating):
      return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return jnp.zeros(shape, dtype)

  return jax.jit(make, out_shardings=sharding)


def _batch(abstract: dict, key):
  """The step's batch: random latents / text, σ_n = VP_SIGMA_N, SDXL's 1024² time ids."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  batch = _materialize(abstract, key, scale=1.0)
  b = abstract["latent"].shape[0]
  put = lambda x, a: jax.device_put(x, a.sharding)
  batch["sigma_n"] = put(jnp.full((b,), VP_SIGMA_N, jnp.float32), abstract["sigma_n"])
  batch["index"] = put(jnp.arange(b, dtype=jnp.int32), abstract["index"])
  if "time_ids" in batch:
    side = abstract["latent"].shape[1] * 8
    ids = jnp.tile(jnp.asarray([[side, side, 0, 0, side, side]], jnp.float32), (b, 1))
    batch["time_ids"] = put(ids, abstract["time_ids"])
  return batch


def peak_bytes() -> int | None:
  """The largest `peak_bytes_in_use` over the local devices (None: the backend has none)."""
  import jax  # pylint: disable=g-import-not-at-top
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


def run_one(attention: str, per_device_batch: int, *, steps: int, consistency: bool,
            quick: bool) -> dict:
  """Builds, compiles and times the step for one (attention, per-device batch)."""
  import jax  # pylint: disable=g-import-not-at-top
  config = sdxl_memory.load_config(os.path.join(HERE, "configs", "sdxl.py"))
  devices = jax.devices()[:1] if quick else jax.devices()
  n = len(devices)
  fsdp = max(f for f in range(1, min(n, 8) + 1) if n % f == 0)
  built = sdxl_memory.build(
      config, batch=per_device_batch * n, fsdp=fsdp, devices=devices, attention=attention,
      resolution=sdxl_memory.QUICK_RESOLUTION if quick else 1024,
      unet_config=sdxl_memory.QUICK_UNET if quick else None)
  state_abs, batch_abs, frozen_abs = built["args"]
  key = jax.random.key(0)
  frozen = _materialize(frozen_abs, jax.random.fold_in(key, 1))
  state = _materialize(state_abs, jax.random.fold_in(key, 2))
  state = state.__class__(step=state.step, params=state.params,
                          opt_state=jax.tree.map(lambda x: x * 0, state.opt_state),
                          ema=state.ema)  # AdamW moments start at zero (ν must be >= 0)
  batch = _batch(batch_abs, jax.random.fold_in(key, 3))
  t0 = time.time()
  options = sdxl_memory.scheduler_options(built)
  lowered = built["step"].lower(state, batch, consistency, frozen)
  compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
  compile_s = time.time() - t0
  m = compiled.memory_analysis()
  plan = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes) if m is not None else None
  state, metrics = compiled(state, batch, frozen)  # warm-up
  jax.block_until_ready(metrics)
  t0 = time.time()
  for _ in range(steps):
    state, metrics = compiled(state, batch, frozen)
  jax.block_until_ready((state, metrics))
  step_s = (time.time() - t0) / steps
  loss = float(jax.device_get(metrics["loss"]))
  return dict(attention=attention, per_device_batch=per_device_batch, devices=n, fsdp=fsdp,
              batch=built["batch"], resolution=built["resolution"], compile_s=compile_s,
              plan_bytes=plan, step_s=step_s, images_per_s=built["batch"] / step_s,
              peak_bytes=peak_bytes(), loss=loss, device=str(devices[0].device_kind))


def torch_one(per_device_batch: int, *, steps: int) -> dict:
  """diffusers' SDXL UNet (random bf16 weights, SDPA, gradient checkpointing), forward +
  backward w.r.t. the input latents at 1024², on one CUDA GPU."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from ambient_jax.latent import configs  # pylint: disable=g-import-not-at-top
  cfg = configs.bundled_config("sdxl", "unet")
  with torch.device("cuda"):
    model = UNet2DConditionModel.from_config(cfg).to(torch.bfloat16)
  model.enable_gradient_checkpointing()
  model.train()
  model.requires_grad_(False)
  b, dev, bf = per_device_batch, "cuda", torch.bfloat16
  pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
  x = torch.randn(b, cfg["in_channels"], 128, 128, device=dev, dtype=bf, requires_grad=True)
  context = torch.randn(b, TOKENS, cfg["cross_attention_dim"], device=dev, dtype=bf)
  added = {"text_embeds": torch.randn(b, pooled, device=dev, dtype=bf),
           "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * b, device=dev, dtype=bf)}
  t = torch.full((b,), 500, device=dev)

  def step():
    out = model(x, t, context, added_cond_kwargs=added).sample
    out.float().square().mean().backward()

  step()
  torch.cuda.synchronize()
  t0 = time.time()
  for _ in range(steps):
    step()
  torch.cuda.synchronize()
  step_s = (time.time() - t0) / steps
  return dict(attention="diffusers SDPA", per_device_batch=b, devices=1, fsdp=1, batch=b,
              resolution=1024, compile_s=0.0, plan_bytes=None, step_s=step_s,
              images_per_s=b / step_s, peak_bytes=torch.cuda.max_memory_allocated(),
              loss=float("nan"), device=torch.cuda.get_device_name())


def _gib(x) -> str:
  return "n/a" if x is None else f"{x / GIB:.2f}"


HEADER = (f"{'attention':>15} {'batch/dev':>9} {'devices':>7} {'res':>5} {'compile s':>9} "
          f"{'plan GiB':>8} {'step s':>8} {'images/s':>8} {'peak GiB':>8}  device")


def line(r: dict) -> str:
  return (f"{r['attention']:>15} {r['per_device_batch']:9d} {r['devices']:7d} "
          f"{r['resolution']:5d} {r['compile_s']:9.1f} {_gib(r['plan_bytes']):>8} "
          f"{r['step_s']:8.3f} {r['images_per_s']:8.2f} {_gib(r['peak_bytes']):>8}  {r['device']}")


def _child(argv: list[str], timeout: int) -> dict:
  """One pair in its own process; its result, or its error's last line."""
  try:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], cwd=HERE,
                          capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout} s"}
  for out_line in reversed(proc.stdout.splitlines()):
    if out_line.startswith("RESULT "):
      return json.loads(out_line[len("RESULT "):])
  tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
  return {"error": f"exit {proc.returncode}: {tail[:300]}"}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--attention", action="append",
                 help="attention implementation(s); repeatable (default: every one the backend "
                      "has, auto first)")
  p.add_argument("--per_device_batch", type=int, action="append",
                 help="examples per device; repeatable (default 1 and 2)")
  p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
  p.add_argument("--consistency", action="store_true", help="time the consistency phase")
  p.add_argument("--timeout", type=int, default=300, help="seconds per (attention, batch)")
  p.add_argument("--no_torch", action="store_true", help="skip diffusers' PyTorch UNet")
  p.add_argument("--quick", action="store_true",
                 help="CPU smoke test: toy SDXL-structured UNet at 64², one device, in-process")
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: ATTENTION:BATCH
  p.add_argument("--torch_one", type=int, default=None, help=argparse.SUPPRESS)  # child: B
  _output.add_out_flags(p, "sdxl_device_check")
  args = p.parse_args(argv)
  sys.path.insert(0, HERE)
  if args.torch_one is not None:
    print("RESULT " + json.dumps(torch_one(args.torch_one, steps=args.steps)), flush=True)
    return 0
  if args.quick:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  if args.one is not None:
    attention, b = args.one.rsplit(":", 1)
    r = run_one(attention, int(b), steps=args.steps, consistency=args.consistency,
                quick=args.quick)
    print("RESULT " + json.dumps(r), flush=True)
    return 0
  if backend == "cpu" and not args.quick:
    print("sdxl_device_check: no GPU or TPU here (jax backend 'cpu'); the real SDXL step "
          "needs an accelerator (--quick runs the toy CPU smoke test)", file=sys.stderr)
    return 2
  attentions = args.attention or list(BACKEND_ATTENTION.get(backend, ("xla", "chunked")))
  batches = args.per_device_batch or [1, 2]
  lines = []

  def say(s=""):
    print(s, flush=True)
    lines.append(s)

  say(f"# {' '.join(['benchmarks/sdxl_device_check.py'] + list(argv or sys.argv[1:]))}")
  say(f"# jax {jax.__version__}, {jax.device_count()} {backend} devices "
      f"({jax.devices()[0].device_kind}); configs/sdxl.py defaults (bf16 base, LoRA r = 4, "
      f"remat on), {'consistency' if args.consistency else 'ambient'} phase, "
      f"{'toy UNet (--quick)' if args.quick else 'SDXL UNet, random weights'}; "
      f"step time = mean of {args.steps} steps after one warm-up")
  say(HEADER)
  for attention in attentions:
    for b in batches:
      child = ["--one", f"{attention}:{b}", "--steps", str(args.steps)] + (
          ["--consistency"] if args.consistency else [])
      if args.quick:  # in-process: the CPU has no peak memory statistic to keep apart
        r = run_one(attention, b, steps=args.steps, consistency=args.consistency, quick=True)
      else:
        r = _child(child, args.timeout)
      say(line(r) if "error" not in r else f"{attention:>15} {b:9d}  FAILED: {r['error']}")
  if backend == "gpu" and not args.no_torch and not args.quick:
    for b in batches:
      r = _child(["--torch_one", str(b), "--steps", str(args.steps)], args.timeout)
      say(line(r) if "error" not in r else
          f"{'diffusers SDPA':>15} {b:9d}  not run: {r['error']} (needs torch with CUDA and "
          f"diffusers)")
  outputs = _output.OutputFolder(args.out, "sdxl_device_check", quick=args.quick)
  outputs.append("sdxl_device_check.txt", lines)
  outputs.report()
  return 0


if __name__ == "__main__":
  sys.exit(main())
