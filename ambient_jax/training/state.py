"""The train state (a plain pytree), the model as pure functions, and the optimizer.

The NNX model is split once into graph definitions (train: dropout on; eval: off) and
a pure-dict parameter tree. `ModelDef.denoiser(params, ...)` returns a pure
`denoise_fn(x, sigma) -> x0_hat` that re-merges the module on every call, so it is safe
inside jit, grad, lax.cond and lax.scan (the losses and samplers use all of them), and
its dropout keys come from the step key, not from hidden module state.

`TrainState` holds everything a resume needs: step, params, optimizer state and every
EMA. The data position is the step (data order is a pure function of (seed, epoch)).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ambient_jax.runtime import sharding as sharding_lib
from ambient_jax.models import build_model

_PARAMS_SALT, _DROPOUT_SALT = 0x9A7A, 0xD209


@flax.struct.dataclass
class TrainState:
  step: jax.Array      # int32 scalar: number of completed training steps
  params: Any          # nested dict of arrays
  opt_state: Any
  ema: tuple           # one params-like tree per config.ema.halflife_kimg entry


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """A built model as data: graph definitions + non-parameter state + image layout."""
  train_graphdef: Any
  eval_graphdef: Any
  rest: Any                     # non-Param state (dropout RNG streams), reseeded per call
  image_shape: tuple            # (H, W, C)
  flat: bool                    # the MLP takes [B, H·W·C]
  label_dim: int
  model_config: dict

  def denoiser(self, params: Any, *, train: bool, key: Optional[jax.Array] = None,
               labels: Optional[jax.Array] = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Pure denoise_fn(x [B,H,W,C], sigma [B]) -> x0_hat for these params.

    train=True enables dropout with keys fold_in(key, call index); labels [b] are tiled
    when the loss calls the network on a multiple of the batch (several chains at once).
    """
    graphdef = self.train_graphdef if train else self.eval_graphdef
    calls = [0]

    def denoise(x: jax.Array, sigma: jax.Array) -> jax.Array:
      model = nnx.merge(graphdef, params, self.rest)
      if train and key is not None:
        nnx.reseed(model, dropout=jax.random.fold_in(key, calls[0]))
        calls[0] += 1
      lab = None
      if self.label_dim and labels is not None:
        reps = x.shape[0] // labels.shape[0]
        lab = labels if reps == 1 else jnp.concatenate([labels] * reps, axis=0)
      if self.flat:
        return model(x.reshape(x.shape[0], -1), sigma, lab).reshape(x.shape)
      return model(x, sigma, lab)

    return denoise


def model_config_dict(config: Any) -> dict:
  return config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)


def _build(model_config: dict, key: jax.Array):
  rngs = nnx.Rngs(params=jax.random.fold_in(key, _PARAMS_SALT),
                  dropout=jax.random.fold_in(key, _DROPOUT_SALT))
  return build_model(model_config, rngs=rngs)


def make_model_def(config: Any, image_shape: tuple) -> ModelDef:
  """Graph definitions of config.model (no parameters are allocated)."""
  model_config = model_config_dict(config)
  abstract = nnx.eval_shape(lambda: _build(model_config, jax.random.key(0)))
  train_graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
  abstract.eval()
  eval_graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
  # The non-Param state (RNG streams) is tiny: build it concretely once.
  # Kept as a pure dict so that every merge makes fresh Variables in the caller's trace.
  rest = nnx.to_pure_dict(jax.jit(
      lambda: nnx.split(_build(model_config, jax.random.key(0)), nnx.Param, ...)[2])())
  return ModelDef(train_graphdef, eval_graphdef, rest, tuple(image_shape),
                  model_config["name"] == "mlp", int(model_config.get("label_dim", 0)),
                  model_config)


def learning_rate_schedule(optim_config: Any) -> Callable[[jax.Array], jax.Array]:
  """Linear warm-up from 0 to lr over warmup_steps (EDM's lr ramp), then constant."""
  lr, warmup = float(optim_config.lr), int(optim_config.warmup_steps)

  def schedule(count):
    if warmup <= 0:
      return jnp.asarray(lr, jnp.float32)
    return lr * jnp.minimum(1.0, (jnp.asarray(count, jnp.float32) + 1.0) / warmup)

  return schedule


def make_optimizer(optim_config: Any) -> optax.GradientTransformation:
  """(global-norm clip) + Adam (AdamW when optim.weight_decay > 0) with the warm-up schedule."""
  decay = float(optim_config.get("weight_decay", 0.0))
  common = dict(b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps)
  adam = (optax.adamw(learning_rate_schedule(optim_config), weight_decay=decay, **common) if decay
          else optax.adam(learning_rate_schedule(optim_config), **common))
  if optim_config.grad_clip and optim_config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), adam)
  return adam


def state_from_params(params: Any, tx: optax.GradientTransformation, num_emas: int) -> TrainState:
  """The step-0 state around trainable `params`: fresh optimizer state, EMAs = params."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema=tuple(jax.tree.map(jnp.copy, params) for _ in range(num_emas)))


def init_fn(config: Any, tx: optax.GradientTransformation) -> Callable[[], TrainState]:
  """A function () -> TrainState at step 0; parameters are a pure function of config.seed."""
  model_config = model_config_dict(config)
  num_emas = len(tuple(config.ema.halflife_kimg))

  def init() -> TrainState:
    model = _build(model_config, jax.random.key(config.seed))
    return state_from_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), tx, num_emas)

  return init


def state_shardings(config: Any, mesh: jax.sharding.Mesh, abstract_state: TrainState) -> TrainState:
  """Where each leaf lives: replicated, or FSDP-sharded by shape when mesh.fsdp > 1 (leaves
  of at least config.mesh.fsdp_min_size elements; see sharding.param_sharding)."""
  min_size = int(config.mesh.get("fsdp_min_size", sharding_lib.FSDP_MIN_SIZE))
  return sharding_lib.param_sharding(mesh, abstract_state, min_size=min_size)


def create_train_state(config: Any, mesh: jax.sharding.Mesh,
                       tx: optax.GradientTransformation) -> tuple[TrainState, TrainState]:
  """(state at step 0 placed on the mesh, its shardings)."""
  init = init_fn(config, tx)
  shardings = state_shardings(config, mesh, jax.eval_shape(init))
  return jax.jit(init, out_shardings=shardings)(), shardings


def abstract_train_state(config: Any, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation,
                         init: Optional[Callable[..., TrainState]] = None, init_args: tuple = ()
                         ) -> tuple[TrainState, TrainState]:
  """(ShapeDtypeStructs of the state carrying their target shardings, the shardings).
  `init(*init_args)` builds the step-0 state (default: `init_fn(config, tx)`)."""
  abstract = jax.eval_shape(init or init_fn(config, tx), *init_args)
  shardings = state_shardings(config, mesh, abstract)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings), shardings
