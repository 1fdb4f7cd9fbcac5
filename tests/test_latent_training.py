"""Latent fine-tuning through the ordinary Trainer: configs/sdxl.py:smoke on a tiny SDXL
folder made by diffusers and a dataset made by prepare_latents.

LoRA adapters alone train (optimizer, EMAs and checkpoints hold only them); resuming is
bit-exact; the step traces once per consistency phase; a grid PNG is written.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from ambient_jax.training import trainer as train
from ambient_jax.latent import lora
from tests.latent_reference import prepare_tiny_sdxl_dataset, sdxl_config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """(pretrained folder, noisy-latent dataset at t_n = 500) of 8 tiny captioned images."""
  return prepare_tiny_sdxl_dataset(tmp_path_factory.mktemp("latent_train"))


def _config(prepared, **changes):
  config = sdxl_config()
  config.latent.pretrained, config.latent.dataset = prepared
  config.update_from_flattened_dict(changes)
  return config


def test_lora_fine_tune_trains_only_the_adapters_and_resumes_bit_exactly(prepared, tmp_path):
  config = _config(prepared)
  straight = train.Trainer(config, str(tmp_path / "straight"), devices=jax.devices()[:2])
  final = straight.run()
  # Only the adapters are in the state: as many leaves as 2 per adapted layer.
  adapted = lora.adapted_layers(straight.task.unet(final.params, straight.task.frozen))
  assert len(jax.tree.leaves(final.params)) == 2 * len(adapted) > 0
  assert all(a.shape[0] == 2 or a.shape[-1] == 2 for a in jax.tree.leaves(final.params))
  # B started at zero and moved; the frozen base is what the folder holds.
  start = straight.task.trainable_init
  moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(start))]
  assert max(moved) > 0
  assert straight.step_fn.num_traces == 2  # steps 0-1 ambient, 2-3 ambient + consistency
  assert (tmp_path / "straight" / "samples" / "step_0000004.png").exists()
  straight.close()

  # The resumed pair writes no grid (its sampler compile is a third of this test's time;
  # sampling draws from its own keys and never touches the state).
  no_grid = {"sample.every_steps": -1}
  half = _config(prepared, num_train_steps=2, **no_grid)
  first = train.Trainer(half, str(tmp_path / "resumed"), devices=jax.devices()[:2])
  first.run()
  first.close()
  second = train.Trainer(_config(prepared, **no_grid), str(tmp_path / "resumed"),
                         devices=jax.devices()[:2])
  resumed = second.run()
  second.close()
  for a, b in zip(jax.tree.leaves((final.params, final.opt_state, final.ema)),
                  jax.tree.leaves((resumed.params, resumed.opt_state, resumed.ema))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_two_micro_batches_give_the_full_batch_gradient(prepared, tmp_path):
  """The latent step with k = 2 (consistency on, prompt dropout 0.5) gives k = 1's gradient
  and losses on 2 devices: every example draws the same timestep, noise, prompt dropout and
  chains whatever micro-batch it is in. k = 2 runs through the scan (the accelerators' loop;
  its program is k = 1's size, where "unrolled" doubles the compile): both loops are
  checked against each other in tests/test_grad_accum.py."""
  from ambient_jax import data  # pylint: disable=g-import-not-at-top
  from ambient_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  from ambient_jax.training import latent  # pylint: disable=g-import-not-at-top
  from tests.test_grad_accum import assert_same_gradients, gradient_recorder, recording_state
  changes = {"latent.cfg_dropout": 0.5, "sample.every_steps": -1}
  trainer = train.Trainer(_config(prepared, **changes), str(tmp_path / "w"),
                          devices=jax.devices()[:2])
  task, start = trainer.task, trainer.initial_state()
  frozen_shardings = jax.tree.map(lambda a: a.sharding, task.frozen)
  results = {}
  for k in (1, 2):
    config = _config(prepared, **changes, **{"optim.grad_accum_steps": k,
                                             "optim.grad_accum_loop": "scan"})
    step_fn = latent.make_latent_step(config, task.graphdef, task.schedule, task.uncond,
                                      gradient_recorder(), trainer.state_shardings,
                                      frozen_shardings, num_shards=2)
    loader = data.GlobalBatchLoader(task.dataset, config.batch_size, config.seed,
                                    sharding.batch_sharding(trainer.mesh), micro_batches=k)
    new, metrics = jax.jit(step_fn, static_argnums=2)(recording_state(start, 2), loader.batch(2),
                                                       True, task.frozen)
    results[k] = jax.device_get((new.opt_state, metrics))
  trainer.close()
  assert results[1][1]["consistency_loss"] != 0 and results[1][1]["grad_norm"] > 0
  assert_same_gradients(results[2][0], results[1][0])
  for name in ("loss", "ambient_loss", "consistency_loss", "grad_norm"):
    np.testing.assert_allclose(results[2][1][name], results[1][1][name], rtol=2e-5, err_msg=name)


@pytest.mark.parametrize("variant", ["naive", "full_finetune"])
def test_baselines_and_full_fine_tuning_take_a_step(prepared, tmp_path, variant):
  """One step of the naive baseline (with remat) and of full fine-tuning."""
  config = _config(prepared, num_train_steps=1, **{"sample.every_steps": -1})
  if variant == "full_finetune":
    config.latent.lora_rank = 0
  else:
    config.loss.kind = "naive"
    config.consistency.weight = 0.0
    config.latent.remat = True  # the LoRA step with every block recomputed in the backward pass
  trainer = train.Trainer(config, str(tmp_path / variant), devices=jax.devices()[:1])
  state = trainer.run()
  trainer.close()
  params = jax.tree.leaves(state.params)
  if variant == "full_finetune":
    base = nnx.state(trainer.task.unet(state.params, trainer.task.frozen), nnx.Param)
    assert len(params) == len(jax.tree.leaves(base))  # the whole UNet trains
  assert int(state.step) == 1


def test_missing_pretrained_folder_is_a_clear_error(prepared, tmp_path):
  config = _config(prepared)
  config.latent.pretrained = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="model_index.json"):
    train.Trainer(config, str(tmp_path / "w"), devices=jax.devices()[:2])


def test_grid_shows_each_training_latent_at_its_own_noise_level():
  """A mixed-σ_n dataset's grid rescales example i by its own √(1 − σ_n[i]²), not the
  first example's (the old bug)."""
  from ambient_jax.training.latent_grid import latents_as_seen
  noisy = np.ones((3, 2, 2, 4), np.float32)
  sigma_n = np.array([0.0, 0.6, 0.8], np.float32)  # VP: clean, and scales 0.8, 0.6
  seen = np.asarray(latents_as_seen(noisy, sigma_n))
  np.testing.assert_allclose(seen[:, 0, 0, 0], [1.0, 1.0 / 0.8, 1.0 / 0.6], rtol=1e-6)
