"""Latent UNet speed, JAX vs diffusers PyTorch side by side, and real parameter counts.

    python benchmarks/latent_speed.py                  # tiny + mid UNet, batch 2, counts
    python benchmarks/latent_speed.py --quick          # tiny UNet, few iterations (< 1 min)
    python benchmarks/latent_speed.py --configs mid --batch 4 --iters 3 --rounds 3
    python benchmarks/latent_speed.py --configs mid64 --attention xla,chunked,auto
    python benchmarks/latent_speed.py --configs tiny --attention xla,chunked --ops  # op by op

For each UNet config, diffusers builds a random `UNet2DConditionModel` (seeded), saves it
with `save_pretrained` to a temporary folder and ambient_jax loads that folder
(`latent.unet.load_unet`): both frameworks run the same weights on the same inputs (fp32,
NHWC for JAX, NCHW for torch); JAX once per `--attention` implementation
(`latent.attention.ATTENTION_IMPLEMENTATIONS` that this backend runs; "auto" is labelled
with what it resolves to), diffusers with its default attention (SDPA). Measured: forward,
and forward + backward (loss = mean
square of the output, gradients w.r.t. every parameter). JAX: `nnx.split` once, one
jitted pure function that merges; its first call (trace + compile + run) is reported as
"compile". PyTorch: eval mode, `torch.set_num_threads(--threads)`, `torch.no_grad()` for
the forward, OMP_WAIT_POLICY=PASSIVE (`--omp_wait_policy`; set before torch loads): with
libgomp's default active spin-waiting, 2 torch threads on 2 cores that other processes
also use ran the mid forward 5-25x slower (3-11 s instead of 0.4 s), which would measure
the machine's load, not the framework. After one warm-up call each, the contenders (each
JAX attention and torch) take turns, `--rounds` rounds of `--iters` timed calls in a
rotating order (so that load from other processes falls on all alike); the figure is the
median over all timed calls, and "torch/jax" > 1 means JAX is faster.

Parameter counts of the public SDXL / SD-1.5 configs (`ambient_jax/latent/model_configs/`)
come from `nnx.eval_shape` (nothing allocated) and are checked against the published
figures. The printed output is also written to OUT/latent_speed.txt (OUT: --out, default
./benchmark_results/latent_speed, --quick: a temporary folder; `--out benchmarks/results`
updates the committed result).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ambient_jax.latent import attention as attention_lib
from ambient_jax.latent import clip, configs, unet, vae, weights
from ambient_jax.models import count_params
import _output  # benchmarks/, beside this file

# The tiny SDXL-shaped UNet of the parity tests (tests/latent_reference.TINY_UNETS["sdxl"],
# duplicated so that benchmarks do not import tests; tests/test_latent_speed_benchmark.py
# checks that the two stay equal), and a mid-size SDXL-structured UNet: plain first level,
# linear projections, text_time embedding, 64-channel heads as in SDXL, 1/2/2 transformer
# layers (SDXL: 1/2/10 at 320/640/1280 channels), 32x32 latents, 77 context tokens.
SDXL_STRUCTURE = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True, addition_embed_type="text_time")
CONFIGS = {
    "tiny": dict(
        unet=dict(SDXL_STRUCTURE, block_out_channels=(16, 32, 32), layers_per_block=1,
                  sample_size=16, cross_attention_dim=24, attention_head_dim=(2, 4, 4),
                  transformer_layers_per_block=(1, 1, 2), addition_time_embed_dim=4,
                  projection_class_embeddings_input_dim=12 + 6 * 4, norm_num_groups=8,
                  upcast_attention=True),
        size=16, tokens=7, pooled=12),
    "mid": dict(
        unet=dict(SDXL_STRUCTURE, block_out_channels=(64, 128, 256), layers_per_block=2,
                  sample_size=32, cross_attention_dim=256, attention_head_dim=(1, 2, 4),
                  transformer_layers_per_block=(1, 2, 2), addition_time_embed_dim=32,
                  projection_class_embeddings_input_dim=128 + 6 * 32, norm_num_groups=32),
        size=32, tokens=77, pooled=128),
}
# The mid UNet at 64x64 latents (a 512² image): 1,024 tokens at its first attention level
# and 256 at its second (SDXL at 1024²: 4,096 and 1,024), where attention's share grows.
CONFIGS["mid64"] = dict(CONFIGS["mid"], size=64)

# (label, family, component, published parameter count)
PUBLISHED = [
    ("SDXL UNet", "sdxl", "unet", 2_567_463_684),
    ("SD-1.5 UNet", "sd15", "unet", 859_520_964),
    ("SDXL VAE", "sdxl", "vae", 83_653_863),
    ("SDXL text_encoder (CLIP ViT-L)", "sdxl", "text_encoder", 123_060_480),
    ("SDXL text_encoder_2 (bigG)", "sdxl", "text_encoder_2", 694_659_840),
]


def abstract_component(family: str, component: str) -> nnx.Module:
  """The bundled public config's module with ShapeDtypeStruct parameters (nothing allocated)."""
  config = configs.bundled_config(family, component)
  if component == "unet":
    factory = lambda: unet.UNet2DConditionModel(config, rngs=nnx.Rngs(0))
  elif component == "vae":
    factory = lambda: vae.AutoencoderKL(config, rngs=nnx.Rngs(0))
  elif component.startswith("text_encoder"):
    factory = lambda: clip.text_encoder(config, rngs=nnx.Rngs(0))
  else:
    raise ValueError(f"no parameter count for component {component!r}")
  return weights.build_abstract(factory)


def parameter_counts(unets: bool = True) -> list[tuple[str, int, int]]:
  """[(label, eval_shape count, published count)] for the public SDXL / SD-1.5 components;
  `unets=False` leaves out the two UNets (their eval_shape alone takes 30-80 s here)."""
  return [(label, count_params(abstract_component(family, component)), published)
          for label, family, component, published in PUBLISHED if unets or component != "unet"]


def unet_inputs(case: dict, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Seeded fp32 inputs: x [B, s, s, 4] (NHWC), t [B], context [B, T, D], text_embeds
  [B, pooled], time_ids [B, 6] (original size, crop, target size)."""
  rng = np.random.default_rng(seed)
  size, width = case["size"], case["unet"]["cross_attention_dim"]
  res = 8 * size
  return dict(x=rng.standard_normal((batch, size, size, 4)).astype(np.float32),
              t=rng.uniform(0, 999, batch).astype(np.float32),
              context=rng.standard_normal((batch, case["tokens"], width)).astype(np.float32),
              text_embeds=rng.standard_normal((batch, case["pooled"])).astype(np.float32),
              time_ids=np.tile(np.array([[res, res, 0, 0, res, res]], np.float32), (batch, 1)))


def jax_functions(folder: str, inputs: dict[str, np.ndarray], attention: str = "auto"):
  """(forward, forward+backward, parameter count): zero-argument callables on the UNet
  that `load_unet(folder, attention=attention)` gives; each is one jitted pure function of
  (params, rest, inputs)."""
  model = unet.load_unet(folder, attention=attention)
  if isinstance(model, tuple):  # (module, config.json dict), like load_vae
    model = model[0]
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  n_params = count_params(params)
  args = {k: jnp.asarray(v) for k, v in inputs.items()}

  def apply(params, rest, a):
    net = nnx.merge(graphdef, params, rest, copy=True)
    return net(a["x"], a["t"], a["context"], text_embeds=a["text_embeds"], time_ids=a["time_ids"])

  forward = jax.jit(apply)
  grad = jax.jit(jax.value_and_grad(lambda p, r, a: jnp.mean(jnp.square(apply(p, r, a)))))
  return (lambda: forward(params, rest, args)), (lambda: grad(params, rest, args)), n_params


def torch_functions(model, inputs: dict[str, np.ndarray]):
  """(forward, forward+backward): zero-argument callables on the diffusers UNet (eval mode)."""
  import torch  # pylint: disable=g-import-not-at-top
  x = torch.from_numpy(np.ascontiguousarray(inputs["x"].transpose(0, 3, 1, 2)))
  t, context = torch.from_numpy(inputs["t"]), torch.from_numpy(inputs["context"])
  added = {"text_embeds": torch.from_numpy(inputs["text_embeds"]),
           "time_ids": torch.from_numpy(inputs["time_ids"])}

  def forward():
    with torch.no_grad():
      return model(x, t, context, added_cond_kwargs=added).sample

  def forward_backward():
    model.zero_grad(set_to_none=True)
    loss = model(x, t, context, added_cond_kwargs=added).sample.square().mean()
    loss.backward()
    return loss

  return forward, forward_backward


def _call(fn, framework: str) -> float:
  """Seconds for one call, waiting for JAX's asynchronous result."""
  t0 = time.perf_counter()
  out = fn()
  if framework == "jax":
    jax.block_until_ready(out)
  return time.perf_counter() - t0


def compare(fns: dict[str, Any], iters: int, rounds: int) -> dict[str, dict[str, float]]:
  """fns: name -> zero-argument callable ("torch" is PyTorch, the others JAX). Each one's
  first call (JAX: trace + compile), then one warm-up call each and `rounds` rounds of
  `iters` timed calls per contender, in an order that rotates every round -> per name
  {"first": s, "median": s}."""
  framework = lambda name: "torch" if name == "torch" else "jax"
  first = {name: _call(fn, framework(name)) for name, fn in fns.items()}
  for name, fn in fns.items():
    _call(fn, framework(name))
  names, times = list(fns), {name: [] for name in fns}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      times[name] += [_call(fns[name], framework(name)) for _ in range(iters)]
  return {name: dict(first=first[name], median=statistics.median(times[name])) for name in fns}


def check_outputs_agree(jax_forward, torch_forward) -> float:
  """max |jax − torch| / max |torch| of the forward outputs (a guard that both run the same
  network; the parity tests bound it by 1e-4)."""
  ours = np.asarray(jax_forward(), np.float64)
  ref = torch_forward().numpy().transpose(0, 2, 3, 1).astype(np.float64)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-12))


def bench_case(name: str, batch: int, iters: int, rounds: int, seed: int = 0,
               attentions: tuple[str, ...] = ("auto",)) -> list[dict]:
  """Builds the diffusers UNet, loads it into JAX once per attention implementation, times
  forward and forward+backward of each beside torch's; one row per (mode, attention)."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  case = CONFIGS[name]
  torch.manual_seed(seed)
  reference = UNet2DConditionModel(**case["unet"]).eval()
  inputs = unet_inputs(case, batch, seed)
  jax_fns = {}
  with tempfile.TemporaryDirectory() as folder:
    reference.save_pretrained(folder)
    for attention in attentions:
      jax_fns[attention] = jax_functions(folder, inputs, attention)
  torch_fns = torch_functions(reference, inputs)
  rows = []
  for i, mode in enumerate(("forward", "fwd+bwd")):
    timed = compare(dict({a: fns[i] for a, fns in jax_fns.items()}, torch=torch_fns[i]),
                    iters, rounds)
    for attention, fns in jax_fns.items():
      rows.append(dict(config=name, mode=mode, attention=attention_label(attention),
                       params=fns[2], jax=timed[attention]["median"],
                       jax_first=timed[attention]["first"], torch=timed["torch"]["median"],
                       torch_first=timed["torch"]["first"]))
  # After timing (the first calls are timed): every implementation equals diffusers.
  rel = {attention_label(a): check_outputs_agree(fns[0], torch_fns[0])
         for a, fns in jax_fns.items()}
  return [dict(row, rel=rel[row["attention"]]) for row in rows]


def attention_label(name: str) -> str:
  """The implementation's name; "auto" as "auto=chunked" (what it runs as on this backend
  for float32 queries)."""
  return name if name != "auto" else f"auto={attention_lib.resolve_implementation(name)}"


# The mid64 UNet's largest operations (batch 2, fp32): self-attention at its first attention
# level (1,024 tokens, 2 heads of 64), cross-attention there (77 keys), self-attention at its
# second (256 tokens, 4 heads), and its 3x3 convolutions at full and half resolution.
ATTENTION_OPS = ((1024, 2, 64, 1024), (1024, 2, 64, 77), (256, 4, 64, 256))  # T, N, D, S
CONV_OPS = ((64, 64), (128, 32))  # channels in = out, side


def op_timings(attentions: tuple[str, ...], iters: int) -> list[str]:
  """Where a UNet's time goes, op by op, JAX beside torch: each ATTENTION_OPS shape forward
  and gradient (of the output's sum of squares w.r.t. q, k, v) per JAX implementation
  against torch's scaled_dot_product_attention, and each CONV_OPS 3x3 convolution forward
  against torch's conv2d. Medians of `iters` calls after a warm-up, in ms."""
  import torch  # pylint: disable=g-import-not-at-top
  sdpa = torch.nn.functional.scaled_dot_product_attention
  rng = np.random.default_rng(0)

  def ms(fn):
    fn()
    return 1e3 * statistics.median(_call(fn, "jax") for _ in range(iters))

  lines = []
  for t, n, d, s in ATTENTION_OPS:
    q, k, v = (rng.standard_normal((2, size, n, d)).astype(np.float32) for size in (t, s, s))
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 1, 3)))
                  for a in (q, k, v))
    grads = [a.clone().requires_grad_() for a in (tq, tk, tv)]

    def torch_grad():
      sdpa(*grads).square().sum().backward()

    with torch.no_grad():
      torch_fwd = ms(lambda: sdpa(tq, tk, tv))
    cells = []
    for name in attentions:
      attend = lambda q, k, v, name=name: attention_lib.dot_product_attention(
          q, k, v, implementation=name)
      fwd, grad = jax.jit(attend), jax.jit(jax.grad(
          lambda q, k, v, f=attend: jnp.sum(jnp.square(f(q, k, v))), (0, 1, 2)))
      cells.append(f"{attention_label(name)} {ms(lambda: fwd(q, k, v)):.2f} / "
                   f"{ms(lambda: grad(q, k, v)):.2f}")
    lines.append(f"attention {t} queries x {s} keys, {n} heads of {d}: fwd / grad ms: "
                 f"{'; '.join(cells)}; torch sdpa {torch_fwd:.2f} / {ms(torch_grad):.2f}")
  for c, side in CONV_OPS:
    x = rng.standard_normal((2, side, side, c)).astype(np.float32)
    w = (0.05 * rng.standard_normal((3, 3, c, c))).astype(np.float32)
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    tw = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
    with torch.no_grad():
      torch_ms = ms(lambda: torch.nn.functional.conv2d(tx, tw, padding=1))
    jax_ms = ms(lambda: conv(x, w))
    lines.append(f"conv 3x3 {c}->{c} at {side}x{side}, forward ms: jax {jax_ms:.2f}, torch "
                 f"{torch_ms:.2f} (torch/jax {torch_ms / jax_ms:.2f})")
  return lines


def load_average() -> str:
  """The 1/5/15-minute load averages, e.g. '1.92 2.76 1.65'."""
  return " ".join(f"{v:.2f}" for v in os.getloadavg())


class Report:
  """Prints lines and writes them to a file as they come (a partial run keeps its figures)."""

  def __init__(self, path: str | None):
    self.file = None
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self.file = open(path, "w")

  def __call__(self, line: str = "") -> None:
    print(line, flush=True)
    if self.file:
      self.file.write(line + "\n")
      self.file.flush()

  def close(self) -> None:
    if self.file:
      self.file.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny config, batch 1, 2 rounds of 2 calls, no UNet parameter "
                      "counts (< 1 minute)")
  parser.add_argument("--configs", default="tiny,mid",
                      help=f"comma-separated UNet configs from {sorted(CONFIGS)}")
  parser.add_argument("--batch", type=int, default=2, help="batch size (both frameworks)")
  parser.add_argument("--attention", default="auto",
                      help="comma-separated JAX attention implementations, each timed beside "
                      "torch (xla, chunked, auto; cudnn / pallas on GPU / TPU)")
  parser.add_argument("--iters", type=int, default=5, help="timed calls per round")
  parser.add_argument("--rounds", type=int, default=3, help="alternating JAX / torch rounds")
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  parser.add_argument("--omp_wait_policy", default="PASSIVE",
                      help="OMP_WAIT_POLICY for torch's OpenMP threads ('' = leave as is); an "
                      "OMP_WAIT_POLICY already in the environment wins")
  parser.add_argument("--ops", action="store_true",
                      help="also time the mid64 UNet's attention and convolution ops one by "
                      "one beside torch's (where the time goes)")
  parser.add_argument("--skip_counts", action="store_true",
                      help="skip the eval_shape parameter counts of the real configs")
  _output.add_out_flags(parser, "latent_speed")
  args = parser.parse_args(argv)
  if args.quick:
    args.configs, args.batch, args.iters, args.rounds = "tiny", 1, 2, 2
  args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
  args.attention = tuple(a.strip() for a in args.attention.split(",") if a.strip())
  try:
    for name in args.attention:
      attention_lib.resolve_implementation(name)
  except ValueError as e:
    parser.error(f"--attention: {e}")
  unknown = [c for c in args.configs if c not in CONFIGS]
  if unknown:
    parser.error(f"unknown --configs {unknown}; choose from {sorted(CONFIGS)}")
  return args


def main(argv: list[str] | None = None):
  args = parse_args(argv)
  if args.omp_wait_policy:
    os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)  # read when torch loads
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  outputs = _output.OutputFolder(args.out, "latent_speed", quick=args.quick)
  report = Report(outputs.path("latent_speed.txt"))
  start = time.perf_counter()
  report("$ python benchmarks/latent_speed.py " + " ".join(sys.argv[1:] if argv is None else argv))
  report(f"jax {jax.__version__} ({jax.default_backend()}, {jax.devices()[0].device_kind}), "
         f"torch {torch.__version__} ({torch.get_num_threads()} threads, "
         f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), "
         f"diffusers {diffusers.__version__}; {platform.processor() or platform.machine()}, "
         f"{os.cpu_count()} CPUs")
  report(f"load average at start: {load_average()}")
  start_load = os.getloadavg()[0]
  report(f"batch {args.batch}; fp32; median of {args.rounds} alternating rounds x "
         f"{args.iters} calls after one warm-up call")
  report()
  header = (f"{'config':<6} {'params':>11} {'mode':<8} {'attention':<12} {'jax s/it':>9} "
            f"{'torch s/it':>10} "
            f"{'torch/jax':>9} {'jax compile':>11} {'torch 1st':>9} {'rel diff':>9}")
  report(header)
  for name in args.configs:
    for row in bench_case(name, args.batch, args.iters, args.rounds, attentions=args.attention):
      report(f"{row['config']:<6} {row['params']:>11,} {row['mode']:<8} {row['attention']:<12} "
             f"{row['jax']:>9.4f} "
             f"{row['torch']:>10.4f} {row['torch'] / row['jax']:>9.2f} "
             f"{row['jax_first']:>10.2f}s {row['torch_first']:>8.2f}s {row['rel']:>9.1e}")
  for name in args.configs:
    case = CONFIGS[name]
    report(f"  {name}: latents {case['size']}x{case['size']}x4, {case['tokens']} tokens x "
           f"{case['unet']['cross_attention_dim']}, pooled {case['pooled']}, "
           f"block_out_channels {case['unet']['block_out_channels']}, transformer layers "
           f"{case['unet']['transformer_layers_per_block']}")
  report(f"load average after timing: {load_average()}")
  if max(start_load, os.getloadavg()[0]) > (os.cpu_count() or 1):
    report(f"NOTE: the 1-minute load average ({start_load:.2f} at start, "
           f"{os.getloadavg()[0]:.2f} now) exceeded the {os.cpu_count()} CPUs: other processes "
           "shared the cores, so the s/it figures are upper bounds; the ratios are fairer "
           "(the frameworks alternate rounds) but still noisy.")
  if args.ops:
    report()
    report(f"op by op (batch 2, fp32, median of {max(args.iters, 5)} calls):")
    for line in op_timings(args.attention, max(args.iters, 5)):
      report("  " + line)
  if not args.skip_counts:
    report()
    report(f"{'component (eval_shape, nothing allocated)':<42} {'params':>15} "
           f"{'published':>15}  equal")
    for label, count, published in parameter_counts(unets=not args.quick):
      report(f"{label:<42} {count:>15,} {published:>15,}  {count == published}")
    if args.quick:
      report("(--quick leaves out the SDXL / SD-1.5 UNet counts: their eval_shape is slow)")
  report()
  report(f"load average at end: {load_average()}; wall time {time.perf_counter() - start:.0f} s")
  report.close()
  outputs.report()


if __name__ == "__main__":
  main()
