"""The proof of the method on Gaussian mixtures with a closed-form denoiser.

    python benchmarks/toy_exactness.py --out DIR [--quick] [--ablate]

Given only noisy samples x_n = x0 + σ_n z (drawn once per example), small MLP
denoisers are trained four ways with the same number of steps:
  clean_edm            EDM on the clean data (the oracle)
  noisy_edm            EDM on the noisy data (the naive baseline), full sampling
  ambient              ambient loss, truncated sampling at σ_n
  ambient_consistency  the ambient run's first half, then ambient + λ·consistency, full sampling
and compared with the exact E[x0 | x_σ] over a grid of σ (relative error
√(E‖D − D*‖² / E‖x_σ − D*‖²): the share of the ideal correction that is wrong),
and by the sliced Wasserstein distance of their samples to clean data.
Writes DIR/results.json, DIR/samples_*.png, DIR/errors_*.png and prints a table.
`--ablate` instead compares loss options on one setting (DIR/ablation.json).
"""

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ambient_jax import gaussian_mixture, losses, sampling  # noqa: E402
from ambient_jax.models import build_model  # noqa: E402

METHODS = ("clean_edm", "noisy_edm", "ambient", "ambient_consistency")


# ----------------------------------------------------------------------------- training


def make_model(dim: int, width: int, seed: int):
  model = build_model({"name": "mlp", "data_dim": dim, "model_channels": width, "num_blocks": 3},
                      rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def denoiser(graphdef, rest, params):
  return lambda x, s: nnx.merge(graphdef, params, rest)(x, s)


_COMPILED = {}  # training chunk runners: they close over the network and options only
_EVALUATORS = {}  # per setting (they close over its mixture, keys and levels): emptied by run_setting


def _chunk_runner(graphdef, rest, objective, batch, seed, lr, consistency_weight,
                  consistency_options, ambient_options, chunk):
  """A jitted `chunk`-step scan for one training recipe and network, compiled once and reused
  (the cache key holds the GraphDef itself: hashable, equal for equal structures)."""
  cache_key = (graphdef, objective, batch, seed, lr, consistency_weight, json.dumps(consistency_options, sort_keys=True),
               json.dumps(ambient_options, sort_keys=True), chunk)
  if cache_key in _COMPILED:
    return _COMPILED[cache_key]
  optimizer = optax.adam(lr)

  def loss_fn(p, data, sigma_n, key, idx):
    fn = denoiser(graphdef, rest, p)
    x, sn = data[idx], sigma_n[idx]
    k_loss, k_cons = jax.random.split(key)
    if objective == "edm":
      loss, _ = losses.edm_loss(fn, x, k_loss)
    else:
      loss, _ = losses.ambient_loss(fn, x, sn, k_loss, **ambient_options)
    total = jnp.mean(loss)
    if consistency_weight:
      cons, _ = losses.consistency_loss(fn, x, sn, k_cons, **consistency_options)
      total = total + consistency_weight * jnp.mean(cons)
    return total

  def one_step(carry, step, data, sigma_n):
    p, o, e = carry
    key = jax.random.fold_in(jax.random.key(seed), step)
    k_idx, k_loss = jax.random.split(key)
    idx = jax.random.randint(k_idx, (batch,), 0, data.shape[0])
    value, grads = jax.value_and_grad(loss_fn)(p, data, sigma_n, k_loss, idx)
    updates, o = optimizer.update(grads, o, p)
    p = optax.apply_updates(p, updates)
    decay = jnp.minimum(EMA_DECAY, (1.0 + step) / (10.0 + step))  # warm-up: no memory of the init
    e = jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, e, p)
    return (p, o, e), value

  @jax.jit
  def run_chunk(carry, first, data, sigma_n):
    return jax.lax.scan(functools.partial(one_step, data=data, sigma_n=sigma_n), carry,
                        first + jnp.arange(chunk))

  _COMPILED[cache_key] = (optimizer, run_chunk)
  return optimizer, run_chunk


EMA_DECAY = 0.999
CHUNK = 250


def train(graphdef, rest, params, data, sigma_n, *, objective, steps, batch, seed, lr,
          consistency_weight=0.0, consistency_options=None, ambient_options=None,
          start_step=0, opt_state=None, ema=None):
  """Runs `steps` Adam steps from `start_step`; randomness is a function of (seed, step).

  Returns (params, opt_state, ema_params).
  """
  optimizer, run_chunk = _chunk_runner(graphdef, rest, objective, batch, seed, lr, consistency_weight,
                                       consistency_options or {}, ambient_options or {}, CHUNK)
  opt_state = optimizer.init(params) if opt_state is None else opt_state
  carry = (params, opt_state, params if ema is None else ema)
  data, sigma_n, values = jnp.asarray(data), jnp.asarray(sigma_n), []
  for first in range(start_step, start_step + steps, CHUNK):
    carry, chunk_values = run_chunk(carry, first, data, sigma_n)
    values.append(np.asarray(chunk_values))
  if not np.all(np.isfinite(np.concatenate(values))):
    raise FloatingPointError(f"non-finite loss in {objective} training (consistency λ={consistency_weight})")
  return carry


# ----------------------------------------------------------------------------- metrics


def denoiser_errors(fn, mixture, sigmas, key, n=4000):
  """Relative error √(E‖D − D*‖² / E‖x_σ − D*‖²) at each σ of the grid: [S].

  Held-out points: fresh clean draws, noised at each σ.
  """
  sigmas = jnp.asarray(sigmas, jnp.float32)
  k0, k1 = jax.random.split(key)
  x0 = mixture.sample(k0, n * len(sigmas))
  sig = jnp.repeat(sigmas, n)
  x = x0 + sig[:, None] * jax.random.normal(k1, x0.shape)
  exact = mixture.denoise(x, sig)
  err = jnp.sum(jnp.square(fn(x, sig) - exact), -1).reshape(len(sigmas), n).mean(1)
  ref = jnp.sum(jnp.square(x - exact), -1).reshape(len(sigmas), n).mean(1)
  return jnp.sqrt(err / ref)


def sliced_wasserstein(a, b, key, num_projections=256):
  """Sliced 2-Wasserstein distance between equal-size point sets [N, D]."""
  dirs = jax.random.normal(key, (a.shape[1], num_projections))
  dirs = dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True)
  pa, pb = jnp.sort(a @ dirs, axis=0), jnp.sort(b @ dirs, axis=0)
  return float(jnp.sqrt(jnp.mean(jnp.square(pa - pb))))


def evaluate(graphdef, rest, params, mixture, sigmas, key, num_samples, seed, sigma_n):
  """(relative errors [S], full samples [N, D], truncated samples [N, D]) for one model."""

  @functools.partial(jax.jit, static_argnums=())
  def run(params):
    fn = denoiser(graphdef, rest, params)
    errors = denoiser_errors(fn, mixture, sigmas, key)
    latents = sampling.latents_from_keys(jax.random.split(jax.random.key(seed), num_samples), (mixture.dim,))
    full = sampling.edm_sampler(fn, latents, num_steps=18)
    truncated = sampling.edm_sampler(fn, latents, num_steps=18, sigma_stop=jnp.full((num_samples,), sigma_n))
    return errors, full, truncated

  key_ = (graphdef, mixture.dim, num_samples, sigma_n)
  if key_ not in _EVALUATORS:
    _EVALUATORS[key_] = run
  return _EVALUATORS[key_](params)


# ----------------------------------------------------------------------------- one setting


def run_setting(name, mixture, sigma_n, args, plot_dir=None, variants=None):
  """Trains every method on one (dataset, σ_n) and returns its results dict."""
  dim = mixture.dim
  key = jax.random.key(args.seed)
  k_data, k_noise, k_eval, k_ref, k_sw = jax.random.split(key, 5)
  clean = mixture.sample(k_data, args.train_size)
  noisy = clean + sigma_n * jax.random.normal(k_noise, clean.shape)  # fixed once per example
  sn = jnp.full((args.train_size,), sigma_n)
  zeros = jnp.zeros_like(sn)
  _EVALUATORS.clear()
  graphdef, params0, rest = make_model(dim, args.width, args.seed)
  common = dict(batch=args.batch, seed=args.seed + 1, lr=args.lr)
  half = args.steps // 2
  sigmas = np.geomspace(0.01, 5.0, 25)
  reference = mixture.sample(k_ref, args.num_samples)
  floor = sliced_wasserstein(mixture.sample(jax.random.fold_in(k_ref, 1), args.num_samples), reference, k_sw)

  if variants is None:
    variants = {
        "clean_edm": dict(objective="edm", data=clean, sigma_n=zeros, stop=None),
        "noisy_edm": dict(objective="edm", data=noisy, sigma_n=sn, stop=None),
        "ambient": dict(objective="ambient", data=noisy, sigma_n=sn, stop=sigma_n),
        "ambient_consistency": dict(objective="ambient", data=noisy, sigma_n=sn, stop=None,
                                    consistency_weight=args.consistency_weight, fork="ambient"),
    }
  results, first_halves = {}, {}
  for method, spec in variants.items():
    spec = {"data": noisy, "sigma_n": sn, **spec}  # ablation variants train on the noisy data
    t0 = time.time()
    train_kw = dict(objective=spec["objective"], ambient_options=spec.get("ambient_options"), **common)
    if "fork" in spec:  # continue the ambient run's first half with the consistency term
      p, o, e = first_halves[spec["fork"]]
      _, _, ema = train(graphdef, rest, p, spec["data"], spec["sigma_n"], steps=args.steps - half,
                        start_step=half, opt_state=o, ema=e, consistency_weight=spec["consistency_weight"],
                        consistency_options=spec.get("consistency_options"), **train_kw)
    else:
      state = train(graphdef, rest, params0, spec["data"], spec["sigma_n"], steps=half, **train_kw)
      first_halves[method] = state
      _, _, ema = train(graphdef, rest, state[0], spec["data"], spec["sigma_n"], steps=args.steps - half,
                        start_step=half, opt_state=state[1], ema=state[2], **train_kw)
    seconds = time.time() - t0
    errors, full, truncated = evaluate(graphdef, rest, ema, mixture, sigmas, k_eval, args.num_samples,
                                       args.seed + 2, sigma_n)
    errors = np.asarray(errors)
    sw_full, sw_trunc = (sliced_wasserstein(s, reference, k_sw) for s in (full, truncated))
    chosen = truncated if spec["stop"] is not None else full
    results[method] = {
        "denoiser_rel_error_above_sigma_n": float(np.mean(errors[sigmas > sigma_n])),
        "denoiser_rel_error_below_sigma_n": float(np.mean(errors[sigmas < sigma_n])),
        "sliced_wasserstein": sw_trunc if spec["stop"] is not None else sw_full,
        "sliced_wasserstein_full_sampling": sw_full,
        "sliced_wasserstein_truncated_sampling": sw_trunc,
        "sampling": "truncated" if spec["stop"] is not None else "full",
        "train_seconds": seconds,
        "errors_by_sigma": errors.tolist(),
    }
    results[method]["_samples"] = np.asarray(chosen)
    print(f"  {name} σ_n={sigma_n:<5} {method:<22} above {results[method]['denoiser_rel_error_above_sigma_n']:.3f}"
          f"  below {results[method]['denoiser_rel_error_below_sigma_n']:.3f}  SW {results[method]['sliced_wasserstein']:.4f}"
          f"  ({seconds:.0f} s)", flush=True)
  if plot_dir is not None:
    plot_setting(plot_dir, name, sigma_n, mixture, noisy, reference, results, sigmas)
  for r in results.values():
    r.pop("_samples")
  return {"dataset": name, "dim": dim, "sigma_n": sigma_n, "sigma_grid": sigmas.tolist(),
          "sliced_wasserstein_clean_floor": floor, "methods": results}


def plot_setting(out, name, sigma_n, mixture, noisy, reference, results, sigmas):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tag = f"{name}_sigma{sigma_n}"
  fig, ax = plt.subplots(figsize=(6, 4))
  for method, r in results.items():
    ax.loglog(sigmas, r["errors_by_sigma"], marker="o", ms=3, label=method)
  ax.axvline(sigma_n, color="k", ls="--", lw=1, label="σ_n")
  ax.set_xlabel("σ"); ax.set_ylabel("relative denoiser error"); ax.set_title(f"{name}, σ_n = {sigma_n}")
  ax.legend(fontsize=8); fig.tight_layout(); fig.savefig(os.path.join(out, f"errors_{tag}.png"), dpi=110)
  plt.close(fig)
  if mixture.dim != 2:
    return
  panels = [("clean data", np.asarray(reference)), ("noisy training data", np.asarray(noisy))]
  panels += [(f"{m} ({r['sampling']})", r["_samples"]) for m, r in results.items()]
  fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2), sharex=True, sharey=True)
  for ax, (title, pts) in zip(axes, panels):
    ax.scatter(pts[:4000, 0], pts[:4000, 1], s=1, alpha=0.4)
    ax.set_title(title, fontsize=8); ax.set_xlim(-1.1, 1.1); ax.set_ylim(-1.1, 1.1); ax.set_aspect("equal")
  fig.tight_layout(); fig.savefig(os.path.join(out, f"samples_{tag}.png"), dpi=110); plt.close(fig)


# ----------------------------------------------------------------------------- main


def print_table(runs):
  print("\n| dataset | σ_n | method | rel. error above σ_n | rel. error below σ_n | sliced W2 (× clean floor) |")
  print("|---|---|---|---|---|---|")
  for run in runs:
    for method, r in run["methods"].items():
      ratio = r["sliced_wasserstein"] / run["sliced_wasserstein_clean_floor"]
      print(f"| {run['dataset']} | {run['sigma_n']} | {method} ({r['sampling']}) | "
            f"{r['denoiser_rel_error_above_sigma_n']:.3f} | {r['denoiser_rel_error_below_sigma_n']:.3f} | "
            f"{r['sliced_wasserstein']:.4f} ({ratio:.1f}×) |")


def ablation_variants(args, sigma_n):
  """Loss options compared on one setting; the consistency ones fork from the plain ambient run."""
  base = dict(objective="ambient", stop=None, fork="ambient")
  lam = args.consistency_weight
  return {
      "ambient": dict(objective="ambient", stop=sigma_n),
      "ambient_x0_weighting": dict(objective="ambient", stop=sigma_n, ambient_options={"weighting": "x0"}),
      "global_K4": dict(base, consistency_weight=lam),
      "global_K4_lam10x": dict(base, consistency_weight=10 * lam),
      "global_K1": dict(base, consistency_weight=lam, consistency_options={"chain_steps": 1}),
      "global_K4_euler_maruyama": dict(base, consistency_weight=lam,
                                       consistency_options={"step": "euler_maruyama"}),
      "global_K4_from_sigma_n": dict(base, consistency_weight=lam, consistency_options={"start": "sigma_n"}),
      "global_K4_target_min0.02": dict(base, consistency_weight=lam,
                                       consistency_options={"target_min_ratio": 0.02}),
      "local_gap0.05_K1": dict(base, consistency_weight=lam, consistency_options={
          "start": "sigma_n", "gap": 0.05, "anchor_steps": 1, "chain_steps": 1}),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="output folder (created)")
  parser.add_argument("--quick", action="store_true",
                      help="one setting (2-D, σ_n = 0.1), 2,000 steps: ≈ 2 minutes")
  parser.add_argument("--ablate", action="store_true", help="compare loss options on 2-D, σ_n = 0.1")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--train_size", type=int, default=20000)
  parser.add_argument("--num_samples", type=int, default=10000)
  parser.add_argument("--consistency_weight", type=float, default=10.0,
                      help="λ_c; 10 won the ablation (README Results)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.steps is None:  # --quick: the fewest steps at which consistency shows (README)
    args.steps = 2000 if args.quick else 4000
  if args.steps % 500:
    parser.error("--steps must be a multiple of 500 (two halves of 250-step chunks)")
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  mixtures = {"2d_four_clusters": gaussian_mixture.four_clusters_2d(),
              "16d_eight_clusters": gaussian_mixture.random_clusters(16, 8)}
  if args.ablate:
    run = run_setting("2d_four_clusters", mixtures["2d_four_clusters"], 0.1, args,
                      variants=ablation_variants(args, 0.1))
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
      json.dump(run, f, indent=1)
    print_table([run])
    print(f"\nwall time {time.time() - t0:.0f} s")
    return
  settings = ([("2d_four_clusters", 0.1)] if args.quick else
              [(name, s) for name in mixtures for s in (0.1, 0.2)])
  runs = [run_setting(name, mixtures[name], s, args, plot_dir=args.out) for name, s in settings]
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"runs": runs, "args": vars(args), "wall_seconds": time.time() - t0}, f, indent=1)
  print_table(runs)
  print(f"\nwall time {time.time() - t0:.0f} s; results in {args.out}/results.json")


if __name__ == "__main__":
  main()
