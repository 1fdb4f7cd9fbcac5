"""Samplers for a denoiser D(x, σ) ≈ E[x0 | x_σ = x] in the variance-exploding form.

- `edm_sampler`: EDM's Heun sampler (Karras et al. 2022, Alg. 2), deterministic or
  stochastic (S_churn), full (down to σ_min) or truncated at σ_stop with a final
  Tweedie step `D(x_{σ_stop}, σ_stop)` (METHOD.md §6).
- `euler_sampler`: Euler steps over any given σ list (latent models' 25-step sampling).
- `posterior_step`, `euler_maruyama_step`, `reverse_chain`: the one-step reverse
  moves of METHOD.md §5, shared with the consistency loss; step kind "posterior_cov" is
  a posterior step that also draws Var[x0 | x] (`tweedie_moments`).

Every random draw comes from one key per image (`keys`: [B]), folded with the step
index, so an image never depends on batch size, batch order or device count.
Pure jax; `denoise_fn(x: [B, ...], sigma: [B]) -> [B, ...]`.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from ambient_jax import checks, random_draws
from ambient_jax.precond import expand

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]



# ----------------------------------------------------------------------------- noise


def per_image_normal(keys: jax.Array, shape_per_image: tuple, dtype=jnp.float32) -> jax.Array:
  """One standard-normal draw per key: keys [B] -> [B, *shape_per_image]."""
  return jax.vmap(lambda k: jax.random.normal(k, shape_per_image, dtype))(keys)


def latents_from_keys(keys: jax.Array, shape_per_image: tuple) -> jax.Array:
  """Initial latents, one key per image: keys [B] -> [B, *shape_per_image] ~ N(0, I).

  Use `jax.random.split(jax.random.key(seed), n)` or `fold_in(key, image_index)` per
  image so that image k is the same whatever the batch it is drawn in.
  """
  keys = per_image_keys(keys, checks.batch_size("keys", keys))
  return per_image_normal(keys, tuple(shape_per_image))


def _step_noise(keys: jax.Array, step: int | jax.Array, like: jax.Array) -> jax.Array:
  """Fresh per-image noise for sampler step `step`: keys [B] -> [B, *like.shape[1:]]."""
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
  return per_image_normal(step_keys, like.shape[1:], like.dtype)


# ----------------------------------------------------------------------------- EDM Heun


def edm_sigma_steps(num_steps: int = 18, sigma_min: float | jax.Array = 0.002,
                    sigma_max: float = 80.0, rho: float = 7.0) -> jax.Array:
  """EDM's time steps σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ.

  `sigma_min` may be a per-example [B] array (truncated sampling); the result is
  [N] for a scalar and [N, B] for an array.
  """
  if num_steps < 2:
    raise ValueError(f"`num_steps` must be >= 2; got {num_steps}.")
  sigma_min = jnp.asarray(sigma_min, jnp.float32)
  frac = jnp.arange(num_steps, dtype=jnp.float32) / (num_steps - 1)
  frac = frac.reshape((num_steps,) + (1,) * sigma_min.ndim)
  inv_rho = 1.0 / rho
  return (sigma_max**inv_rho + frac * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho


def edm_sampler(denoise_fn: DenoiseFn, latents: jax.Array, num_steps: int = 18, *,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                sigma_stop: Optional[jax.Array] = None, keys: Optional[jax.Array] = None,
                S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"),
                S_noise: float = 1.0) -> jax.Array:
  """EDM Heun sampler: latents [B, ...] ~ N(0, I) -> samples [B, ...].

  Full sampling (`sigma_stop=None`) runs N−1 Heun steps from σ_max to σ_min and
  returns D(x, σ_min), which is exactly EDM's last Euler step to σ = 0: 2N−1 = 35
  network evaluations for N = 18, as in EDM.

  Truncated sampling (`sigma_stop`: scalar or [B], e.g. each example's σ_n) spends
  the same N steps on [σ_stop, σ_max] and returns the Tweedie estimate
  D(x_{σ_stop}, σ_stop) = E[x0 | x_{σ_stop}] (METHOD.md §6). Entries of 0 fall back
  to full sampling, so one call serves clean and noisy models.

  `S_churn > 0` makes it stochastic (EDM Alg. 2) and needs `keys` [B], one PRNG key
  per image.
  """
  batch = checks.batch_size("latents", latents)
  if S_churn < 0:
    raise ValueError(f"`S_churn` must be >= 0; got {S_churn}.")
  if S_churn > 0:
    if keys is None:
      raise ValueError("`keys` (one PRNG key per image, shape [B]) is required when S_churn > 0.")
    keys = per_image_keys(keys, batch)
  if sigma_stop is None:
    sigma_low = jnp.full((batch,), sigma_min, jnp.float32)
  else:
    checks.per_example("sigma_stop", sigma_stop, batch, allow_scalar=True)
    sigma_stop = jnp.broadcast_to(jnp.asarray(sigma_stop, jnp.float32), (batch,))
    sigma_low = jnp.where(sigma_stop > 0, sigma_stop, sigma_min)

  t_steps = edm_sigma_steps(num_steps, sigma_low, sigma_max, rho)  # [N, B]
  gamma_max = min(S_churn / num_steps, 2**0.5 - 1)
  x = latents.astype(jnp.float32) * t_steps[0][:, None].reshape((batch,) + (1,) * (latents.ndim - 1))

  def heun_step(x, inputs):
    i, t_cur, t_next = inputs
    if S_churn > 0:
      gamma = jnp.where((t_cur >= S_min) & (t_cur <= S_max), gamma_max, 0.0)
      t_hat = t_cur + gamma * t_cur
      eps = _step_noise(keys, i, x)
      x_hat = x + expand(jnp.sqrt(jnp.maximum(t_hat**2 - t_cur**2, 0.0)) * S_noise, x) * eps
    else:
      t_hat, x_hat = t_cur, x
    d_cur = (x_hat - denoise_fn(x_hat, t_hat)) / expand(t_hat, x)
    x_euler = x_hat + expand(t_next - t_hat, x) * d_cur
    d_next = (x_euler - denoise_fn(x_euler, t_next)) / expand(t_next, x)
    x_next = x_hat + expand(t_next - t_hat, x) * (0.5 * d_cur + 0.5 * d_next)
    return x_next, None

  steps = (jnp.arange(num_steps - 1), t_steps[:-1], t_steps[1:])
  x, _ = jax.lax.scan(heun_step, x, steps)
  return denoise_fn(x, sigma_low)


def euler_sampler(denoise_fn: DenoiseFn, x: jax.Array, sigmas: jax.Array) -> jax.Array:
  """Euler steps of the probability-flow ODE dx/dσ = (x − D(x, σ))/σ over a given σ list.

  x: [B, ...] at level sigmas[0]; sigmas: [N + 1] decreasing, the last may be 0 (then the
  last step returns D exactly). Returns x at sigmas[-1]: N network evaluations. Over a
  DDPM model's σ list this is diffusers' EulerDiscreteScheduler (and DDIM), step for step.
  """
  sigmas = jnp.asarray(sigmas, jnp.float32)
  if sigmas.ndim != 1 or sigmas.shape[0] < 2:
    raise ValueError(f"`sigmas` must be a 1-D list of at least 2 levels; got shape {sigmas.shape}.")
  batch = checks.batch_size("x", x)

  def step(x, levels):
    s_cur, s_next = levels
    s = jnp.full((batch,), s_cur)
    derivative = (x - denoise_fn(x, s)) / s_cur
    return x + (s_next - s_cur) * derivative, None

  x, _ = jax.lax.scan(step, x.astype(jnp.float32), (sigmas[:-1], sigmas[1:]))
  return x


def per_image_keys(keys: jax.Array, batch: int) -> jax.Array:
  """Validates one PRNG key per image; raw uint32 keys [B, 2] are wrapped to typed keys [B]."""
  if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    keys = jax.random.wrap_key_data(keys)
  if keys.shape != (batch,):
    raise ValueError(f"`keys` must hold one PRNG key per image, shape [{batch}]; got {keys.shape}.")
  return keys


# ----------------------------------------------------------------------------- reverse steps


def posterior_step(denoised: jax.Array, x: jax.Array, sigma_from: jax.Array, sigma_to: jax.Array,
                   noise: jax.Array, x0_variance: jax.Array | float = 0.0) -> jax.Array:
  """One posterior (DDIM-like ancestral) step from σ_i to σ_j < σ_i (σ_j may be 0); σ's are [B].

  x ← r x + (1 − r) D + √(σ_j² (1 − r) + (1 − r)² v) ξ with r = σ_j²/σ_i², v =
  `x0_variance` [B] (per coordinate). Its mean is exact for any step size, so the exact
  denoiser is exactly consistent under it. With v = Var[x0 | x_i] the step's variance is
  exact too (for Gaussian data, any step size); with v = 0 (default) it draws too narrow.
  """
  ratio = (sigma_to / sigma_from) ** 2
  keep = jnp.clip(1.0 - ratio, 0.0, 1.0)  # guards √ of tiny negatives when σ_j ≈ σ_i
  variance = sigma_to ** 2 * keep + keep ** 2 * x0_variance
  return (expand(ratio, x) * x + expand(keep, x) * denoised
          + expand(jnp.sqrt(variance), x) * noise)


def tweedie_moments(denoise_fn: DenoiseFn, x: jax.Array, sigma: jax.Array,
                    probe: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(D(x, σ) [B, ...], Var[x0 | x] per coordinate [B]) from one forward-mode pass.

  Tweedie's second-order identity: Cov[x0 | x_σ] = σ² ∂D/∂x; its trace is estimated with
  one Rademacher probe u ([B, ...] of ±1: E[uᵀ J u] = tr J; exact when J is a multiple
  of the identity) and spread evenly over the coordinates. Clipped at 0 (a rough
  network's estimate can go negative). Costs one JVP, about two network calls.
  """
  batch = checks.batch_size("x", x)
  denoised, tangent = jax.jvp(lambda y: denoise_fn(y, sigma), (x,), (probe,))
  per_coordinate = jnp.mean((probe * tangent).reshape(batch, -1), axis=1)
  return denoised, jnp.maximum(jnp.asarray(sigma, x.dtype) ** 2 * per_coordinate, 0.0)


def euler_maruyama_step(denoised: jax.Array, x: jax.Array, sigma_from: jax.Array,
                        sigma_to: jax.Array, noise: jax.Array,
                        x0_variance: jax.Array | float = 0.0) -> jax.Array:
  """One Euler–Maruyama step of the VE reverse SDE from σ_i to σ_j < σ_i; σ's are [B].

  x ← x − 2(σ_i − σ_j)(x − D)/σ_i + √(2 σ_i (σ_i − σ_j)) ξ. (`x0_variance` is unused:
  the SDE's noise carries the spread, up to a discretization error.)
  """
  del x0_variance
  delta = jnp.maximum(sigma_from - sigma_to, 0.0)
  return (x - expand(2.0 * delta / sigma_from, x) * (x - denoised)
          + expand(jnp.sqrt(2.0 * sigma_from * delta), x) * noise)


STEP_FUNCTIONS = {"posterior": posterior_step, "euler_maruyama": euler_maruyama_step,
                  "posterior_cov": posterior_step}
STEP_KINDS = tuple(STEP_FUNCTIONS)


def step_moments(step: str, denoise_fn: DenoiseFn, x: jax.Array, sigma: jax.Array,
                 probe_key: jax.Array) -> tuple[jax.Array, jax.Array | float]:
  """(D(x, σ), the x0 variance step kind `step` uses): for "posterior_cov",
  `tweedie_moments` with a ±1 probe [B, ...] drawn from `probe_key` (one key, or [B] keys:
  `random_draws`); else (D, 0) from one network call (the key unused)."""
  if step == "posterior_cov":
    return tweedie_moments(denoise_fn, x, sigma,
                           random_draws.rademacher(probe_key, x.shape, x.dtype))
  return denoise_fn(x, sigma), 0.0


def geometric_levels(sigma_from: jax.Array, sigma_to: jax.Array, num_steps: int) -> jax.Array:
  """[num_steps + 1, B] noise levels from σ_from to σ_to ([B] each), evenly spaced in log σ;
  the first and last rows are σ_from and σ_to exactly."""
  sigma_from, sigma_to = jnp.asarray(sigma_from, jnp.float32), jnp.asarray(sigma_to, jnp.float32)
  frac = (jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps)[:, None]
  levels = jnp.exp(jnp.log(sigma_from)[None] + frac * (jnp.log(sigma_to) - jnp.log(sigma_from))[None])
  return levels.at[0].set(sigma_from).at[-1].set(sigma_to)


def reverse_chain(denoise_fn: DenoiseFn, x: jax.Array, sigma_from: jax.Array,
                  sigma_to: jax.Array, num_steps: int, key: jax.Array,
                  step: str = "posterior", first_denoised: jax.Array | None = None, *,
                  then_to_zero: bool = False) -> jax.Array:
  """Runs `num_steps` reverse steps from σ_from to σ_to ([B] each), geometrically spaced.

  x: [B, ...] at level σ_from -> [B, ...] at level σ_to. `key`: one key for the whole
  batch, or [B] keys, one per example (`random_draws`: then example i's chain depends on
  keys[i] alone, not on the batch it runs in; the training steps' losses pass these).
  `first_denoised`: D(x, σ_from) when the caller already has it (saves one network call;
  not for "posterior_cov", which needs the Jacobian there as well).
  `then_to_zero`: one more step, from σ_to to σ = 0, so the chain ends on x0: a draw from
  N(D, Var[x0 | x]) for "posterior_cov", exactly D(x, σ_to) for "posterior". Not for
  Euler–Maruyama, whose step to 0 is no draw of x0 (a ValueError).
  """
  checks.one_of("step", step, STEP_KINDS)
  if num_steps < 1:
    raise ValueError(f"`num_steps` must be >= 1; got {num_steps}.")
  if then_to_zero and step == "euler_maruyama":
    raise ValueError("`then_to_zero` needs posterior steps (\"posterior\" or \"posterior_cov\"); "
                     "an Euler–Maruyama step to σ = 0 is no draw of x0.")
  move = STEP_FUNCTIONS[step]
  levels = geometric_levels(sigma_from, sigma_to, num_steps)
  if then_to_zero:
    levels = jnp.concatenate([levels, jnp.zeros_like(levels[:1])])  # [num_steps + 2, B]

  def advance(x, k, denoised=None):
    """Step k: x at levels[k] -> levels[k + 1], drawing from fold_in(key, k)."""
    k_noise = random_draws.fold_in(key, k)
    x0_variance = 0.0
    if denoised is None:
      denoised, x0_variance = step_moments(step, denoise_fn, x, levels[k],
                                           random_draws.fold_in(k_noise, 1))
    noise = random_draws.normal(k_noise, x.shape, x.dtype)
    return move(denoised, x, levels[k], levels[k + 1], noise, x0_variance)

  first = 0
  if first_denoised is not None and step != "posterior_cov":
    x, first = advance(x, 0, first_denoised), 1
  # The network steps run in a scan: one copy of the network in the program whatever
  # num_steps is (unrolled, XLA compiled each step's network and its JVP anew).
  if first < levels.shape[0] - 1:  # (an empty scan would still compile its body)
    x, _ = jax.lax.scan(lambda x, k: (advance(x, k), None), x,
                        jnp.arange(first, levels.shape[0] - 1))
  return x


def ancestral_sampler(denoise_fn: DenoiseFn, x: jax.Array, sigma_from: jax.Array,
                      keys: jax.Array, num_steps: int = 32, *, sigma_to: float | jax.Array = 0.002,
                      step: str = "posterior") -> jax.Array:
  """Stochastic sampling by posterior or Euler–Maruyama steps, from x at σ_from to x0.

  x: [B, ...] at per-example level σ_from [B]; keys [B], one per image. Runs
  `num_steps` geometrically spaced steps down to σ_to, then returns D(x, σ_to). Used
  for posterior-sampling reconstructions in the memorization attack (METHOD.md §8).
  """
  batch = checks.batch_size("x", x)
  sigma_from = jnp.broadcast_to(jnp.asarray(sigma_from, jnp.float32), (batch,))
  sigma_to = jnp.broadcast_to(jnp.asarray(sigma_to, jnp.float32), (batch,))
  x = ancestral_steps(denoise_fn, x, geometric_levels(sigma_from, sigma_to, num_steps), keys,
                      step=step)
  return denoise_fn(x, sigma_to)


def ancestral_steps(denoise_fn: DenoiseFn, x: jax.Array, levels: jax.Array, keys: jax.Array, *,
                    step: str = "posterior") -> jax.Array:
  """Reverse steps of kind `step` over a given list of noise levels: x [B, ...] at levels[0]
  -> x at levels[-1].

  levels: [N + 1] (shared) or [N + 1, B] (per example), decreasing; the last may be 0, and a
  posterior step to 0 returns D exactly (N network evaluations in all). keys [B], one per
  image: step i draws from fold_in(keys[b], i). Over a DDPM model's inference σ list, posterior
  steps are DDPMScheduler's ancestral steps (variance β̃, "fixed_small") in the VE view.
  """
  checks.one_of("step", step, STEP_KINDS)
  batch = checks.batch_size("x", x)
  keys = per_image_keys(keys, batch)
  levels = jnp.asarray(levels, jnp.float32)
  if levels.ndim == 1:
    levels = jnp.broadcast_to(levels[:, None], (levels.shape[0], batch))
  num_steps = levels.shape[0] - 1
  move = STEP_FUNCTIONS[step]

  def body(x, inputs):
    i, s_i, s_j = inputs
    denoised, x0_variance = step_moments(step, denoise_fn, x, s_i,
                                         random_draws.fold_in(keys, num_steps + i))
    return move(denoised, x, s_i, s_j, _step_noise(keys, i, x), x0_variance), None

  x, _ = jax.lax.scan(body, x, (jnp.arange(num_steps), levels[:-1], levels[1:]))
  return x
