"""Entry point: `python -m ambient_jax.main --config=configs/NAME.py[:VARIANT] --workdir=DIR`.

Override any field with `--config.FIELD=VALUE` (e.g. `--config.optim.lr=3e-4`). The same
--workdir again resumes. Several processes (multi-host): pass --coordinator_address,
--num_processes and --process_id, or --distributed on a Cloud TPU pod / SLURM.
"""

import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "jax.distributed.initialize() with auto-detection (TPU pods, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for an explicit multi-process start.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Keeps Orbax's and tfds's INFO chatter out of the console; warnings still show."""
  NOISY = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/")

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        n in record.pathname for n in self.NOISY)


def _split_cpu(num_devices: int) -> None:
  """config.cpu_devices > 0: N XLA devices on the CPU platform (before jax starts)."""
  flags_now = os.environ.get("XLA_FLAGS", "")
  if not num_devices or "xla_force_host_platform_device_count" in flags_now:
    return
  os.environ["XLA_FLAGS"] = (
      f"{flags_now} --xla_force_host_platform_device_count={int(num_devices)}").strip()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _split_cpu(_CONFIG.value.get("cpu_devices", 0))
  from ambient_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  auto=_DISTRIBUTED.value)
  from ambient_jax import train  # pylint: disable=g-import-not-at-top
  logging.info("Config:\n%s", _CONFIG.value)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
