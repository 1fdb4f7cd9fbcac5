"""Entry point: `python -m ambient_jax.main --config=configs/NAME.py[:VARIANT] --workdir=DIR`.

Override any field with `--config.FIELD=VALUE` (e.g. `--config.optim.lr=3e-4`); every
field is documented in configs/default.py. The same --workdir again resumes.
`--list_configs` lists the configs and their variants. Several processes (multi-host):
pass --coordinator_address, --num_processes and --process_id, or --distributed on a
Cloud TPU pod / SLURM.

Exit status: 0 finished; 2 a mistake on the command line; 1 a missing or unusable
dataset, file or workdir (one line each; --traceback shows the traceback); 143 stopped
by SIGTERM after saving a checkpoint (the same command resumes).
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from ambient_jax import cli
from ambient_jax.runtime import cpu_defaults

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
_LIST_CONFIGS = flags.DEFINE_bool("list_configs", False,
                                  "List the configs in configs/ and their variants, then exit.")
_LOG_CONFIG = flags.DEFINE_bool("log_config", False,
                                "Print the whole config at start-up (it is always written to "
                                "WORKDIR/config.json).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "jax.distributed.initialize() with auto-detection (TPU pods, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for an explicit multi-process start.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
PROG = "ambient_jax.main"
_REQUIRED = {"config": "--config=configs/NAME.py[:VARIANT] (--list_configs lists them)",
             "workdir": "--workdir=DIR, the run directory (the same one again resumes)"}


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {argv[1:]}: flags are written --name=value.")
  if _LIST_CONFIGS.value:
    from ambient_jax.training import config_catalog  # pylint: disable=g-import-not-at-top
    print(config_catalog.describe())
    return 0
  for name, how in _REQUIRED.items():
    if flags.FLAGS[name].value is None:
      raise cli.UsageError(f"--{name} is required: give {how}.")
  cli.exit_on_sigterm(PROG, "stopped by SIGTERM before the first training step: nothing to "
                            "save; the same command starts again.")
  if _LOG_CONFIG.value:
    logging.info("Config:\n%s", _CONFIG.value)
  try:  # CPU-only runs: XLA devices and flags, before jax starts (ambient_jax/runtime/cpu_defaults.py)
    cpu_defaults.apply(_CONFIG.value.get("cpu_devices", 0), _CONFIG.value.get("cpu_xla_flags", ""))
  except ValueError as e:
    raise cli.UsageError(str(e)) from None
  from ambient_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  auto=_DISTRIBUTED.value)
  from ambient_jax.training import trainer as train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  return 0


if __name__ == "__main__":
  if cli.asks_for_help(sys.argv):
    from ambient_jax.training import config_catalog  # pylint: disable=g-import-not-at-top
    __doc__ += "\n" + config_catalog.describe() + "\n"
  cli.run(main, PROG)
