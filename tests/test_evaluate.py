"""`python -m ambient_jax.evaluate` on a tiny trained workdir (2 steps, 8x8 digits)."""

import json
import os

import numpy as np
import pytest

from ambient_jax import evaluate

from ambient_jax.evaluation import common as eval_common

from ambient_jax.evaluation import pixel as pixel_eval


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  from ambient_jax.training import trainer as train
  from configs import default
  c = default.get_config()
  c.num_train_steps, c.batch_size = 2, 8
  c.data.resolution = c.model.img_resolution = 8
  c.data.max_examples = 64
  c.model.model_channels, c.model.channel_mult, c.model.num_blocks = 8, (1,), 1
  c.consistency.weight, c.optim.warmup_steps = 0.0, 0
  c.checkpoint.every_steps, c.sample.every_steps = 2, 0
  c.sample.num_images, c.sample.num_steps, c.log_every_steps = 8, 2, 1
  wd = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(c, wd)
  return wd


@pytest.fixture(scope="module")
def run(workdir):
  return pixel_eval.Run(workdir)


def test_evaluate_writes_metrics_and_pngs(workdir, run, tmp_path):
  result = evaluate.evaluate(
      workdir, run=run, sampling="truncated", num_samples=24, batch_size=16, num_steps=3,
      metrics=("fd", "kid", "memorization"), attack_images=16, posterior_steps=2,
      kid_subset_size=20, cache_dir=str(tmp_path), feature_steps=40)
  path = os.path.join(workdir, "eval", "2", "metrics.json")
  with open(path) as f:
    saved = json.load(f)
  assert saved["step"] == 2 and saved["sampling"] == "truncated"
  assert saved["sigma_stop"] == pytest.approx(0.2)
  assert np.isfinite(saved["fd_digits"]) and saved["fd_digits"] > 0
  assert np.isfinite(saved["kid_digits"])
  mem = saved["memorization"]
  for m in ("mmse", "posterior", "samples"):
    assert 0.0 <= mem[m]["frac_sim_above_0.95"] <= mem[m]["frac_sim_above_0.9"] <= 1.0
  assert mem["mmse"]["count"] == 16 and mem["samples"]["count"] == 24
  for key in ("samples_png", "memorization_png"):
    with open(result[key], "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # The numbers also reach the run's TensorBoard, at the evaluated step.
  scalars = _tensorboard_scalars(workdir)
  assert scalars[("eval/fd_digits", 2)] == pytest.approx(saved["fd_digits"], rel=1e-6)
  assert ("eval/memorization/mmse/frac_sim_above_0.95", 2) in scalars
  assert ("train_loss", 2) not in scalars and ("loss", 2) in scalars  # beside training's


def _tensorboard_scalars(workdir) -> dict:
  """{(tag, step): value} of every scalar in the workdir's TensorBoard event files."""
  import glob  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField("tensor") and not value.tensor.tensor_shape.dim:
          out[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
        elif value.HasField("simple_value"):
          out[(value.tag, event.step)] = value.simple_value
  return out


def test_samples_do_not_depend_on_batch_size(run):
  assert run.step == 2 and run.weights.startswith("ema0")
  fn = pixel_eval.make_sampler(run.model_def, run.dataset.image_shape, "stochastic", num_steps=3,
                             s_churn=10.0)
  kw = dict(seed=5, batch_sharding=run.batch_sharding, param_sharding=run.param_shardings, log=None)
  a = eval_common.generate(fn, run.params, 12, batch_size=8, **kw)   # 8 devices: 8 + 8 (padded)
  b = eval_common.generate(fn, run.params, 12, batch_size=16, **kw)  # one padded batch of 16
  assert a.shape == (12, 8, 8, 1)
  # Same keys -> same images; only float rounding differs between compiled batch shapes.
  np.testing.assert_allclose(a, b, atol=2e-3)
  c = eval_common.generate(fn, run.params, 12, batch_size=8, **dict(kw, seed=6))
  assert np.abs(a - c).max() > 1e-2


def test_bad_options_fail_before_any_work(workdir, tmp_path):
  from ambient_jax.metrics import inception
  with pytest.raises(inception.MissingInceptionWeightsError, match="Nothing is downloaded"):
    evaluate.evaluate(workdir, metrics=("fid",), inception_weights=str(tmp_path / "none.npz"))
  with pytest.raises(ValueError, match="not known"):
    evaluate.evaluate(workdir, metrics=("fdd",))
  with pytest.raises(FileNotFoundError, match="available"):
    pixel_eval.Run(workdir, step=7)
