"""What tracing a training step costs, with flax's own dropout-key draws and with ours.

    python benchmarks/trace_cost.py [--configs SPEC ...] [--out DIR] [--quick]

Traces (jax.eval_shape: no compile) the pixel train step of each config, consistency
phase on, twice: with `layers.next_key` (the library's dropout draws) and with flax's
`RngStream.__call__` in its place. flax writes the stream's count with an indexed write
that compares the new value's sharding; on a tracer that raises an AttributeError whose
message walks the whole trace so far, once per dropout call, so the cost grows with
(dropout calls) × (trace length). Same keys either way (tests/test_models.py). Writes
DIR/trace_cost.txt (and _quick) and prints it; the committed run is `--out benchmarks/results`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ambient_jax.data import corruption, registry  # noqa: E402
from ambient_jax.models import layers  # noqa: E402
from ambient_jax.training import pixel as pixel_task  # noqa: E402
from ambient_jax.training import state as ts  # noqa: E402
import _output  # noqa: E402  (benchmarks/, beside this file)
from sdxl_memory import load_config  # noqa: E402  (configs/X.py[:ARG] -> ConfigDict)

CONFIGS = ("cifar10.py:smoke", "ffhq64.py:smoke", "imagenet64.py:smoke", "cifar10.py")


def trace_seconds(config) -> float:
  """Seconds to trace one train step of `config` (consistency on) on a synthetic batch."""
  spec = registry.get_spec(config.data.name)
  shape = (config.data.resolution, config.data.resolution, spec.channels)
  tx = ts.make_optimizer(config.optim)
  step_fn = pixel_task.make_train_step(config, ts.make_model_def(config, shape), tx)
  b = config.batch_size
  host = {"image": np.zeros((b,) + shape, np.uint8), "index": np.arange(b, dtype=np.int32),
          "sigma_n": corruption.sigma_n_table(b, config.data.sigma_n, config.data.clean_fraction),
          "label": np.zeros((b,), np.int32)}
  state = jax.eval_shape(ts.init_fn(config, tx))
  t0 = time.perf_counter()
  jax.eval_shape(functools.partial(step_fn, consistency=True), state, host)
  return time.perf_counter() - t0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", nargs="+", default=None, help=f"config specs (default {' '.join(CONFIGS)})")
  p.add_argument("--quick", action="store_true",
                 help="cifar10.py:smoke only, at batch 2, one block on one level, 1-step chains")
  _output.add_out_flags(p, "trace_cost")
  args = p.parse_args(argv)
  specs = args.configs or (["cifar10.py:smoke"] if args.quick else list(CONFIGS))
  outputs = _output.OutputFolder(args.out, "trace_cost", quick=args.quick)
  lines = ["| config | dropout | trace, flax's draws (s) | trace, next_key (s) | ratio |",
           "|---|---|---|---|---|"]
  print("\n".join(lines), flush=True)
  ours = layers.next_key
  for spec in specs:
    config = load_config(os.path.join(ROOT, "configs", spec))
    if args.quick:
      config.batch_size, config.model.num_blocks, config.model.channel_mult = 2, 1, (1,)
      config.consistency.kwargs.chain_steps = 1
    seconds = {}
    for name, draw in (("ours", ours), ("flax", lambda stream: stream())):  # ours pays the warm-up
      layers.next_key = draw  # the one place a dropout key is drawn
      try:
        seconds[name] = trace_seconds(config)
      finally:
        layers.next_key = ours
    line = (f"| {spec} | {config.model.get('dropout', 0.0)} | {seconds['flax']:.1f} | "
            f"{seconds['ours']:.1f} | {seconds['flax'] / seconds['ours']:.2f}× |")
    lines.append(line)
    print(line, flush=True)
  outputs.write_table(lines)
  outputs.report()
  return 0


if __name__ == "__main__":
  sys.exit(main())
