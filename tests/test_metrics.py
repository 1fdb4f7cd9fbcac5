"""Fréchet distance, KID and the FID Inception architecture (no real weights needed)."""

import numpy as np
import pytest
import scipy.linalg

from ambient_jax.metrics import frechet


def _random_spd(rng, d, scale=1.0):
  a = rng.normal(size=(d, d)) * scale
  return a @ a.T / d + 0.1 * np.eye(d)


def test_fd_diagonal_closed_form():
  rng = np.random.default_rng(0)
  m1, m2 = rng.normal(size=7), rng.normal(size=7)
  a, b = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7)
  expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert frechet.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_fd_general_matches_scipy_sqrtm_and_is_symmetric():
  rng = np.random.default_rng(1)
  d = 12
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d, 2.0)
  m1, m2 = rng.normal(size=d), rng.normal(size=d)
  ref = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(
      scipy.linalg.sqrtm(s1 @ s2)).real
  fd = frechet.frechet_distance(m1, s1, m2, s2)
  assert fd == pytest.approx(ref, rel=1e-8)
  assert frechet.frechet_distance(m2, s2, m1, s1) == pytest.approx(fd, rel=1e-8)
  assert frechet.frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fd_rank_deficient_covariances_stay_finite_and_exact():
  # Rank-1 covariances (fewer samples than dims): Σ1 = u uᵀ, Σ2 = v vᵀ ->
  # tr √(Σ1Σ2) = |u·v|, so FD = |u|² + |v|² − 2|u·v| for equal means.
  rng = np.random.default_rng(2)
  u, v = rng.normal(size=30), rng.normal(size=30)
  fd = frechet.frechet_distance(np.zeros(30), np.outer(u, u), np.zeros(30), np.outer(v, v))
  assert fd == pytest.approx(u @ u + v @ v - 2 * abs(u @ v), rel=1e-6)


def test_feature_stats_streaming_matches_numpy_and_merge():
  rng = np.random.default_rng(3)
  f = rng.normal(size=(500, 9)) * 3 + 5
  s = frechet.FeatureStats(9)
  for chunk in np.array_split(f, 7):
    s.update(chunk)
  np.testing.assert_allclose(s.mean, f.mean(0), rtol=1e-12)
  np.testing.assert_allclose(s.cov, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-11)
  merged = frechet.FeatureStats(9).update(f[:200]).merge(frechet.FeatureStats(9).update(f[200:]))
  np.testing.assert_allclose(merged.cov, s.cov, rtol=1e-10)
  with pytest.raises(ValueError, match=r"\[n, 9\]"):
    s.update(np.zeros((3, 8)))


def test_fd_of_samples_converges_to_closed_form():
  rng = np.random.default_rng(4)
  a, b = np.array([1.0, 2.0, 0.5]), np.array([0.5, 1.0, 3.0])
  x = rng.normal(size=(40000, 3)) * np.sqrt(a)
  y = rng.normal(size=(40000, 3)) * np.sqrt(b) + 1.0
  expected = 3.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert frechet.fd_from_features(x, y) == pytest.approx(expected, rel=0.03)


def test_mmd_unbiased_matches_explicit_loops():
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(6, 4)), rng.normal(size=(5, 4)) + 0.3
  k = lambda p, q: (p @ q / 4 + 1) ** 3
  xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
  yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
  xy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / 30
  assert frechet.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_near_zero_for_same_distribution_and_positive_for_shift():
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
  same, same_std = frechet.kernel_inception_distance(x, y, num_subsets=20, subset_size=300)
  shifted, _ = frechet.kernel_inception_distance(x, y + 0.5, num_subsets=20, subset_size=300)
  assert abs(same) < 3 * same_std + 1e-3
  assert shifted > 20 * max(abs(same), same_std)


# ----------------------------------------------------------------------------- Inception


def test_inception_architecture_param_count_and_output_shape():
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from ambient_jax.metrics import inception
  model = nnx.eval_shape(lambda: inception.FIDInceptionV3(rngs=nnx.Rngs(0)))
  flat = inception.flat_state(model)
  size = lambda leaf: sum(v.size for k, v in flat.items() if k.endswith("/" + leaf))
  # 94 conv+BN layers. torchvision counts conv kernels + BN weight/bias as parameters:
  # Inception3 without AuxLogits and fc = 21,785,568. The TF graph (BN without gamma)
  # holds kernels + beta + moving mean + moving variance = 21,802,784.
  assert sum(k.endswith("/kernel") for k in flat) == 94
  assert size("kernel") + size("scale") + size("bias") == 21_785_568
  assert size("kernel") + size("bias") + size("mean") + size("var") == 21_802_784
  out = jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert out.shape == (2, inception.FEATURE_DIM)
  out = jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((3, 28, 28, 1), jnp.float32))
  assert out.shape == (3, 2048)


def _torch_bilinear_reference(x, size):
  """numpy port of torch F.interpolate(bilinear, align_corners=False) on NHWC."""
  def axis_weights(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    w = np.zeros((n_out, n_in))
    w[np.arange(n_out), i0] += 1 - lam
    w[np.arange(n_out), i1] += lam
    return w
  wh, ww = axis_weights(x.shape[1], size), axis_weights(x.shape[2], size)
  return np.einsum("oh,bhwc,pw->bopc", wh, x, ww, optimize=True)


@pytest.mark.parametrize("n_in", [32, 400])
def test_resize_matches_torch_bilinear(n_in):
  from ambient_jax.metrics import inception
  x = np.random.default_rng(7).uniform(-1, 1, (1, n_in, n_in, 3)).astype(np.float32)
  got = np.asarray(inception.resize_bilinear(x, 299))
  np.testing.assert_allclose(got, _torch_bilinear_reference(x.astype(np.float64), 299), atol=2e-5)


def test_converter_name_mapping_on_fake_state_dict(tmp_path):
  from flax import nnx
  from ambient_jax.metrics import inception
  model = nnx.eval_shape(lambda: inception.FIDInceptionV3(rngs=nnx.Rngs(0)))
  flat = inception.flat_state(model)
  inverse = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
             "var": "running_var"}
  rng = np.random.default_rng(8)
  fake = {}
  for key, v in flat.items():
    parts = key.split("/")
    name = ".".join(parts[:-1] + [inverse[parts[-1]]])
    shape = v.shape if parts[-1] != "kernel" else (v.shape[3], v.shape[2], v.shape[0], v.shape[1])
    fake[name] = rng.normal(size=shape).astype(np.float32) if parts[-1] == "kernel" else \
        rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    if parts[-2] == "bn":
      fake[".".join(parts[:-1] + ["num_batches_tracked"])] = np.array(0)
  fake["fc.weight"], fake["fc.bias"] = np.zeros((1008, 2048)), np.zeros(1008)
  assert "Mixed_7c.branch3x3dbl_3b.conv.weight" in fake and "Conv2d_1a_3x3.bn.running_var" in fake
  converted = inception.convert_state_dict(fake)
  assert set(converted) == set(flat)
  for key, v in converted.items():
    assert v.shape == flat[key].shape, key
  w = fake["Mixed_6b.branch7x7_2.conv.weight"]  # [out, in, 1, 7] -> [1, 7, in, out]
  np.testing.assert_array_equal(converted["Mixed_6b/branch7x7_2/conv/kernel"][0, 5, 3, 2], w[2, 3, 0, 5])
  np.testing.assert_array_equal(converted["Mixed_5b/branch1x1/bn/var"], fake["Mixed_5b.branch1x1.bn.running_var"])
  with pytest.raises(ValueError, match="unexpected"):
    inception.convert_state_dict({"Mixed_5b.branch1x1.conv.bias": np.zeros(3)})
  # Round trip through an .npz and into a real model.
  path = tmp_path / "w.npz"
  np.savez(path, **converted)
  loaded = inception.load_weights(inception.FIDInceptionV3(rngs=nnx.Rngs(1)), str(path))
  got = inception.flat_state(loaded)
  np.testing.assert_array_equal(np.asarray(got["Mixed_7a/branch3x3_2/conv/kernel"]),
                                converted["Mixed_7a/branch3x3_2/conv/kernel"])
  np.testing.assert_array_equal(np.asarray(got["Conv2d_4a_3x3/bn/mean"]), converted["Conv2d_4a_3x3/bn/mean"])


def test_missing_weights_error_names_the_file_and_does_not_download(tmp_path):
  from ambient_jax.metrics import inception
  with pytest.raises(inception.MissingInceptionWeightsError, match="pt_inception-2015-12-05-6726825d.pth"):
    inception.load_fid_inception(str(tmp_path / "nope.npz"))
  with pytest.raises(inception.MissingInceptionWeightsError, match="Nothing is downloaded"):
    inception.load_fid_inception(None)


def test_digit_feature_net_trains_caches_and_separates_classes(tmp_path):
  from ambient_jax.metrics import digit_features as df
  logs = []
  net = df.get_digit_feature_net(12, seed=1, cache_dir=str(tmp_path), log=logs.append, steps=100)
  assert any("accuracy" in line for line in logs)
  assert 0.7 < net.test_accuracy <= 1.0  # chance is 0.1
  images, labels = df.load_digits(12)
  _, test_idx = df.split_indices(len(images), df.RECIPE["test_size"], 1)
  assert np.mean(net.predict(images[test_idx]) == labels[test_idx]) == pytest.approx(net.test_accuracy)
  logs.clear()
  again = df.get_digit_feature_net(12, seed=1, cache_dir=str(tmp_path), log=logs.append, steps=100)
  assert logs == []  # loaded, not retrained
  f1, f2 = net.features(images[:50]), again.features(images[:50])
  np.testing.assert_array_equal(f1, f2)
  assert f1.shape == (50, df.FEATURE_DIM)
  assert df.cache_key(12, 1, 100) != df.cache_key(12, 2, 100) != df.cache_key(16, 1, 100)
  # Features carry the class: FD between two halves of one class < FD between classes.
  f = net.features(images)
  zeros, ones = f[labels == 0], f[labels == 1]
  assert frechet.fd_from_features(zeros[:250], zeros[250:]) < 0.2 * frechet.fd_from_features(zeros, ones)
  with pytest.raises(ValueError, match=r"\[B, 12, 12, 1\]"):
    net.features(np.zeros((2, 16, 16, 1)))
