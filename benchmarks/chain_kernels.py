"""How consistent is the exact denoiser under each reverse-chain kernel? (closed form)

    python benchmarks/chain_kernels.py [--out DIR] [--quick]   # 931 s on 2 shared cores; --quick ≈ 40 s

The consistency loss (losses.consistency_loss, METHOD.md §5) asks E[D(X_b, σ_b) | x_a] =
D(x_a, σ_a) with X_b drawn from x_a by K reverse steps of the model itself. On the toy's
Gaussian mixtures the exact denoiser D* is known, so each kernel can be judged without
training: run the chains with D* and measure, over the loss's own draws of
(σ_a, σ_b, x_a) (σ_a = σ_n · logU[1.05, 2], σ_b = σ_n · logU[0.1, 0.95], K = 4):
  residual    E‖E[D*(X_b, σ_b) | x_a] − D*(x_a, σ_a)‖² / E‖x_b − D*(x_b, σ_b)‖²: how far
              D* is from a fixed point of the loss under that kernel (0 for the exact
              kernel; the bias a model trained with it inherits);
  spread      E tr Cov[X_b | x_a], against the exact kernel's;
  visibility  for a perturbation δ(x) = sin(ω uᵀx) of D(·, σ_b) (u a random unit
              direction, ω = 32: wavelength ≈ 2.5 cluster stds), E‖E[δ(X_b) | x_a]‖² /
              E‖δ(X_b)‖²: the share of its energy the loss can see at all (a wide kernel
              averages it away), for far (σ_b ≤ 0.3 σ_n) and near targets.
Kernels: "posterior" (sampling.posterior_step without x0 variance: the trainer's
default), "posterior_cov" (the library's, one Rademacher probe of D*'s Jacobian),
"cov_exact_trace" (the same with tr ∂D*/∂x exact), "full_cov" (x0 variance σ² ∂D*/∂x as a
full matrix: the Gaussian approximation of p(x0 | x) in each step), and "exact" (x0 drawn
from p(x0 | x) itself: `GaussianMixture.posterior_sample`). Writes DIR/chain_kernels.txt
(and _quick) and prints it; the committed run is `--out benchmarks/results`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ambient_jax import gaussian_mixture, sampling  # noqa: E402
import _output  # noqa: E402  (benchmarks/, beside this file)

KERNELS = ("posterior", "posterior_cov", "cov_exact_trace", "full_cov", "exact")
DATASETS = {"2-D": gaussian_mixture.four_clusters_2d,
            "16-D": lambda: gaussian_mixture.random_clusters(16, 8)}
FREQUENCY = 32.0
CHAIN_STEPS = 4


def _jacobian(mixture, x, sigma):
  """∂D*/∂x per row: x [B, D], σ [B] -> [B, D, D]."""
  one = lambda xi, si: jax.jacfwd(lambda y: mixture.denoise(y[None], si[None])[0])(xi)
  return jax.vmap(one)(x, sigma)


def step_fn(kernel: str, mixture):
  """(x [B, D], σ_i [B], σ_j [B], key) -> x at σ_j: one reverse step of `kernel` driven by D*."""
  denoise = mixture.denoise

  def library(x, si, sj, key):  # the project's own steps, as reverse_chain runs them
    return sampling.reverse_chain(denoise, x, si, sj, 1, key, "posterior_cov"
                                  if kernel == "posterior_cov" else "posterior")

  def exact_trace(x, si, sj, key):
    variance = si ** 2 * jnp.trace(_jacobian(mixture, x, si), axis1=1, axis2=2) / x.shape[1]
    return sampling.posterior_step(denoise(x, si), x, si, sj, jax.random.normal(key, x.shape),
                                   variance)

  def full_cov(x, si, sj, key):
    jac = _jacobian(mixture, x, si)
    cov_x0 = si[:, None, None] ** 2 * 0.5 * (jac + jnp.swapaxes(jac, 1, 2))
    ratio = (sj / si) ** 2
    keep = 1.0 - ratio
    eye = jnp.eye(x.shape[1])
    cov = (sj ** 2 * keep)[:, None, None] * eye + (keep ** 2)[:, None, None] * cov_x0
    root = jnp.linalg.cholesky(cov + 1e-12 * eye)
    return (ratio[:, None] * x + keep[:, None] * denoise(x, si)
            + jnp.einsum("bij,bj->bi", root, jax.random.normal(key, x.shape)))

  def exact(x, si, sj, key):
    k_x0, k_noise = jax.random.split(key)
    x0 = mixture.posterior_sample(x, si, k_x0)  # the step's mean and noise given a true x0
    return sampling.posterior_step(x0, x, si, sj, jax.random.normal(k_noise, x.shape))

  return {"posterior": library, "posterior_cov": library, "cov_exact_trace": exact_trace,
          "full_cov": full_cov, "exact": exact}[kernel]


def measure(mixture, sigma_n: float, kernel: str, n: int, chains: int, seed: int = 0) -> dict:
  """The three measures for one (mixture, σ_n, kernel) over n start points, `chains` chains each."""
  k_x0, k_a, k_b, k_noise, k_chain, k_ref, k_dir = jax.random.split(jax.random.key(seed), 7)
  log_uniform = lambda k, lo, hi: sigma_n * jnp.exp(jax.random.uniform(
      k, (n,), minval=np.log(lo), maxval=np.log(hi)))
  x0 = mixture.sample(k_x0, n)
  sigma_a, sigma_b = log_uniform(k_a, 1.05, 2.0), log_uniform(k_b, 0.1, 0.95)
  x_a = x0 + sigma_a[:, None] * jax.random.normal(k_noise, x0.shape)
  direction = jax.random.normal(k_dir, (mixture.dim,))
  direction = direction / jnp.linalg.norm(direction)
  step = step_fn(kernel, mixture)

  @jax.jit
  def chains_from(x_a, sigma_a, sigma_b, key):
    tile = lambda v: jnp.repeat(v, chains, axis=0)
    levels = sampling.geometric_levels(tile(sigma_a), tile(sigma_b), CHAIN_STEPS)
    x = tile(x_a)
    for k in range(CHAIN_STEPS):
      x = step(x, levels[k], levels[k + 1], jax.random.fold_in(key, k))
    denoised = mixture.denoise(x, tile(sigma_b))
    return x.reshape(n, chains, -1), denoised.reshape(n, chains, -1)

  x_b, d_b = chains_from(x_a, sigma_a, sigma_b, k_chain)
  mean_b = d_b.mean(1)
  # E‖mean − D*(x_a)‖² less the Monte Carlo part of the chains' own spread (unbiased).
  residual = jnp.sum(jnp.square(mean_b - mixture.denoise(x_a, sigma_a)), -1) - jnp.sum(
      d_b.var(1, ddof=1), -1) / chains
  x_ref = x0 + sigma_b[:, None] * jax.random.normal(k_ref, x0.shape)  # x_b's true law
  scale = jnp.mean(jnp.sum(jnp.square(x_ref - mixture.denoise(x_ref, sigma_b)), -1))
  wave = jnp.sin(FREQUENCY * (x_b @ direction) + 0.3)  # [n, chains]
  seen = (jnp.square(wave.mean(1)) - wave.var(1, ddof=1) / chains) / jnp.mean(jnp.square(wave), 1)
  far = np.asarray(sigma_b <= 0.3 * sigma_n)
  seen = np.asarray(seen)
  residual = np.asarray(residual) / float(scale)
  return dict(residual=float(residual.mean()), residual_se=float(residual.std(ddof=1) / np.sqrt(n)),
              spread=float(jnp.mean(jnp.sum(x_b.var(1, ddof=1), -1))),
              visibility_far=float(seen[far].mean()), visibility_near=float(seen[~far].mean()))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="2-D at σ_n = 0.2, fewer chains")
  p.add_argument("--sigma_n", type=float, nargs="+", default=None,
                 help="noise levels (default 0.05 0.1 0.2 0.4; --quick 0.2)")
  p.add_argument("--starts", type=int, default=None, help="start points x_a (default 1000)")
  p.add_argument("--chains", type=int, default=None, help="chains per start (default 256)")
  _output.add_out_flags(p, "chain_kernels")
  args = p.parse_args(argv)
  q = args.quick
  sigmas = args.sigma_n or ([0.2] if q else [0.05, 0.1, 0.2, 0.4])
  n, chains = args.starts or (400 if q else 1000), args.chains or (64 if q else 256)
  datasets = {"2-D": DATASETS["2-D"]} if q else DATASETS
  lines = [f"# chain_kernels: {n} starts × {chains} chains, K = {CHAIN_STEPS}, ω = {FREQUENCY}",
           "| data | σ_n | kernel | residual ± s.e. | spread (exact's) | visibility far / near |",
           "|---|---|---|---|---|---|"]
  print("\n".join(lines), flush=True)
  t0 = time.time()
  for name, make in datasets.items():
    mixture = make()
    for sigma_n in sigmas:
      rows = {k: measure(mixture, sigma_n, k, n, chains) for k in KERNELS}
      for k, r in rows.items():
        line = (f"| {name} | {sigma_n} | {k} | {r['residual']:.4f} ± {r['residual_se']:.4f} | {r['spread']:.4f} "
                f"({r['spread'] / rows['exact']['spread']:.2f}×) | "
                f"{r['visibility_far']:.3f} / {r['visibility_near']:.3f} |")
        lines.append(line)
        print(line, flush=True)
  lines.append(f"({time.time() - t0:.0f} s)")
  outputs = _output.OutputFolder(args.out, "chain_kernels", quick=q)
  outputs.write_table(lines)
  outputs.report()
  return 0


if __name__ == "__main__":
  sys.exit(main())
