"""Gradient accumulation (config.optim.grad_accum_steps = k): k micro-batches give the
full batch's gradient, every example draws the same σ and noise for any k, the loader's
row order makes the split local to each device, and a batch k cannot split is a config error."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ambient_jax import data, random_draws
from ambient_jax.data import loader as loader_lib
from ambient_jax.runtime import sharding as sharding_lib
from ambient_jax.training import config_validation, pixel
from ambient_jax.training import state as ts
from ambient_jax.training import step as step_lib
from ambient_jax.training import trainer as train
from tests.test_train import shared_tfds_dir, tiny_config


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return shared_tfds_dir(tmp_path_factory)


def gradient_recorder() -> optax.GradientTransformation:
  """An 'optimizer' whose state after a step is that step's gradient (and which leaves the
  parameters as they are): the step's gradients, read from state.opt_state."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def recording_state(state: ts.TrainState, step: int) -> ts.TrainState:
  """`state` at `step` with the recorder's optimizer state."""
  return ts.TrainState(step=jnp.int32(step), params=state.params,
                       opt_state=gradient_recorder().init(state.params), ema=state.ema)


def assert_same_gradients(got, want):
  """Float32 sums in another order: equal to 1e-5 of the largest entry of each leaf."""
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()) + 1e-12)


def collectives(compiled_text: str) -> dict[str, int]:
  return {op: len(re.findall(rf" {op}[a-z-]*\(", compiled_text))
          for op in ("all-to-all", "collective-permute")}


@pytest.mark.parametrize("batch,micro,shards", [(16, 1, 8), (16, 2, 8), (32, 4, 8), (24, 3, 2),
                                                (8, 8, 1), (12, 2, 3)])
def test_loader_order_and_step_split_are_inverse_and_local(batch, micro, shards):
  """physical_order (loader) then micro_batches (step): micro m = positions m·b .. (m+1)·b − 1,
  and each device's block of B/N rows holds its b/N rows of every micro-batch."""
  logical = np.arange(batch) * 10
  rows = loader_lib.physical_order(logical, micro, shards)
  assert sorted(rows) == sorted(logical)
  split = np.asarray(step_lib.micro_batches(jnp.asarray(rows), micro, shards))
  np.testing.assert_array_equal(split, logical.reshape(micro, batch // micro))
  per = batch // (micro * shards)
  for d, block in enumerate(rows.reshape(shards, batch // shards)):
    for m in range(micro):
      np.testing.assert_array_equal(block[m * per:(m + 1) * per],
                                    split[m, d * per:(d + 1) * per])
  if micro == 1:
    np.testing.assert_array_equal(rows, logical)
  with pytest.raises(ValueError, match="does not split"):
    loader_lib.physical_order(np.arange(batch + 1), micro, shards)


def test_example_keys_are_by_position_for_any_k():
  key = jax.random.key(3)
  data_of = lambda k: jax.random.key_data(step_lib.micro_example_keys(key, 16, k)).reshape(16, -1)
  for k in (2, 4, 16):
    np.testing.assert_array_equal(data_of(k), data_of(1))
  np.testing.assert_array_equal(data_of(4)[5],
                                jax.random.key_data(jax.random.fold_in(key, 5)))
  np.testing.assert_array_equal(data_of(1), jax.random.key_data(
      random_draws.example_keys(key, jnp.arange(16))))


@pytest.mark.parametrize("loop", ["scan", "unrolled"])
def test_accumulate_gradients_is_the_mean_and_k1_is_the_plain_gradient(loop):
  """A mean loss over 8 examples: 4 micro-batches of 2 give its gradient and metric, in a
  while loop ("scan") or traced in turn ("unrolled"); one micro-batch is jax.grad itself
  (its bits exactly, and no while loop in the program: XLA:CPU runs a convolution's weight
  gradient inside one ~35x slower)."""
  params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.array([0.1, -0.2, 0.3])}
  x = jax.random.normal(jax.random.key(0), (8, 2))

  def loss_fn(p, xb, frozen=None):
    del frozen
    loss = jnp.mean(jnp.tanh(xb @ p["w"] + p["b"]) ** 2)
    return loss, {"loss": loss}

  (want_loss, _), want = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, x)
  one = jax.jit(lambda p, xs: step_lib.accumulate_gradients(loss_fn, p, xs, 1, loop=loop))
  got, metrics = one(params, x[None])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert metrics["loss"] == want_loss
  assert "while" not in one.lower(params, x[None]).as_text()
  four = jax.jit(lambda p, xs: step_lib.accumulate_gradients(loss_fn, p, xs, 4, loop=loop))
  got, metrics = four(params, x.reshape(4, 2, 2))
  assert_same_gradients(got, want)
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-6)
  assert ("while" in four.lower(params, x.reshape(4, 2, 2)).as_text()) == (loop == "scan")
  with pytest.raises(ValueError, match="must be one of"):
    step_lib.accumulate_gradients(loss_fn, params, x[None], 1, loop="auto")


@pytest.mark.parametrize("loop", ["scan", "unrolled"])
def test_loss_terms_taken_in_turn_give_the_joint_gradient_and_metrics(loop):
  """Two loss terms (the ambient and consistency terms' shape): their gradients, taken one
  term per loop iteration ("scan": a while loop with a conditional picking the term, so
  each term's activations live alone) or traced in turn ("unrolled"), sum to the joint
  loss's gradient, alone and over 2 micro-batches; both read the frozen weights; metrics
  are the union (the later term wins a shared key) with "loss" the sum."""
  params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.array([0.1, -0.2, 0.3])}
  x = jax.random.normal(jax.random.key(1), (8, 2))
  frozen = jnp.float32(0.7)

  def main_term(p, xb, scale):
    loss = scale * jnp.mean(jnp.tanh(xb @ p["w"] + p["b"]) ** 2)
    return loss, {"main": loss, "shared": jnp.float32(1.0)}

  def second_term(p, xb, scale):
    loss = 0.3 * jnp.mean((xb[::2] @ p["w"] * scale) ** 4)
    return loss, {"second": loss, "shared": jnp.float32(2.0)}

  joint = lambda p, xb: main_term(p, xb, frozen)[0] + second_term(p, xb, frozen)[0]
  want_loss, want = jax.value_and_grad(joint)(params, x)
  terms = (main_term, second_term)
  one = jax.jit(lambda p, xb: step_lib.sum_of_term_gradients(terms, p, xb, frozen, loop))
  got, metrics = one(params, x)
  assert_same_gradients(got, want)
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["main"], main_term(params, x, frozen)[0], rtol=1e-6)
  np.testing.assert_allclose(metrics["second"], second_term(params, x, frozen)[0], rtol=1e-6)
  assert metrics["shared"] == 2.0
  text = one.lower(params, x).as_text()
  assert ("while" in text and "case" in text) == (loop == "scan"), loop
  two = jax.jit(lambda p, xs: step_lib.accumulate_gradients(terms, p, xs, 2, loop=loop,
                                                            frozen=frozen))
  got, metrics = two(params, x.reshape(2, 4, 2))
  want_halves = [jax.grad(joint)(params, half) for half in x.reshape(2, 4, 2)]
  assert_same_gradients(got, jax.tree.map(lambda a, b: (a + b) / 2, *want_halves))


def test_auto_loop_is_unrolled_on_cpu_only():
  config = tiny_config("/nonexistent")
  assert config.optim.grad_accum_loop == "auto"
  assert step_lib.grad_accum_loop(config) == "unrolled"  # this machine: the CPU backend
  assert [step_lib.grad_accum_loop(config, b) for b in ("gpu", "tpu")] == ["scan", "scan"]
  config.optim.grad_accum_loop = "scan"
  assert step_lib.grad_accum_loop(config) == "scan"
  msg = _errors(**{"optim.grad_accum_loop": "while"})
  assert "\n" not in msg and msg.startswith("config.optim.grad_accum_loop = 'while' is not "
                                            "allowed: must be one of ('auto', 'scan', 'unrolled')")


@pytest.mark.parametrize("num_devices", [1, 8])
def test_k_micro_batches_give_the_full_batch_gradient(tfds_dir, tmp_path, num_devices):
  """The pixel step with the consistency term on, from the same state and the same logical
  batch: k = 2 (unrolled, CPU's "auto") and 4 (in a lax.scan) give k = 1's gradient and losses (so each example drew the same σ and
  noise), on 1 device and on 8. On 8, splitting the batch adds no all-to-all or
  collective-permute (the ambient phase has none at all)."""
  batch = 16 if num_devices == 1 else 32  # k × devices must divide it
  overrides = {"model.dropout": 0.0, "batch_size": batch, "consistency.start_step": 0}
  trainer = train.Trainer(tiny_config(tfds_dir, **overrides), str(tmp_path / "w"),
                          devices=jax.devices()[:num_devices])
  start = trainer.initial_state()
  results = {}
  for k, loop in ((1, "auto"), (2, "auto"), (4, "scan")):
    config = tiny_config(tfds_dir, **overrides, **{"optim.grad_accum_steps": k,
                                                   "optim.grad_accum_loop": loop})
    step_fn = jax.jit(pixel.make_train_step(config, trainer.model_def, gradient_recorder(),
                                            num_shards=num_devices), static_argnums=2)
    loader = data.GlobalBatchLoader(trainer.dataset, batch, config.seed,
                                    sharding_lib.batch_sharding(trainer.mesh), micro_batches=k)
    rows = loader.batch(3)
    np.testing.assert_array_equal(np.sort(np.asarray(rows["index"])),
                                  np.sort(loader.global_indices(3)))  # the dataset's indices
    state = recording_state(start, 3)
    new, metrics = step_fn(state, rows, True)
    results[k] = jax.device_get((new.opt_state, metrics))
    if num_devices > 1 and k == 4:
      text = step_fn.lower(state, rows, False).compile().as_text()
      assert collectives(text) == {"all-to-all": 0, "collective-permute": 0}
  trainer.close()
  grads, metrics = results[1]
  assert metrics["consistency_loss"] > 0 and metrics["grad_norm"] > 0
  for k in (2, 4):
    assert_same_gradients(results[k][0], grads)
    for name in ("loss", "ambient_loss", "consistency_loss", "sigma_mean", "grad_norm"):
      np.testing.assert_allclose(results[k][1][name], metrics[name], rtol=2e-5, err_msg=name)


def _errors(**overrides):
  config = tiny_config("/nonexistent", **overrides)
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate(config, num_devices=8)
  return str(e.value)


def test_a_batch_k_cannot_split_is_a_one_line_config_error():
  msg = _errors(**{"optim.grad_accum_steps": 3})  # 16 over 3 × 8
  assert "\n" not in msg
  assert msg.startswith("config.optim.grad_accum_steps = 3 is not allowed")
  assert "config.batch_size = 16" in msg and "8 devices" in msg and "3 × 8 = 24" in msg
  msg = _errors(**{"optim.grad_accum_steps": 4})  # 16 = 4 × 4, but each micro of 4 over 8
  assert "\n" not in msg and "4 × 8 = 32" in msg
  assert _errors(**{"optim.grad_accum_steps": 0}).startswith(
      "config.optim.grad_accum_steps = 0 is not allowed: must be an integer >= 1")
  # The consistency term takes every 4th example of each micro-batch: b = 16/8 = 2 cannot.
  config = tiny_config("/nonexistent", **{"optim.grad_accum_steps": 8})
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate(config, num_devices=1)
  assert "\n" not in str(e.value)
  assert str(e.value).startswith("config.consistency.batch_fraction = 0.25 is not allowed")
  assert "16 / 8 = 2 must be divisible by s" in str(e.value)
  config_validation.validate(tiny_config("/nonexistent", **{"optim.grad_accum_steps": 4}),
                             num_devices=1)  # micro-batches of 4: fine
