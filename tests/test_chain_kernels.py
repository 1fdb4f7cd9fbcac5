"""The exact mixture posterior and the chain-kernel benchmark against their closed forms."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import chain_kernels  # noqa: E402

from ambient_jax import gaussian_mixture  # noqa: E402
from tests import benchmark_outputs  # noqa: E402


def test_posterior_sample_draws_the_gaussian_posterior_and_averages_to_the_denoiser():
  # One cluster N(μ, s² I): p(x0 | x) = N(μ + s²/(s² + σ²)(x − μ), s²σ²/(s² + σ²) I).
  s, sigma, n = 0.3, 0.5, 20000
  single = gaussian_mixture.GaussianMixture(np.array([[1.0, -2.0]], np.float32),
                                            np.array([s], np.float32), np.ones(1, np.float32))
  x = jnp.tile(jnp.array([[0.4, 0.1]]), (n, 1))
  draws = single.posterior_sample(x, jnp.full((n,), sigma), jax.random.key(0))
  shrink = s ** 2 / (s ** 2 + sigma ** 2)
  np.testing.assert_allclose(draws.mean(0), [1.0 + shrink * (0.4 - 1.0), -2.0 + shrink * 2.1],
                             atol=4 * np.sqrt(shrink * sigma ** 2 / n))
  np.testing.assert_allclose(draws.var(0), shrink * sigma ** 2, rtol=0.05)
  # A mixture's draws are bimodal between clusters, and their mean is the exact denoiser.
  mix = gaussian_mixture.four_clusters_2d()
  x = jnp.tile(jnp.array([[0.0, 0.45]]), (n, 1))
  draws = mix.posterior_sample(x, jnp.full((n,), 0.3), jax.random.key(1))
  np.testing.assert_allclose(draws.mean(0), mix.denoise(x[:1], jnp.array([0.3]))[0], atol=0.01)
  assert 0.3 < float(jnp.mean(draws[:, 0] > 0)) < 0.7  # both upper clusters drawn


def test_exact_kernel_is_consistent_and_plain_posterior_steps_are_not(tmp_path, capsys):
  """--quick (2-D, σ_n = 0.2): with D* in the chains, the exact kernel's residual is zero
  within its standard error, plain posterior steps (no x0 variance) are far from
  consistent and too narrow, and posterior_cov steps sit close to exact."""
  assert chain_kernels.main(["--quick", "--out", str(tmp_path)]) == 0
  written = benchmark_outputs.printed_paths(capsys.readouterr().out)
  assert [p.name for p in written] == ["chain_kernels_quick.txt"]
  rows = {}
  for line in written[0].read_text().splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) == 6 and cells[2] in chain_kernels.KERNELS:
      residual, se = (float(v) for v in cells[3].split("±"))
      rows[cells[2]] = residual, se, float(cells[4].split("(")[1].rstrip("×)"))
  assert sorted(rows) == sorted(chain_kernels.KERNELS)
  exact, exact_se, _ = rows["exact"]
  assert abs(exact) < 4 * exact_se
  plain, plain_se, plain_spread = rows["posterior"]
  assert plain > 5 * abs(exact) + 4 * plain_se and plain_spread < 0.6
  cov, _, cov_spread = rows["posterior_cov"]
  assert cov < plain / 4 and cov_spread > 0.75
