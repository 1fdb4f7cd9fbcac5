"""Test set-up: 8 fake CPU devices, so sharding and multi-device code run for real."""

import os

from tests import xla_test_flags

# 8 CPU devices, compiled at the tests' optimisation level (see tests/xla_test_flags.py).
os.environ["XLA_FLAGS"] = xla_test_flags.xla_flags(8, os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache per test process: the many Trainers of the resume,
# device-count and latent tests compile identical steps; later ones load them instead.
# (Tracing still happens, so trace-count assertions are unaffected.) Per process, not
# shared by the xdist workers (which inherit the controller's environment): two processes
# reading and writing one cache is a suspect in a rare native abort seen under -n 2.
# A cache directory the user set is kept.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

_OURS = "AMBIENT_JAX_TEST_XLA_CACHE"
_made_cache = None  # the cache directory this process made (removed at its end), else None
if os.environ.get("JAX_COMPILATION_CACHE_DIR", os.environ.get(_OURS)) == os.environ.get(_OURS):
  _worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  _made_cache = os.environ[_OURS] = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix=f"ambient_jax_xla_cache_{_worker}_")
  atexit.register(shutil.rmtree, _made_cache, ignore_errors=True)  # ours: leave no litter
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
  """Removes this process's cache when its tests and fixtures are done, before an xdist
  worker reports that it finished: the controller then stops the workers, one of which was
  often interrupted before its atexit handlers ran (seen after each of four full `-n 2` runs
  on 2026-12-04: one worker's 26-52 MB cache left in the temporary folder; none since)."""
  del session
  if _made_cache:
    shutil.rmtree(_made_cache, ignore_errors=True)
  _drop_jax_gc_callback()


def _drop_jax_gc_callback():
  """Takes jax's `_xla_gc_callback` out of `gc.callbacks` once a process's tests are done.

  xdist stops a finished worker by interrupting its main thread; when that lands in a
  garbage collection, the KeyboardInterrupt surfaces inside jax's callback and is printed
  as an "Exception ignored" traceback under a green run (3 of 6 full `-n 2` runs on
  2026-12-04). The callback only releases XLA's own garbage early, which a process about
  to exit does not need.
  """
  import gc  # pylint: disable=g-import-not-at-top
  gc.callbacks[:] = [cb for cb in gc.callbacks
                     if getattr(cb, "__name__", "") != "_xla_gc_callback"]
