"""Cost of one training step per loss, side by side, for one small conv network.

    python benchmarks/loss_cost.py [--batch 32] [--resolution 28] [--repeats 10]

Times one jitted step (forward + backward + Adam) with `edm_loss`, `ambient_loss`, and
`ambient_loss + consistency_loss` (K = 1 chain step and the default K = 4; on the full
batch and on a 1/8 slice; K = 1 on configs/default.py's 1/4 slice with plain and with
`posterior_cov` chains), prints each median, the ratio to `edm_loss`, and XLA's
compiled memory figures (temp + argument bytes) as the peak-memory measure on CPU.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ambient_jax import losses  # noqa: E402
from ambient_jax.models import build_model  # noqa: E402


def make_step(graphdef, rest, optimizer, recipe, batch):
  """A jitted step for one loss recipe: (params, opt_state, x_noisy, sigma_n, key) -> same."""
  objective, cons_options, fraction = recipe

  def loss_fn(params, x, sigma_n, key):
    fn = lambda x_, s_: nnx.merge(graphdef, params, rest)(x_, s_)
    k_loss, k_cons = jax.random.split(key)
    if objective == "edm":
      loss, _ = losses.edm_loss(fn, x, k_loss)
    else:
      loss, _ = losses.ambient_loss(fn, x, sigma_n, k_loss)
    total = jnp.mean(loss)
    if cons_options is not None:
      n = max(1, int(batch * fraction))
      cons, _ = losses.consistency_loss(fn, x[:n], sigma_n[:n], k_cons, **cons_options)
      total = total + jnp.mean(cons)
    return total

  def step(params, opt_state, x, sigma_n, key):
    value, grads = jax.value_and_grad(loss_fn)(params, x, sigma_n, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return jax.jit(step, donate_argnums=(0, 1))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--resolution", type=int, default=28)
  parser.add_argument("--channels", type=int, default=1)
  parser.add_argument("--model_channels", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)
  model = build_model({"name": "ddpmpp", "img_resolution": args.resolution, "in_channels": args.channels,
                       "model_channels": args.model_channels, "channel_mult": (1, 2, 2), "num_blocks": 1,
                       "attn_resolutions": (), "dropout": 0.0}, rngs=nnx.Rngs(0))
  graphdef, params0, rest = nnx.split(model, nnx.Param, ...)
  n_params = sum(p.size for p in jax.tree.leaves(params0))
  optimizer = optax.adam(1e-4)
  shape = (args.batch, args.resolution, args.resolution, args.channels)
  x = jax.random.uniform(jax.random.key(1), shape, minval=-1, maxval=1)
  sigma_n = jnp.full((args.batch,), 0.2)
  recipes = {
      "edm_loss": ("edm", None, 1.0),
      "ambient_loss": ("ambient", None, 1.0),
      "ambient + consistency K=1, full batch": ("ambient", {"chain_steps": 1}, 1.0),
      "ambient + consistency K=1, 1/8 slice": ("ambient", {"chain_steps": 1}, 1 / 8),
      "ambient + consistency K=4 (default), full batch": ("ambient", {}, 1.0),
      "ambient + consistency K=4 (default), 1/8 slice": ("ambient", {}, 1 / 8),
      # configs/default.py's term (K = 1 on a 1/4 slice), plain and exact-variance chains
      "ambient + consistency K=1, 1/4 slice": ("ambient", {"chain_steps": 1}, 1 / 4),
      "ambient + consistency K=1 posterior_cov, 1/4 slice": (
          "ambient", {"chain_steps": 1, "step": "posterior_cov"}, 1 / 4),
  }
  print(f"devices: {jax.devices()[0].platform} x{jax.device_count()}; DDPM++ {n_params:,} params; "
        f"batch {shape}; median of {args.repeats} steps after warm-up", flush=True)
  rows = []
  for name, recipe in recipes.items():
    step = make_step(graphdef, rest, optimizer, recipe, args.batch)
    params = jax.tree.map(jnp.copy, params0)
    opt_state = optimizer.init(params)
    compiled = step.lower(params, opt_state, x, sigma_n, jax.random.key(0)).compile()
    mem = compiled.memory_analysis()
    peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes) if mem is not None else float("nan")
    params, opt_state, _ = step(params, opt_state, x, sigma_n, jax.random.key(0))  # warm-up
    times = []
    for i in range(args.repeats):
      t0 = time.perf_counter()
      params, opt_state, value = step(params, opt_state, x, sigma_n, jax.random.key(i + 1))
      value.block_until_ready()
      times.append(time.perf_counter() - t0)
    rows.append((name, statistics.median(times), peak))
    print(f"  {name:<48} {statistics.median(times) * 1e3:8.1f} ms   peak {peak / 2**20:7.1f} MiB", flush=True)
  base_time, base_mem = rows[0][1], rows[0][2]
  print("\n| loss | step (ms) | × edm_loss | peak memory (MiB) | × edm_loss |")
  print("|---|---|---|---|---|")
  for name, t, m in rows:
    print(f"| {name} | {t * 1e3:.1f} | {t / base_time:.2f} | {m / 2**20:.1f} | {m / base_mem:.2f} |")


if __name__ == "__main__":
  main()
