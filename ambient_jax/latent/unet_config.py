"""Validation of a diffusers `UNet2DConditionModel` config.json (SD 1.x/2.x, SDXL families).

`resolve_unet_config(raw)` fills diffusers' defaults, expands per-block values to lists,
and rejects every key or value whose feature we do not implement, naming the key: a
config we cannot reproduce exactly is an error, never a silent difference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)

# diffusers 0.42 defaults of UNet2DConditionModel.__init__ for the keys we implement.
DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True,
    "freq_shift": 0, "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1, "attention_head_dim": 8,
    "use_linear_projection": False, "upcast_attention": False,
    "addition_embed_type": None, "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
}
# Keys whose only supported value is diffusers' default (the feature is not implemented).
FIXED: dict[str, Any] = {
    "center_input_sample": False, "only_cross_attention": False, "dropout": 0.0,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "num_attention_heads": None, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}


def _per_block(cfg: dict, key: str, n: int, kind: type) -> tuple:
  v = cfg[key]
  if isinstance(v, kind) and not isinstance(v, bool):
    return (v,) * n
  if (isinstance(v, Sequence) and not isinstance(v, str) and len(v) == n
      and all(isinstance(i, kind) and not isinstance(i, bool) for i in v)):
    return tuple(v)
  raise ValueError(f"unet config: {key}={v!r} is not allowed: expected one {kind.__name__} or a "
                   f"list of {n} (one per down block).")


def resolve_unet_config(raw: Mapping[str, Any]) -> dict[str, Any]:
  """Validated config with diffusers' defaults filled in; per-block values as tuples of
  length len(down_block_types) ("layers_per_block", "transformer_layers_per_block",
  "heads" (diffusers' `attention_head_dim`, which is the number of heads),
  "cross_attention_dim")."""
  raw = dict(raw)
  known = set(DEFAULTS) | set(FIXED)
  unknown = sorted(k for k in raw if not k.startswith("_") and k not in known)
  if unknown:
    raise ValueError(f"unet config: key {unknown[0]!r} is not supported by ambient_jax's "
                     f"UNet2DConditionModel (supported keys: {sorted(known)}).")
  for key, only in FIXED.items():
    if key in raw and raw[key] != only and not (isinstance(only, float) and raw[key] == only):
      raise ValueError(f"unet config: {key}={raw[key]!r} is not supported (only {only!r}, "
                       "diffusers' default, is implemented).")
  cfg = {**DEFAULTS, **{k: v for k, v in raw.items() if k in DEFAULTS}}
  down, up = tuple(cfg["down_block_types"]), tuple(cfg["up_block_types"])
  for key, types, allowed in (("down_block_types", down, DOWN_BLOCKS),
                              ("up_block_types", up, UP_BLOCKS)):
    bad = [t for t in types if t not in allowed]
    if bad or not types:
      raise ValueError(f"unet config: {key} contains {bad[0] if bad else 'nothing'!r}; "
                       f"supported block types: {allowed}.")
  if len(up) != len(down):
    raise ValueError(f"unet config: up_block_types has {len(up)} entries, down_block_types "
                     f"{len(down)}; they must match.")
  if cfg["mid_block_type"] not in MID_BLOCKS:
    raise ValueError(f"unet config: mid_block_type={cfg['mid_block_type']!r} is not supported "
                     f"(supported: {MID_BLOCKS}).")
  n = len(down)
  channels = tuple(cfg["block_out_channels"])
  if len(channels) != n:
    raise ValueError(f"unet config: block_out_channels has {len(channels)} entries for {n} "
                     "down blocks.")
  if cfg["act_fn"] not in ("silu", "swish"):
    raise ValueError(f"unet config: act_fn={cfg['act_fn']!r} is not supported (silu only).")
  for c in channels:
    if c % cfg["norm_num_groups"]:
      raise ValueError(f"unet config: norm_num_groups={cfg['norm_num_groups']} does not divide "
                       f"block_out_channels entry {c}.")
  heads = _per_block(cfg, "attention_head_dim", n, int)
  for c, h in zip(channels, heads):
    if c % h:
      raise ValueError(f"unet config: attention_head_dim (diffusers' head count) {h} does not "
                       f"divide {c} channels.")
  emb = cfg["addition_embed_type"]
  if emb not in (None, "text_time"):
    raise ValueError(f"unet config: addition_embed_type={emb!r} is not supported "
                     "(None or 'text_time').")
  if emb == "text_time" and not (cfg["addition_time_embed_dim"]
                                 and cfg["projection_class_embeddings_input_dim"]):
    raise ValueError("unet config: addition_embed_type='text_time' needs "
                     "addition_time_embed_dim and projection_class_embeddings_input_dim.")
  cfg.update(down_block_types=down, up_block_types=up, block_out_channels=channels, heads=heads,
             layers_per_block=_per_block(cfg, "layers_per_block", n, int),
             transformer_layers_per_block=_per_block(cfg, "transformer_layers_per_block", n, int),
             cross_attention_dim=_per_block(cfg, "cross_attention_dim", n, int))
  return cfg
