"""Test set-up: 8 fake CPU devices, so sharding and multi-device code run for real."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache per test process: the many Trainers of the resume,
# device-count and latent tests compile identical steps; later ones load them instead.
# (Tracing still happens, so trace-count assertions are unaffected.) Per process, not
# shared by the xdist workers (which inherit the controller's environment): two processes
# reading and writing one cache is a suspect in a rare native abort seen under -n 2.
# A cache directory the user set is kept.
import tempfile  # noqa: E402

_OURS = "AMBIENT_JAX_TEST_XLA_CACHE"
if os.environ.get("JAX_COMPILATION_CACHE_DIR", os.environ.get(_OURS)) == os.environ.get(_OURS):
  _worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  os.environ[_OURS] = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix=f"ambient_jax_xla_cache_{_worker}_")
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  atexit.register(shutil.rmtree, os.environ[_OURS], ignore_errors=True)  # ours: leave no litter
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
