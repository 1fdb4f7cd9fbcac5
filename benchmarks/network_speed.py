"""Network speed: median train step (forward + backward + Adam) and 18-step Heun sampling.

    python benchmarks/network_speed.py            # reduced DDPM++ 28x28x1 / 32x32x3 at
                                                   # batch 8 and 32, full CIFAR DDPM++ at 8
    python benchmarks/network_speed.py --quick    # reduced DDPM++ 28x28x1, batch 8 only

Uses the patterns a trainer should use: `nnx.split` once, one jitted pure step that
merges, donated params / optimizer state, dropout reseeded from (seed, step), the batch
split over all devices (`sharding.make_mesh`, data-parallel; parameters replicated).
Sampling is `ambient_jax.sampling.edm_sampler` (18 steps = 35 network evaluations) on a
jitted `make_denoise_fn`, latents split over the devices. Times exclude compilation
(reported separately). `benchmarks/vs_pytorch.py` runs these same functions side by side
with EDM's PyTorch code.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from ambient_jax import precond, sampling
from ambient_jax.runtime import sharding
from ambient_jax.models import build_model, count_params, make_denoise_fn

REDUCED = dict(name="ddpmpp", model_channels=32, channel_mult=(1, 2, 2), num_blocks=2,
               dropout=0.13)
FULL_CIFAR = dict(name="ddpmpp", img_resolution=32, in_channels=3, dropout=0.13)
CASES = [  # (label, config, batch sizes, quick)
    ("ddpmpp-reduced 28x28x1", dict(REDUCED, img_resolution=28, in_channels=1), (8, 32), True),
    ("ddpmpp-reduced 32x32x3", dict(REDUCED, img_resolution=32, in_channels=3), (8, 32), False),
    ("ddpmpp-cifar10 32x32x3", FULL_CIFAR, (8,), False),
]


def _timed(fn, reps: int) -> tuple[float, list[float]]:
  """(first-call seconds incl. compile, seconds of each of `reps` further calls)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, times


def _mesh():
  """Data-parallel mesh over every device (as the trainer builds it for mesh.data = -1)."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
  return sharding.replicated(mesh), sharding.batch_sharding(mesh)


def bench_train_step(config: dict, batch: int, reps: int) -> tuple[float, list[float], int]:
  """(compile + first step seconds, seconds of each further step, parameter count)."""
  model = build_model(config, rngs=nnx.Rngs(params=0, dropout=1))
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  replicated, split = _mesh()
  params, rest = jax.device_put((params, rest), replicated)
  tx = optax.adam(2e-4)
  opt_state = tx.init(params)
  shape = (batch, config["img_resolution"], config["img_resolution"], config["in_channels"])

  def loss_fn(params, rest, x0, key):
    k_sigma, k_noise, k_dropout = jax.random.split(key, 3)
    denoise = make_denoise_fn(graphdef, params, rest, dropout_key=k_dropout)
    sigma = jax.lax.with_sharding_constraint(precond.sample_sigma(k_sigma, jnp.zeros((batch,))),
                                             split)
    noise = jax.lax.with_sharding_constraint(jax.random.normal(k_noise, x0.shape), split)
    x = x0 + precond.expand(sigma, x0) * noise
    err = jnp.square(denoise(x, sigma) - x0).reshape(batch, -1).sum(-1)
    return jnp.mean(precond.edm_weight(sigma) * err)

  def step(params, opt_state, rest, x0, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, x0, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  x0 = jax.device_put(jax.random.normal(jax.random.key(0), shape), split)
  state = {"params": params, "opt": opt_state, "i": 0}

  def run():
    state["params"], state["opt"], loss = step(state["params"], state["opt"], rest, x0,
                                               jax.random.fold_in(jax.random.key(2), state["i"]))
    state["i"] += 1
    return loss

  first, times = _timed(run, reps)
  return first, times, count_params(model)


def bench_sampling(config: dict, batch: int, reps: int) -> tuple[float, list[float]]:
  """(compile + first batch seconds, seconds of each further 18-step batch)."""
  model = build_model(config, rngs=nnx.Rngs(params=0, dropout=1))
  model.eval()
  graphdef, state = nnx.split(model)
  replicated, split = _mesh()
  state = jax.device_put(state, replicated)
  shape = (batch, config["img_resolution"], config["img_resolution"], config["in_channels"])

  @jax.jit
  def sample(state, latents):
    return sampling.edm_sampler(make_denoise_fn(graphdef, state), latents, num_steps=18)

  latents = jax.device_put(jax.random.normal(jax.random.key(3), shape), split)
  return _timed(lambda: sample(state, latents), reps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="reduced 28x28x1, batch 8 only")
  parser.add_argument("--reps", type=int, default=5, help="timed repetitions per figure")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"device {jax.devices()[0].device_kind}, {jax.device_count()} device(s)")
  print(f"{'model':<24} {'batch':>5} {'params':>11} {'train step':>11} {'(compile)':>10} "
        f"{'Heun-18':>9} {'(compile)':>10}")
  for label, config, batches, quick in CASES:
    if args.quick and not quick:
      continue
    for batch in batches[:1] if args.quick else batches:
      reps = args.reps if config is not FULL_CIFAR else max(2, args.reps // 2)
      t_first, t_steps, n = bench_train_step(config, batch, reps)
      s_first, t_samples = bench_sampling(config, batch, max(1, reps // 2))
      t_step, t_sample = statistics.median(t_steps), statistics.median(t_samples)
      print(f"{label:<24} {batch:>5} {n:>11,} {t_step * 1e3:>9.1f}ms {t_first:>9.1f}s "
            f"{t_sample:>8.2f}s {s_first:>9.1f}s", flush=True)


if __name__ == "__main__":
  main()
