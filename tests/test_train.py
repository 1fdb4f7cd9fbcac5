"""The training step and loop: traced once, 1 vs 8 devices, outputs of a run, non-finite stop,
and the default config end to end through `python -m ambient_jax.main` at tiny size."""

import json
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from ambient_jax.training import trainer as train

from ambient_jax.training import step as step_lib
from tests import xla_test_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _default_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location("aj_default_cfg", ROOT / "configs" / "default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_config(tfds_dir, **overrides) -> ml_collections.ConfigDict:
  """The default config shrunk for tests: 256 digits at 8x8, an MLP, consistency from step 2."""
  c = _default_config()
  c.num_train_steps = 6
  c.batch_size = 16
  c.data.resolution = 8
  c.data.max_examples = 256
  c.data.tfds_data_dir = str(tfds_dir)
  c.model = ml_collections.ConfigDict(dict(name="mlp", data_dim=64, model_channels=32,
                                           num_blocks=1, dropout=0.1))
  c.optim.warmup_steps = 2
  c.ema.halflife_kimg = (0.05, 0.5)
  c.ema.rampup_ratio = 0.0
  c.consistency.weight = 0.1
  c.consistency.start_step = 2
  c.consistency.batch_fraction = 0.25
  c.consistency.kwargs = ml_collections.ConfigDict({"step": "posterior", "chain_steps": 1})
  c.log_every_steps = 2
  c.checkpoint.every_steps = 2
  c.sample.every_steps = -1
  c.sample.num_images = 8
  c.sample.num_steps = 3
  c.update_from_flattened_dict(overrides)
  return c


def shared_tfds_dir(tmp_path_factory) -> pathlib.Path:
  """One prepared copy of the digits per test session (every module asks for the same dir)."""
  path = tmp_path_factory.getbasetemp() / "tfds_digits"
  path.mkdir(exist_ok=True)
  return path


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return shared_tfds_dir(tmp_path_factory)


def _run_steps(trainer, num_steps):
  state = trainer.initial_state()
  metrics = []
  for step in range(num_steps):
    state, m = trainer.train_step(state, trainer.loader.batch(step),
                                  step_lib.consistency_active(trainer.config, step))
    metrics.append(jax.device_get(m))
  return state, metrics


def test_step_is_traced_once_and_agrees_across_1_and_8_devices(tfds_dir, tmp_path):
  """Same config on 1 device, 8 devices (data parallel) and 8 devices as 4 data x 2 fsdp:
  the same parameters after 3 steps (the third with consistency on), to float tolerance;
  the step traced once per consistency phase."""
  results = {}
  for n, fsdp in ((1, 1), (8, 1), (8, 2)):  # 256 channels: large enough for FSDP
    cfg = tiny_config(tfds_dir, **{"model.model_channels": 256, "mesh.fsdp": fsdp})
    trainer = train.Trainer(cfg, str(tmp_path / f"d{n}_{fsdp}"), devices=jax.devices()[:n])
    state, metrics = _run_steps(trainer, 3)
    assert trainer.step_fn.num_traces == 2  # steps 0-1 without λ_c, step 2 with it
    kernel = state.params["backbone"]["blocks"][0]["fc0"]["kernel"]  # 256 x 256
    assert len(kernel.sharding.device_set) == n
    assert kernel.sharding.spec == (jax.sharding.PartitionSpec(None, "fsdp") if fsdp > 1
                                    else jax.sharding.PartitionSpec())
    assert metrics[0]["consistency_weight"] == 0 and metrics[2]["consistency_weight"] > 0
    results[(n, fsdp)] = (jax.device_get(state), metrics)
    trainer.close()
  s1, m1 = results[(1, 1)]
  for key in ((8, 1), (8, 2)):
    s8, m8 = results[key]
    np.testing.assert_allclose([m["loss"] for m in m1], [m["loss"] for m in m8], rtol=1e-4)
    # Adam divides by √v: a summation-order difference in a small gradient moves its
    # parameter by a fraction of lr = 1e-3 (measured: up to 2.4e-6 after 3 steps).
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-6)
    assert int(s8.step) == 3


def test_posterior_sample_loss_can_replace_consistency_below_sigma_n(tfds_dir, tmp_path):
  """config.consistency.loss = "posterior_sample": the EM term joins the loss from the
  consistency start step, weighted by λ_c, with its own options (here the "posterior_cov"
  draws, which differentiate the network inside the chain)."""
  cfg = tiny_config(tfds_dir, **{"consistency.loss": "posterior_sample"})
  cfg.consistency.kwargs = ml_collections.ConfigDict(
      {"chain_steps": 2, "target_max_ratio": 0.5, "step": "posterior_cov"})
  trainer = train.Trainer(cfg, str(tmp_path / "em"), devices=jax.devices()[:1])
  _, metrics = _run_steps(trainer, 3)
  trainer.close()
  assert metrics[1]["consistency_loss"] == 0 and metrics[2]["consistency_loss"] > 0
  np.testing.assert_allclose(metrics[2]["loss"],
                             metrics[2]["ambient_loss"] + 0.1 * metrics[2]["consistency_loss"], rtol=1e-5)


def test_a_run_leaves_config_metrics_tensorboard_checkpoints_and_stops_on_nan(tfds_dir, tmp_path,
                                                                              caplog):
  workdir = tmp_path / "run"
  config = tiny_config(tfds_dir, **{"sample.every_steps": 0})
  trainer = train.Trainer(config, str(workdir))
  with caplog.at_level("INFO"):
    state = trainer.run()
  assert int(state.step) == 6
  # One closing line: steps, wall time, final loss, the last checkpoint and grid.
  closing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Finished")]
  assert len(closing) == 1 and "step 6/6" in closing[0] and "final loss" in closing[0]
  assert str(trainer.checkpointer.path(6)) in closing[0]
  assert str(workdir / "samples" / "step_0000006.png") in closing[0]
  assert json.loads((workdir / "config.json").read_text())["model"]["name"] == "mlp"
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [2, 4, 6]
  for l in lines:
    assert {"loss", "ambient_loss", "consistency_loss", "grad_norm", "lr", "steps_per_sec"} <= set(l)
    assert np.isfinite(l["loss"])
  assert list(workdir.glob("events.out.tfevents.*"))
  assert trainer.checkpointer.all_steps() == [2, 4, 6]
  assert (workdir / "samples" / "step_0000006.png").stat().st_size > 1000
  # Two EMAs with EDM half-lives: the short one tracks the parameters more closely.
  p = jax.device_get(state.params["backbone"]["proj_in"]["kernel"])
  e_short, e_long = (jax.device_get(e["backbone"]["proj_in"]["kernel"]) for e in state.ema)
  assert np.abs(e_short - p).mean() < np.abs(e_long - p).mean()

  # A non-finite loss stops the run, naming the step and the last good checkpoint.
  nan_state = jax.device_put(state.replace(step=np.int32(4), params=jax.tree.map(
      lambda x: x * np.nan, state.params)), trainer.state_shardings)
  with pytest.raises(train.NonFiniteLossError) as e:
    trainer.run(state=nan_state)
  msg = str(e.value)
  assert "at step 5" in msg and "Last good checkpoint" in msg and str(workdir / "checkpoints") in msg
  assert trainer.step_fn.num_traces == 2  # the restarted loop reused the compiled steps
  trainer.close()


def test_ema_follows_edm_half_life():
  from ambient_jax.training import ema
  # Half-life h images: after h images at batch B the old average weighs 1/2.
  b = float(ema.beta(10_000, 100, 5.0, 0.0))
  assert abs(b ** (5000 / 100) - 0.5) < 1e-5
  # Ramp-up: the first update copies the parameters; early half-lives are short.
  assert float(ema.beta(0, 100, 500.0, 0.05)) == 0.0
  assert abs(float(ema.beta(200, 100, 500.0, 0.05)) ** (1000 / 100) - 0.5) < 1e-5


def test_default_config_end_to_end_through_main(tfds_dir, tmp_path):
  """configs/default.py (its DDPM++ at 8x8, ambient + consistency) through main.py on 2 devices."""
  workdir = tmp_path / "default"
  env = xla_test_flags.child_env(2)
  overrides = {
      "num_train_steps": 4, "batch_size": 8, "data.resolution": 8, "data.max_examples": 64,
      "data.tfds_data_dir": str(tfds_dir), "model.img_resolution": 8, "model.model_channels": 8,
      "model.channel_mult": "(1,)", "consistency.start_step": 2, "log_every_steps": 2,
      "checkpoint.every_steps": 2, "sample.every_steps": 0, "sample.num_images": 4,
      "sample.num_steps": 3, "consistency.kwargs.chain_steps": 1}
  cmd = [sys.executable, "-m", "ambient_jax.main", "--config=configs/default.py",
         f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  log = proc.stderr
  assert "steps/s" in log and "ETA" in log
  assert "Renaming" not in log  # Orbax's INFO chatter is filtered from the console
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [2, 4] and lines[-1]["consistency_weight"] > 0
  assert (workdir / "samples" / "step_0000004.png").exists()
  assert (workdir / "config.json").exists() and list(workdir.glob("events.out.tfevents.*"))
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def test_eta_counts_the_slower_consistency_phase():
  """Steps left in each phase at that phase's speed; a phase not run yet is guessed."""
  # Ambient phase measured at 4 steps/s, consistency (steps 60..100) not yet: guessed 4/1.6.
  seconds, guessed = train.eta_seconds(20, 100, 60, {False: 4.0})
  assert guessed and seconds == pytest.approx(40 / 4.0 + 40 / (4.0 / 1.6))
  # Both measured: no guess; inside the consistency phase only its steps remain.
  seconds, guessed = train.eta_seconds(80, 100, 60, {False: 4.0, True: 2.0})
  assert not guessed and seconds == pytest.approx(20 / 2.0)
  # No consistency phase (switch = total): the ambient rate alone.
  assert train.eta_seconds(50, 100, 100, {False: 5.0}) == (pytest.approx(10.0), False)


def test_a_failed_start_removes_only_the_workdir_it_created(tmp_path):
  """A dataset that is not prepared fails before the first step: a new workdir goes, an
  existing one (a user's folder) stays as it was."""
  from ambient_jax import data  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path / "empty_tfds", **{"data.name": "cifar10", "data.resolution": 32,
                                                    "model.data_dim": 32 * 32 * 3})
  new = tmp_path / "new_run"
  with pytest.raises(data.DatasetNotReadyError):
    train.train_and_evaluate(config, str(new))
  assert not new.exists()
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  with pytest.raises(data.DatasetNotReadyError):
    train.train_and_evaluate(config, str(existing))
  assert (existing / "notes.txt").read_text() == "mine"
