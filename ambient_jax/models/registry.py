"""`build_model(config) -> EDMPrecond`: validated construction from a model config.

Names and defaults follow EDM's `train.py` presets (`--arch=ddpmpp|ncsnpp|adm`) on top of
the network constructors' defaults; "mlp" is the toy-data backbone. Any key may be
overridden from the config. Every bad value raises ValueError naming the field, the value
and what is allowed, before anything is traced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ambient_jax.models.dhariwal_unet import DhariwalUNet
from ambient_jax.models.mlp import MLP
from ambient_jax.models.preconditioned import EDMPrecond
from ambient_jax.models.song_unet import SongUNet

_SONG = dict(model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4,
             attn_resolutions=(16,), dropout=0.10, label_dropout=0.0)
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "ddpmpp": dict(_SONG, embedding_type="positional", channel_mult_noise=1,
                   encoder_type="standard", decoder_type="standard", resample_filter=(1, 1)),
    "ncsnpp": dict(_SONG, embedding_type="fourier", channel_mult_noise=2,
                   encoder_type="residual", decoder_type="standard",
                   resample_filter=(1, 3, 3, 1)),
    "adm": dict(model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0.0,
                channels_per_head=64),
    "mlp": dict(model_channels=256, num_blocks=4, channel_mult_emb=1, dropout=0.0,
                label_dropout=0.0),
}
_COMMON = dict(label_dim=0, augment_dim=0, dtype="float32", sigma_data=0.5)
_IMAGE_ONLY = ("img_resolution", "in_channels", "out_channels")
_MLP_ONLY = ("data_dim",)
KNOWN_KEYS = frozenset({"name", *_COMMON, *_IMAGE_ONLY, *_MLP_ONLY,
                        *(k for p in ARCH_PRESETS.values() for k in p)})
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _as_dict(config: Any) -> dict[str, Any]:
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict.
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise ValueError(f"model config must be a dict or ConfigDict; got {type(config).__name__}.")
  return dict(config)


def _int(cfg, key, prefix, minimum):
  v = cfg[key]
  if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
    raise ValueError(f"{prefix}{key}={v!r} is not allowed: expected an integer >= {minimum}.")
  return v


def _ints(cfg, key, prefix, minimum, nonempty):
  v = cfg[key]
  ok = isinstance(v, Sequence) and not isinstance(v, str) and (len(v) > 0 or not nonempty)
  ok = ok and all(isinstance(i, int) and not isinstance(i, bool) and i >= minimum for i in v)
  if not ok:
    raise ValueError(f"{prefix}{key}={v!r} is not allowed: expected a "
                     f"{'non-empty ' if nonempty else ''}sequence of integers >= {minimum}.")
  return tuple(v)


def _rate(cfg, key, prefix):
  v = cfg[key]
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
    raise ValueError(f"{prefix}{key}={v!r} is not allowed: expected a probability in [0, 1).")
  return float(v)


def resolve_config(model_config: Any, *, prefix: str = "model.") -> dict[str, Any]:
  """Validates a model config and fills in the preset defaults; returns a plain dict."""
  cfg = _as_dict(model_config)
  unknown = sorted(set(cfg) - KNOWN_KEYS)
  if unknown:
    raise ValueError(f"{prefix}{unknown[0]} is not a model option; allowed keys: "
                     f"{sorted(KNOWN_KEYS)}.")
  name = cfg.get("name")
  if name not in ARCH_PRESETS:
    raise ValueError(f"{prefix}name={name!r} is not allowed: expected one of "
                     f"{sorted(ARCH_PRESETS)}.")
  out = {**_COMMON, **ARCH_PRESETS[name], "name": name}
  out.update({k: v for k, v in cfg.items() if k in out or k in _IMAGE_ONLY + _MLP_ONLY})
  if out["dtype"] not in DTYPES and out["dtype"] not in DTYPES.values():
    raise ValueError(f"{prefix}dtype={out['dtype']!r} is not allowed: expected one of "
                     f"{sorted(DTYPES)}.")
  if isinstance(out["dtype"], str):
    out["dtype"] = DTYPES[out["dtype"]]
  s = out["sigma_data"]
  if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
    raise ValueError(f"{prefix}sigma_data={s!r} is not allowed: expected a positive number.")
  for key in ("label_dim", "augment_dim"):
    _int(out, key, prefix, 0)
  for key in ("model_channels", "num_blocks", "channel_mult_emb"):
    _int(out, key, prefix, 1)
  for key in ("dropout", "label_dropout"):
    out[key] = _rate(out, key, prefix)

  if name == "mlp":
    if "data_dim" not in out:
      if "in_channels" not in out:
        raise ValueError(f"{prefix}data_dim is required for name='mlp' (the size D of [B, D]).")
      out["data_dim"] = out["in_channels"]
    _int(out, "data_dim", prefix, 1)
    return out

  for key in ("img_resolution", "in_channels"):
    if key not in out:
      raise ValueError(f"{prefix}{key} is required for name={name!r}.")
    _int(out, key, prefix, 1)
  out.setdefault("out_channels", out["in_channels"])
  _int(out, "out_channels", prefix, 1)
  mult = out["channel_mult"] = _ints(out, "channel_mult", prefix, 1, nonempty=True)
  out["attn_resolutions"] = _ints(out, "attn_resolutions", prefix, 1, nonempty=False)
  factor = 2 ** (len(mult) - 1)
  if out["img_resolution"] % factor:
    raise ValueError(
        f"{prefix}img_resolution={out['img_resolution']} is not allowed with "
        f"{prefix}channel_mult={mult}: the U-Net halves the resolution {len(mult) - 1} times, "
        f"so it must be a multiple of 2**(len(channel_mult)-1)={factor}.")
  if name in ("ddpmpp", "ncsnpp"):
    _int(out, "channel_mult_noise", prefix, 1)
    if (out["model_channels"] * out["channel_mult_noise"]) % 2:
      raise ValueError(f"{prefix}model_channels*channel_mult_noise must be even (sin/cos "
                       f"halves); got {out['model_channels']}*{out['channel_mult_noise']}.")
    f = out["resample_filter"]
    if (isinstance(f, str) or not isinstance(f, Sequence) or len(f) < 2 or len(f) % 2
        or sum(f) <= 0):
      raise ValueError(f"{prefix}resample_filter={f!r} is not allowed: expected an even-length "
                       f"sequence with positive sum, e.g. (1, 1) or (1, 3, 3, 1).")
    out["resample_filter"] = tuple(float(v) for v in f)
    for key, allowed in (("embedding_type", ("positional", "fourier")),
                         ("encoder_type", ("standard", "skip", "residual")),
                         ("decoder_type", ("standard", "skip"))):
      if out[key] not in allowed:
        raise ValueError(f"{prefix}{key}={out[key]!r} is not allowed: expected one of {allowed}.")
  else:
    _int(out, "channels_per_head", prefix, 1)
    for m in mult:
      c = out["model_channels"] * m
      heads = c // out["channels_per_head"]
      if heads and c % heads:
        raise ValueError(f"{prefix}model_channels*channel_mult={c} does not split into "
                         f"{heads} attention heads of ~{out['channels_per_head']} channels.")
  return out


def build_backbone(cfg: dict[str, Any], *, rngs: nnx.Rngs) -> nnx.Module:
  """Backbone F from a `resolve_config` result."""
  common = dict(label_dim=cfg["label_dim"], augment_dim=cfg["augment_dim"],
                model_channels=cfg["model_channels"], num_blocks=cfg["num_blocks"],
                channel_mult_emb=cfg["channel_mult_emb"], dropout=cfg["dropout"],
                label_dropout=cfg["label_dropout"], dtype=cfg["dtype"], rngs=rngs)
  if cfg["name"] == "mlp":
    return MLP(cfg["data_dim"], **common)
  image = dict(img_resolution=cfg["img_resolution"], in_channels=cfg["in_channels"],
               out_channels=cfg["out_channels"], channel_mult=cfg["channel_mult"],
               attn_resolutions=cfg["attn_resolutions"])
  if cfg["name"] == "adm":
    return DhariwalUNet(**image, **common, channels_per_head=cfg["channels_per_head"])
  song = {k: cfg[k] for k in ("embedding_type", "channel_mult_noise", "encoder_type",
                              "decoder_type", "resample_filter")}
  return SongUNet(**image, **common, **song)


def build_model(model_config: Any, *, rngs: nnx.Rngs, prefix: str = "model.") -> EDMPrecond:
  """Validated `EDMPrecond(backbone, sigma_data)` from a dict / ConfigDict.

  Keys: name (ddpmpp|ncsnpp|adm|mlp); img_resolution, in_channels[, out_channels] for the
  U-Nets, data_dim for the MLP; label_dim, augment_dim, dtype (float32|bfloat16),
  sigma_data; and any preset key in `ARCH_PRESETS[name]` (model_channels, channel_mult,
  num_blocks, attn_resolutions, dropout, channel_mult_noise, resample_filter, ...). Keys that
  exist for another architecture are ignored; unknown keys raise. `prefix` names the config
  section in error messages. The model starts in training mode (dropout on).
  """
  cfg = resolve_config(model_config, prefix=prefix)
  return EDMPrecond(build_backbone(cfg, rngs=rngs), sigma_data=cfg["sigma_data"])


def count_params(model_or_state: Any) -> int:
  """Number of scalars in the nnx.Param leaves (works on abstract models from eval_shape)."""
  state = model_or_state
  if isinstance(model_or_state, nnx.Module):
    state = nnx.state(model_or_state, nnx.Param)
  return int(sum(int(x.size) for x in jax.tree.leaves(state)))


def abstract_param_count(model_config: Any) -> int:
  """Parameter count of `build_model(model_config)` without allocating anything."""
  abstract = nnx.eval_shape(lambda: build_model(model_config, rngs=nnx.Rngs(0)))
  return count_params(abstract)
