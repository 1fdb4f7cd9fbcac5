"""Loss functions for diffusion training on noisy data. Pure jax: no Flax, Orbax or TF.

Each loss takes `denoise_fn(x: [B, ...], sigma: [B]) -> [B, ...]` (an estimate of
E[x0 | x_σ = x]), arrays, a PRNG key and keyword options, and returns per-example
losses [B] (mean over the non-batch axes) and a dict of per-example diagnostics.

`key` is one key or [B] keys (`random_draws`). One key draws for the whole batch at once
(example i's draws then depend on the batch it is in); [B] keys, one per example, draw
each example from its own key, so its σ and noise are the same whatever batch or
micro-batch it is in (the training steps pass one key per position in the global batch,
so gradient accumulation does not change the draws).

- `edm_loss`: Karras et al. 2022 on clean data (METHOD.md §2).
- `ambient_loss`: double-Tweedie loss on data noised at σ_n, VE form (§3). Its
  minimiser is exactly E[x0 | x_σ] for every σ > σ_n; with σ_n = 0 it is `edm_loss`.
- `ambient_loss_vp`: the same in the variance-preserving form, x0- or ε-prediction (§4).
- `ddpm_loss`: plain DDPM ε-prediction loss (ordinary fine-tuning: clean and naive baselines).
- `consistency_loss`: makes D consistent with its own reverse process below σ_n (§5).
- `posterior_sample_loss`: EDM loss below σ_n on clean images the model itself draws
  from p(x0 | x_n) — one expectation-maximisation step, an alternative to consistency.
"""

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from ambient_jax import checks, precond, random_draws, sampling
from ambient_jax.precond import expand

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]

AMBIENT_WEIGHTINGS = ("edm", "x0")
VP_PREDICTIONS = ("x0", "eps")
CONSISTENCY_STARTS = ("above", "sigma_n")
CONSISTENCY_ANCHORS = ("network", "data")
ESTIMATORS = ("unbiased", "average")
CONSISTENCY_WEIGHTINGS = ("none", "edm")


def _mean_over_pixels(v: jax.Array) -> jax.Array:
  """[B, ...] -> [B]."""
  return jnp.mean(v.reshape(v.shape[0], -1), axis=1)


def _weighted_mse(weight: jax.Array, prediction: jax.Array, target: jax.Array) -> jax.Array:
  """weight [B] · mean over pixels of (prediction − target)²  ->  [B]."""
  return weight * _mean_over_pixels(jnp.square(prediction - target))


def _check_noisy_batch(x_noisy, sigma_n) -> int:
  batch = checks.batch_size("x_noisy", x_noisy)
  checks.per_example("sigma_n", sigma_n, batch)
  return batch


# ----------------------------------------------------------------------------- EDM


def edm_loss(denoise_fn: DenoiseFn, x0: jax.Array, key: jax.Array, *,
             sigma_data: float = precond.SIGMA_DATA, p_mean: float = precond.P_MEAN,
             p_std: float = precond.P_STD):
  """EDM loss λ(σ) ‖D(x0 + σ ε, σ) − x0‖² with σ ~ lognormal(p_mean, p_std).

  x0: [B, ...] clean data; key: one key, or [B] keys (one per example: then an
  example's draws do not depend on the batch it is in).
  Returns (loss [B], {"sigma": [B], "weight": [B]}).
  """
  batch = checks.batch_size("x0", x0)
  key_sigma, key_noise = random_draws.split(key)
  sigma = precond.sample_sigma(key_sigma, jnp.zeros((batch,), jnp.float32), p_mean, p_std)
  x = x0 + expand(sigma, x0) * random_draws.normal(key_noise, x0.shape, x0.dtype)
  weight = precond.edm_weight(sigma, sigma_data)
  return _weighted_mse(weight, denoise_fn(x, sigma), x0), {"sigma": sigma, "weight": weight}


# ----------------------------------------------------------------------------- ambient (VE)


def ambient_loss(denoise_fn: DenoiseFn, x_noisy: jax.Array, sigma_n: jax.Array, key: jax.Array,
                 *, weighting: str = "edm", x0_weight_cap: float = 100.0,
                 sigma_data: float = precond.SIGMA_DATA, p_mean: float = precond.P_MEAN,
                 p_std: float = precond.P_STD):
  """Double-Tweedie ambient loss on x_n = x0 + σ_n z (METHOD.md §3), variance exploding.

  x_noisy: [B, ...]; sigma_n: [B], 0 for a clean example. σ is drawn from the EDM
  lognormal truncated to σ > σ_n (no wasted draws), x_σ = x_n + √(σ² − σ_n²) η, and
  the denoiser is trained through the predicted noisy image
  x̂_n = (σ_n²/σ²) x_σ + (1 − σ_n²/σ²) D(x_σ, σ), whose target is x_n.

  weighting: "edm" uses λ(σ) (the follow-up paper's choice; the measured default,
    see README "Results"); "x0" uses λ(σ) σ⁴/(σ² − σ_n²)² (Ambient Omni), which maps
    the x_n-space error back to x0 space, capped at `x0_weight_cap`·λ(σ) because it
    diverges as σ → σ_n.
  key: one key, or [B] keys (one per example: then an example's draws do not depend on the
  batch it is in).
  Returns (loss [B], {"sigma", "weight", "x0_factor"}: [B] each).
  """
  batch = _check_noisy_batch(x_noisy, sigma_n)
  checks.one_of("weighting", weighting, AMBIENT_WEIGHTINGS)
  sigma_n = jnp.asarray(sigma_n, jnp.float32)
  key_sigma, key_noise = random_draws.split(key)
  sigma = precond.sample_sigma(key_sigma, sigma_n, p_mean, p_std)
  ratio = jnp.square(sigma_n / sigma)  # σ_n²/σ² ∈ [0, 1)
  extra_std = sigma * jnp.sqrt(jnp.maximum(1.0 - ratio, 0.0))  # √(σ² − σ_n²); exactly σ when σ_n = 0
  x = x_noisy + expand(extra_std, x_noisy) * random_draws.normal(key_noise, x_noisy.shape, x_noisy.dtype)
  x_noisy_hat = expand(ratio, x) * x + expand(1.0 - ratio, x) * denoise_fn(x, sigma)
  x0_factor = jnp.minimum(1.0 / jnp.square(1.0 - ratio), x0_weight_cap)
  weight = precond.edm_weight(sigma, sigma_data)
  if weighting == "x0":
    weight = weight * x0_factor
  del batch
  loss = _weighted_mse(weight, x_noisy_hat, x_noisy)
  return loss, {"sigma": sigma, "weight": weight, "x0_factor": x0_factor}


# ----------------------------------------------------------------------------- ambient (VP)


def ambient_loss_vp(denoise_fn: DenoiseFn, x_noisy: jax.Array, sigma_n: jax.Array,
                    key: jax.Array, *, prediction: str = "x0",
                    sigma_schedule: Optional[jax.Array] = None,
                    p_mean: float = precond.P_MEAN, p_std: float = precond.P_STD):
  """Ambient loss in the variance-preserving form (METHOD.md §4), plain MSE on x̂_n.

  Data x_n = √(1 − σ_n²) x0 + σ_n z with VP levels σ_n ∈ [0, 1): [B]. A level
  σ_t > σ_n is drawn, x_t = α x_n + β η with α = √((1−σ_t²)/(1−σ_n²)),
  β = √((σ_t² − σ_n²)/(1−σ_n²)), and
  x̂_n = (α σ_n²/σ_t²) x_t + (β² √(1−σ_n²)/σ_t²) x̂0.

  denoise_fn(x_t, σ_t) returns x̂0 (prediction="x0") or ε̂ (prediction="eps", then
  x̂0 = (x_t − σ_t ε̂)/√(1 − σ_t²)). σ_t is drawn uniformly from the entries of
  `sigma_schedule` ([T], e.g. `precond.ddpm_sigmas()`; DDPM steps t > t_n) when given,
  else from the EDM lognormal (in VE units) truncated above σ_n and mapped to VP.
  key: one key, or [B] keys (one per example: then an example's draws do not depend on the
  batch it is in).
  Returns (loss [B], {"sigma_t": [B], "timestep": [B] (−1 without a schedule)}).
  """
  batch = _check_noisy_batch(x_noisy, sigma_n)
  checks.one_of("prediction", prediction, VP_PREDICTIONS)
  sigma_n = jnp.asarray(sigma_n, jnp.float32)
  try:
    if float(jnp.max(sigma_n)) >= 1.0:
      raise ValueError(f"`sigma_n` must be < 1 in the VP form; got max {float(jnp.max(sigma_n))}.")
  except jax.errors.ConcretizationTypeError:
    pass
  key_sigma, key_noise = random_draws.split(key)
  if sigma_schedule is None:
    sigma_t = precond.ve_to_vp_sigma(
        precond.sample_sigma(key_sigma, precond.vp_to_ve_sigma(sigma_n), p_mean, p_std))
    timestep = jnp.full((batch,), -1, jnp.int32)
  else:
    sigma_schedule = jnp.asarray(sigma_schedule, jnp.float32)
    num_t = sigma_schedule.shape[0]
    count_above = jnp.sum(sigma_schedule[None, :] > sigma_n[:, None], axis=1)  # schedule is increasing
    u = random_draws.uniform(key_sigma, (batch,))
    timestep = num_t - 1 - jnp.minimum(jnp.floor(u * count_above).astype(jnp.int32),
                                       jnp.maximum(count_above - 1, 0))
    sigma_t = sigma_schedule[timestep]
  one_minus_n = 1.0 - jnp.square(sigma_n)
  alpha = jnp.sqrt((1.0 - jnp.square(sigma_t)) / one_minus_n)
  beta_sq = jnp.maximum(jnp.square(sigma_t) - jnp.square(sigma_n), 0.0) / one_minus_n
  x_t = expand(alpha, x_noisy) * x_noisy + expand(jnp.sqrt(beta_sq), x_noisy) * random_draws.normal(
      key_noise, x_noisy.shape, x_noisy.dtype)
  out = denoise_fn(x_t, sigma_t)
  if prediction == "eps":
    out = (x_t - expand(sigma_t, x_t) * out) / expand(jnp.sqrt(1.0 - jnp.square(sigma_t)), x_t)
  sigma_t_sq = jnp.square(sigma_t)
  x_noisy_hat = (expand(alpha * jnp.square(sigma_n) / sigma_t_sq, x_t) * x_t
                 + expand(beta_sq * jnp.sqrt(one_minus_n) / sigma_t_sq, x_t) * out)
  loss = _weighted_mse(jnp.ones((batch,), jnp.float32), x_noisy_hat, x_noisy)
  return loss, {"sigma_t": sigma_t, "timestep": timestep}


def ddpm_loss(eps_fn: DenoiseFn, x: jax.Array, key: jax.Array, sigma_schedule: jax.Array):
  """The plain DDPM ε-prediction loss ‖ε̂(x_t, σ_t) − ε‖², t uniform over the schedule.

  x: [B, ...] data as given (clean, or noisy for the naive baseline); sigma_schedule: VP
  levels [T] (e.g. `precond.ddpm_sigmas()`); x_t = √(1 − σ_t²) x + σ_t ε. This is what
  ordinary (Stable Diffusion) fine-tuning minimises: the clean and naive baselines.
  key: one key, or [B] keys (one per example: then an example's draws do not depend on the
  batch it is in).
  Returns (loss [B], {"sigma_t": [B], "timestep": [B]}).
  """
  batch = checks.batch_size("x", x)
  sigma_schedule = jnp.asarray(sigma_schedule, jnp.float32)
  k_t, k_noise = random_draws.split(key)
  timestep = random_draws.randint(k_t, (batch,), 0, sigma_schedule.shape[0])
  sigma_t = sigma_schedule[timestep]
  noise = random_draws.normal(k_noise, x.shape, x.dtype)
  x_t = expand(jnp.sqrt(1.0 - jnp.square(sigma_t)), x) * x + expand(sigma_t, x) * noise
  loss = _weighted_mse(jnp.ones((batch,), jnp.float32), eps_fn(x_t, sigma_t), noise)
  return loss, {"sigma_t": sigma_t, "timestep": timestep}


# ----------------------------------------------------------------------------- consistency


def consistency_loss(denoise_fn: DenoiseFn, x_noisy: jax.Array, sigma_n: jax.Array,
                     key: jax.Array, step: str = "posterior", *,
                     start: str = "above", start_max_ratio: float = 2.0,
                     start_min_ratio: Optional[float] = None, anchor: str = "network",
                     target_min_ratio: float = 0.1, margin: float = 0.05,
                     gap: Optional[float] = None, anchor_steps: int = 1, chain_steps: int = 4,
                     num_samples: int = 2, estimator: str = "unbiased",
                     grad_through_sampler: bool = False, anchor_grad: bool = False,
                     weighting: Union[str, Callable[[jax.Array, jax.Array], jax.Array]] = "none",
                     chain_denoise_fn: Optional[DenoiseFn] = None,
                     sigma_data: float = precond.SIGMA_DATA):
  """Consistency loss below σ_n (METHOD.md §5): ‖E[D(X_b, σ_b) | x_a] − D(x_a, σ_a)‖².

  The true E[x0 | x] satisfies D(x_a, σ_a) = E[D(X_b, σ_b) | x_a] when X_b is drawn by
  the model's own reverse process from x_a (tower property); the ambient loss pins
  D above σ_n and this loss extends it below. Per example (all levels [B]):
    1. start: x_s = x_n at σ_s = σ_n (start="sigma_n") or x_s = x_n + √(σ_s² − σ_n²) η
       at σ_s ~ σ_n · logU[start_min_ratio (default 1 + margin), start_max_ratio]
       (start="above");
    2. target level σ_b ~ σ_n · logU[target_min_ratio, 1 − margin] (below σ_n);
    3. anchor: with `gap=None` the anchor is the start (x_a, σ_a) = (x_s, σ_s) — the
       "global" form; with a `gap` g ∈ (0, 1), σ_a = min(σ_b / (1 − g), σ_s), reached
       from x_s by `anchor_steps` reverse steps (no gradient unless
       `grad_through_sampler`) — the paper's "local" form (paper: K = 1, g small;
       follow-up: K ≈ 6–8);
    4. `num_samples` (M ≥ 2) independent chains of `chain_steps` reverse steps of kind
       `step` ("posterior" | "euler_maruyama" | "posterior_cov") from x_a to σ_b;
    5. loss = w · estimate of ‖mean_m D(x_b^m, σ_b) − D(x_a, σ_a)‖² (mean over pixels):
       estimator="unbiased": Σ_{m≠m'} d_m·d_m' / (M(M−1)) (paper's two-sample product
       for M = 2; zero in expectation for a consistent D); "average": ‖mean_m d_m‖²
       (non-negative, biased up by Var/M).
  grad_through_sampler: back-propagate through the chain states (2–3× the memory);
  default stops gradients there and trains only the final D(x_b, σ_b).
  anchor_grad: also back-propagate through D(x_a, σ_a) (off: above σ_n the ambient
  loss already pins it, and a free anchor lets the fit above σ_n drift).
  weighting: "none", "edm" (λ(σ_b)) or a callable (σ_b [B], σ_n [B]) -> [B].
  anchor: "network" (D(x_a, σ_a), above) or "data": the global form's anchor replaced by
  T = (x_n − a x_s) / (1 − a), a = σ_n²/σ_s², whose mean given x_s is exactly E[x0 | x_s]
  (double Tweedie, METHOD.md §3) and which, given x_s, is independent of the chains. The
  estimator then measures ‖E[D(X_b, σ_b) | x_s] − E[x0 | x_s]‖² plus tr Var[T | x_s], a
  constant: its gradient is unbiased and carries no error of the network above σ_n, which
  the deconvolution from σ_a down to σ_b amplifies (docs/results_toy.md). Var[T] grows as
  σ_n⁴ / (σ_s² − σ_n²): keep the starts away from σ_n (`start_min_ratio`).
  chain_denoise_fn: the denoiser of the anchor and the chains (e.g. an EMA teacher, or the
  exact one in a closed-form diagnosis); then `denoise_fn` is called only at the chains'
  ends, the one place the loss trains. Default: `denoise_fn` everywhere.
  Clean examples (σ_n = 0) need no consistency and get loss 0.
  key: one key, or [B] keys (one per example: then an example's draws do not depend on the
  batch it is in).
  Returns (loss [B], {"sigma_start", "sigma_anchor", "sigma_target", "is_noisy"}: [B]).

  Defaults (global form from above σ_n, K = 4 posterior steps, M = 2, unbiased, no
  gradient through the sampler or the anchor) come from the toy benchmark's ablation
  (`benchmarks/toy_exactness.py --ablate`, README "Results"): the global form beat the
  local one (below-σ_n error 0.90 vs 1.11, plain ambient 1.14); K = 4 beat K = 1
  slightly; Euler–Maruyama was on par with posterior steps; the weight λ_c that
  multiplies this loss mattered most (λ_c = 10: 0.15).
  """
  batch = _check_noisy_batch(x_noisy, sigma_n)
  checks.one_of("step", step, sampling.STEP_KINDS)
  checks.one_of("start", start, CONSISTENCY_STARTS)
  checks.one_of("anchor", anchor, CONSISTENCY_ANCHORS)
  checks.one_of("estimator", estimator, ESTIMATORS)
  if not callable(weighting):
    checks.one_of("weighting", weighting, CONSISTENCY_WEIGHTINGS)
  if num_samples < 2 and estimator == "unbiased":
    raise ValueError(f"`num_samples` must be >= 2 for the unbiased estimator; got {num_samples}.")
  if num_samples < 1:
    raise ValueError(f"`num_samples` must be >= 1; got {num_samples}.")
  if chain_steps < 1 or anchor_steps < 1:
    raise ValueError(f"`chain_steps` and `anchor_steps` must be >= 1; got {chain_steps}, {anchor_steps}.")
  if not 0.0 < margin < 1.0:
    raise ValueError(f"`margin` must be in (0, 1); got {margin}.")
  if not 0.0 < target_min_ratio < 1.0 - margin:
    raise ValueError(f"`target_min_ratio` must be in (0, 1 - margin); got {target_min_ratio}.")
  start_min_ratio = 1.0 + margin if start_min_ratio is None else start_min_ratio
  if not 1.0 < start_min_ratio <= start_max_ratio:
    raise ValueError("need 1 < `start_min_ratio` (default 1 + margin) <= `start_max_ratio`; got "
                     f"{start_min_ratio}, {start_max_ratio}.")
  if anchor == "data" and (start != "above" or gap is not None or anchor_grad):
    raise ValueError("anchor=\"data\" is the global form's anchor: it needs start=\"above\", "
                     f"gap=None and no anchor_grad; got start={start!r}, gap={gap}, anchor_grad={anchor_grad}.")
  if gap is not None and not 0.0 < gap < 1.0:
    raise ValueError(f"`gap` must be None or in (0, 1); got {gap}.")
  if chain_denoise_fn is not None and (grad_through_sampler or anchor_grad):
    raise ValueError("`chain_denoise_fn` is a fixed teacher: it takes no `grad_through_sampler` "
                     "or `anchor_grad`.")

  sigma_n = jnp.asarray(sigma_n, jnp.float32)
  is_noisy = sigma_n > 0
  base = jnp.where(is_noisy, sigma_n, 1.0)  # clean examples run on a dummy level, then are masked out
  k_start, k_start_noise, k_target, k_anchor, k_chains = random_draws.split(key, 5)

  def log_uniform(k, low, high):
    return jnp.exp(random_draws.uniform(k, (batch,), minval=jnp.log(low), maxval=jnp.log(high)))

  no_grad = (lambda v: v) if grad_through_sampler else jax.lax.stop_gradient
  teacher = denoise_fn if chain_denoise_fn is None else chain_denoise_fn
  # "posterior_cov" differentiates the network inside the chain (for Var[x0 | x]): it must
  # see the plain network; `no_grad` on the chain's output still keeps gradients out.
  denoise_in_chain = teacher if grad_through_sampler or step == "posterior_cov" else (
      lambda x, s: jax.lax.stop_gradient(teacher(x, s)))

  # 1. start level and point, formed from the data.
  if start == "above":
    start_ratio = log_uniform(k_start, start_min_ratio, start_max_ratio)
    sigma_s = base * start_ratio
    extra = base * jnp.sqrt(jnp.maximum(jnp.square(start_ratio) - 1.0, 0.0))
    x_s = x_noisy + expand(extra, x_noisy) * random_draws.normal(k_start_noise, x_noisy.shape, x_noisy.dtype)
  else:
    sigma_s, x_s = base, x_noisy

  # 2. target level below σ_n.
  sigma_b = base * log_uniform(k_target, target_min_ratio, 1.0 - margin)

  # 3. anchor: the start itself (global form) or a point just above σ_b reached by the sampler.
  if gap is None:
    sigma_a, x_a = sigma_s, x_s
  else:
    sigma_a = jnp.minimum(sigma_b / (1.0 - gap), sigma_s)
    x_a = no_grad(sampling.reverse_chain(denoise_in_chain, x_s, sigma_s, sigma_a, anchor_steps,
                                         k_anchor, step))
  denoised_a = teacher(x_a, sigma_a)
  if anchor == "data":  # E[x_n | x_s] = a x_s + (1 − a) E[x0 | x_s] solved for E[x0 | x_s]
    a = expand(jnp.square(base / sigma_s), x_noisy)
    target = (x_noisy - a * x_s) / (1.0 - a)
  else:
    target = denoised_a if anchor_grad else jax.lax.stop_gradient(denoised_a)

  # 4. M independent chains from x_a to σ_b, batched as [M·B, ...] for one network call a step.
  tile = lambda v: jnp.concatenate([v] * num_samples, axis=0)
  sigma_a_m, sigma_b_m = tile(sigma_a), tile(sigma_b)
  first = tile(denoised_a if grad_through_sampler else jax.lax.stop_gradient(denoised_a))
  x_chain = no_grad(sampling.reverse_chain(denoise_in_chain, tile(x_a), sigma_a_m, sigma_b_m,
                                           chain_steps, random_draws.repeat(k_chains, num_samples),
                                           step, first_denoised=first))
  denoised_b = denoise_fn(x_chain, sigma_b_m).reshape((num_samples,) + x_noisy.shape)

  # 5. estimator of the squared distance between the chains' mean and the anchor.
  diffs = (denoised_b - target[None]).reshape(num_samples, batch, -1)  # [M, B, P]
  if estimator == "unbiased":
    total = jnp.sum(diffs, axis=0)
    pair_sum = jnp.sum(jnp.square(total), -1) - jnp.sum(jnp.square(diffs), axis=(0, 2))
    estimate = pair_sum / (num_samples * (num_samples - 1)) / diffs.shape[-1]
  else:
    estimate = jnp.mean(jnp.square(jnp.mean(diffs, axis=0)), axis=-1)
  if callable(weighting):
    weight = weighting(sigma_b, sigma_n)
  elif weighting == "edm":
    weight = precond.edm_weight(sigma_b, sigma_data)
  else:
    weight = jnp.ones((batch,), jnp.float32)
  loss = jnp.where(is_noisy, weight * estimate, 0.0)
  aux = {"sigma_start": sigma_s, "sigma_anchor": sigma_a, "sigma_target": sigma_b,
         "is_noisy": is_noisy.astype(jnp.float32)}
  return loss, aux


# ----------------------------------------------------------------------------- EM below σ_n


def posterior_sample_loss(denoise_fn: DenoiseFn, x_noisy: jax.Array, sigma_n: jax.Array,
                          key: jax.Array, *, chain_steps: int = 16, step: str = "posterior_cov",
                          sigma_min: float = 0.002, target_min_ratio: float = 0.01,
                          target_max_ratio: float = 1.0,
                          chain_denoise_fn: Optional[DenoiseFn] = None,
                          sigma_data: float = precond.SIGMA_DATA):
  """EDM loss below σ_n on clean images drawn from the model's own posterior p(x0 | x_n).

  Per example: `chain_steps` reverse steps of kind `step` take x_n from σ_n down to σ_min
  (no gradient; by `chain_denoise_fn`, e.g. an EMA teacher, else by `denoise_fn`); x̂0 is
  then D(x_K, σ_min) ("posterior", "euler_maruyama") or, for "posterior_cov", a draw
  around it (`reverse_chain(..., then_to_zero=True)`);
  σ_b ~ σ_n · logU[target_min_ratio, target_max_ratio];
  loss = λ(σ_b) · mean ‖D(x̂0 + σ_b z, σ_b) − x̂0‖².
  This is the M-step of expectation-maximisation for Gaussian deconvolution (Rozet et al.
  2024, Bai et al. 2024), taken one gradient step at a time: the exact denoiser is a fixed
  point (then x̂0 are true posterior draws, whose marginal is p(x0)). Unlike the
  consistency loss it regresses on direct targets; each EM round contracts the error of
  the learned distribution by a factor that tends to 1 as σ_n outgrows the data's scale.
  The draws must be right in spread, not only in mean, and more so the larger σ_n is
  against the data's scale: an error in the draws' spread is amplified by 1 / (1 − the
  contraction) at the fixed point. Euler–Maruyama steps are right only as the steps
  shrink: for clusters of std 0.08 at σ_n = 0.2, 16 of them settle at std 0.144 (closed
  form, tests/test_losses.py). "posterior_cov" steps (the default) draw Var[x0 | x_σ] too
  (Tweedie's σ² ∂D/∂x, one JVP per step) and end on a draw of x0 rather than its mean:
  exact for Gaussian data at any number of steps; the toy step costs ~2.5× a consistency
  step. Plain posterior steps omit that variance and draw too narrow.
  Clean examples (σ_n = 0) get loss 0. key: one key, or [B] keys (one per example: then an example's draws do not depend on the
  batch it is in).
  Returns (loss [B], {"sigma_target", "is_noisy"}: [B]).
  """
  batch = _check_noisy_batch(x_noisy, sigma_n)
  checks.one_of("step", step, sampling.STEP_KINDS)
  if chain_steps < 1:
    raise ValueError(f"`chain_steps` must be >= 1; got {chain_steps}.")
  if not 0.0 < target_min_ratio < target_max_ratio <= 1.0:
    raise ValueError("need 0 < `target_min_ratio` < `target_max_ratio` <= 1; got "
                     f"{target_min_ratio}, {target_max_ratio}.")
  if sigma_min <= 0.0:
    raise ValueError(f"`sigma_min` must be > 0; got {sigma_min}.")
  sigma_n = jnp.asarray(sigma_n, jnp.float32)
  is_noisy = sigma_n > 0
  base = jnp.where(is_noisy, sigma_n, 1.0)  # clean examples run on a dummy level, then are masked out
  k_chain, k_target, k_noise = random_draws.split(key, 3)
  teacher = denoise_fn if chain_denoise_fn is None else chain_denoise_fn
  floor = jnp.minimum(jnp.float32(sigma_min), base)
  # Posterior chains end on x0 (a draw for "posterior_cov", the mean D for "posterior");
  # Euler–Maruyama ones at σ_min, denoised there.
  lands_on_x0 = step != "euler_maruyama"
  x_last = sampling.reverse_chain(teacher, x_noisy, base, floor, chain_steps, k_chain, step,
                                  then_to_zero=lands_on_x0)
  x0_hat = x_last if lands_on_x0 else teacher(x_last, floor)
  x0_hat = jax.lax.stop_gradient(x0_hat)  # the targets: no gradient through the chain
  ratio = jnp.exp(random_draws.uniform(k_target, (batch,), minval=jnp.log(target_min_ratio),
                                     maxval=jnp.log(target_max_ratio)))
  sigma_b = base * ratio
  x_b = x0_hat + expand(sigma_b, x0_hat) * random_draws.normal(k_noise, x0_hat.shape, x0_hat.dtype)
  loss = _weighted_mse(precond.edm_weight(sigma_b, sigma_data), denoise_fn(x_b, sigma_b), x0_hat)
  return jnp.where(is_noisy, loss, 0.0), {"sigma_target": sigma_b, "is_noisy": is_noisy.astype(jnp.float32)}


# The term that extends the denoiser below σ_n, by name (config.consistency.loss).
BELOW_SIGMA_N_LOSSES = {"consistency": consistency_loss, "posterior_sample": posterior_sample_loss}
