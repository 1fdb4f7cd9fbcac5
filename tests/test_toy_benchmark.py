"""The toy benchmark's metrics against their closed forms."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import toy_exactness  # noqa: E402

from ambient_jax import gaussian_mixture  # noqa: E402


def test_relative_error_is_zero_for_the_exact_denoiser_and_one_for_the_identity():
  mix = gaussian_mixture.four_clusters_2d()
  sigmas = np.geomspace(0.01, 5.0, 6)
  exact = toy_exactness.denoiser_errors(mix.denoise, mix, sigmas, jax.random.key(0), n=500)
  identity = toy_exactness.denoiser_errors(lambda x, s: x, mix, sigmas, jax.random.key(0), n=500)
  np.testing.assert_allclose(np.asarray(exact), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(identity), 1.0, rtol=1e-5)


def test_sliced_wasserstein_is_zero_for_equal_sets_and_the_shift_for_a_translate():
  a = jax.random.normal(jax.random.key(0), (2000, 1))
  assert toy_exactness.sliced_wasserstein(a, a, jax.random.key(1)) < 1e-6
  # in 1-D every projection is ±identity, so the distance is exactly the shift
  np.testing.assert_allclose(toy_exactness.sliced_wasserstein(a, a + 0.3, jax.random.key(1)), 0.3, rtol=1e-4)
