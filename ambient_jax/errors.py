"""The errors a user can cause, and the exit status each ends the program with.

Library code raises these; the entry points (`ambient_jax.cli`) turn them into one line,
`PROG: error: WHAT`, and the status below, without a traceback:
  2  the command line is wrong: a flag, a config file or variant, a config field or value;
  1  something it names is missing or unusable: a dataset, a weights file, the workdir;
  143  stopped by SIGTERM after saving (128 + SIGTERM, so that resume loops run it again).
Standard library only: any module, at any layer, may raise them.
"""

from __future__ import annotations

import signal

EXIT_ERROR, EXIT_USAGE, EXIT_SIGTERM = 1, 2, 128 + signal.SIGTERM


class Exit(Exception):
  """Ends the program with `str(self)` as one line and status `exit_code`, no traceback."""
  exit_code = EXIT_ERROR
  prefix = ""


class UserError(Exit):
  """Something the user named is missing or unusable (a dataset, a file, the workdir)."""
  prefix = "error: "


class UsageError(UserError, ValueError):
  """The command line is wrong: a flag, a config file, field or value."""
  exit_code = EXIT_USAGE


class Stopped(BaseException):
  """Stopped by SIGTERM; whatever could be saved was saved. Like KeyboardInterrupt a
  BaseException, so that no `except Exception` on the way out swallows it."""
  exit_code = EXIT_SIGTERM
  prefix = ""
