"""The proof of the method on Gaussian mixtures with a closed-form denoiser.

    python benchmarks/toy_exactness.py [--out DIR] [--quick] [--ablate]

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
`--ablate` instead compares loss options on one setting (DIR/ablation.json). DIR: --out,
default ./benchmark_results/toy_exactness (--quick: a temporary folder); the committed
runs are `--out benchmarks/results/toy_full` and `.../toy_high_noise`.
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
import _output  # noqa: E402  (benchmarks/, beside this file)

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
_EVALUATORS = {}  # per (network, mixture, levels, sample count, σ_n); keys and seed are arguments


def learning_rate(lr: float, decay: tuple | None = None):
  """Adam's learning rate as a function of the global step: `lr`, or with decay =
  (final_lr, first_step, num_steps) a cosine from `lr` to `final_lr` over those steps.
  Always a schedule, so that optimizer states of every recipe share one structure (a
  consistency phase forks the ambient run's state)."""
  if decay is None:
    return lambda count: jnp.full((), lr, jnp.float32)
  final, first, num = decay
  def schedule(count):
    t = jnp.clip((count - first) / num, 0.0, 1.0)
    return final + (lr - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
  return schedule


TEACHERS = ("ema", "exact", "exact_above_sigma_n", "exact_below_sigma_n")


def _teacher(name, fn, ema_fn, mixture, sigma_n):
  """The consistency term's `chain_denoise_fn` named by a variant's "teacher" option: the EMA
  network, or (a diagnosis) the exact E[x0 | x_σ] everywhere or on one side of σ_n, with the
  trained network on the other."""
  if name == "ema":
    return ema_fn
  exact = mixture.denoise
  return {"exact": exact, "exact_above_sigma_n": split_denoiser(exact, fn, sigma_n),
          "exact_below_sigma_n": split_denoiser(fn, exact, sigma_n)}[name]


def _chunk_runner(graphdef, rest, objective, batch, lr, consistency_weight,
                  consistency_options, ambient_options, chunk, lr_decay=None, mixture=None):
  """A jitted `chunk`-step scan for one training recipe and network, compiled once and reused
  (the cache key holds the GraphDef itself: hashable, equal for equal structures); the seed
  is an argument of the scan, so every seed of an ablation shares the compile (`rest`, the
  network's non-parameter state, is empty for this MLP: nothing seed-dependent is baked in).
  `mixture`: the data's closed form, for a consistency "teacher" that uses the exact denoiser."""
  teacher = consistency_options.get("teacher")
  if teacher is not None and teacher not in TEACHERS:
    raise ValueError(f"unknown consistency teacher {teacher!r}; expected one of {TEACHERS}")
  exact_key = (None if teacher in (None, "ema") else
               tuple(np.asarray(a).tobytes() for a in (mixture.means, mixture.stds, mixture.weights)))
  cache_key = (graphdef, objective, batch, lr, consistency_weight, json.dumps(consistency_options, sort_keys=True),
               json.dumps(ambient_options, sort_keys=True), chunk, lr_decay, exact_key)
  if cache_key in _COMPILED:
    return _COMPILED[cache_key]
  optimizer = optax.adam(learning_rate(lr, lr_decay))

  def loss_fn(p, ema, data, sigma_n, key, idx):
    fn = denoiser(graphdef, rest, p)
    x, sn = data[idx], sigma_n[idx]
    k_loss, k_cons = jax.random.split(key)
    if objective == "edm":
      loss, _ = losses.edm_loss(fn, x, k_loss)
    else:
      loss, _ = losses.ambient_loss(fn, x, sn, k_loss, **ambient_options)
    total = jnp.mean(loss)
    if consistency_weight:  # the term below σ_n: consistency, or kind="posterior_sample" (EM)
      options = dict(consistency_options)
      plus = options.pop("plus", None)  # a second below-σ_n term, {"weight": w, "kind": ..., ...}
      terms = [(1.0, options, k_cons)]
      if plus:
        plus = dict(plus)
        terms.append((plus.pop("weight"), plus, jax.random.fold_in(k_cons, 1)))
      for weight, term_options, term_key in terms:
        term_options = dict(term_options)
        if "teacher" in term_options:  # one σ_n per toy set: its largest is the level
          term_options["chain_denoise_fn"] = _teacher(
              term_options.pop("teacher"), fn, denoiser(graphdef, rest, ema), mixture, jnp.max(sigma_n))
        below_loss = losses.BELOW_SIGMA_N_LOSSES[term_options.pop("kind", "consistency")]
        term, _ = below_loss(fn, x, sn, term_key, **term_options)
        total = total + consistency_weight * weight * jnp.mean(term)
    return total

  def one_step(carry, step, data, sigma_n, seed):
    p, o, e = carry
    key = jax.random.fold_in(jax.random.key(seed), step)
    k_idx, k_loss = jax.random.split(key)
    idx = jax.random.randint(k_idx, (batch,), 0, data.shape[0])
    value, grads = jax.value_and_grad(loss_fn)(p, e, data, sigma_n, k_loss, idx)
    updates, o = optimizer.update(grads, o, p)
    p = optax.apply_updates(p, updates)
    decay = jnp.minimum(EMA_DECAY, (1.0 + step) / (10.0 + step))  # warm-up: no memory of the init
    e = jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, e, p)
    return (p, o, e), value

  @jax.jit
  def run_chunk(carry, first, data, sigma_n, seed):
    return jax.lax.scan(functools.partial(one_step, data=data, sigma_n=sigma_n, seed=seed), carry,
                        first + jnp.arange(chunk))

  _COMPILED[cache_key] = (optimizer, run_chunk)
  return optimizer, run_chunk


EMA_DECAY = 0.999
CHUNK = 250


def train(graphdef, rest, params, data, sigma_n, *, objective, steps, batch, seed, lr,
          consistency_weight=0.0, consistency_options=None, ambient_options=None,
          start_step=0, opt_state=None, ema=None, lr_decay=None, mixture=None):
  """Runs `steps` Adam steps from `start_step`; randomness is a function of (seed, step).
  lr_decay: see `learning_rate`; mixture: see `_chunk_runner`.

  Returns (params, opt_state, ema_params).
  """
  optimizer, run_chunk = _chunk_runner(graphdef, rest, objective, batch, lr, consistency_weight,
                                       consistency_options or {}, ambient_options or {}, CHUNK,
                                       lr_decay, mixture)
  opt_state = optimizer.init(params) if opt_state is None else opt_state
  carry = (params, opt_state, params if ema is None else ema)
  data, sigma_n, values = jnp.asarray(data), jnp.asarray(sigma_n), []
  for first in range(start_step, start_step + steps, CHUNK):
    carry, chunk_values = run_chunk(carry, first, data, sigma_n, jnp.int32(seed))
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


def split_denoiser(above, below, sigma_n):
  """`above` at σ > σ_n and `below` at σ ≤ σ_n: (x [B, D], σ [B]) -> [B, D]. With the exact
  E[x0 | x_σ] on one side, a model's samples show which side of σ_n limits them."""
  return lambda x, s: jnp.where((s > sigma_n)[:, None], above(x, s), below(x, s))


def evaluate(graphdef, rest, params, mixture, sigmas, key, num_samples, seed, sigma_n):
  """(relative errors [S], full samples [N, D], truncated samples [N, D], diagnosis) for one
  model; diagnosis: full samples [N, D] from the same latents with the exact denoiser
  everywhere (the sampler's own error), below σ_n only, or above σ_n only."""

  @jax.jit
  def run(params, key, seed):
    fn = denoiser(graphdef, rest, params)
    errors = denoiser_errors(fn, mixture, sigmas, key)
    latents = sampling.latents_from_keys(jax.random.split(jax.random.key(seed), num_samples), (mixture.dim,))
    full = sampling.edm_sampler(fn, latents, num_steps=18)
    truncated = sampling.edm_sampler(fn, latents, num_steps=18, sigma_stop=jnp.full((num_samples,), sigma_n))
    exact = mixture.denoise
    diagnosis = {name: sampling.edm_sampler(f, latents, num_steps=18) for name, f in (
        ("exact", exact), ("exact_below_sigma_n", split_denoiser(fn, exact, sigma_n)),
        ("exact_above_sigma_n", split_denoiser(exact, fn, sigma_n)))}
    return errors, full, truncated, diagnosis

  key_ = (graphdef, *(np.asarray(a).tobytes() for a in (mixture.means, mixture.stds,
                                                        mixture.weights, sigmas)),
          num_samples, sigma_n)
  if key_ not in _EVALUATORS:
    _EVALUATORS[key_] = run
  return _EVALUATORS[key_](params, key, jnp.int32(seed))


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
    spec = {"data": noisy, "sigma_n": sn, **spec}  # ablation variants train on the noisy data,
    if spec.pop("clean_data", False):  # ... but for the clean oracle of a set
      spec.update(data=clean, sigma_n=zeros)
    t0 = time.time()
    train_kw = dict(objective=spec["objective"], ambient_options=spec.get("ambient_options"), **common)
    if "fork" in spec:  # continue the ambient run's first half with the consistency term
      p, o, e = first_halves[spec["fork"]]
      more = spec.get("consistency_steps", args.steps - half)
      decay = (spec["lr_decay_to"], half, more) if "lr_decay_to" in spec else None
      _, _, ema = train(graphdef, rest, p, spec["data"], spec["sigma_n"], steps=more,
                        start_step=half, opt_state=o, ema=e, consistency_weight=spec["consistency_weight"],
                        consistency_options=spec.get("consistency_options"), lr_decay=decay,
                        mixture=mixture, **train_kw)
    else:
      state = train(graphdef, rest, params0, spec["data"], spec["sigma_n"], steps=half, **train_kw)
      first_halves[method] = state
      _, _, ema = train(graphdef, rest, state[0], spec["data"], spec["sigma_n"], steps=args.steps - half,
                        start_step=half, opt_state=state[1], ema=state[2], **train_kw)
    seconds = time.time() - t0
    errors, full, truncated, diagnosis = evaluate(graphdef, rest, ema, mixture, sigmas, k_eval,
                                                  args.num_samples, args.seed + 2, sigma_n)
    errors = np.asarray(errors)
    sw_full, sw_trunc = (sliced_wasserstein(s, reference, k_sw) for s in (full, truncated))
    sw_diagnosis = {k: sliced_wasserstein(s, reference, k_sw) for k, s in diagnosis.items()}
    chosen = truncated if spec["stop"] is not None else full
    results[method] = {
        "denoiser_rel_error_above_sigma_n": float(np.mean(errors[sigmas > sigma_n])),
        "denoiser_rel_error_below_sigma_n": float(np.mean(errors[sigmas < sigma_n])),
        "sliced_wasserstein": sw_trunc if spec["stop"] is not None else sw_full,
        "sliced_wasserstein_full_sampling": sw_full,
        "sliced_wasserstein_truncated_sampling": sw_trunc,
        # full sampling with the exact denoiser everywhere / below σ_n only / above σ_n only
        "sliced_wasserstein_with_exact_denoiser": sw_diagnosis,
        "sampling": "truncated" if spec["stop"] is not None else "full",
        "train_seconds": seconds,
        "errors_by_sigma": errors.tolist(),
    }
    results[method]["_samples"] = np.asarray(chosen)
    print(f"  {name} σ_n={sigma_n:<5} {method:<22} above {results[method]['denoiser_rel_error_above_sigma_n']:.3f}"
          f"  below {results[method]['denoiser_rel_error_below_sigma_n']:.3f}  SW {results[method]['sliced_wasserstein']:.4f}"
          f"  (exact below σ_n {sw_diagnosis['exact_below_sigma_n']:.4f}, exact above"
          f" {sw_diagnosis['exact_above_sigma_n']:.4f}, exact {sw_diagnosis['exact']:.4f})"
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


LOCAL = {"gap": 0.5, "anchor_steps": 4}  # σ_a = 2 σ_b, reached from the start by 4 steps


def high_noise_variants(args, sigma_n):
  """The below-σ_n research set (README "Below σ_n at high noise"; measured at σ_n = 0.1
  and 0.2): the consistency default and what was tried against it; every below-σ_n
  variant continues the same ambient run's first half."""
  base = dict(objective="ambient", stop=None, fork="ambient")
  em = {"kind": "posterior_sample", "step": "euler_maruyama"}  # the EM term as first measured
  em_cov = {**em, "step": "posterior_cov", "chain_steps": 16}
  # 16 exact-variance steps with targets down to 0.01 σ_n: the base of the 2026-12-05 variants
  to_sigma_min = {"step": "posterior_cov", "chain_steps": 16, "target_min_ratio": 0.01}
  return {
      "ambient": dict(objective="ambient", stop=sigma_n),
      "clean_edm": dict(objective="edm", stop=None, clean_data=True),  # the oracle, same seed and budget
      "consistency": dict(base, consistency_weight=10.0),
      "consistency_lam1": dict(base, consistency_weight=1.0),
      "consistency_6k_steps": dict(base, consistency_weight=10.0, consistency_steps=6000),
      "consistency_lr_decay": dict(base, consistency_weight=10.0, lr_decay_to=1e-5),
      "consistency_lam100_lr_decay": dict(base, consistency_weight=100.0, lr_decay_to=1e-5),
      "consistency_edm_weighting": dict(base, consistency_weight=1.0,
                                        consistency_options={"weighting": "edm"}),
      "posterior_sample": dict(base, consistency_weight=1.0, consistency_options=em),
      "posterior_sample_6k_steps": dict(base, consistency_weight=1.0, consistency_steps=6000,
                                        consistency_options=em),
      "posterior_sample_lam10": dict(base, consistency_weight=10.0, consistency_options=em),
      "posterior_sample_below_half": dict(base, consistency_weight=1.0,
                                          consistency_options={**em, "target_max_ratio": 0.5}),
      # draws with Tweedie's variance (exact spread for Gaussian clusters, any step count)
      "posterior_sample_cov": dict(base, consistency_weight=1.0,
                                   consistency_options={**em_cov, "chain_steps": 4}),
      "posterior_sample_cov_16": dict(base, consistency_weight=1.0, consistency_options=em_cov),
      "posterior_sample_cov_16_6k_steps": dict(base, consistency_weight=1.0, consistency_steps=6000,
                                               consistency_options=em_cov),
      "posterior_sample_cov_16_lr_decay": dict(base, consistency_weight=1.0, lr_decay_to=1e-5,
                                               consistency_options=em_cov),
      "posterior_sample_cov_16_below_half": dict(base, consistency_weight=1.0,
                                                 consistency_options={**em_cov, "target_max_ratio": 0.5}),
      "consistency_cov": dict(base, consistency_weight=10.0, consistency_options={"step": "posterior_cov"}),
      # why exact-variance chains lose at σ_n = 0.1 (docs/results_toy.md): more chains per
      # example (the estimator's noise), and the local form (anchor just above σ_b)
      "consistency_cov_8_chains": dict(base, consistency_weight=10.0,
                                       consistency_options={"step": "posterior_cov", "num_samples": 8}),
      "consistency_local": dict(base, consistency_weight=10.0, consistency_options=LOCAL),
      "consistency_cov_local": dict(base, consistency_weight=10.0,
                                    consistency_options={**LOCAL, "step": "posterior_cov"}),
      # 16-D at σ_n = 0.2 (docs/results_toy.md): longer exact chains, longer training, a
      # σ-dependent weight, and both below-σ_n terms at once (EM at its own λ = 1)
      "consistency_cov_16_steps": dict(base, consistency_weight=10.0, consistency_options={
          "step": "posterior_cov", "chain_steps": 16}),
      "consistency_cov_6k_steps": dict(base, consistency_weight=10.0, consistency_steps=6000,
                                       consistency_options={"step": "posterior_cov"}),
      "consistency_cov_edm_weighting": dict(base, consistency_weight=1.0, consistency_options={
          "step": "posterior_cov", "weighting": "edm"}),
      "consistency_cov_plus_em": dict(base, consistency_weight=10.0, consistency_options={
          "step": "posterior_cov", "plus": {**em_cov, "weight": 0.1}}),
      # after 16 steps met the error target but not sliced W2: still longer chains, and 16
      # steps trained three times as long
      "consistency_cov_32_steps": dict(base, consistency_weight=10.0, consistency_options={
          "step": "posterior_cov", "chain_steps": 32}),
      "consistency_cov_16_steps_6k_steps": dict(base, consistency_weight=10.0,
                                                consistency_steps=6000, consistency_options={
                                                    "step": "posterior_cov", "chain_steps": 16}),
      # ... and 8 chains per example instead of 2 (the estimator's variance)
      "consistency_cov_16_steps_8_chains": dict(base, consistency_weight=10.0, consistency_options={
          "step": "posterior_cov", "chain_steps": 16, "num_samples": 8}),
      # the sampler's last steps (σ < 0.1 σ_n) use a denoiser no target level reaches: targets
      # down to 0.01 σ_n (σ 0.002 at σ_n = 0.2, the sampler's σ_min)
      "consistency_cov_16_steps_targets_to_sigma_min": dict(base, consistency_weight=10.0,
                                                            consistency_options=to_sigma_min),
      # ... and λ_c = 30: the error left is the mid range below σ_n (σ = 0.2–0.5 σ_n)
      "consistency_cov_16_steps_targets_to_sigma_min_lam30": dict(
          base, consistency_weight=30.0, consistency_options=to_sigma_min),
      # whose error the mid range inherits: the anchor and chains by another denoiser (the
      # exact one everywhere, or on one side of σ_n; or the EMA network), the trained
      # network only at the chains' ends
      **{f"consistency_cov_16_steps_targets_to_sigma_min_teacher_{teacher}": dict(
          base, consistency_weight=10.0, consistency_options={**to_sigma_min, "teacher": teacher})
          for teacher in TEACHERS},
      # the anchor's own error is what the mid range inherits (exact above σ_n: SW at the
      # oracle's): the data's unbiased anchor instead, T = (x_n − a x_s) / (1 − a), with starts
      # up to 2 σ_n from 1.05 σ_n (the default) or from 1.5 σ_n up to 3 σ_n (T's variance
      # grows as σ_n⁴ / (σ_s² − σ_n²))
      "consistency_cov_16_steps_targets_to_sigma_min_data_anchor": dict(
          base, consistency_weight=10.0, consistency_options={**to_sigma_min, "anchor": "data"}),
      # its gradients are unbiased but noisy (T's variance): a decaying learning rate
      "consistency_cov_16_steps_targets_to_sigma_min_data_anchor_lr_decay": dict(
          base, consistency_weight=10.0, lr_decay_to=1e-5, consistency_options={**to_sigma_min, "anchor": "data"}),
      # ... and the network's anchor beside it (a second term at the same λ_c): in expectation
      # the mean of the two anchors, the data's noise relative to the signal halved
      "consistency_cov_16_steps_targets_to_sigma_min_data_anchor_plus_network_anchor": dict(
          base, consistency_weight=10.0, consistency_options={
              **to_sigma_min, "anchor": "data", "plus": {**to_sigma_min, "kind": "consistency", "weight": 1.0}}),
      "consistency_cov_16_steps_targets_to_sigma_min_data_anchor_far": dict(
          base, consistency_weight=10.0, consistency_options={**to_sigma_min, "anchor": "data",
              "start_min_ratio": 1.5, "start_max_ratio": 3.0}),
  }


ABLATIONS = {"loss_options": (ablation_variants, 0.1), "high_noise": (high_noise_variants, 0.2)}
DATASETS = {"2d": ("2d_four_clusters", gaussian_mixture.four_clusters_2d),
            "16d": ("16d_eight_clusters", lambda: gaussian_mixture.random_clusters(16, 8))}
METRICS = ("denoiser_rel_error_above_sigma_n", "denoiser_rel_error_below_sigma_n", "sliced_wasserstein")


def run_ablation(args):
  """Every variant of one ablation set on one (dataset, σ_n), once per seed; returns
  {"seeds": [run per seed], "summary": {variant: {metric: [mean, std]}}}."""
  make_variants, default_sigma_n = ABLATIONS[args.ablate]
  sigma_n = default_sigma_n if args.sigma_n is None else args.sigma_n
  name, make_mixture = DATASETS[args.data]
  variants = make_variants(args, sigma_n)
  if args.variants:
    unknown = sorted(set(args.variants) - set(variants))
    if unknown:
      raise SystemExit(f"unknown --variants {unknown}; {args.ablate} has {sorted(variants)}")
    variants = {k: v for k, v in variants.items() if k == "ambient" or k in args.variants}
  runs = []
  for seed in args.seeds or [args.seed]:
    print(f"== {args.ablate}: {name}, σ_n = {sigma_n}, seed {seed}", flush=True)
    runs.append(run_setting(name, make_mixture(), sigma_n, argparse.Namespace(**{**vars(args), "seed": seed}),
                            variants=variants))
  summary = {m: {k: [float(np.mean([r["methods"][m][k] for r in runs])),
                     float(np.std([r["methods"][m][k] for r in runs]))] for k in METRICS}
             for m in variants}
  return {"ablation": args.ablate, "dataset": name, "sigma_n": sigma_n, "seeds": runs,
          "summary": summary, "clean_floor": float(np.mean([r["sliced_wasserstein_clean_floor"] for r in runs]))}


def print_ablation(result):
  n = len(result["seeds"])
  spread = " (mean ± std over %d seeds)" % n if n > 1 else ""
  print(f"\n{result['dataset']}, σ_n = {result['sigma_n']}{spread}")
  print("| variant | rel. error above | rel. error below | sliced W2 |")
  print("|---|---|---|---|")
  for m, r in result["summary"].items():
    cells = [f"{r[k][0]:.3f} ± {r[k][1]:.3f}" if n > 1 else f"{r[k][0]:.3f}" for k in METRICS]
    print(f"| {m} | " + " | ".join(cells) + " |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  _output.add_out_flags(parser, "toy_exactness")
  parser.add_argument("--quick", action="store_true",
                      help="one setting (2-D, σ_n = 0.1), 2,000 steps: ≈ 2 minutes")
  parser.add_argument("--ablate", nargs="?", const="loss_options", choices=sorted(ABLATIONS),
                      help="compare loss options instead: loss_options (2-D, σ_n = 0.1) or "
                           "high_noise (the σ_n = 0.2 research set)")
  parser.add_argument("--data", choices=sorted(DATASETS), default="2d", help="--ablate: the mixture")
  parser.add_argument("--sigma_n", type=float, default=None, help="--ablate: σ_n (default per set)")
  parser.add_argument("--seeds", type=int, nargs="+", default=None, help="--ablate: one run per seed")
  parser.add_argument("--variants", nargs="+", default=None,
                      help="--ablate: only these variants (and the ambient run they fork from)")
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
  outputs = _output.OutputFolder(args.out, "toy_exactness", quick=args.quick)
  args.out = outputs.folder
  t0 = time.time()
  if args.ablate:
    result = run_ablation(args)
    tag = "" if args.ablate == "loss_options" else f"_{args.ablate}_{args.data}_sigma{result['sigma_n']}"
    with open(os.path.join(args.out, f"ablation{tag}.json"), "w") as f:
      json.dump({**result, "args": vars(args), "wall_seconds": time.time() - t0}, f, indent=1)
    print_ablation(result)
    print(f"\nwall time {time.time() - t0:.0f} s")
    outputs.report()
    return
  settings = ([("2d", 0.1)] if args.quick else [(d, s) for d in DATASETS for s in (0.1, 0.2)])
  runs = [run_setting(DATASETS[d][0], DATASETS[d][1](), s, args, plot_dir=args.out) for d, s in settings]
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"runs": runs, "args": vars(args), "wall_seconds": time.time() - t0}, f, indent=1)
  print_table(runs)
  print(f"\nwall time {time.time() - t0:.0f} s")
  outputs.report()


if __name__ == "__main__":
  main()
