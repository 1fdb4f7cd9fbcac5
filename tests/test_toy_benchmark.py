"""The toy benchmark's metrics against their closed forms."""

import json
import os
import sys

import jax
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


def test_split_denoiser_takes_each_side_of_sigma_n_from_its_own_denoiser():
  mix = gaussian_mixture.four_clusters_2d()
  x = jax.random.normal(jax.random.key(0), (4, 2))
  s = np.array([0.05, 0.2, 0.21, 3.0], np.float32)
  split = np.asarray(toy_exactness.split_denoiser(lambda x, s: x, mix.denoise, 0.2)(x, s))
  np.testing.assert_allclose(split[:2], np.asarray(mix.denoise(x, s))[:2], rtol=1e-6)  # σ ≤ σ_n: below
  np.testing.assert_allclose(split[2:], np.asarray(x)[2:])  # σ > σ_n: above


def test_consistency_teachers_are_the_ema_or_the_exact_denoiser_on_the_named_side_of_sigma_n():
  mix = gaussian_mixture.four_clusters_2d()
  x = jax.random.normal(jax.random.key(0), (4, 2))
  s = np.array([0.05, 0.2, 0.21, 3.0], np.float32)
  network, ema = (lambda x, s: x), (lambda x, s: 2 * x)
  teacher = lambda name: np.asarray(toy_exactness._teacher(name, network, ema, mix, 0.2)(x, s))
  exact = np.asarray(mix.denoise(x, s))
  np.testing.assert_allclose(teacher("ema"), 2 * np.asarray(x))
  np.testing.assert_allclose(teacher("exact"), exact, rtol=1e-6)
  np.testing.assert_allclose(teacher("exact_above_sigma_n"), np.concatenate([x[:2], exact[2:]]), rtol=1e-6)
  np.testing.assert_allclose(teacher("exact_below_sigma_n"), np.concatenate([exact[:2], x[2:]]), rtol=1e-6)
  with np.testing.assert_raises_regex(ValueError, "unknown consistency teacher"):
    toy_exactness._chunk_runner(None, None, "ambient", 8, 1e-3, 1.0, {"teacher": "oracle"}, {}, 10)


def test_learning_rate_is_constant_or_a_cosine_over_the_given_steps():
  constant = toy_exactness.learning_rate(1e-3)
  assert float(constant(0)) == float(constant(10_000)) == np.float32(1e-3)
  decay = toy_exactness.learning_rate(1e-3, (1e-5, 2000, 4000))
  np.testing.assert_allclose([float(decay(c)) for c in (0, 2000, 4000, 6000, 9000)],
                             [1e-3, 1e-3, (1e-3 + 1e-5) / 2, 1e-5, 1e-5], rtol=1e-5)


def test_ablation_runs_each_seed_and_summarizes_mean_and_spread(tmp_path):
  """A tiny --ablate high_noise run: one forked below-σ_n variant (both below-σ_n terms at once), two seeds."""
  toy_exactness.main(["--out", str(tmp_path), "--ablate", "high_noise", "--variants", "consistency_cov_plus_em",
                      "--seeds", "0", "1", "--steps", "500", "--batch", "64", "--train_size", "512",
                      "--num_samples", "256", "--width", "16"])
  result = json.loads((tmp_path / "ablation_high_noise_2d_sigma0.2.json").read_text())
  assert [r["dataset"] for r in result["seeds"]] == ["2d_four_clusters"] * 2
  assert set(result["summary"]) == {"ambient", "consistency_cov_plus_em"}
  for variant, metrics in result["summary"].items():
    below = [r["methods"][variant]["denoiser_rel_error_below_sigma_n"] for r in result["seeds"]]
    np.testing.assert_allclose(metrics["denoiser_rel_error_below_sigma_n"], [np.mean(below), np.std(below)],
                               rtol=1e-6)
  # the seeds differ, and the forked variant trained on from the ambient run
  first = result["seeds"][0]["methods"]
  assert result["summary"]["ambient"]["denoiser_rel_error_below_sigma_n"][1] > 0
  assert first["consistency_cov_plus_em"]["errors_by_sigma"] != first["ambient"]["errors_by_sigma"]
  # the diagnosis samples: the exact denoiser everywhere is the same sampler run for every model
  diagnosis = [first[m]["sliced_wasserstein_with_exact_denoiser"] for m in first]
  assert diagnosis[0]["exact"] == diagnosis[1]["exact"]
  assert diagnosis[0]["exact_below_sigma_n"] != diagnosis[1]["exact_below_sigma_n"]
