"""Parameters of a latent-model component <-> its diffusers / transformers folder.

A component folder (`unet/`, `vae/`, `text_encoder/`, ...) holds `config.json` and the
weights as one safetensors file or several shards listed in an `.index.json`, named
`diffusion_pytorch_model*` (diffusers) or `model*` (transformers), optionally with a
variant (`...fp16.safetensors`). Because every NNX parameter path of our modules is the
checkpoint's tensor name (see `layers`), loading is a checked copy: every missing,
unexpected or wrongly shaped tensor is named in one error. Tensors are copied one at a
time, straight into the target dtype and, when shardings are given, straight into their
device shards (`jax.make_array_from_callback`), so no full-precision copy of the model is
ever made on the host.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ambient_jax.latent.layers import shapes_only
from ambient_jax.latent.safetensors_io import SafetensorsFile, save_file

STEMS = ("diffusion_pytorch_model", "model")


def param_name(path: tuple) -> str:
  """NNX state path -> checkpoint tensor name: ('to_out', 0, 'weight') -> 'to_out.0.weight'."""
  return ".".join(str(p) for p in path)


class Checkpoint(Mapping):
  """name -> np.ndarray over the safetensors file(s) of one component folder (lazy)."""

  def __init__(self, files: Mapping[str, SafetensorsFile]):
    self._where = files  # name -> the file that holds it

  def __getitem__(self, name: str) -> np.ndarray:
    return self._where[name][name]

  def shape(self, name: str) -> tuple[int, ...]:
    return self._where[name].shape(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


def open_checkpoint(folder: str | os.PathLike, variant: str | None = None) -> Checkpoint:
  """Finds and opens the safetensors weights of a component folder (sharded or not)."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder} is not a directory (expected a diffusers component "
                            "folder with config.json and *.safetensors).")
  for stem in STEMS:
    index = os.path.join(folder, f"{stem}.safetensors.index{'.' + variant if variant else ''}.json")
    single = os.path.join(folder, f"{stem}{'.' + variant if variant else ''}.safetensors")
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      opened = {fn: SafetensorsFile(os.path.join(folder, fn)) for fn in sorted(set(weight_map.values()))}
      where = {}
      for name, fn in weight_map.items():
        if name not in opened[fn]:
          raise ValueError(f"{index} lists {name!r} in {fn}, which does not contain it.")
        where[name] = opened[fn]
      return Checkpoint(where)
    if os.path.isfile(single):
      file = SafetensorsFile(single)
      return Checkpoint({name: file for name in file})
  present = sorted(os.listdir(folder))
  hint = (" PyTorch .bin/.pt weights are not read (they need torch): convert them to "
          "safetensors, e.g. by loading and `save_pretrained` in diffusers."
          if any(p.endswith((".bin", ".pt", ".ckpt")) for p in present) else "")
  raise FileNotFoundError(
      f"no safetensors weights in {folder} (looked for "
      f"{' / '.join(s + '[.' + (variant or 'VARIANT') + '].safetensors[.index.json]' for s in STEMS)}"
      f"; found {present}).{hint}")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
  """A JSON file as a dict; a missing file is a FileNotFoundError naming it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{os.fspath(path)} does not exist.")
  with open(path) as f:
    return json.load(f)


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
  """The component's `config.json` as a dict, with a clear error when it is missing."""
  path = os.path.join(os.fspath(folder), "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: not a diffusers/transformers component folder.")
  with open(path) as f:
    return json.load(f)


def _place(array: np.ndarray, dtype: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """One host tensor -> a device array of `dtype`, copied shard by shard when sharded."""
  if sharding is None:
    return jnp.asarray(np.asarray(array).astype(dtype))
  return jax.make_array_from_callback(array.shape, sharding,
                                      lambda index: np.asarray(array[index]).astype(dtype))


def load_params(module: nnx.Module, tensors: Mapping[str, np.ndarray], *, component: str,
                dtype: Any = None, shardings: Any = None) -> nnx.Module:
  """Copies checkpoint tensors into the nnx.Param leaves of `module` (which may be abstract).

  `dtype`: cast to it (default: each parameter's own dtype). `shardings`: None, or a
  pytree matching `nnx.state(module, nnx.Param)` of `jax.sharding.Sharding`s (e.g.
  `sharding.param_sharding(mesh, state)`), or a callable abstract state -> that pytree.
  Raises ValueError naming every missing, unexpected or wrongly shaped tensor.
  Returns a new module; `module` is not changed.
  """
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  if callable(shardings):
    shardings = shardings(params)
  flat = list(nnx.to_flat_state(params))
  sharding_leaves = (jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
                     if shardings is not None else [None] * len(flat))
  expected = {param_name(path): var for path, var in flat}
  problems = [f"missing tensor {n!r} (expected shape {tuple(v.shape)})"
              for n, v in expected.items() if n not in tensors]
  problems += [f"unexpected tensor {n!r} {tuple(tensors[n].shape)} (the config builds no such "
               "parameter)" for n in tensors if n not in expected]
  problems += [f"tensor {n!r} has shape {tuple(tensors[n].shape)}, the config needs "
               f"{tuple(v.shape)}" for n, v in expected.items()
               if n in tensors and tuple(tensors[n].shape) != tuple(v.shape)]
  if problems:
    shown = "\n  ".join(problems[:12])
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    raise ValueError(f"{component}: the checkpoint does not match the model built from its "
                     f"config ({len(problems)} problems):\n  {shown}{more}")
  for (path, var), sharding in zip(flat, sharding_leaves):
    var.set_value(_place(tensors[param_name(path)], dtype or var.dtype, sharding))
  params = nnx.from_flat_state(flat)
  return nnx.merge(graphdef, params, rest)


def state_dict(module: nnx.Module, dtype: Any = None) -> dict[str, np.ndarray]:
  """Checkpoint name -> host array for every nnx.Param of `module` (cast to `dtype`)."""
  params = nnx.state(module, nnx.Param)
  out = {}
  for path, var in nnx.to_flat_state(params):
    value = np.asarray(jax.device_get(var[...]))
    out[param_name(path)] = value.astype(dtype) if dtype is not None else value
  return out


def save_component(module: nnx.Module, folder: str | os.PathLike, config: Mapping[str, Any], *,
                   stem: str, dtype: Any = None, max_shard_bytes: int = 10 * 2**30) -> None:
  """Writes `config.json` and the parameters as `<stem>.safetensors` (sharded with an
  `.index.json` above `max_shard_bytes`, as diffusers / transformers do)."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)
  tensors = state_dict(module, dtype)
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    if current and size + tensors[name].nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensors[name]
    size += tensors[name].nbytes
  shards.append(current)
  meta = {"format": "pt"}  # diffusers / transformers refuse files without it.
  if len(shards) == 1:
    save_file(shards[0], os.path.join(folder, f"{stem}.safetensors"), meta)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    fn = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(folder, fn), meta)
    weight_map.update({name: fn for name in shard})
  total = sum(t.nbytes for t in tensors.values())
  with open(os.path.join(folder, f"{stem}.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def build_abstract(factory: Callable[[], nnx.Module]) -> nnx.Module:
  """The module with ShapeDtypeStruct parameters: nothing allocated, no random draws (for
  loading or counting; SDXL's UNet in a few seconds)."""
  with shapes_only():
    return nnx.eval_shape(factory)
