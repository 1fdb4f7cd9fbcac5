"""diffusers' `UNet2DConditionModel` (SD 1.x/2.x, SDXL) in Flax NNX, NHWC.

    unet = UNet2DConditionModel(config, rngs=nnx.Rngs(0))      # config: unet/config.json
    eps = unet(latents [B, h, w, 4], timesteps [B], context [B, T, D],
               text_embeds=[B, 1280], time_ids=[B, 6])          # SDXL's added conditions

Module and parameter names follow diffusers exactly (`down_blocks.1.attentions.0.
transformer_blocks.0.attn2.to_k.weight`), so a diffusers folder loads by name
(`ambient_jax.latent.pipeline`). Block structure, channel bookkeeping and skip order are
diffusers'; `unet_config.resolve_unet_config` rejects what is not implemented.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ambient_jax.latent.attention import Attention, check_implementation
from ambient_jax.latent import weights
from ambient_jax.latent.configs import freeze, thaw
from ambient_jax.latent.layers import Conv2d, GroupNorm, LayerNorm, Linear, Placeholder
from ambient_jax.latent.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from ambient_jax.latent.unet_config import resolve_unet_config

Dtype = Any


@dataclasses.dataclass(frozen=True)
class BlockCall:
  """How the UNet runs its modules: `run(module, *args)` is module(*args), with

  remat   each resnet / transformer block recomputed in the backward pass instead of its
          activations stored (jax.checkpoint over a pure split/merge of the module, so
          that nothing of the caller's trace is mutated: the module may be a merge inside
          a jitted step). `run(m, ..., remat=False)` for the small pieces between blocks.
  scan    `run.stack(blocks, x, ...)` runs a stack of identical transformer blocks as one
          lax.scan over their stacked weights (SDXL: 60 of its 70 blocks, 81 % of its
          weights, are in stacks of 10) instead of one after another.
  gather  FSDP: replicates a module's sharded weights (`sharding.replicate_for_use`) right
          before it runs. Inside a scanned stack it runs in the loop body, under remat:
          one layer's gathered weights are live at a time, forward and backward (the
          backward gathers again). Elsewhere the gathered weights are the block's inputs and
          live from the forward pass to the backward, as if gathered once per step.

  What remat saves is up to the XLA scheduler: nothing orders a recomputation, or an
  all-gather, after the work that needs it except a loop. The jaxpr's residuals do shrink
  (SDXL shapes, 1/1/1 transformer layers, 512², batch 2, f32: 3.5 GiB of saved activations
  -> 0.3 GiB, jax's saved_residuals), but XLA:CPU's default concurrency-optimized scheduler
  starts every block's recomputation as soon as its saved inputs exist, long before its
  cotangent arrives, so the recomputed activations of all blocks are live together and the
  plan does not move (4.67 -> 4.66 GiB). With xla_cpu_enable_concurrency_optimized_scheduler
  =false the same programs plan 2.96 -> 2.54 GiB; the scan removes the rest for the stacks.
  """
  remat: bool = False
  scan: bool = False
  gather: Callable[[Any], Any] | None = None

  def __call__(self, module: nnx.Module, *args, remat: bool | None = None):
    remat = self.remat if remat is None else remat
    if not remat and self.gather is None:
      return module(*args)
    graphdef, state = nnx.split(module)
    if self.gather is not None:
      state = self.gather(state)
    run = lambda st, *a: nnx.merge(graphdef, st)(*a)
    return (jax.checkpoint(run) if remat else run)(state, *args)

  def stack(self, blocks: Sequence[nnx.Module], x: jax.Array, *args) -> jax.Array:
    """x through `blocks` in order (each block(x, *args) -> x of the same shape): a
    lax.scan over their stacked weights when `scan` is on and there are several
    identical blocks, else one `run` per block."""
    if not self.scan or len(blocks) < 2:
      for block in blocks:
        x = self(block, x, *args)
      return x
    graphdef, states = None, []
    for block in blocks:
      block_graphdef, state = nnx.split(block)
      if graphdef is not None and block_graphdef != graphdef:
        raise ValueError("scan: the stacked blocks differ in structure")
      graphdef = block_graphdef
      states.append(state)
    gather = self.gather or (lambda st: st)

    def layer(h, state):
      return nnx.merge(graphdef, gather(state))(h, *args), None

    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    x, _ = jax.lax.scan(jax.checkpoint(layer) if self.remat else layer, x, stacked)
    return x


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """diffusers' `get_timestep_embedding`: float timesteps [N] -> [N, dim] float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  """linear_1 -> SiLU -> linear_2: [N, in] -> [N, out]."""

  def __init__(self, in_features: int, out_features: int, **kw):
    self.linear_1 = Linear(in_features, out_features, **kw)
    self.linear_2 = Linear(out_features, out_features, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class GEGLU(nnx.Module):
  """proj to 2·inner, then value · GELU(gate) (exact erf GELU, as torch's F.gelu)."""

  def __init__(self, dim: int, inner: int, **kw):
    self.proj = Linear(dim, inner * 2, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    value, gate = jnp.split(self.proj(x), 2, axis=-1)
    return value * jax.nn.gelu(gate.astype(jnp.float32), approximate=False).astype(value.dtype)


class FeedForward(nnx.Module):
  """net = [GEGLU, Dropout slot, Linear]: [B, T, dim] -> [B, T, dim]."""

  def __init__(self, dim: int, **kw):
    self.net = nnx.List([GEGLU(dim, 4 * dim, **kw), Placeholder(), Linear(4 * dim, dim, **kw)])

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
  """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual."""

  def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, *,
               upcast_attention: bool, attention: str = "auto", **kw):
    nkw = dict(dtype=kw["dtype"], param_dtype=kw["param_dtype"])
    akw = dict(heads=heads, dim_head=dim_head, upcast_attention=upcast_attention,
               attention=attention, **kw)
    self.norm1 = LayerNorm(dim, **nkw)
    self.attn1 = Attention(dim, **akw)
    self.norm2 = LayerNorm(dim, **nkw)
    self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **akw)
    self.norm3 = LayerNorm(dim, **nkw)
    self.ff = FeedForward(dim, **kw)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    x = self.attn1(self.norm1(x)) + x
    x = self.attn2(self.norm2(x), context) + x
    return self.ff(self.norm3(x)) + x


class Transformer2DModel(nnx.Module):
  """GroupNorm -> proj_in -> transformer blocks over HW tokens -> proj_out, plus the input.

  `use_linear_projection` picks Linear (SDXL, SD 2.x) or 1x1 Conv2d (SD 1.x) projections;
  on NHWC they are the same product, but the checkpoint shapes differ.
  """

  def __init__(self, channels: int, heads: int, num_layers: int, cross_attention_dim: int, *,
               norm_num_groups: int, use_linear_projection: bool, upcast_attention: bool,
               attention: str = "auto", **kw):
    nkw = dict(dtype=kw["dtype"], param_dtype=kw["param_dtype"])
    self.norm = GroupNorm(norm_num_groups, channels, eps=1e-6, **nkw)
    project = (lambda i, o: Linear(i, o, **kw)) if use_linear_projection else (
        lambda i, o: Conv2d(i, o, 1, **kw))
    self.proj_in = project(channels, channels)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(channels, heads, channels // heads, cross_attention_dim,
                              upcast_attention=upcast_attention, attention=attention, **kw)
        for _ in range(num_layers)])
    self.proj_out = project(channels, channels)

  def __call__(self, x: jax.Array, context: jax.Array, run: BlockCall = BlockCall()) -> jax.Array:
    b, h, w, c = x.shape
    tokens = run(self.proj_in, run(self.norm, x, remat=False), remat=False).reshape(b, h * w, c)
    tokens = run.stack(self.transformer_blocks, tokens, context)
    return run(self.proj_out, tokens.reshape(b, h, w, c), remat=False) + x.astype(tokens.dtype)


def transformers(count: int, channels: int, heads: int, depth: int, cross_attention_dim: int,
                 cfg: dict, attention: str, **kw) -> nnx.List:
  """`count` Transformer2DModels of `depth` blocks each, as a block's `attentions` list
  (`attention`: their dot_product_attention implementation)."""
  return nnx.List([Transformer2DModel(channels, heads, depth, cross_attention_dim,
                                      norm_num_groups=cfg["norm_num_groups"],
                                      use_linear_projection=cfg["use_linear_projection"],
                                      upcast_attention=cfg["upcast_attention"],
                                      attention=attention, **kw)
                   for _ in range(count)])


class DownBlock(nnx.Module):
  """DownBlock2D / CrossAttnDownBlock2D: resnets (+ transformers) then an optional stride-2 conv.

  Returns the output and the skip tensors the up path consumes (one per layer, one after
  the downsampler).
  """

  def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, has_attention: bool,
               add_downsample: bool, temb_channels: int, cfg: dict, heads: int,
               transformer_layers: int, cross_attention_dim: int, attention: str, **kw):
    rkw = dict(temb_channels=temb_channels, groups=cfg["norm_num_groups"], eps=cfg["norm_eps"], **kw)
    self.resnets = nnx.List([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                                           **rkw) for i in range(num_layers)])
    self.attentions = nnx.data(transformers(num_layers, out_channels, heads, transformer_layers,
                                            cross_attention_dim, cfg, attention, **kw)
                               if has_attention else None)
    self.downsamplers = nnx.data(nnx.List([Downsample2D(
        out_channels, padding=cfg["downsample_padding"], **kw)]) if add_downsample else None)

  def __call__(self, x, temb, context, run: BlockCall = BlockCall()):
    skips = []
    for i, resnet in enumerate(self.resnets):
      x = run(resnet, x, temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context, run)
      skips.append(x)
    if self.downsamplers is not None:
      x = run(self.downsamplers[0], x, remat=False)
      skips.append(x)
    return x, skips


class UpBlock(nnx.Module):
  """UpBlock2D / CrossAttnUpBlock2D: each layer concatenates one skip (channels last), then
  resnet (+ transformer); then an optional nearest ×2 upsample + conv."""

  def __init__(self, in_channels: int, prev_output_channels: int, out_channels: int, *,
               num_layers: int, has_attention: bool, add_upsample: bool, temb_channels: int,
               cfg: dict, heads: int, transformer_layers: int, cross_attention_dim: int,
               attention: str, **kw):
    rkw = dict(temb_channels=temb_channels, groups=cfg["norm_num_groups"], eps=cfg["norm_eps"], **kw)
    resnets = []
    for i in range(num_layers):
      skip_channels = in_channels if i == num_layers - 1 else out_channels
      resnet_in = prev_output_channels if i == 0 else out_channels
      resnets.append(ResnetBlock2D(resnet_in + skip_channels, out_channels, **rkw))
    self.resnets = nnx.List(resnets)
    self.attentions = nnx.data(transformers(num_layers, out_channels, heads, transformer_layers,
                                            cross_attention_dim, cfg, attention, **kw)
                               if has_attention else None)
    self.upsamplers = nnx.data(nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None)

  def __call__(self, x, skips, temb, context, run: BlockCall = BlockCall()):
    for i, resnet in enumerate(self.resnets):
      x = run(resnet, jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1), temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context, run)
    if self.upsamplers is not None:
      x = run(self.upsamplers[0], x, remat=False)
    return x


class MidBlock(nnx.Module):
  """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) pairs."""

  def __init__(self, channels: int, *, temb_channels: int, cfg: dict, heads: int,
               transformer_layers: int, cross_attention_dim: int, attention: str, **kw):
    rkw = dict(temb_channels=temb_channels, groups=cfg["norm_num_groups"], eps=cfg["norm_eps"],
               output_scale_factor=float(cfg["mid_block_scale_factor"]), **kw)
    self.attentions = transformers(1, channels, heads, transformer_layers, cross_attention_dim,
                                   cfg, attention, **kw)
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, **rkw) for _ in range(2)])

  def __call__(self, x, temb, context, run: BlockCall = BlockCall()):
    x = run(self.resnets[0], x, temb)
    return run(self.resnets[1], self.attentions[0](x, context, run), temb)


class UNet2DConditionModel(nnx.Module):
  """ε (or v) prediction network of Stable Diffusion: [B, h, w, C] latents -> [B, h, w, C].

  `config`: the unet/config.json dict (validated by `resolve_unet_config`). `dtype` is the
  compute dtype (e.g. bfloat16), `param_dtype` the storage dtype. `remat`: recompute every
  resnet and transformer block in the backward pass (same numbers; how much memory it saves
  depends on the XLA scheduler, see `BlockCall`). `scan_layers`: each Transformer2DModel's
  stack of blocks as one lax.scan (same numbers; with remat and FSDP, the memory of one
  layer's gathered weights and activations at a time; faster compiles). `gather_weights` (an
  attribute, set on a model merged from FSDP-sharded weights): see `BlockCall.gather`.
  `attention`: the self- and cross-attention implementation (latent.attention's
  ATTENTION_IMPLEMENTATIONS; "auto" is the best one the backend has).
  """

  def __init__(self, config: Mapping[str, Any], *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, remat: bool = False, scan_layers: bool = False,
               attention: str = "auto", rngs: nnx.Rngs):
    cfg = resolve_unet_config(config)
    self.remat = bool(remat)  # recompute each resnet / transformer block in the backward pass
    self.scan_layers = bool(scan_layers)  # each stack of transformer blocks as one lax.scan
    # FSDP: replicates a module's weights right before it runs (BlockCall.gather); set by
    # the training step on the model it merges from sharded frozen weights. None: as they are.
    self.gather_weights: Callable[[Any], Any] | None = None
    self.config = freeze(dict(config))  # the folder's config.json, saved back unchanged
    self.cfg = freeze(cfg)
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    channels = cfg["block_out_channels"]
    temb = channels[0] * 4
    self.conv_in = Conv2d(cfg["in_channels"], channels[0], 3, padding=1, **kw)
    self.time_embedding = TimestepEmbedding(channels[0], temb, **kw)
    self.add_embedding = nnx.data(
        TimestepEmbedding(cfg["projection_class_embeddings_input_dim"], temb, **kw)
        if cfg["addition_embed_type"] == "text_time" else None)

    common = dict(temb_channels=temb, cfg=cfg, attention=check_implementation(attention), **kw)
    n = len(channels)
    down = []
    for i, kind in enumerate(cfg["down_block_types"]):
      down.append(DownBlock(
          channels[max(i - 1, 0)], channels[i], num_layers=cfg["layers_per_block"][i],
          has_attention=kind.startswith("CrossAttn"), add_downsample=i < n - 1,
          heads=cfg["heads"][i], transformer_layers=cfg["transformer_layers_per_block"][i],
          cross_attention_dim=cfg["cross_attention_dim"][i], **common))
    self.down_blocks = nnx.List(down)
    self.mid_block = MidBlock(channels[-1], heads=cfg["heads"][-1],
                              transformer_layers=cfg["transformer_layers_per_block"][-1],
                              cross_attention_dim=cfg["cross_attention_dim"][-1], **common)
    rev = lambda key: tuple(reversed(cfg[key]))
    rev_channels = tuple(reversed(channels))
    up = []
    for i, kind in enumerate(cfg["up_block_types"]):
      up.append(UpBlock(
          rev_channels[min(i + 1, n - 1)], rev_channels[max(i - 1, 0)], rev_channels[i],
          num_layers=rev("layers_per_block")[i] + 1, has_attention=kind.startswith("CrossAttn"),
          add_upsample=i < n - 1, heads=rev("heads")[i],
          transformer_layers=rev("transformer_layers_per_block")[i],
          cross_attention_dim=rev("cross_attention_dim")[i], **common))
    self.up_blocks = nnx.List(up)
    self.conv_norm_out = GroupNorm(cfg["norm_num_groups"], channels[0], eps=cfg["norm_eps"],
                                   dtype=dtype, param_dtype=param_dtype)
    self.conv_out = Conv2d(channels[0], cfg["out_channels"], 3, padding=1, **kw)

  def embed(self, timesteps: jax.Array, text_embeds: jax.Array | None,
            time_ids: jax.Array | None, run: BlockCall = BlockCall()) -> jax.Array:
    """Time (+ SDXL's pooled-text and size) embedding: [B] (, [B, P], [B, 6]) -> [B, 4·C0]."""
    cfg = self.cfg
    t = timestep_embedding(timesteps, cfg["block_out_channels"][0], cfg["flip_sin_to_cos"],
                           cfg["freq_shift"])
    emb = run(self.time_embedding, t.astype(self.dtype), remat=False)
    if self.add_embedding is None:
      if text_embeds is not None or time_ids is not None:
        raise ValueError("text_embeds/time_ids were given but the UNet config has no "
                         "addition_embed_type='text_time' (they are SDXL's conditions).")
      return emb
    if text_embeds is None or time_ids is None:
      raise ValueError("this UNet (addition_embed_type='text_time', SDXL) needs text_embeds "
                       "[B, pooled] and time_ids [B, 6].")
    batch = timesteps.shape[0]
    time_emb = timestep_embedding(jnp.asarray(time_ids).reshape(-1), cfg["addition_time_embed_dim"],
                                  cfg["flip_sin_to_cos"], cfg["freq_shift"]).reshape(batch, -1)
    added = jnp.concatenate([jnp.asarray(text_embeds, jnp.float32), time_emb], axis=-1)
    if added.shape[-1] != cfg["projection_class_embeddings_input_dim"]:
      raise ValueError(f"text_embeds [{text_embeds.shape[-1]}] + time_ids embedding "
                       f"[{time_emb.shape[-1]}] give {added.shape[-1]} features; the config's "
                       f"projection_class_embeddings_input_dim is "
                       f"{cfg['projection_class_embeddings_input_dim']}.")
    return emb + run(self.add_embedding, added.astype(self.dtype), remat=False)

  def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array, *,
               text_embeds: jax.Array | None = None,
               time_ids: jax.Array | None = None) -> jax.Array:
    """sample [B, h, w, C], timesteps [B] or scalar (float: fractional steps allowed),
    context [B, T, cross_attention_dim] -> model output [B, h, w, out_channels] float32."""
    b, h, w, _ = sample.shape
    factor = 2 ** (len(self.down_blocks) - 1)
    if h % factor or w % factor:
      raise ValueError(f"latent size {h}x{w} is not a multiple of {factor} (the UNet halves it "
                       f"{len(self.down_blocks) - 1} times).")
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
    run = BlockCall(self.remat, self.scan_layers, self.gather_weights)
    temb = self.embed(timesteps, text_embeds, time_ids, run)
    context = context.astype(self.dtype)
    x = run(self.conv_in, sample, remat=False)
    skips = [x]
    for block in self.down_blocks:
      x, block_skips = block(x, temb, context, run)
      skips += block_skips
    x = self.mid_block(x, temb, context, run)
    for block in self.up_blocks:
      used = len(block.resnets)
      x = block(x, skips[-used:], temb, context, run)
      skips = skips[:-used]
    x = run(self.conv_out, jax.nn.silu(run(self.conv_norm_out, x, remat=False)), remat=False)
    return x.astype(jnp.float32)


def load_unet(folder: str, *, dtype: Dtype = None, param_dtype: Dtype = None,
              shardings: Any = None, variant: str | None = None, remat: bool = False,
              scan_layers: bool = False, attention: str = "auto",
              with_weights: bool = True) -> tuple[UNet2DConditionModel, dict[str, Any]]:
  """A diffusers `unet/` folder -> (UNet2DConditionModel with its weights, config.json dict).

  `param_dtype`: storage dtype (default: float32); `dtype`: compute dtype (default:
  `param_dtype`). `shardings`: see `weights.load_params` (e.g. FSDP over a mesh); each
  tensor goes straight from the memory-mapped file into its device shards.
  with_weights=False: the module with ShapeDtypeStruct parameters, nothing read (enough
  to restore and export adapters, which never run the base). `remat`,
  `scan_layers`, `attention`: as UNet2DConditionModel's.
  """
  param_dtype = param_dtype or jnp.float32
  config = weights.read_config(folder)
  abstract = weights.build_abstract(lambda: UNet2DConditionModel(
      config, dtype=dtype or param_dtype, param_dtype=param_dtype, remat=remat,
      scan_layers=scan_layers,
      attention=attention, rngs=nnx.Rngs(0)))
  if not with_weights:
    return abstract, config
  module = weights.load_params(abstract, weights.open_checkpoint(folder, variant),
                               component=f"unet ({folder})", dtype=param_dtype,
                               shardings=shardings)
  return module, config


def save_unet(unet: UNet2DConditionModel, folder: str, *, dtype: Dtype = None) -> None:
  """Writes `folder/config.json` + `diffusion_pytorch_model.safetensors` (diffusers opens it)."""
  weights.save_component(unet, folder, thaw(unet.config), stem="diffusion_pytorch_model",
                         dtype=dtype)
