"""The front door, tried as a new user would: every mistake with `python -m ambient_jax.main`
or `python -m ambient_jax.evaluate` is one line that names it and what is allowed, exit
status 2 (the command line) or 1 (a missing or unusable thing), and no traceback unless
asked for; --list_configs; SIGTERM before the first step; a finished workdir left alone."""

import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ambient_jax import cli
from ambient_jax.runtime import metrics_io
from ambient_jax.training import trainer as train
from ambient_jax.training import step as step_lib
from tests.test_train import tiny_config, shared_tfds_dir

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAIN, EVALUATE = "ambient_jax.main", "ambient_jax.evaluate"
DEFAULT = "--config=configs/default.py"


def _run(module: str, *args, env=None, timeout=180) -> subprocess.CompletedProcess:
  full_env = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
  full_env.update(JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


def _one_line(proc: subprocess.CompletedProcess, module: str, code: int, *fragments: str) -> str:
  """Asserts the whole output is `MODULE: error: ...` containing `fragments`, and the status."""
  out = proc.stdout + proc.stderr
  assert proc.returncode == code, out
  assert "Traceback" not in out, out
  lines = out.splitlines()
  assert len(lines) == 1, out
  assert lines[0].startswith(f"{module}: error: "), out
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


@pytest.fixture
def paths(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("not a directory")
  return {"W": tmp_path / "w", "FILE": afile, "UNDER_FILE": afile / "run",
          "TFDS": tmp_path / "tfds", "EMPTY": tmp_path}


# (arguments with {W}, {FILE}, ... placeholders, exit status, fragments of the message)
MAIN_MISTAKES = {
    "unknown_field": ([DEFAULT, "--workdir={W}", "--config.batchsize=8"], 2,
                      ["--config.batchsize", "no field 'batchsize'",
                       'Did you mean "batch_size" instead of "batchsize"?']),
    "unknown_nested_field": ([DEFAULT, "--workdir={W}", "--config.data.zzz=1"], 2,
                             ["config.data has no field 'zzz'", "Fields here:", "sigma_n"]),
    "bad_value": ([DEFAULT, "--workdir={W}", "--config.data.sigma_n=-0.1"], 2,
                  ["config.data.sigma_n = -0.1 is not allowed: must be a number >= 0"]),
    "bad_type": ([DEFAULT, "--workdir={W}", "--config.batch_size=abc"], 2,
                 ["--config.batch_size=abc", "int()"]),
    "bad_cpu_xla_flags": ([DEFAULT, "--workdir={W}", "--config.cpu_xla_flags=xla_cpu_foo=1"], 2,
                          ["config.cpu_xla_flags = 'xla_cpu_foo=1' is not allowed",
                           "write --xla_NAME=VALUE"]),
    "config_not_found": (["--config=configs/nope.py", "--workdir={W}"], 2,
                         ["--config=configs/nope.py: no such file", "configs/default.py",
                          "configs/cifar10.py"]),
    "bad_variant": (["--config=configs/cifar10.py:sigmaa=0.1", "--workdir={W}"], 2,
                    ["--config=configs/cifar10.py:sigmaa=0.1", "'sigmaa' is unknown", "sigma_n"]),
    "default_has_no_variants": (["--config=configs/default.py:small", "--workdir={W}"], 2,
                                ["has no variants", "--config.FIELD=VALUE"]),
    "bad_flag": ([DEFAULT, "--workdirr={W}"], 2, ["Unknown command line flag 'workdirr'",
                                                  "Did you mean: workdir"]),
    "missing_workdir": ([DEFAULT], 2, ["--workdir is required"]),
    "missing_config": (["--workdir={W}"], 2, ["--config is required", "--list_configs"]),
    "positional_argument": ([DEFAULT, "--workdir={W}", "extra"], 2, ["unexpected arguments",
                                                                     "'extra'"]),
    "workdir_is_a_file": ([DEFAULT, "--workdir={FILE}"], 1,
                          ["workdir {FILE} is an existing file, not a directory"]),
    "workdir_not_creatable": ([DEFAULT, "--workdir={UNDER_FILE}"], 1,
                              ["workdir {UNDER_FILE} cannot be created: Not a directory"]),
    "missing_dataset": (["--config=configs/cifar10.py:smoke", "--workdir={W}",
                         "--config.data.tfds_data_dir={TFDS}"], 1,
                        ["Dataset 'cifar10'", "is not prepared in {TFDS}",
                         "--config.data.download=True"]),
}

EVALUATE_MISTAKES = {
    "not_a_run": (["--workdir={EMPTY}"], 1, ["--workdir={EMPTY} is not a training run"]),
    "missing_weights": (["--workdir={EMPTY}", "--metrics=fid", "--inception_weights={W}.npz"], 1,
                        ["FID Inception weights not found at '{W}.npz'", "Nothing is downloaded"]),
    "unknown_metric": (["--workdir={EMPTY}", "--metrics=fdd"], 2,
                       ["--metrics: ['fdd'] not known", "'fd', 'kid', 'fid', 'memorization'"]),
    "bad_flag": (["--workdir={EMPTY}", "--bogus"], 2, ["Unknown command line flag 'bogus'"]),
    "bad_sampling": (["--workdir={EMPTY}", "--sampling=bogus"], 2,
                     ["--sampling=bogus", "full|truncated|stochastic"]),
}


def _fill(items, paths):
  return [item.format(**paths) for item in items]


@pytest.mark.parametrize("case", sorted(MAIN_MISTAKES))
def test_main_mistake_is_one_line(case, paths):
  args, code, fragments = MAIN_MISTAKES[case]
  proc = _run(MAIN, *_fill(args, paths))
  _one_line(proc, MAIN, code, *_fill(fragments, paths))
  assert not (paths["W"] / "checkpoints").exists()


@pytest.mark.parametrize("case", sorted(EVALUATE_MISTAKES))
def test_evaluate_mistake_is_one_line(case, paths):
  args, code, fragments = EVALUATE_MISTAKES[case]
  _one_line(_run(EVALUATE, *_fill(args, paths)), EVALUATE, code, *_fill(fragments, paths))


def test_inception_converter_mistake_is_one_line(paths):
  module = "ambient_jax.metrics.inception"
  _one_line(_run(module, f"--convert={paths['W']}.pth"), module, 1,
            f"--convert={paths['W']}.pth: no such file", "pt_inception-2015-12-05-6726825d.pth")


def test_traceback_on_request(paths):
  """--traceback, or AMBIENT_JAX_TRACEBACK=1, shows where a mistake was found."""
  proc = _run(MAIN, DEFAULT, f"--workdir={paths['W']}", "--config.batchsize=8", "--traceback")
  assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr
  proc = _run(EVALUATE, f"--workdir={paths['EMPTY']}", "--metrics=fdd",
              env={cli.TRACEBACK_ENV: "1"})
  assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr
  assert "UsageError: --metrics: ['fdd'] not known" in proc.stderr


def test_list_configs_and_help():
  proc = _run(MAIN, "--list_configs")
  assert proc.returncode == 0, proc.stderr
  listing = proc.stdout
  configs = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.py")
                   if not p.name.startswith("_"))
  for path in configs:  # one line each, with its docstring's first line
    (line,) = [l for l in listing.splitlines() if l.split()[:1] == [str(path)]]
    assert len(line.split(None, 1)) == 2, line
  from configs import edm_paper
  (paper,) = [block for block in listing.split("\nVariants of ")[1:]
              if block.startswith("afhq64, celeba64, cifar10, edm_paper, ffhq64, imagenet64 ")]
  for variant in edm_paper.VARIANTS:  # listed once for all the paper configs
    assert sum(l.strip().startswith(f":{variant} ") for l in paper.splitlines()) == 1, variant
  assert "configs/default.py" in listing.splitlines()[0]  # where the fields are documented
  helped = _run(MAIN, "--help")
  assert helped.returncode == 0 and ":sigma_n=0.1" in helped.stdout
  assert "--[no]traceback" in helped.stdout and "--[no]list_configs" in helped.stdout


def test_sigterm_before_the_first_step(tmp_path_factory, tmp_path):
  """Start-up (imports, dataset, compilation setup) ended by SIGTERM: one line, status 143."""
  config_file = tmp_path / "tiny.py"
  config_file.write_text(
      f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
      "from tests.test_train import tiny_config\n\n"
      f"def get_config():\n  return tiny_config({str(shared_tfds_dir(tmp_path_factory))!r})\n")
  env = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
  proc = subprocess.Popen(
      [sys.executable, "-m", MAIN, f"--config={config_file}", f"--workdir={tmp_path / 'w'}",
       "--log_config"], cwd=ROOT, env=dict(env, JAX_PLATFORMS="cpu"),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:  # --log_config prints once the SIGTERM handler is in place
    lines.append(line)
    if "Config:" in line:
      proc.send_signal(signal.SIGTERM)
      break
  lines += proc.stdout.readlines()
  proc.wait(timeout=60)
  out = "".join(lines)
  assert proc.returncode == cli.EXIT_SIGTERM == 143, out
  assert "Traceback" not in out
  assert lines[-1].strip() == (f"{MAIN}: stopped by SIGTERM before the first training step: "
                               "nothing to save; the same command starts again.")


@pytest.fixture(scope="module")
def finished_workdir(tfds_dir, tmp_path_factory):
  """(workdir, config): a run whose checkpoint is at its last step, 2 (saved, not trained)."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  config = tiny_config(tfds_dir, num_train_steps=2)
  trainer = train.Trainer(config, str(workdir), devices=jax.devices()[:1])
  state = trainer.initial_state()
  trainer.save(2, state.replace(step=jax.device_put(np.int32(2), state.step.sharding)))
  trainer.close()
  metrics_io.write_config_json(str(workdir), config)
  return workdir, config


def test_a_finished_workdir_is_left_alone(finished_workdir, caplog):
  """Run again: one line, nothing written (no TensorBoard events, config.json or metrics)."""
  workdir, config = finished_workdir
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  time.sleep(0.01)
  with caplog.at_level(logging.INFO):
    state = train.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 2
  assert f"{workdir} already finished at step 2 (config.num_train_steps = 2)" in caplog.text
  assert "Resumed from" not in caplog.text
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before  # nothing written


def test_a_changed_model_names_the_change(finished_workdir):
  """Resuming with a config the checkpoint does not fit: one line naming the changed field."""
  workdir, config = finished_workdir
  config = tiny_config(config.data.tfds_data_dir, num_train_steps=4, **{"model.model_channels": 64})
  trainer = train.Trainer(config, str(workdir), devices=jax.devices()[:1])
  # Refused from the checkpoint's metadata: Orbax never starts a read that would fail part-way
  # (its pending reads then warn at exit, a traceback in a passing test run).
  def no_read(*args, **kwargs):
    raise AssertionError("Orbax was asked to restore a checkpoint that cannot fit")
  trainer.checkpointer._manager.restore = no_read  # pylint: disable=protected-access
  with pytest.raises(train.CheckpointMismatchError) as e:
    trainer.initial_state()
  trainer.close()
  message = str(e.value)
  assert "\n" not in message and isinstance(e.value, cli.UserError)
  assert f"checkpoint {workdir / 'checkpoints' / '2'} does not fit this config" in message
  assert ("65 of its 73 arrays have other shapes than this config builds (params/backbone/"
          "blocks/0/affine/bias: checkpoint (32,), config (64,); ") in message
  assert "config (64, 64); " in message and "; 62 more)" in message
  assert "model.model_channels: 32 -> 64; num_train_steps: 2 -> 4" in message


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return shared_tfds_dir(tmp_path_factory)


def test_grid_titles_name_the_objective():
  config = tiny_config("unused")  # consistency from step 2 (0-based) on
  assert step_lib.objective(config, 2, 0.2) == "ambient"
  assert step_lib.objective(config, 3, 0.2) == "ambient + consistency"
  assert step_lib.objective(config, 3, 0.0) == "clean"
  config.loss.kind, config.consistency.weight = "naive", 0.0
  assert step_lib.objective(config, 3, 0.2) == "naive"
