"""ambient_jax against EDM's own PyTorch code on the same networks, side by side on this CPU.

    python benchmarks/vs_pytorch.py --edm_dir=PATH/TO/edm       # the whole table
    python benchmarks/vs_pytorch.py --edm_dir=PATH/TO/edm --quick   # reduced 28x28x1 only

`--edm_dir` is your own checkout of NVlabs/edm (nothing of EDM is in this repository); torch
comes from the `test` extra. Both sides build the same networks (DDPM++ as in EDM's
`train.py --arch=ddpmpp`, reduced and CIFAR-10 sized; the parameter counts are printed and
must agree) in float32 and time
  train   one step of EDM's loss (`training.loss.EDMLoss`: log-normal σ, λ(σ) weighting,
          summed over pixels, averaged over the batch) + backward + Adam, dropout on;
  sample  EDM's 18-step Heun sampler (`generate.edm_sampler` / `ambient_jax.sampling`,
          35 network evaluations) on 16 images.
Ours is `benchmarks/network_speed.py`'s step and sampler (one jitted function, donated
state, batch split over the XLA devices). Every setting runs in its own process (XLA's
flags and device count are fixed when jax starts); the processes alternate, setting after
setting, for --rounds rounds. A figure is the median over rounds of each process's median
(compilation excluded). Settings:
  pytorch      EDM's code, torch.set_num_threads(--threads)
  jax_1dev     ours on 1 XLA device with XLA's own CPU defaults (no flags)
  jax_default  ours as `python -m ambient_jax.main --config=configs/default.py` runs on a
               CPU: config.cpu_devices XLA devices and config.cpu_xla_flags
               (`ambient_jax.runtime.cpu_defaults`)
and any `--setting NAME=DEVICES[:XLA_FLAGS]` added. The ratio columns are PyTorch's time
divided by ours: > 1 means ours is faster. Results go to stdout and OUT/vs_pytorch.txt
(OUT: --out, default ./benchmark_results/vs_pytorch, --quick: a temporary folder;
`--out benchmarks/results` updates the committed result).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import _output  # noqa: E402

from ambient_jax.runtime import cpu_defaults  # noqa: E402  (no jax: settings are made before it starts)

SAMPLE_BATCH = 16
# (case id, network_speed.CASES label, kind, batch, quick)
CASES = [
    ("train reduced 28x28x1 b8", "ddpmpp-reduced 28x28x1", "train", 8, True),
    ("train reduced 28x28x1 b32", "ddpmpp-reduced 28x28x1", "train", 32, True),
    ("train reduced 32x32x3 b8", "ddpmpp-reduced 32x32x3", "train", 8, False),
    ("train reduced 32x32x3 b32", "ddpmpp-reduced 32x32x3", "train", 32, False),
    ("train cifar10 32x32x3 b8", "ddpmpp-cifar10 32x32x3", "train", 8, False),
    ("sample reduced 28x28x1 b16", "ddpmpp-reduced 28x28x1", "sample", SAMPLE_BATCH, True),
    ("sample reduced 32x32x3 b16", "ddpmpp-reduced 32x32x3", "sample", SAMPLE_BATCH, False),
]


def _network_config(label: str) -> dict:
  import network_speed  # pylint: disable=g-import-not-at-top
  return next(config for name, config, _, _ in network_speed.CASES if name == label)


def default_setting() -> tuple[int, str]:
  """(cpu_devices, cpu_xla_flags) of configs/default.py: what the entry point applies."""
  from ambient_jax.training import config_catalog  # pylint: disable=g-import-not-at-top
  config = config_catalog.load_module(ROOT / "configs" / "default.py",
                                      "vs_pytorch_default_config").get_config()
  return config.cpu_devices, config.cpu_xla_flags


# ----------------------------------------------------------------------------- children


def _edm_kwargs(config: dict) -> dict:
  """EDM `EDMPrecond(**kwargs)` for one of our model configs (SongUNet backbones)."""
  from ambient_jax.models import resolve_config  # pylint: disable=g-import-not-at-top
  c = resolve_config(config)
  keys = ("label_dim", "augment_dim", "model_channels", "channel_mult", "channel_mult_emb",
          "num_blocks", "attn_resolutions", "dropout", "label_dropout", "embedding_type",
          "channel_mult_noise", "encoder_type", "decoder_type", "resample_filter")
  kwargs = {k: list(c[k]) if isinstance(c[k], tuple) else c[k] for k in keys}
  return dict(img_resolution=c["img_resolution"], img_channels=c["in_channels"],
              use_fp16=False, sigma_data=c["sigma_data"], model_type="SongUNet", **kwargs)


def _median_times(fn, warmup: int, reps: int) -> list[float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def child_torch(args, cases) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.abspath(args.edm_dir))
  from training import loss as edm_loss, networks  # pylint: disable=g-import-not-at-top
  import generate  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  for case_id, label, kind, batch, _ in cases:
    config = _network_config(label)
    net = networks.EDMPrecond(**_edm_kwargs(config))
    params = sum(p.numel() for p in net.parameters())
    shape = (batch, config["in_channels"], config["img_resolution"], config["img_resolution"])
    if kind == "train":
      net.train()
      opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
      loss_fn = edm_loss.EDMLoss()
      images = torch.randn(shape)

      def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net=net, images=images).sum().mul(1 / batch).backward()
        opt.step()

      times = _median_times(step, 2, args.steps)
    else:
      net.eval()
      latents = torch.randn(shape)

      def sample():
        with torch.no_grad():
          generate.edm_sampler(net, latents, num_steps=18)

      times = _median_times(sample, 1, args.sample_reps)
    _report(case_id, times, params)


def child_jax(args, cases) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import network_speed  # pylint: disable=g-import-not-at-top
  from ambient_jax.models import abstract_param_count  # pylint: disable=g-import-not-at-top
  for case_id, label, kind, batch, _ in cases:
    config = _network_config(label)
    if kind == "train":
      times = network_speed.bench_train_step(config, batch, args.steps)[1]
    else:
      times = network_speed.bench_sampling(config, batch, args.sample_reps)[1]
    _report(case_id, times, abstract_param_count(config), devices=jax.device_count())


def _report(case_id: str, times: list[float], params: int, **extra) -> None:
  print("RESULT " + json.dumps(dict(case=case_id, median=statistics.median(times), times=times,
                                    params=params, **extra)), flush=True)


# ----------------------------------------------------------------------------- parent


def _settings(args) -> dict[str, tuple[str, dict]]:
  """name -> (child kind, environment)."""
  base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # Rounds after the first load their executables from a compilation cache (compile time
  # is never timed; XLA_FLAGS are part of the cache key).
  jax_env = dict(base, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_COMPILATION_CACHE_DIR=base.get("JAX_COMPILATION_CACHE_DIR", args.cache_dir))
  devices, flags = default_setting()
  out = {"pytorch": ("torch", dict(base)),
         "jax_1dev": ("jax", dict(jax_env, XLA_FLAGS=cpu_defaults.merged_flags("", 1, "")[0])),
         "jax_default": ("jax", dict(jax_env, XLA_FLAGS=cpu_defaults.merged_flags(
             "", devices, flags)[0]))}
  for item in args.setting:
    name, _, spec = item.partition("=")
    n, _, extra = spec.partition(":")
    out[name] = ("jax", dict(jax_env, XLA_FLAGS=cpu_defaults.merged_flags("", int(n), extra)[0]))
  for name in filter(None, args.skip.split(",")):
    out.pop(name)
  return out


def _run_child(kind: str, env: dict, args, case_ids: list[str]) -> dict[str, dict]:
  cmd = [sys.executable, __file__, f"--child={kind}", f"--edm_dir={args.edm_dir}",
         f"--steps={args.steps}", f"--sample_reps={args.sample_reps}",
         f"--threads={args.threads}", "--cases=" + "|".join(case_ids)]
  out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
  results = {}
  for line in out.stdout.splitlines():
    if line.startswith("RESULT "):
      r = json.loads(line[7:])
      results[r["case"]] = r
  if len(results) != len(case_ids):
    sys.exit(f"{kind} child failed (rc {out.returncode}):\n{out.stderr[-4000:]}")
  return results


def _table(names, cases, medians, params, flags_line) -> str:
  head = ["case", *[f"{n} s" for n in names], *[f"{n} ×" for n in names if n != "pytorch"],
          "params (ours / EDM)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for case_id in cases:
    row = [case_id] + [f"{medians[n][case_id]:.3f}" for n in names]
    row += [f"{medians['pytorch'][case_id] / medians[n][case_id]:.2f}×" for n in names
            if n != "pytorch"]
    row.append(f"{params['jax'][case_id]:,} / {params['torch'][case_id]:,}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines + ["", flags_line])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n", 2)[2])
  parser.add_argument("--edm_dir", required=True, help="a checkout of github.com/NVlabs/edm")
  parser.add_argument("--quick", action="store_true", help="reduced 28x28x1 cases only")
  parser.add_argument("--cases", default="", help="'|'-separated substrings of case ids")
  parser.add_argument("--rounds", type=int, default=3, help="processes per setting")
  parser.add_argument("--steps", type=int, default=10, help="timed train steps per process")
  parser.add_argument("--sample_reps", type=int, default=3,
                      help="timed sampling batches per process")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
  parser.add_argument("--setting", action="append", default=[],
                      help="NAME=DEVICES[:XLA_FLAGS], another jax column (repeatable); "
                           "XLA_FLAGS may be 'auto' (config.cpu_xla_flags' rule)")
  parser.add_argument("--skip", default="", help="comma-separated settings to leave out")
  _output.add_out_flags(parser, "vs_pytorch")
  parser.add_argument("--child", choices=("torch", "jax"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  wanted = [s for s in args.cases.split("|") if s]
  cases = [c for c in CASES if (c[4] or not args.quick)
           and (not wanted or any(w in c[0] for w in wanted))]
  if args.child:
    (child_torch if args.child == "torch" else child_jax)(args, cases)
    return
  if not (pathlib.Path(args.edm_dir) / "training" / "networks.py").exists():
    sys.exit(f"--edm_dir={args.edm_dir}: no training/networks.py there; give a checkout of "
             "https://github.com/NVlabs/edm")
  cache = tempfile.TemporaryDirectory(prefix="vs_pytorch_xla_cache_")
  args.cache_dir = cache.name
  settings = _settings(args)
  case_ids = [c[0] for c in cases]
  runs = {name: [] for name in settings}
  t0 = time.time()
  for r in range(args.rounds):
    for name, (kind, env) in settings.items():
      runs[name].append(_run_child(kind, env, args, case_ids))
      print(f"  round {r + 1}/{args.rounds} {name} done ({time.time() - t0:.0f} s)",
            file=sys.stderr, flush=True)
  medians = {n: {c: statistics.median(run[c]["median"] for run in rs) for c in case_ids}
             for n, rs in runs.items()}
  ours = next(n for n, (kind, _) in settings.items() if kind == "jax")
  params = {"jax": {c: runs[ours][0][c]["params"] for c in case_ids},
            "torch": {c: runs["pytorch"][0][c]["params"] for c in case_ids}}
  devices, flags = default_setting()
  flags_line = "\n".join(f"{n}: XLA_FLAGS={env.get('XLA_FLAGS', '')!r}"
                         for n, (kind, env) in settings.items() if kind == "jax")
  import torch  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  header = (f"benchmarks/vs_pytorch.py {' '.join(sys.argv[1:])}\n"
            f"{os.cpu_count()} CPU cores; torch {torch.__version__} ({args.threads} threads), "
            f"jax {jax.__version__}; s per train step / per 18-step sampling batch, median of "
            f"{args.rounds} alternating processes x {args.steps} steps ({args.sample_reps} "
            f"sampling batches); × = PyTorch time / ours (> 1: ours faster); "
            f"{time.time() - t0:.0f} s in all\n")
  text = header + "\n" + _table(list(settings), case_ids, medians, params, flags_line) + "\n"
  print(text)
  outputs = _output.OutputFolder(args.out, "vs_pytorch", quick=args.quick)
  pathlib.Path(outputs.path("vs_pytorch.txt")).write_text(text)
  outputs.report()


if __name__ == "__main__":
  main()
