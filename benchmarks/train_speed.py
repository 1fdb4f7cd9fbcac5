"""Train-step speed of a config with 1 vs 2 vs 8 (fake CPU) devices, side by side.

    python benchmarks/train_speed.py                           # configs/default.py, 1/2/8 devices
    python benchmarks/train_speed.py --devices=1,2 --steps=10 --config=configs/default.py \
        --override=data.resolution=16 --override=model.img_resolution=16

Each device count runs in its own process (the fake-device count is fixed when jax starts),
with the config's `cpu_xla_flags` as the entry point sets them:
it builds the real `Trainer` (dataset, model, sharded jitted step), times the first call
(compile), then `--steps` steps before the consistency term kicks in and `--steps` steps
after (the step's second, consistency phase: one more compile), and prints steps/s for both. The
default config's wall time is ~ compile + start_step / rate_before + rest / rate_after.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ambient_jax.runtime import cpu_defaults  # noqa: E402  (no jax)


def _load_config(path: str, overrides: list[str]):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import ast  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("bench_cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    key, value = item.split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value
  return config


def child(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from ambient_jax.training import trainer as train  # pylint: disable=g-import-not-at-top
  config = _load_config(args.config, args.override)
  with tempfile.TemporaryDirectory() as workdir:
    trainer = train.Trainer(config, workdir)
    state = trainer.initial_state()
    batches = [trainer.loader.batch(s) for s in range(4)]
    t = time.perf_counter()
    state, m = trainer.train_step(state, batches[0], False)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t

    def rate(state, n, consistency):
      jax.block_until_ready(state)
      t = time.perf_counter()
      for i in range(n):
        state, m = trainer.train_step(state, batches[i % 4], consistency)
      jax.block_until_ready(m)
      return state, n / (time.perf_counter() - t)

    state, before = rate(state, args.steps, False)
    after = compile2_s = None
    if config.consistency.weight > 0:
      t = time.perf_counter()
      state, m = trainer.train_step(state, batches[0], True)  # second phase
      jax.block_until_ready(m)
      compile2_s = time.perf_counter() - t
      state, after = rate(state, args.steps, True)
    trainer.close()
  print("RESULT " + json.dumps(dict(devices=jax.device_count(), compile_s=compile_s,
                                    compile2_s=compile2_s, before=before, after=after,
                                    traces=trainer.step_fn.num_traces)), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(ROOT / "configs" / "default.py"))
  parser.add_argument("--override", action="append", default=[],
                      help="FIELD=VALUE (Python literal), repeatable")
  parser.add_argument("--devices", default="1,2,8")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  rows = []
  cpu_xla_flags = _load_config(args.config, args.override).get("cpu_xla_flags", "")
  for n in [int(d) for d in args.devices.split(",")]:
    # As `python -m ambient_jax.main` on a CPU: n devices and the config's cpu_xla_flags.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=cpu_defaults.merged_flags("", n, cpu_xla_flags)[0])
    cmd = [sys.executable, __file__, "--child", f"--config={args.config}", f"--steps={args.steps}"]
    cmd += [f"--override={o}" for o in args.override]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
      sys.exit(f"{n} devices failed:\n{out.stderr[-3000:]}")
    rows.append(json.loads(line[7:]))
    print(f"  {n} device(s) done", file=sys.stderr, flush=True)
  config = _load_config(args.config, args.override)
  print(f"config {pathlib.Path(args.config).name} {' '.join(args.override)}: batch "
        f"{config.batch_size}, {config.data.resolution}x{config.data.resolution}, "
        f"{config.num_train_steps} steps (consistency from step {config.consistency.start_step})")
  print(f"{'devices':>8} {'compile s':>10} {'steps/s before λ_c':>19} {'steps/s after λ_c':>18} "
        f"{'est. train min':>15}")
  for r in rows:
    after = r["after"] or r["before"]
    start = min(config.consistency.start_step, config.num_train_steps) if r["after"] else \
        config.num_train_steps
    compile_s = r["compile_s"] + ((r["compile2_s"] or 0.0) if start < config.num_train_steps
                                  and start > 0 else 0.0)
    est = (compile_s + start / r["before"] + (config.num_train_steps - start) / after) / 60
    print(f"{r['devices']:>8} {compile_s:>10.1f} {r['before']:>19.2f} "
          f"{(r['after'] or float('nan')):>18.2f} {est:>15.1f}")


if __name__ == "__main__":
  main()
