"""LoRA adapters on the latent models' Linear layers, as a separate parameter tree.

An adapted `layers.Linear` computes y = x Wᵀ + b + (α / r) · (x Aᵀ) Bᵀ with `lora_A`
[r, in] and `lora_B` [out, r] (Hu et al. 2021). The adapters are `LoRAParam`s, a
variable type of their own and *not* an `nnx.Param`, so

  graphdef, lora, base = nnx.split(model, LoRAParam, ...)

hands the optimizer, the EMAs and the checkpoints only what trains, while
`weights.load_params` / `nnx.state(model, nnx.Param)` keep seeing the base weights alone.
`add_lora` uses the paper's initialisation (Gaussian A with std 1/r, as PEFT's
init_lora_weights="gaussian", and B = 0), so the adapted model equals the base at init.

Files are in the diffusers / PEFT LoRA format that `pipe.load_lora_weights(path)` reads:
"unet.<module path>.lora_A.weight" [r, in] and ".lora_B.weight" [out, r], safetensors with
metadata {"format": "pt"}. Without adapter metadata diffusers assumes α = r (scale 1), so
`lora_state_dict` folds α / r into B on export: every loader, old or new, then applies
exactly our update. `load_lora` reads such files, ours or saved by diffusers / PEFT
(`pipe.save_lora_weights`, `get_peft_model_state_dict`, PEFT's adapter_model.safetensors),
honouring the α of diffusers' `lora_adapter_metadata` or of PEFT's adapter_config.json.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ambient_jax.latent.layers import Linear
from ambient_jax.latent.safetensors_io import SafetensorsFile, save_file
from ambient_jax.latent.weights import param_name

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
A_AXES = ("lora_rank", "embed_in")
B_AXES = ("embed_out", "lora_rank")
# Top-level names of the other components a pipeline LoRA file may adapt too.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer", "prior")
_PEFT_PREFIX = "base_model.model."  # PeftModel.save_pretrained's key prefix
_SUFFIX = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")


class LoRAParam(nnx.Variable):
  """A LoRA adapter matrix: trainable, but not an `nnx.Param` (see the module docstring)."""


def lora_param(value: jax.Array, axes: tuple[str, str]) -> LoRAParam:
  """A LoRAParam with logical axis names ("lora_rank" is never sharded)."""
  return LoRAParam(value, out_sharding=axes, eager_sharding=False)


def linear_layers(model: nnx.Module) -> dict[str, Linear]:
  """Every `layers.Linear` in `model` by its dotted path ("...attn1.to_out.0"), sorted."""
  if not isinstance(model, nnx.Module):  # e.g. load_unet's (model, config) tuple
    raise TypeError(f"expected an nnx.Module, got {type(model).__name__}.")
  found = {param_name(path): node for path, node in nnx.iter_graph(model)
           if isinstance(node, Linear)}
  return dict(sorted(found.items()))


def adapted_layers(model: nnx.Module) -> dict[str, Linear]:
  """The Linear layers of `model` that carry an adapter, by dotted path, sorted."""
  return {name: layer for name, layer in linear_layers(model).items() if layer.lora_A is not None}


def attach(layer: Linear, a: jax.Array, b: jax.Array, scale: float) -> None:
  """Puts the adapter A [r, in], B [out, r] with scale α / r on `layer` (replacing any)."""
  r = a.shape[0]
  if a.shape != (r, layer.in_features) or b.shape != (layer.out_features, r):
    raise ValueError(f"LoRA shapes A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a Linear "
                     f"{layer.in_features} -> {layer.out_features} (A [r, in], B [out, r]).")
  layer.lora_A, layer.lora_B = lora_param(a, A_AXES), lora_param(b, B_AXES)
  layer.lora_scale = float(scale)


def _matches(name: str, targets: Sequence[str]) -> bool:
  return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(model: nnx.Module, *, rank: int = 4, alpha: float | None = None,
             targets: Sequence[str] = ATTENTION_TARGETS, key: jax.Array,
             init: str = "gaussian", param_dtype: Any = jnp.float32) -> tuple[int, int]:
  """Attaches rank-`rank` adapters to every Linear whose dotted path ends with a target.

  `alpha`: the LoRA α (default `rank`, scale 1). `init`: "gaussian" — A ~ N(0, 1/r²), the
  paper's and PEFT's init_lora_weights="gaussian" — or "kaiming_uniform" — A ~ U(±1/√in),
  PEFT's default; B = 0 either way, so the model is unchanged until B trains. Layer i of the
  matching layers in sorted path order draws from fold_in(key, i): the result does not
  depend on traversal order. Works on abstract models (inside `nnx.eval_shape`) too.
  Changes `model` in place; returns (adapted layers, adapter parameters).
  """
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
  if init not in ("gaussian", "kaiming_uniform"):
    raise ValueError(f"init={init!r}: expected 'gaussian' or 'kaiming_uniform'.")
  scale = (rank if alpha is None else alpha) / rank
  layers = {n: l for n, l in linear_layers(model).items() if _matches(n, targets)}
  if not layers:
    raise ValueError(f"no Linear layer's path ends with any of {tuple(targets)}.")
  taken = [n for n, l in layers.items() if l.lora_A is not None]
  if taken:
    raise ValueError(f"{len(taken)} layers already carry an adapter (e.g. {taken[0]!r}).")
  count = 0
  for i, layer in enumerate(layers.values()):
    shape, k = (rank, layer.in_features), jax.random.fold_in(key, i)
    if init == "gaussian":
      a = jax.random.normal(k, shape, param_dtype) / rank
    else:
      bound = 1.0 / math.sqrt(layer.in_features)
      a = jax.random.uniform(k, shape, param_dtype, -bound, bound)
    attach(layer, a, jnp.zeros((layer.out_features, rank), param_dtype), scale)
    count += rank * (layer.in_features + layer.out_features)
  return len(layers), count


def lora_state_dict(model: nnx.Module, *, prefix: str | None = "unet",
                    dtype: Any = None) -> dict[str, np.ndarray]:
  """The adapters as a diffusers / PEFT LoRA state dict of host arrays.

  "{prefix}.{path}.lora_A.weight" [r, in] and "...lora_B.weight" [out, r], with α / r folded
  into B (so the file means scale 1, what diffusers assumes without metadata). `prefix`:
  the pipeline component ("unet", "text_encoder", ...; None for a bare model's keys).
  `dtype`: cast to it (default: the adapters' own, float32).
  """
  head = f"{prefix}." if prefix else ""
  out = {}
  for name, layer in adapted_layers(model).items():
    a = np.asarray(jax.device_get(layer.lora_A[...]))
    b = np.asarray(jax.device_get(layer.lora_B[...]))
    if layer.lora_scale != 1.0:
      b = (b.astype(np.float32) * np.float32(layer.lora_scale)).astype(b.dtype)
    out[f"{head}{name}.lora_A.weight"] = a.astype(dtype) if dtype is not None else a
    out[f"{head}{name}.lora_B.weight"] = b.astype(dtype) if dtype is not None else b
  if not out:
    raise ValueError("the model carries no LoRA adapter (add_lora or load_lora first).")
  return out


def save_lora(model: nnx.Module, path: str | os.PathLike, *, prefix: str | None = "unet",
              dtype: Any = None) -> None:
  """Writes `lora_state_dict` as a safetensors file that `pipe.load_lora_weights` loads."""
  path = os.fspath(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  save_file(lora_state_dict(model, prefix=prefix, dtype=dtype), path, {"format": "pt"})


def _file_alphas(metadata: Mapping[str, str], prefix: str | None, path: str | None):
  """(α, α pattern, use_rslora) from diffusers' `lora_adapter_metadata` in the file, else
  from PEFT's `adapter_config.json` beside it, else None (scale 1)."""
  raw = metadata.get("lora_adapter_metadata")
  beside = os.path.join(os.path.dirname(path), "adapter_config.json") if path else None
  if raw:
    config = json.loads(raw)
  elif beside and os.path.isfile(beside):
    with open(beside) as f:
      config = json.load(f)
  else:
    return None
  if prefix and any(k.startswith(f"{prefix}.") for k in config):
    config = {k[len(prefix) + 1:]: v for k, v in config.items() if k.startswith(f"{prefix}.")}
  if config.get("use_dora"):
    raise ValueError("the LoRA file is a DoRA adapter (use_dora), which is not supported.")
  if "lora_alpha" not in config:
    return None
  return config["lora_alpha"], config.get("alpha_pattern") or {}, bool(config.get("use_rslora"))


def _alpha_for(name: str, rank: int, alphas) -> float:
  """A layer's scale: α / r (α / √r with rsLoRA); PEFT's pattern rule picks α per layer."""
  if alphas is None:
    return 1.0
  alpha, pattern, rslora = alphas
  for key, value in pattern.items():
    if re.match(rf"(.*\.)?({key})$", name):
      alpha = value
      break
  return alpha / (math.sqrt(rank) if rslora else rank)


def load_lora(model: nnx.Module, source: str | os.PathLike | Mapping[str, Any], *,
              prefix: str | None = "unet", param_dtype: Any = jnp.float32) -> int:
  """Attaches the adapters of a diffusers / PEFT LoRA file (or state dict) to `model`.

  Keys "[{prefix}.][base_model.model.]{path}.lora_A[.default].weight" [r, in] and lora_B
  [out, r]; each layer gets the rank its tensors have, and the scale that the file's
  `lora_adapter_metadata` (diffusers) or an `adapter_config.json` beside it (PEFT's
  `save_pretrained`) gives — α / r, α patterns, rsLoRA — else 1 (diffusers' rule).
  Keys of the other pipeline components (e.g. "text_encoder.") are skipped; any other key
  that names no Linear of `model`, or an A without its B, is an error naming it. Existing
  adapters on the named layers are replaced. Changes `model` in place; returns the number
  of adapted layers.
  """
  metadata, path = {}, None
  if isinstance(source, (str, os.PathLike)):
    path = os.path.abspath(os.fspath(source))
    file = SafetensorsFile(path)
    metadata, tensors, where = file.metadata, file, path
  else:
    tensors, where = source, "the state dict"
  pairs, problems = {}, []
  for key in tensors:
    name = key
    first = key.split(".", 1)[0]
    if prefix and first == prefix:
      name = key[len(prefix) + 1:]
    elif first in COMPONENTS:
      continue  # another component's adapter
    name = name.removeprefix(_PEFT_PREFIX)
    match = _SUFFIX.match(name)
    if not match:
      problems.append(f"{key!r} is not a PEFT lora_A / lora_B weight")
      continue
    pairs.setdefault(match["module"], {})[match["which"]] = key
  layers = linear_layers(model)
  for module, keys in sorted(pairs.items()):
    if module not in layers:
      problems.append(f"{sorted(keys.values())[0]!r} matches no Linear layer ({module!r})")
    elif set(keys) != {"A", "B"}:
      problems.append(f"{next(iter(keys.values()))!r} has no lora_{'B' if 'A' in keys else 'A'}")
    else:
      a, b, layer = tuple(tensors[keys["A"]].shape), tuple(tensors[keys["B"]].shape), layers[module]
      if len(a) != 2 or a[1:] != (layer.in_features,) or b != (layer.out_features, a[0]):
        problems.append(f"{keys['A']!r} {a} / lora_B {b} do not fit the Linear {module!r} "
                        f"({layer.in_features} -> {layer.out_features}; A [r, in], B [out, r])")
  if problems or not pairs:
    shown = "\n  ".join(problems[:12]) or "no LoRA weight found"
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    raise ValueError(f"{where}: cannot load the LoRA adapters ({len(problems)} problems):\n"
                     f"  {shown}{more}")
  alphas = _file_alphas(metadata, prefix, path)
  for module, keys in sorted(pairs.items()):
    a = jnp.asarray(np.asarray(tensors[keys["A"]]).astype(param_dtype))
    b = jnp.asarray(np.asarray(tensors[keys["B"]]).astype(param_dtype))
    attach(layers[module], a, b, _alpha_for(module, a.shape[0], alphas))
  return len(pairs)
