"""The XLA settings of every test process and of the child processes tests start.

Tests compile at LLVM optimisation level 2 instead of XLA's default 3: about 60 % of the
suite's work is XLA's CPU compile, and O2 cuts the compile of small programs by about a
third (a tiny DDPM++ forward: 7.8 s -> 3.7 s on one core) for a few percent of run time;
without fast-math the two levels compute the same numbers. The whole `-n 2` suite went
from 16 min 27 s to 14 min 2 s on one machine (2026-12-04). Users' runs keep XLA's default.
"""

import os

COMPILE_FLAGS = "--xla_backend_optimization_level=2"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(num_devices: int, current: str = "") -> str:
  """XLA_FLAGS for a test process on `num_devices` CPU devices. `current` (a user's own
  flags) comes after the compile flags, so a user's optimisation level wins; applied twice
  (the xdist controller, then its workers) it gives the same flags."""
  own = [f for f in current.split() if f != COMPILE_FLAGS and not f.startswith(DEVICE_COUNT_FLAG)]
  return " ".join([COMPILE_FLAGS, *own, f"{DEVICE_COUNT_FLAG}={num_devices}"])


def child_env(num_devices: int) -> dict[str, str]:
  """The environment for a child jax process of a test: CPU, `num_devices` devices, the
  tests' compile flags, and everything else (the XLA cache directory too) inherited."""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(num_devices))
