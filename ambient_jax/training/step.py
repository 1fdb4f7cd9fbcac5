"""The pieces every task's training step shares: the below-σ_n term, gradient
accumulation over micro-batches with per-example keys, the optimizer + EMA update, the jit
over the mesh, the consistency phase and what a model was trained with.

A task (`training.pixel`, `training.latent`) writes its pure step from these; the Trainer
jits it once per consistency phase with `jit_train_step`. A step's loss is a sum of terms
(the main loss; λ_c × the below-σ_n loss once consistency is on), each a function
(params, micro-batch, frozen weights) -> (loss, metrics) whose gradient is taken on its
own (`sum_of_term_gradients`).

Gradient accumulation (config.optim.grad_accum_steps = k): inside the one jitted step the
global batch B is cut into k micro-batches of b = B/k, `lax.scan` runs forward + backward
on one at a time (activation memory of b examples) and sums the gradients in float32;
their mean over the k micro-batches is the full batch's gradient (every loss is a mean
over equally sized parts). Example p of the global batch (its *position*, 0..B-1) draws
from fold_in(key, p) (`example_keys`), so its σ and noise do not depend on k. The loader
writes the batch in an order (`data.loader.physical_order`) that `micro_batches` undoes
with local reshapes only: every device holds B/N rows and gives b/N of them to each
micro-batch, so the split moves no data between devices.

How the k micro-batches run (config.optim.grad_accum_loop): "scan" is one `lax.scan` (an
XLA while loop: one micro-batch's activations live at a time, one copy of the graph to
compile); "unrolled" traces the k micro-batches one after the other (straight-line code,
k copies to compile, and XLA may overlap them). "auto" is "scan" on GPU/TPU and
"unrolled" on CPU: XLA:CPU leaves a convolution's weight gradient inside a while loop in
its non-canonical form, which it runs as a naive loop nest, ~35× slower (the default
pixel step: 0.47 s plain, 10 s in a length-1 scan; docs/training.md). k = 1 is
always the plain gradient, no loop. The same setting decides how the terms run: "scan" takes
them one per loop iteration (each term's activations live alone: the SDXL step's consistency
phase plans 1.01× its ambient phase instead of 1.24×), "unrolled" one after the other in
straight-line code.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from ambient_jax import losses, random_draws
from ambient_jax.runtime import sharding as sharding_lib
from ambient_jax.training import ema
from ambient_jax.training import state as ts

# A term of the training loss: (params, micro-batch inputs, frozen weights) -> (loss, metrics).
LossTerm = Callable[[Any, Any, Any], tuple[jax.Array, dict]]

STEP_SALT = 0x57E9  # key of step s: fold_in(fold_in(key(seed), STEP_SALT), s)


def step_key(seed: int, step: jax.Array) -> jax.Array:
  """The PRNG key of training step `step`: a pure function of (seed, step)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), STEP_SALT), step)


def grad_accum_steps(config: Any) -> int:
  """config.optim.grad_accum_steps (k micro-batches a step); 1 for configs older than it."""
  return int(config.optim.get("grad_accum_steps", 1))


GRAD_ACCUM_LOOPS = ("auto", "scan", "unrolled")


def grad_accum_loop(config: Any, backend: Optional[str] = None) -> str:
  """"scan" or "unrolled": how the step runs its micro-batches (config.optim.grad_accum_loop;
  "auto", and configs older than it, mean "unrolled" on the CPU backend, else "scan")."""
  loop = config.optim.get("grad_accum_loop", "auto")
  if loop == "auto":
    return "unrolled" if (backend or jax.default_backend()) == "cpu" else "scan"
  return loop


def batch_shards(shardings: Any) -> int:
  """How many devices the batch is split over (N): the data-parallel size of the mesh that
  the first NamedSharding in `shardings` lives on; 1 when there is none."""
  for leaf in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
    if isinstance(leaf, NamedSharding):
      return sharding_lib.data_parallel_size(leaf.mesh)
  return 1


def micro_batches(batch: Any, num_micro: int, num_shards: int) -> Any:
  """The loader's batch (leaves [B, ...], rows in `data.loader.physical_order`) ->
  micro-batches (leaves [k, b, ...]; micro m holds positions m·b .. (m+1)·b − 1 in order).

  [B] -> [N, k, b/N] -> [k, N, b/N] -> [k, b]: each device's B/N contiguous rows are its
  b/N rows of every micro-batch, so with the batch sharded over N devices on axis 0 these
  reshapes and the transpose are local. k = 1 is the identity.
  """
  def one(x):
    total = x.shape[0]
    if total % (num_micro * num_shards):
      raise ValueError(f"a batch of {total} does not split into {num_micro} micro-batches over "
                       f"{num_shards} devices.")
    x = x.reshape((num_shards, num_micro, total // (num_micro * num_shards)) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((num_micro, total // num_micro) + x.shape[3:])
  return jax.tree.map(one, batch)


def micro_example_keys(key: jax.Array, batch_size: int, num_micro: int) -> jax.Array:
  """[k, b] keys: micro m, row r gets fold_in(key, m·b + r), its position in the global
  batch, so an example's draws are the same for every k."""
  keys = random_draws.example_keys(key, jnp.arange(batch_size))
  return keys.reshape((num_micro, batch_size // num_micro))


def _zeros_like_f32(params: Any, shardings: Optional[Any]) -> Any:
  """float32 zeros shaped like `params`, laid out by `shardings` when given."""
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  return zeros if shardings is None else jax.lax.with_sharding_constraint(zeros, shardings)


def sum_of_term_gradients(loss_terms: Sequence[LossTerm], params: Any, inputs: Any,
                          frozen: Any = None, loop: str = "unrolled",
                          shardings: Optional[Any] = None) -> tuple[Any, dict]:
  """(Σ_t ∇ term_t(params, inputs, frozen), metrics): the gradient of a loss made of terms.

  loop="unrolled": the terms' gradients traced one after the other in one program (XLA may
  interleave them). loop="scan" (and more than one term): one `lax.scan` iteration per term,
  a `lax.switch` picking it, so each term's forward and backward run alone and the peak is
  the largest term's, not the terms' together (the SDXL step's consistency phase: README
  "What fits"). Straight-line programs cannot be ordered so: XLA:CPU drops
  `optimization_barrier`s before it schedules, and its scheduler starts a remat block's
  recomputation whenever its saved inputs exist. The sum equals the joint loss's gradient
  up to summation order. Metrics: the union of the terms' dicts (a later term's value wins
  on a shared key), plus "loss": the sum of the terms' values. shardings: the parameters'
  own, for the loop's float32 gradient sum (FSDP shards stay sharded).
  """
  loss_terms = tuple(loss_terms)
  grad_fns = [jax.value_and_grad(term, has_aux=True) for term in loss_terms]
  if loop == "unrolled" or len(loss_terms) == 1:
    grads, metrics, total = None, {}, jnp.zeros((), jnp.float32)
    for grad_fn in grad_fns:
      (value, term_metrics), term_grads = grad_fn(params, inputs, frozen)
      grads = term_grads if grads is None else jax.tree.map(jnp.add, grads, term_grads)
      metrics.update(term_metrics)
      total = total + value
    metrics["loss"] = total
    return grads, metrics

  shapes = [jax.eval_shape(term, params, inputs, frozen)[1] for term in loss_terms]
  names = sorted(set().union(*(s.keys() for s in shapes)))
  zeros = {k: jnp.zeros((), jnp.float32) for k in names}

  def branch(index):
    def run(operand):
      (value, term_metrics), grads = grad_fns[index](*operand)
      full = {k: jnp.asarray(term_metrics.get(k, zeros[k]), jnp.float32) for k in names}
      defined = {k: jnp.asarray(k in term_metrics) for k in names}
      grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
      return grads, jnp.asarray(value, jnp.float32), full, defined
    return run

  def body(carry, index):
    grads, total, metrics = carry
    term_grads, value, term_metrics, defined = jax.lax.switch(
        index, [branch(i) for i in range(len(loss_terms))], (params, inputs, frozen))
    metrics = {k: jnp.where(defined[k], term_metrics[k], metrics[k]) for k in names}
    return (jax.tree.map(jnp.add, grads, term_grads), total + value, metrics), None

  start = (_zeros_like_f32(params, shardings), jnp.zeros((), jnp.float32), zeros)
  (grads, total, metrics), _ = jax.lax.scan(body, start, jnp.arange(len(loss_terms)))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return grads, {**metrics, "loss": total}


def accumulate_gradients(loss_terms: Union[LossTerm, Sequence[LossTerm]], params: Any,
                         micro_inputs: Any, num_micro: int,
                         shardings: Optional[Any] = None,
                         loop: str = "scan", frozen: Any = None) -> tuple[Any, dict]:
  """(mean gradient, mean metrics) of the loss Σ_t term_t(params, inputs, frozen) over the
  k micro-batches of `micro_inputs` (leaves [k, ...]), one at a time: in a `lax.scan`
  (loop="scan") or traced one after the other (loop="unrolled"; see the module docstring).

  loss_terms: one function `(params, inputs, frozen) -> (loss, metrics)` or several, whose
  gradients are taken in turn (`sum_of_term_gradients`); frozen: weights every term reads
  but none trains (the latent task's base UNet), not split into micro-batches.
  The gradients are summed in float32 (a tree like `params`, laid out by `shardings`, the
  parameters' own: FSDP shards stay sharded) and divided by k; metrics (scalars, "loss"
  the terms' sum) are averaged. k = 1 runs no micro-batch loop, whatever `loop` says (one
  term: the plain gradient).
  """
  if loop not in GRAD_ACCUM_LOOPS[1:]:
    raise ValueError(f"loop={loop!r}: must be one of {GRAD_ACCUM_LOOPS[1:]}")
  loss_terms = (loss_terms,) if callable(loss_terms) else tuple(loss_terms)
  total = _zeros_like_f32(params, shardings)

  def body(total, inputs):
    grads, metrics = sum_of_term_gradients(loss_terms, params, inputs, frozen, loop, shardings)
    return jax.tree.map(lambda t, g: t + g.astype(jnp.float32), total, grads), metrics

  if loop == "scan" and num_micro > 1:
    total, metrics = jax.lax.scan(body, total, micro_inputs, length=num_micro)
  else:
    per_micro = []
    for m in range(num_micro):
      total, metrics_m = body(total, jax.tree.map(lambda x, m=m: x[m], micro_inputs))
      per_micro.append(metrics_m)
    metrics = jax.tree.map(lambda *ms: jnp.stack(ms), *per_micro)
  grads = jax.tree.map(lambda t, p: (t / num_micro).astype(p.dtype), total, params)
  return grads, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)


def below_sigma_n_term(config) -> tuple[Any, dict]:
  """(the loss below σ_n that config.consistency.loss names, its kwargs): kwargs left
  None mean that loss's own default (e.g. `step`: "posterior" for consistency,
  "posterior_cov" for posterior_sample). Configs written before `loss` existed mean
  consistency."""
  kwargs = {k: v for k, v in config.consistency.kwargs.to_dict().items() if v is not None}
  return losses.BELOW_SIGMA_N_LOSSES[config.consistency.get("loss", "consistency")], kwargs


def apply_gradients(state: ts.TrainState, grads: Any, metrics: dict,
                    tx: optax.GradientTransformation, batch_size: int, halflives: tuple,
                    rampup: float, schedule) -> tuple[ts.TrainState, dict]:
  """The end of every task's step: optimizer update, EMAs, step + 1, gradient-norm and lr."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  emas = ema.update(state.ema, params, state.step, batch_size, halflives, rampup)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["lr"] = schedule(state.step)
  return ts.TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=emas), metrics


def jit_train_step(step_fn, mesh: jax.sharding.Mesh, state_shardings: Any,
                   frozen_shardings: Any = None):
  """jax.jit over the mesh: state donated and kept in place, batch split, metrics replicated.

  Call as `train_step(state, batch, consistency_active(config, step))` (the flag is static),
  plus the frozen weights as a fourth argument when `frozen_shardings` is given (latent
  fine-tuning: passed, never donated, never checkpointed).
  """
  batch_sh = sharding_lib.batch_sharding(mesh)
  in_shardings = (state_shardings, batch_sh) + (() if frozen_shardings is None
                                                 else (frozen_shardings,))
  return jax.jit(step_fn, in_shardings=in_shardings,
                 out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,), static_argnums=(2,))


def consistency_active(config: Any, step: int) -> bool:
  """Whether training step `step` (0-based) includes the consistency term."""
  return config.consistency.weight > 0 and step >= config.consistency.start_step


def objective(config: Any, steps_done: int, sigma_n_max: float) -> str:
  """What a model trained for `steps_done` steps was trained with, for picture titles:
  "clean" (no noisy example), "naive", "ambient" or "ambient + consistency"."""
  if sigma_n_max == 0:
    return "clean"
  if config.loss.kind == "naive":
    return "naive"
  if steps_done > 0 and consistency_active(config, steps_done - 1):
    return "ambient + consistency"
  return "ambient"
