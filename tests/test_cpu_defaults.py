"""ambient_jax.runtime.cpu_defaults: the XLA devices and flags `python -m ambient_jax.main` sets on a
CPU-only machine before jax starts, a user's own XLA_FLAGS winning, nothing on GPU/TPU."""

import os
import pathlib
import subprocess
import sys

import pytest

from ambient_jax.training import config_catalog
from ambient_jax.runtime import cpu_defaults

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT = config_catalog.load_module(ROOT / "configs" / "default.py",
                                     "test_cpu_defaults_default_config").get_config()
COUNT = cpu_defaults.DEVICE_COUNT_FLAG


EIGEN = cpu_defaults.EIGEN_CONV_FLAGS


def test_default_config_uses_auto_flags():
  assert DEFAULT.cpu_devices == 1 and DEFAULT.cpu_xla_flags == "auto"


@pytest.mark.parametrize("devices,cores,expected", [
    (1, 2, EIGEN), (0, 2, EIGEN), (2, 2, ""), (8, 2, ""), (2, 8, EIGEN), (1, 1, "")])
def test_auto_flags_multithread_ops_only_when_devices_are_fewer_than_cores(devices, cores,
                                                                          expected):
  assert cpu_defaults.auto_flags(devices, cores) == expected
  flags, _ = cpu_defaults.merged_flags("", devices, "auto", num_cores=cores)
  assert flags.split() == ([f"{COUNT}={devices}"] if devices else []) + expected.split()


def test_auto_flags_follow_the_users_device_count():
  """XLA_FLAGS asking for 1 device wins over config.cpu_devices = 2, and auto follows it."""
  flags, added = cpu_defaults.merged_flags(f"{COUNT}=1", 2, "auto", num_cores=2)
  assert flags.split() == [f"{COUNT}=1", *EIGEN.split()] and added == EIGEN.split()


def test_merged_flags_adds_what_is_missing_and_keeps_the_users():
  flags, added = cpu_defaults.merged_flags("", 2, "--xla_a=1 --xla_b=x,y")
  assert flags == f"{COUNT}=2 --xla_a=1 --xla_b=x,y" and added == flags.split()
  user = f"--xla_b=mine {COUNT}=8"
  flags, added = cpu_defaults.merged_flags(user, 2, "--xla_a=1 --xla_b=x,y")
  assert flags == f"{user} --xla_a=1" and added == ["--xla_a=1"]
  assert cpu_defaults.merged_flags("--xla_a=1", 0, "") == ("--xla_a=1", [])


@pytest.mark.parametrize("bad", ["xla_a=1", "--foo=1", 3])
def test_bad_flags_are_named(bad):
  with pytest.raises(ValueError, match="config.cpu_xla_flags"):
    cpu_defaults.merged_flags("", 0, bad)


@pytest.mark.parametrize("platforms,plugins,expected", [
    ("cpu", ["xla_cuda12"], True), ("CPU", [], True), ("cuda", [], False), ("tpu,cpu", [], False),
    ("", [], True), ("", ["xla_cuda12"], False), ("", ["libtpu"], False)])
def test_cpu_only(monkeypatch, platforms, plugins, expected):
  monkeypatch.setattr(cpu_defaults, "accelerator_plugins", lambda: plugins)
  assert cpu_defaults.cpu_only({"JAX_PLATFORMS": platforms} if platforms else {}) is expected


def test_apply_only_on_a_cpu_only_run(monkeypatch):
  monkeypatch.setattr(cpu_defaults, "accelerator_plugins", lambda: [])
  env = {"XLA_FLAGS": "--xla_b=mine"}
  assert cpu_defaults.apply(2, "--xla_a=1 --xla_b=2", env) == [f"{COUNT}=2", "--xla_a=1"]
  assert env["XLA_FLAGS"] == f"--xla_b=mine {COUNT}=2 --xla_a=1"
  env = {"JAX_PLATFORMS": "cuda"}
  assert cpu_defaults.apply(2, "--xla_a=1", env) == [] and "XLA_FLAGS" not in env


_FAKE_RUN = """
import os, sys
from ambient_jax import cli, main
from ambient_jax.training import trainer
def report(config, workdir):
  import jax
  print("XLA_FLAGS=" + os.environ.get("XLA_FLAGS", ""))
  print("DEVICES=%d" % jax.device_count())
trainer.train_and_evaluate = report
cli.run(main.main, "ambient_jax.main", ["ambient_jax.main"] + sys.argv[1:])
"""


def _main_flags(tmp_path, *args, xla_flags=None):
  """(XLA_FLAGS the training function saw, jax.device_count()) for `main` with `args`."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  proc = subprocess.run([sys.executable, "-c", _FAKE_RUN, "--config=configs/default.py",
                         f"--workdir={tmp_path}", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  out = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
  return out["XLA_FLAGS"], int(out["DEVICES"])


def test_main_sets_the_cpu_defaults_before_jax_starts(tmp_path):
  flags, devices = _main_flags(tmp_path)
  assert flags.split() == [f"{COUNT}=1", *cpu_defaults.auto_flags(1).split()] and devices == 1
  flags, devices = _main_flags(tmp_path, "--config.cpu_devices=2")
  expected = cpu_defaults.auto_flags(2)  # "" on a 2-core machine
  assert flags.split() == [f"{COUNT}=2", *expected.split()] and devices == 2


def test_main_keeps_the_users_xla_flags(tmp_path):
  name = EIGEN.split("=")[0]
  user = f"{name}=+individual_dot {COUNT}=1"
  flags, devices = _main_flags(tmp_path, "--config.cpu_xla_flags=" + EIGEN, xla_flags=user)
  assert flags == user and devices == 1


def test_main_cpu_xla_flags_override(tmp_path):
  flags, _ = _main_flags(tmp_path, "--config.cpu_xla_flags=")
  assert flags == f"{COUNT}=1"
  flags, _ = _main_flags(tmp_path, "--config.cpu_devices=2",
                         f"--config.cpu_xla_flags={EIGEN} --xla_cpu_enable_fast_math=false")
  assert flags.split() == [f"{COUNT}=2", *EIGEN.split(), "--xla_cpu_enable_fast_math=false"]


def test_eigen_flags_move_convolutions_off_ynnpack():
  """The flag auto adds still exists in this jaxlib and does what it says."""
  code = ("import jax, jax.numpy as jnp\n"
          "f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(\n"
          "    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))\n"
          "print(f.lower(jnp.ones((8, 32, 32, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text())")
  texts = {}
  for flags in ("", EIGEN):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    texts[flags] = proc.stdout
  assert "__ynn_fusion" in texts[""] and "__ynn_fusion" not in texts[EIGEN]


@pytest.mark.parametrize("value", ["fast", "--xla_a=1 -xla_b=2"])
def test_validation_names_a_bad_cpu_xla_flags(value):
  from ambient_jax.training import config_validation  # pylint: disable=g-import-not-at-top
  config = DEFAULT.copy_and_resolve_references()
  config.cpu_xla_flags = value
  with pytest.raises(config_validation.ConfigError, match=f"config.cpu_xla_flags = {value!r}"):
    config_validation.validate(config, num_devices=8)
