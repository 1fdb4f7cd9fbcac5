"""CPU-only XLA settings (config.cpu_devices, config.cpu_xla_flags), set before jax starts.

`python -m ambient_jax.main` calls `apply(config.cpu_devices, config.cpu_xla_flags)` before
it imports anything that starts jax: XLA reads XLA_FLAGS once, when its CPU client starts.
They apply only to a CPU-only run: JAX_PLATFORMS is "cpu", or it is unset and no GPU/TPU
plugin is installed. A flag that XLA_FLAGS already sets keeps the user's value.

No jax import here (benchmarks and the entry point use this module before jax starts).
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Convolutions and dots on XLA's Eigen kernels, which use every core of the device's thread
# pool, instead of YNNPACK, which runs each one on a single core (jaxlib 0.10).
EIGEN_CONV_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot"
AUTO = "auto"


def accelerator_plugins() -> list[str]:
  """Installed jax plugins that can bring a GPU or TPU (`jax_plugins.*`, libtpu)."""
  found = ["libtpu"] if importlib.util.find_spec("libtpu") is not None else []
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    found += sorted(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations))
  return found


def cpu_only(environ=os.environ) -> bool:
  """True when jax will run on the CPU alone.

  JAX_PLATFORMS decides when set ("cpu" alone: yes; anything else, e.g. "cuda" or
  "tpu,cpu": no); unset, it is CPU-only when no GPU/TPU plugin is installed.
  """
  platforms = environ.get("JAX_PLATFORMS", "").replace(" ", "").lower()
  if platforms:
    return platforms.split(",") == ["cpu"]
  return not accelerator_plugins()


def _name(flag: str) -> str:
  return flag.split("=", 1)[0].lstrip("-")


def cores() -> int:
  """CPU cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_flags(num_devices: int, num_cores: int | None = None) -> str:
  """config.cpu_xla_flags = "auto": EIGEN_CONV_FLAGS when the XLA devices are fewer than the
  cores (each op must then use several cores), else none (one single-threaded op per device
  and core already keeps every core busy; Eigen's threads on top of them oversubscribe).

  Measured on 2 cores (README "CPU speed"): 1 device + these flags runs the reduced
  DDPM++ train step 1.6x faster than 1 device without; 2 devices + these flags runs it
  1.05-1.3x slower than 2 devices without.
  """
  return EIGEN_CONV_FLAGS if max(num_devices, 1) < (num_cores or cores()) else ""


def flags_problem(xla_flags) -> str | None:
  """Why `xla_flags` is not a valid config.cpu_xla_flags, or None."""
  if xla_flags == AUTO:
    return None
  if not isinstance(xla_flags, str):
    return "must be \"auto\" or a string of XLA flags (\"\" for none)"
  bad = [f for f in xla_flags.split() if not f.startswith("--xla_")]
  return f"{bad[0]!r} is not an XLA flag: write --xla_NAME=VALUE" if bad else None


def _device_count(flags: str) -> int | None:
  counts = [f.split("=", 1)[1] for f in flags.split() if _name(f) == _name(DEVICE_COUNT_FLAG)]
  return int(counts[-1]) if counts and counts[-1].isdigit() else None


def merged_flags(current: str, num_devices: int, xla_flags: str,
                 num_cores: int | None = None) -> tuple[str, list[str]]:
  """(new XLA_FLAGS, the flags added): `current` plus N devices (N > 0) and `xla_flags`
  ("auto": `auto_flags` of the device count in effect), each only if `current` does not set
  a flag of that name already."""
  problem = flags_problem(xla_flags)
  if problem:
    raise ValueError(f"config.cpu_xla_flags = {xla_flags!r} is not allowed: {problem}.")
  if xla_flags == AUTO:
    in_effect = _device_count(current) or num_devices or 1
    xla_flags = auto_flags(in_effect, num_cores)
  present = {_name(f) for f in current.split()}
  wanted = ([f"{DEVICE_COUNT_FLAG}={int(num_devices)}"] if num_devices else []) + xla_flags.split()
  added = []
  for flag in wanted:
    if _name(flag) not in present:
      added.append(flag)
      present.add(_name(flag))
  return " ".join([current.strip(), *added]).strip(), added


def apply(num_devices: int, xla_flags: str, environ=os.environ) -> list[str]:
  """Sets XLA_FLAGS in `environ` for a CPU-only run (see the module docstring); returns
  the flags it added ([] when the run is not CPU-only)."""
  if not cpu_only(environ):
    return []
  flags, added = merged_flags(environ.get("XLA_FLAGS", ""), num_devices, xla_flags)
  if added:
    environ["XLA_FLAGS"] = flags
  return added
