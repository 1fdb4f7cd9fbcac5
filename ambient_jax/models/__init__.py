"""Flax NNX denoisers: EDM's DDPM++ / NCSN++ (SongUNet), ADM (DhariwalUNet), a toy MLP.

    model = build_model({"name": "ddpmpp", "img_resolution": 32, "in_channels": 3},
                        rngs=nnx.Rngs(params=0, dropout=1))
    x0_hat = model(x_noisy, sigma)            # [B,H,W,C] NHWC (or [B,D] for "mlp"), [B] -> f32

Parameter counts equal NVlabs/edm's `training/networks.py` exactly (tests/test_models.py).

Modes: models start in training mode (dropout on, as `nnx.Dropout`). `model.eval()` /
`model.train()` switch every Dropout / LabelDropout (`deterministic` attribute);
`nnx.view(model, deterministic=True)` gives an eval view without mutating the model.
Dropout randomness comes from the nnx.Rngs stream "dropout".

Pure denoiser for jit/grad: `graphdef, params, rest = nnx.split(model, nnx.Param, ...)`
once outside jit, then inside the jitted function
`denoise_fn = make_denoise_fn(graphdef, params, rest, labels=..., dropout_key=key)`.
If you merge by hand, use `nnx.merge(graphdef, params, rest, copy=True)` and then
`nnx.reseed(model, dropout=key)`: without `copy=True` a train-mode forward inside
`jax.grad` raises TraceContextError (dropout advances RNG state from another trace).

Logical axis names (metadata `out_sharding` on every nnx.Param, `eager_sharding=False`,
so building a model never needs a mesh):
    conv kernel  [k, k, in, out]  ('conv_h', 'conv_w', 'conv_in', 'conv_out')
    conv bias    [out]            ('conv_out',)
    dense kernel [in, out]        ('embed_in', 'embed_out')
    dense bias   [out]            ('embed_out',)
    norm scale / bias [C]         ('norm',)
`logical_axis_rules("fsdp")` maps the output-channel axes (conv_out, embed_out) to a mesh
axis and everything else to None; use it with `nnx.logical_axis_rules(...)` +
`nnx.get_partition_spec(state)`. Some output widths (e.g. the final 3-channel conv) are
not divisible by a large fsdp axis: replicate those. Non-trainable fixed state (NCSN++
Fourier frequencies) is `layers.Buffer`, not `nnx.Param`; resample filters are constants.
"""

from ambient_jax.models.dhariwal_unet import DhariwalUNet
from ambient_jax.models.mlp import MLP
from ambient_jax.models.preconditioned import EDMPrecond, make_denoise_fn
from ambient_jax.models.registry import (ARCH_PRESETS, abstract_param_count, build_model,
                                         count_params, resolve_config)
from ambient_jax.models.song_unet import SongUNet

# "lora_rank": the rank axis of LoRA adapters (`ambient_jax.latent.lora`), never sharded.
LOGICAL_AXES = ("conv_h", "conv_w", "conv_in", "conv_out", "embed_in", "embed_out", "norm",
                "lora_rank")


def logical_axis_rules(fsdp_axis: str | None = "fsdp") -> tuple[tuple[str, str | None], ...]:
  """Rules mapping every logical axis name to a mesh axis: output channels -> `fsdp_axis`."""
  sharded = ("conv_out", "embed_out")
  return tuple((name, fsdp_axis if name in sharded else None) for name in LOGICAL_AXES)


__all__ = ["ARCH_PRESETS", "DhariwalUNet", "EDMPrecond", "LOGICAL_AXES", "MLP", "SongUNet",
           "abstract_param_count", "build_model", "count_params", "logical_axis_rules",
           "make_denoise_fn", "resolve_config"]
