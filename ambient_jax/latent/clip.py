"""transformers' CLIP text encoders in Flax NNX: `CLIPTextModel` (SD 1.x, SDXL's first
encoder) and `CLIPTextModelWithProjection` (SDXL's second).

    encoder, config = load_text_encoder("sdxl/text_encoder_2")
    out = encoder(ids)              # ids [B, T] int (tokenizer.CLIPTokenizer)
    out.last_hidden_state           # [B, T, C] after the final LayerNorm
    out.hidden_states[-2]           # [B, T, C], the penultimate layer (SDXL's conditioning)
    out.pooled                      # [B, C] at each sequence's end-of-text token
    out.text_embeds                 # [B, projection_dim] (WithProjection; else None)

Modules and parameters are named as in the checkpoints that SD / SDXL folders ship
(`text_model.encoder.layers.0.self_attn.q_proj.weight`, `text_projection.weight`), which
transformers 4.x and 5.x both read. transformers 5.x itself saves a plain CLIPTextModel
without the `text_model.` prefix, and transformers < 4.31 saved a `position_ids` buffer:
`load_text_encoder` accepts all three. The encoder is pre-LayerNorm, causal (each token
attends to itself and those before it), and runs in inference mode (no dropout).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ambient_jax.latent import weights
from ambient_jax.latent.attention import dot_product_attention
from ambient_jax.latent.layers import Embedding, LayerNorm, Linear, activation

Dtype = Any

ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")
ACTIVATIONS = ("quick_gelu", "gelu")
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
            "eos_token_id")


def check_config(config: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first key of a text_encoder config.json that this module
  does not implement (so a difference is an error, never silent)."""
  if missing := [k for k in REQUIRED if k not in config]:
    raise ValueError(f"text encoder config: missing key(s) {missing}.")
  if config.get("model_type", "clip_text_model") != "clip_text_model":
    raise ValueError(f"text encoder config: model_type {config['model_type']!r} is not "
                     "supported (only 'clip_text_model').")
  if config["hidden_act"] not in ACTIVATIONS:
    raise ValueError(f"text encoder config: hidden_act {config['hidden_act']!r} is not "
                     f"supported; expected one of {list(ACTIVATIONS)}.")
  if config["hidden_size"] % config["num_attention_heads"]:
    raise ValueError(f"text encoder config: hidden_size {config['hidden_size']} does not split "
                     f"into num_attention_heads {config['num_attention_heads']} heads.")
  for key in ("attention_dropout", "dropout"):
    if config.get(key, 0.0):
      raise ValueError(f"text encoder config: {key} {config[key]} is not supported "
                       "(inference only: 0.0).")
  architectures = config.get("architectures") or ["CLIPTextModel"]
  if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
    raise ValueError(f"text encoder config: architectures {architectures} is not supported; "
                     f"expected one of {list(ARCHITECTURES)}.")
  if architectures[0] == "CLIPTextModelWithProjection" and "projection_dim" not in config:
    raise ValueError("text encoder config: CLIPTextModelWithProjection needs projection_dim.")


class TextEncoderOutput(NamedTuple):
  """What the encoders return (a pytree, so it passes through jit)."""
  last_hidden_state: jax.Array            # [B, T, C], after final_layer_norm
  pooled: jax.Array                       # [B, C], last_hidden_state at the EOS token
  hidden_states: tuple[jax.Array, ...]    # embeddings, then each layer's output: L + 1 of [B, T, C]
  text_embeds: jax.Array | None = None    # [B, projection_dim] (CLIPTextModelWithProjection)


class CLIPAttention(nnx.Module):
  """Multi-head self-attention [B, T, C] -> [B, T, C]; q/k/v/out_proj with biases."""

  def __init__(self, hidden: int, heads: int, **kw):
    self.heads = heads
    self.q_proj = Linear(hidden, hidden, **kw)
    self.k_proj = Linear(hidden, hidden, **kw)
    self.v_proj = Linear(hidden, hidden, **kw)
    self.out_proj = Linear(hidden, hidden, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """`mask`: boolean [B or 1, 1, T, T], True where a query may attend to a key."""
    split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)  # [B, T, C] -> [B, T, N, D]
    out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                split(self.v_proj(x)), mask=mask)
    return self.out_proj(out.reshape(x.shape))


class CLIPMLP(nnx.Module):
  """fc1 -> activation -> fc2: [B, T, C] -> [B, T, C]."""

  def __init__(self, hidden: int, intermediate: int, act: str, **kw):
    self.act = activation(act)
    self.fc1 = Linear(hidden, intermediate, **kw)
    self.fc2 = Linear(intermediate, hidden, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-LayerNorm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  def __init__(self, config: Mapping[str, Any], **kw):
    hidden, eps = config["hidden_size"], config["layer_norm_eps"]
    norm_kw = dict(eps=eps, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
    self.self_attn = CLIPAttention(hidden, config["num_attention_heads"], **kw)
    self.layer_norm1 = LayerNorm(hidden, **norm_kw)
    self.mlp = CLIPMLP(hidden, config["intermediate_size"], config["hidden_act"], **kw)
    self.layer_norm2 = LayerNorm(hidden, **norm_kw)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nnx.Module):
  """Token + learned position embeddings: ids [B, T] -> [B, T, C]."""

  def __init__(self, config: Mapping[str, Any], **kw):
    self.token_embedding = Embedding(config["vocab_size"], config["hidden_size"], **kw)
    self.position_embedding = Embedding(config["max_position_embeddings"], config["hidden_size"],
                                        **kw)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return self.token_embedding(ids) + self.position_embedding(jnp.arange(ids.shape[-1]))[None]


class CLIPEncoder(nnx.Module):
  """The stack of `num_hidden_layers` CLIPEncoderLayers (`encoder.layers.{i}`)."""

  def __init__(self, config: Mapping[str, Any], **kw):
    self.layers = nnx.List([CLIPEncoderLayer(config, **kw)
                            for _ in range(config["num_hidden_layers"])])


class CLIPTextTransformer(nnx.Module):
  """Embeddings, causal encoder, final LayerNorm, EOS pooling (transformers' `text_model`)."""

  def __init__(self, config: Mapping[str, Any], **kw):
    check_config(config)
    self.eos_token_id = int(config["eos_token_id"])
    self.max_positions = int(config["max_position_embeddings"])
    self.embeddings = CLIPTextEmbeddings(config, **kw)
    self.encoder = CLIPEncoder(config, **kw)
    self.final_layer_norm = LayerNorm(config["hidden_size"], eps=config["layer_norm_eps"],
                                      dtype=kw["dtype"], param_dtype=kw["param_dtype"])

  def __call__(self, ids: jax.Array, attention_mask: jax.Array | None = None) -> TextEncoderOutput:
    """ids [B, T] int -> TextEncoderOutput (text_embeds None).

    `attention_mask`: optional [B, T], 1 for tokens and 0 for padding that no token may
    attend to (SD and SDXL pass none: padding is attended causally like any token).
    """
    batch, length = ids.shape
    if length > self.max_positions:
      raise ValueError(f"text encoder: {length} tokens, more than max_position_embeddings "
                       f"{self.max_positions}.")
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, T, T]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, None, :]
    x = self.embeddings(ids)
    hidden_states = [x]
    for layer in self.encoder.layers:
      x = layer(x, mask)
      hidden_states.append(x)
    last = self.final_layer_norm(x)
    if self.eos_token_id == 2:
      # Configs written before transformers PR #24773 (SD 1.x, SDXL) say 2: transformers then
      # takes the highest id, CLIP's end-of-text 49407.
      eos = jnp.argmax(ids, axis=-1)
    else:  # the first end-of-text token (padding may repeat it)
      eos = jnp.argmax((ids == self.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = last[jnp.arange(batch), eos]
    return TextEncoderOutput(last, pooled, tuple(hidden_states))


def _kwargs(dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> dict[str, Any]:
  return dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class CLIPTextModel(nnx.Module):
  """transformers' CLIPTextModel: ids [B, T] -> TextEncoderOutput (SD 1.x, SDXL's first)."""

  def __init__(self, config: Mapping[str, Any], *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.text_model = CLIPTextTransformer(config, **_kwargs(dtype, param_dtype, rngs))

  def __call__(self, ids: jax.Array, attention_mask: jax.Array | None = None) -> TextEncoderOutput:
    return self.text_model(ids, attention_mask)


class CLIPTextModelWithProjection(nnx.Module):
  """transformers' CLIPTextModelWithProjection: also `text_embeds` = text_projection(pooled)
  [B, projection_dim] (SDXL's second encoder; its pooled conditioning)."""

  def __init__(self, config: Mapping[str, Any], *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = _kwargs(dtype, param_dtype, rngs)
    self.text_model = CLIPTextTransformer(config, **kw)
    self.text_projection = Linear(config["hidden_size"], config["projection_dim"], bias=False, **kw)

  def __call__(self, ids: jax.Array, attention_mask: jax.Array | None = None) -> TextEncoderOutput:
    out = self.text_model(ids, attention_mask)
    return out._replace(text_embeds=self.text_projection(out.pooled))


def text_encoder(config: Mapping[str, Any], *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs) -> CLIPTextModel | CLIPTextModelWithProjection:
  """The class that the config's `architectures` names, built from the config."""
  check_config(config)
  cls = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
  architecture = (config.get("architectures") or ["CLIPTextModel"])[0]
  return cls[architecture](config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def checkpoint_names(tensors: Mapping[str, Any]) -> dict[str, Any]:
  """Checkpoint tensors under our names: drops the `position_ids` buffer (transformers
  < 4.31 saved it) and adds the `text_model.` prefix that transformers 5.x leaves off a
  plain CLIPTextModel. Values are not read (memory-mapped views stay views)."""
  out = {}
  for name in tensors:
    if name.endswith("embeddings.position_ids"):
      continue
    ours = name if name.startswith(("text_model.", "text_projection.")) else "text_model." + name
    out[ours] = tensors[name]
  return out


def load_text_encoder(folder: str | os.PathLike, *, dtype: Dtype = None, shardings: Any = None,
                      variant: str | None = None
                      ) -> tuple[CLIPTextModel | CLIPTextModelWithProjection, dict[str, Any]]:
  """A `text_encoder/` or `text_encoder_2/` folder -> (module, its config.json dict).

  `dtype`: parameters are loaded straight into it and the model computes in it (float32
  when None; LayerNorm statistics and the softmax stay float32). `shardings`: as
  `weights.load_params` (a pytree or a callable on the abstract parameter state).
  `variant`: e.g. "fp16" for `model.fp16.safetensors`.
  """
  config = weights.read_config(folder)
  dtype = dtype or jnp.float32
  abstract = weights.build_abstract(
      lambda: text_encoder(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
  tensors = checkpoint_names(weights.open_checkpoint(folder, variant))
  module = weights.load_params(abstract, tensors, component=f"text encoder ({os.fspath(folder)})",
                               dtype=dtype, shardings=shardings)
  return module, config


def save_text_encoder(module: CLIPTextModel | CLIPTextModelWithProjection,
                      config: Mapping[str, Any], folder: str | os.PathLike, *,
                      dtype: Dtype = None) -> None:
  """Writes `config.json` (the original dict, so transformers finds everything it reads;
  `architectures` set to the module's class) and `model.safetensors` (cast to `dtype` when
  given): transformers' from_pretrained opens it."""
  weights.save_component(module, folder, {**config, "architectures": [type(module).__name__]},
                         stem="model", dtype=dtype)
