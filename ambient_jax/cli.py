"""The front door shared by `python -m ambient_jax.main` and `python -m ambient_jax.evaluate`.

A user's mistake ends the program with one line, `PROG: error: WHAT`, where WHAT names
the flag, field or path and what is allowed, and this exit status:
  2  the command line is wrong: a flag, a config file or variant, a config field or value;
  1  something it names is missing or unusable: a dataset, a weights file, the workdir;
  143  stopped by SIGTERM (preemption, a time limit) after saving: 128 + SIGTERM, so that
     resume loops (SLURM requeue, launch/tpu_vm.sh --resume-loop) run it again.
Library code raises `errors.UserError` / `UsageError` (or `Stopped`) for such cases; this
module turns them into that line. `--traceback` or AMBIENT_JAX_TRACEBACK=1 shows the Python
traceback instead. Any other exception is a bug and keeps its traceback.

Also the console's quiet: library INFO chatter (Orbax, tfds, CLU's duplicate metric
lines, matplotlib) and TensorFlow's C++ notices stay out of it; warnings still show.
Only entry points import this module; the errors themselves live in `ambient_jax.errors`.
"""

from __future__ import annotations

import functools
import logging as std_logging
import os
import re
import signal
import sys
from typing import Callable, Optional, Sequence

from absl import app, flags, logging

from ambient_jax.errors import (EXIT_ERROR, EXIT_SIGTERM, EXIT_USAGE, Exit, Stopped,  # pylint: disable=unused-import
                                UsageError, UserError)

TRACEBACK_ENV = "AMBIENT_JAX_TRACEBACK"


class _QuietLibraries:
  """An absl-handler filter: INFO from these libraries stays off the console.

  CLU's logging writer repeats every metric line the training loop already prints.
  tensorflow_datasets' warnings are about its own cache folders, so they go too, and so
  does Orbax's warning that evaluation's (deliberately) read-only checkpointer is read-only.
  """
  INFO_ONLY = ("/orbax/", "/jax/_src/", "/clu/", "/matplotlib/")
  BELOW_ERROR = ("/tensorflow_datasets/",)
  EXPECTED = ("Given directory is read only",)

  def filter(self, record) -> bool:
    if any(str(record.msg).startswith(m) for m in self.EXPECTED):
      return False
    if any(n in record.pathname for n in self.BELOW_ERROR):
      return record.levelno >= std_logging.ERROR
    return record.levelno >= std_logging.WARNING or not any(
        n in record.pathname for n in self.INFO_ONLY)


def quiet_libraries() -> None:
  """Keeps library chatter off the console (call before TensorFlow is imported)."""
  # TensorFlow (tfds and TensorBoard only; the model is JAX) prints its oneDNN notice on every
  # import unless oneDNN is off, and then its CPU-feature notice at INFO.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def exit_on_sigterm(prog: str, message: str) -> None:
  """From now until something else takes SIGTERM over (the training loop does), SIGTERM
  ends the program at once with `PROG: MESSAGE` and status 143.

  At once: an exception raised from a signal handler can land inside an import or a
  library's `except`, and come out as some other error.
  """

  def handle(signum, frame):
    del signum, frame
    os.write(sys.stderr.fileno(), f"{prog}: {message}\n".encode())
    os._exit(EXIT_SIGTERM)  # pylint: disable=protected-access

  signal.signal(signal.SIGTERM, handle)


def wants_traceback(argv: Sequence[str] = ()) -> bool:
  """--traceback (parsed or still in argv) or AMBIENT_JAX_TRACEBACK=1."""
  if os.environ.get(TRACEBACK_ENV, "").lower() in ("1", "true", "yes"):
    return True
  if "traceback" in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS.traceback:
    return True
  return any(a in ("--traceback", "--traceback=true", "--traceback=1") for a in argv)


def report(prog: str, error: Exit | Stopped) -> None:
  """Prints `PROG: [error: ]MESSAGE` on stderr (after any pending log lines)."""
  logging.flush()
  sys.stdout.flush()
  print(f"{prog}: {error.prefix}{error}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- flags


def _argument(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of --name=VALUE or --name VALUE in argv (the last one), or None."""
  value = None
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      value = a.split("=", 1)[1]
    elif a == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _config_file_message(argv: Sequence[str], cause: str) -> str:
  """Why --config did not load: a missing file names the configs that exist."""
  from ambient_jax.training import config_catalog  # pylint: disable=g-import-not-at-top
  spec = _argument(argv, "config") or ""
  path = spec.split(":", 1)[0]
  if not path:
    return "--config is empty: give --config=configs/NAME.py[:VARIANT] (see --list_configs)."
  if not os.path.isfile(path):
    names = ", ".join(config_catalog.config_files())
    return f"--config={spec}: no such file (from {os.getcwd()}); configs: {names}."
  return f"--config={spec}: {cause}"


def _last_line(text: str) -> str:
  """The last non-empty line of an embedded traceback, without its exception class."""
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1]) if lines else text


def _unknown_field_message(error: Exception, argv: Sequence[str]) -> Optional[str]:
  """config_flags' error for --config.FIELD=V with no such FIELD, in plain words (or None
  when `error` is not about an override on the command line)."""
  inner = error.args[0] if error.args and isinstance(error.args[0], KeyError) else error
  text = str(inner.args[0]) if isinstance(inner, KeyError) and inner.args else str(inner)
  key, _, hint = text.partition("\n")
  key = key.strip().strip("'\"")
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    parts = path.split(".")
    if key in parts:
      parent = ".".join(parts[:parts.index(key)])
      allowed = hint.strip() or _fields_at(argv, parent)
      return (f"--config.{path}: config{'.' + parent if parent else ''} has no field {key!r}. "
              f"{allowed + ' ' if allowed else ''}(fields are documented in configs/default.py)")
  return None


def _fields_at(argv: Sequence[str], parent: str) -> str:
  """'Fields here: a, b, c.' for the section `parent` of the --config in argv, or ''."""
  import pathlib  # pylint: disable=g-import-not-at-top
  from ambient_jax.training import config_catalog  # pylint: disable=g-import-not-at-top
  try:
    path, _, variant = (_argument(argv, "config") or "").partition(":")
    module = config_catalog.load_module(pathlib.Path(path))
    node = module.get_config(variant) if variant else module.get_config()
    for part in filter(None, parent.split(".")):
      node = node[part]
    return f"Fields here: {', '.join(sorted(node.keys()))}."
  except Exception:  # pylint: disable=broad-except
    return ""


def _flag_error_message(error: Exception, argv: Sequence[str]) -> Optional[str]:
  """One line for a command-line error found while parsing flags (None: not one of those)."""
  if isinstance(error, (KeyError, AttributeError)):
    return _unknown_field_message(error, argv)
  if isinstance(error, OSError):  # config_flags defers "file not found" until first use
    return _config_file_message(argv, _last_line(str(error)))
  if not isinstance(error, flags.Error):
    return None
  text = re.sub(r"^flag ", "", str(error))
  required = re.search(r"Flag --(\w+) must have a value other than None", text)
  if required:
    name = required.group(1)
    return f"--{name} is required: {flags.FLAGS[name].help}"
  if "Traceback (most recent call last)" in text:  # an exception inside the config file
    return f"{text.split(': Error whilst parsing config file', 1)[0]}: {_last_line(text)}"
  if text.startswith("--config."):
    return f"{text} (fields are documented in configs/default.py)"
  return f"{text} (--help lists the flags)"


def parse_flags(argv: Sequence[str], prog: str) -> list[str]:
  """absl's flag parsing, with each mistake reported as one line and status 2 (and --help
  a success: absl exits 1 after it)."""
  try:
    rest = flags.FLAGS(argv)
  except SystemExit as e:
    if asks_for_help(argv) and e.code == 1:
      sys.exit(0)
    raise
  except (flags.Error, KeyError, AttributeError, OSError) as e:
    message = _flag_error_message(e, argv)
    if message is None or wants_traceback(argv):
      raise
    report(prog, UsageError(message))
    sys.exit(EXIT_USAGE)
  if "config" in flags.FLAGS:
    _check_config_loaded(argv, prog)
  return rest


def _check_config_loaded(argv: Sequence[str], prog: str) -> None:
  """config_flags keeps a config file that failed to load as an object that raises on
  first use; report it now instead."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  value = flags.FLAGS["config"].value
  if value is None or isinstance(value, ml_collections.ConfigDict):
    return
  try:
    value.keys()
  except OSError as e:
    if wants_traceback(argv):
      raise
    report(prog, UsageError(_config_file_message(argv, _last_line(str(e)))))
    sys.exit(EXIT_USAGE)


# ----------------------------------------------------------------------------- run


def _main_reporting(main: Callable, prog: str, argv):
  """Calls main(argv); an `Exit` or `Stopped` becomes its one line and exit status."""
  try:
    return main(argv)
  except (Exit, Stopped) as e:
    if wants_traceback():
      raise
    report(prog, e)
    sys.exit(e.exit_code)


def define_flags(module_name: Optional[str] = None) -> None:
  """The flags every entry point has (idempotent); `module_name`: whose --help shows them."""
  if "traceback" not in flags.FLAGS:
    flags.DEFINE_bool("traceback", False, "On an error, print the Python traceback instead of "
                      f"one line (also {TRACEBACK_ENV}=1).", module_name=module_name)


def asks_for_help(argv: Sequence[str]) -> bool:
  """Whether absl will print the usage and exit."""
  return any(a in ("-h", "-?", "--help", "--helpshort", "--helpfull") for a in argv[1:])


def run(main: Callable, prog: str, argv: Optional[Sequence[str]] = None) -> None:
  """absl's `app.run(main)` with the behaviour of this module's docstring."""
  quiet_libraries()
  # absl lists a script's flags under its path (sys.argv[0]) in --help.
  define_flags(sys.argv[0] if main.__module__ == "__main__" else main.__module__)
  app.run(functools.partial(_main_reporting, main, prog), argv,
          flags_parser=functools.partial(parse_flags, prog=prog))
