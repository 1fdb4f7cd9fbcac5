"""The losses against closed forms for Gaussian data (METHOD.md §3–§5, §7)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ambient_jax import losses, precond, sampling
from tests import gaussian

DIM, N = 16, 16384
SIGMA_N = 0.3


def _noisy_gaussian_data(seed=0, sigma_n=SIGMA_N, n=N):
  k0, k1 = jax.random.split(jax.random.key(seed))
  x0 = gaussian.MU + gaussian.S * jax.random.normal(k0, (n, DIM))
  return x0, x0 + sigma_n * jax.random.normal(k1, (n, DIM))


def _minimiser(total, size: int = 2) -> jax.Array:
  """θ [size] minimising `total`, a loss quadratic in θ: one Newton step from zero is exact
  for the given noise draw (no optimiser tuning, no iteration count to pick). Jitted: the
  Hessian of a loss over 16k examples, run eagerly, is hundreds of separate dispatches."""
  newton = lambda theta: theta - jnp.linalg.solve(jax.hessian(total)(theta), jax.grad(total)(theta))
  return jax.jit(newton)(jnp.zeros(size))


def _fit_linear_denoiser(loss_fn, sigma):
  """Fits D(x, σ) = a x + c at (nearly) one fixed σ and returns a."""

  def total(theta):
    denoise = lambda x, s: theta[0] * x + theta[1]
    return jnp.mean(loss_fn(denoise, p_mean=float(np.log(sigma)), p_std=1e-4))

  return float(_minimiser(total)[0])


@pytest.mark.parametrize("sigma", [0.4, 0.6, 1.0, 2.0])
def test_ambient_recovers_clean_shrinkage_and_edm_the_naive_one(sigma):
  x0, x_noisy = _noisy_gaussian_data()
  sigma_n = jnp.full((N,), SIGMA_N)
  key = jax.random.key(1)
  a_ambient = _fit_linear_denoiser(
      lambda d, **kw: losses.ambient_loss(d, x_noisy, sigma_n, key, **kw)[0], sigma)
  a_naive = _fit_linear_denoiser(lambda d, **kw: losses.edm_loss(d, x_noisy, key, **kw)[0], sigma)
  clean, naive = gaussian.clean_shrinkage(sigma), gaussian.naive_shrinkage(sigma, SIGMA_N)
  assert abs(a_ambient - clean) / clean < 0.03, (a_ambient, clean)
  assert abs(a_naive - naive) / naive < 0.03, (a_naive, naive)
  # the two targets differ by far more than the tolerance, so the test tells them apart
  assert abs(a_ambient - naive) / naive > 0.15


def test_x0_weighting_has_the_same_minimiser():
  x0, x_noisy = _noisy_gaussian_data()
  sigma_n = jnp.full((N,), SIGMA_N)
  a = _fit_linear_denoiser(lambda d, **kw: losses.ambient_loss(
      d, x_noisy, sigma_n, jax.random.key(2), weighting="x0", **kw)[0], 0.6)
  assert abs(a - gaussian.clean_shrinkage(0.6)) / gaussian.clean_shrinkage(0.6) < 0.03


def test_ambient_with_zero_sigma_n_equals_edm_exactly():
  x0, _ = _noisy_gaussian_data(n=512)
  denoise = lambda x, s: jnp.tanh(x) * (1 + s[:, None])  # any nonlinear denoiser
  key = jax.random.key(3)
  for weighting in losses.AMBIENT_WEIGHTINGS:
    ambient, aux_a = losses.ambient_loss(denoise, x0, jnp.zeros(512), key, weighting=weighting)
    edm, aux_e = losses.edm_loss(denoise, x0, key)
    np.testing.assert_array_equal(np.asarray(ambient), np.asarray(edm))
    np.testing.assert_array_equal(np.asarray(aux_a["sigma"]), np.asarray(aux_e["sigma"]))


def test_sigma_is_sampled_above_each_sigma_n_from_the_truncated_lognormal():
  sigma_n = jnp.array([0.0, 0.05, 0.2, 1.0, 10.0] * 20000)
  sigma = precond.sample_sigma(jax.random.key(0), sigma_n)
  assert bool(jnp.all(sigma > sigma_n))
  # clean examples: the EDM lognormal, ln σ ~ N(−1.2, 1.2²)
  log_clean = np.log(np.asarray(sigma[::5]))
  assert abs(log_clean.mean() - precond.P_MEAN) < 0.03 and abs(log_clean.std() - precond.P_STD) < 0.03
  # σ_n = 0.2: P(σ < 2 σ_n | σ > σ_n) matches the truncated law
  from scipy.stats import norm
  a, b = [(np.log(v) - precond.P_MEAN) / precond.P_STD for v in (0.2, 0.4)]
  expected = (norm.cdf(b) - norm.cdf(a)) / norm.sf(a)
  assert abs(np.mean(np.asarray(sigma[2::5]) < 0.4) - expected) < 0.01


def test_vp_ambient_recovers_the_clean_vp_denoiser():
  """VP form: x_n = √(1−σ_n²) x0 + σ_n z; x0- and ε-prediction both reach E[x0 | x_t]."""
  sigma_n, sigma_t = 0.3, 0.6
  k0, k1 = jax.random.split(jax.random.key(4))
  x0 = gaussian.MU + gaussian.S * jax.random.normal(k0, (N, DIM))
  x_noisy = np.sqrt(1 - sigma_n**2) * x0 + sigma_n * jax.random.normal(k1, x0.shape)
  scale = np.sqrt(1 - sigma_t**2)
  target = scale * gaussian.S**2 / (scale**2 * gaussian.S**2 + sigma_t**2)  # x0 coefficient of x_t
  for prediction in losses.VP_PREDICTIONS:
    def total(theta):
      fn = lambda x, s: theta[0] * x + theta[1]
      return jnp.mean(losses.ambient_loss_vp(fn, x_noisy, jnp.full((N,), sigma_n), jax.random.key(5),
                                             prediction=prediction,
                                             sigma_schedule=jnp.array([sigma_t]))[0])
    theta = _minimiser(total)
    a = float(theta[0]) if prediction == "x0" else (1 - sigma_t * float(theta[0])) / scale
    assert abs(a - target) / target < 0.03, (prediction, a, target)


def test_vp_schedule_sampling_stays_above_sigma_n():
  sigmas = precond.ddpm_sigmas()
  sigma_n = jnp.tile(jnp.concatenate([jnp.zeros(1), sigmas[jnp.array([100, 500, 800])]]), 20000)
  _, aux = losses.ambient_loss_vp(lambda x, s: x, jnp.zeros((80000, 1)), sigma_n, jax.random.key(0),
                                  sigma_schedule=sigmas)
  assert bool(jnp.all(aux["sigma_t"] > sigma_n))
  for column, t_n in enumerate([-1, 100, 500, 800]):  # t uniform over t_n + 1 .. 999
    steps = np.asarray(aux["timestep"][column::4])
    assert steps.min() == t_n + 1 and steps.max() == 999
  np.testing.assert_allclose(np.asarray(sigmas[jnp.array([100, 500, 800])]), [0.325, 0.851, 0.981], atol=1e-3)


def test_vp_and_ve_ambient_predictions_agree_for_the_exact_denoiser():
  """The exact VP denoiser's x̂_n equals its noisy target in expectation, like the VE one."""
  x_noisy = jnp.zeros((4096, 4))
  sigma_n = jnp.full((4096,), 0.3)
  loss_vp, _ = losses.ambient_loss_vp(gaussian.exact_vp_denoiser(), x_noisy, sigma_n, jax.random.key(1))
  assert bool(jnp.all(jnp.isfinite(loss_vp)))


@pytest.mark.parametrize("options", [
    dict(),  # the default: global form, posterior steps
    dict(start="sigma_n", gap=0.05, anchor_steps=1, chain_steps=1),  # the paper's local form
    dict(start="sigma_n", gap=0.3, anchor_steps=6, chain_steps=2, num_samples=4),
])
def test_consistency_is_zero_for_the_exact_denoiser_and_positive_for_a_wrong_one(options):
  _, x_noisy = _noisy_gaussian_data(n=8192)
  sigma_n = jnp.full((8192,), SIGMA_N)
  key = jax.random.key(7)
  exact, _ = losses.consistency_loss(gaussian.exact_denoiser(), x_noisy, sigma_n, key, **options)
  stderr = float(jnp.std(exact)) / np.sqrt(exact.size)
  assert abs(float(jnp.mean(exact))) < 4 * stderr, (float(jnp.mean(exact)), stderr)

  def wrong_below(x, sigma):  # exact above σ_n, over-smooths below
    a = gaussian.clean_shrinkage(sigma) * jnp.where(sigma < SIGMA_N, 0.7, 1.0)
    return gaussian.MU + a[:, None] * (x - gaussian.MU)

  wrong, _ = losses.consistency_loss(wrong_below, x_noisy, sigma_n, key, **options)
  wrong_stderr = float(jnp.std(wrong)) / np.sqrt(wrong.size)
  assert float(jnp.mean(wrong)) > 5 * max(wrong_stderr, stderr)


def test_a_consistency_teacher_runs_anchor_and_chains_and_the_trained_denoiser_only_their_ends():
  """Exact teacher, student = exact + c: posterior chains by the exact denoiser keep
  E[D*(X_b) | x_a] = D*(x_a) for Gaussian data, so the loss is c² per pixel in expectation
  and its gradient in c is 2c; the student as its own teacher gives another value."""
  _, x_noisy = _noisy_gaussian_data(n=8192)
  sigma_n = jnp.full((8192,), SIGMA_N)
  key, exact = jax.random.key(3), gaussian.exact_denoiser()

  def mean_loss(c, teacher):
    student = lambda x, s: exact(x, s) + c
    loss, _ = losses.consistency_loss(student, x_noisy, sigma_n, key, chain_denoise_fn=teacher)
    return jnp.mean(loss), loss

  (value, loss), grad = jax.value_and_grad(mean_loss, has_aux=True)(0.1, exact)
  stderr = float(jnp.std(loss)) / np.sqrt(loss.size)
  assert abs(float(value) - 0.01) < 4 * stderr, (float(value), stderr)
  np.testing.assert_allclose(float(grad), 0.2, rtol=0.05)  # d/dc of (c + noise)·(c + noise')
  own, _ = mean_loss(0.1, None)  # its offset also moves the anchor and the chains
  assert abs(float(own) - 0.01) > 10 * stderr, (float(own), stderr)
  with pytest.raises(ValueError, match="chain_denoise_fn"):
    losses.consistency_loss(exact, x_noisy, sigma_n, key, chain_denoise_fn=exact, anchor_grad=True)


def test_the_data_anchor_is_unbiased_its_loss_offset_is_the_closed_form_variance():
  """anchor="data", exact chains, student = exact + c at their ends: the chains' mean misses
  E[x0 | x_s] by c, so the gradient in c is 2c, and the loss is c² + Var[T | x_s] with T = (x_n − a x_s)/(1 − a),
  a = σ_n²/σ_s², and Var[x_n | x_s] = (s² + σ_n²)(σ_s² − σ_n²)/(s² + σ_s²) per pixel."""
  _, x_noisy = _noisy_gaussian_data(n=8192)
  sigma_n = jnp.full((8192,), SIGMA_N)
  exact = gaussian.exact_denoiser()

  def mean_loss(c):
    loss, aux = losses.consistency_loss(lambda x, s: exact(x, s) + c, x_noisy, sigma_n, jax.random.key(5),
                                        anchor="data", start_min_ratio=1.5, start_max_ratio=3.0,
                                        chain_denoise_fn=exact)
    return jnp.mean(loss), (loss, aux["sigma_start"])

  (value, (loss, sigma_s)), grad = jax.value_and_grad(mean_loss, has_aux=True)(0.1)
  a = (SIGMA_N / sigma_s) ** 2
  var_xn = (gaussian.S**2 + SIGMA_N**2) * (sigma_s**2 - SIGMA_N**2) / (gaussian.S**2 + sigma_s**2)
  expected = 0.01 + float(jnp.mean(var_xn / (1 - a) ** 2))
  stderr = float(jnp.std(loss)) / np.sqrt(loss.size)
  assert abs(float(value) - expected) < 4 * stderr, (float(value), expected, stderr)
  np.testing.assert_allclose(float(grad), 0.2, rtol=0.05)
  for bad in [dict(start="sigma_n"), dict(gap=0.5), dict(anchor_grad=True)]:
    with pytest.raises(ValueError, match="global form"):
      losses.consistency_loss(exact, x_noisy, sigma_n, jax.random.key(5), anchor="data", **bad)


def test_consistency_ignores_clean_examples_and_supports_every_option():
  _, x_noisy = _noisy_gaussian_data(n=64)
  sigma_n = jnp.where(jnp.arange(64) % 2 == 0, 0.0, SIGMA_N)
  for options in [dict(step="euler_maruyama"), dict(estimator="average", num_samples=3),
                  dict(weighting="edm"), dict(weighting=lambda sb, sn: sb / sn),
                  dict(grad_through_sampler=True, anchor_grad=True)]:
    loss, aux = losses.consistency_loss(gaussian.exact_denoiser(), x_noisy, sigma_n,
                                        jax.random.key(0), **options)
    assert loss.shape == (64,)
    assert bool(jnp.all(loss[::2] == 0)) and bool(jnp.all(jnp.isfinite(loss)))
    assert bool(jnp.all(aux["sigma_target"][1::2] < SIGMA_N))


def test_levels_keep_the_margin_that_avoids_square_roots_of_negatives():
  _, x_noisy = _noisy_gaussian_data(n=4096)
  sigma_n = jnp.full((4096,), SIGMA_N)
  _, aux = losses.consistency_loss(gaussian.exact_denoiser(), x_noisy, sigma_n, jax.random.key(0))
  assert float(jnp.min(aux["sigma_start"])) >= 1.05 * SIGMA_N * (1 - 1e-6)
  assert float(jnp.max(aux["sigma_target"])) <= 0.95 * SIGMA_N * (1 + 1e-6)


def _linear_params_loss(loss_name):
  _, x_noisy = _noisy_gaussian_data(n=256)
  sigma_n = jnp.full((256,), SIGMA_N)

  def total(theta, key):
    denoise = lambda x, s: theta[0] * x + theta[1] * jnp.tanh(x) + theta[2] * s[:, None]
    if loss_name == "edm":
      loss, _ = losses.edm_loss(denoise, x_noisy, key)
    elif loss_name == "vp":
      loss, _ = losses.ambient_loss_vp(denoise, x_noisy, sigma_n, key)
    else:
      loss, _ = getattr(losses, loss_name)(denoise, x_noisy, sigma_n, key)
    return jnp.mean(loss)

  return total


@pytest.mark.parametrize("loss_name", ["edm", "ambient_loss", "vp", "consistency_loss"])
def test_losses_jit_and_are_differentiable(loss_name):
  total = _linear_params_loss(loss_name)
  theta = jnp.array([0.5, 0.2, 0.1])
  value, grad = jax.jit(jax.value_and_grad(total))(theta, jax.random.key(0))
  assert np.isfinite(float(value)) and bool(jnp.all(jnp.isfinite(grad)))
  assert float(jnp.max(jnp.abs(grad))) > 0


def test_bad_input_gets_a_message_naming_the_argument():
  d = lambda x, s: x
  x = jnp.zeros((4, 2))
  with pytest.raises(ValueError, match="sigma_n"):
    losses.ambient_loss(d, x, jnp.array([0.1, -0.1, 0.1, 0.1]), jax.random.key(0))
  with pytest.raises(ValueError, match="sigma_n"):
    losses.ambient_loss(d, x, jnp.zeros((4, 1)), jax.random.key(0))
  with pytest.raises(ValueError, match="sigma_n"):
    losses.consistency_loss(d, x, jnp.zeros(3), jax.random.key(0))
  with pytest.raises(ValueError, match="step"):
    losses.consistency_loss(d, x, jnp.full((4,), 0.1), jax.random.key(0), step="heun")
  with pytest.raises(ValueError, match="weighting"):
    losses.ambient_loss(d, x, jnp.zeros(4), jax.random.key(0), weighting="snr")
  with pytest.raises(ValueError, match="sigma_n"):
    losses.ambient_loss_vp(d, x, jnp.full((4,), 1.5), jax.random.key(0))


def test_math_modules_import_no_framework():
  code = ("import sys; import ambient_jax.losses, ambient_jax.sampling, ambient_jax.precond; "
          "bad = sorted({m.split('.')[0] for m in sys.modules} & "
          "{'tensorflow', 'orbax', 'flax', 'clu', 'optax', 'torch'}); print(bad); assert not bad")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def test_mixture_denoiser_matches_the_gaussian_closed_form_and_tweedie():
  from ambient_jax import gaussian_mixture
  single = gaussian_mixture.GaussianMixture(np.full((1, DIM), gaussian.MU, np.float32),
                                            np.array([gaussian.S], np.float32), np.ones(1, np.float32))
  x = jax.random.normal(jax.random.key(0), (64, DIM))
  sigma = jnp.geomspace(0.01, 10.0, 64)
  np.testing.assert_allclose(np.asarray(single.denoise(x, sigma)),
                             np.asarray(gaussian.exact_denoiser()(x, sigma)), rtol=1e-5, atol=1e-6)
  # Tweedie: D(x, σ) = x + σ² ∇ log p_σ(x) for a real mixture
  mix = gaussian_mixture.four_clusters_2d()
  def log_density(x, s):
    var = mix.stds**2 + s**2
    sq = jnp.sum(jnp.square(x[None] - mix.means), -1)
    return jax.scipy.special.logsumexp(jnp.log(mix.weights) - 0.5 * sq / var - jnp.log(var))
  x2 = jnp.array([[0.3, 0.1], [-0.4, 0.6], [0.0, 0.0]])
  for s in (0.05, 0.3, 2.0):
    score = jax.vmap(jax.grad(log_density), (0, None))(x2, s)
    np.testing.assert_allclose(np.asarray(mix.denoise(x2, jnp.full((3,), s))),
                               np.asarray(x2 + s**2 * score), rtol=1e-4, atol=1e-5)


def _fit_below(chain_denoiser, ratio=0.5, **options):
  """The shrinkage a that `posterior_sample_loss` fits at σ_b = ratio · σ_n when its
  posterior chain runs on `chain_denoiser` (a Newton step: the loss is quadratic in a, c)."""
  _, x_noisy = _noisy_gaussian_data(seed=3)
  sigma_n = jnp.full((N,), SIGMA_N)

  def total(theta):
    denoise = lambda x, s: theta[0] * x + theta[1]
    loss, _ = losses.posterior_sample_loss(
        denoise, x_noisy, sigma_n, jax.random.key(4), target_min_ratio=ratio,
        target_max_ratio=ratio * 1.0001, chain_denoise_fn=chain_denoiser, **options)
    return jnp.mean(loss)

  return float(_minimiser(total)[0])


def test_posterior_samples_of_the_exact_denoiser_teach_the_clean_shrinkage_below_sigma_n():
  """The exact denoiser is the loss's fixed point: its own posterior draws teach it back."""
  sigma_b = 0.5 * SIGMA_N
  clean = gaussian.clean_shrinkage(sigma_b)
  assert abs(_fit_below(gaussian.exact_denoiser()) - clean) / clean < 0.015
  # posterior steps omit Var[x0 | x_σ]: their draws are too narrow (why they are not the default)
  assert _fit_below(gaussian.exact_denoiser(), step="posterior", chain_steps=8) < 0.95 * clean

  def naive(x, sigma):  # what plain EDM on the noisy data learns: wider than the data
    a = gaussian.naive_shrinkage(sigma, SIGMA_N)[:, None]
    return gaussian.MU + a * (x - gaussian.MU)

  # a chain on the naive model draws too-wide "clean" images, and the fit follows them
  a_naive_chain = _fit_below(naive)
  assert a_naive_chain > clean * 1.05, (a_naive_chain, clean)


def _draw_variance(step, chain_steps, s=0.08, sigma_n=0.2, n=8192):
  """Var of the x̂0 that `posterior_sample_loss` draws with the exact denoiser of
  N(μ, s²) data noised at σ_n, read off the shrinkage it fits at σ_b = s (a = V/(V + s²))."""
  k0, k1 = jax.random.split(jax.random.key(7))
  x_noisy = gaussian.MU + jnp.sqrt(s**2 + sigma_n**2) * jax.random.normal(k0, (n, DIM))
  sigma = jnp.full((n,), sigma_n)
  ratio = s / sigma_n

  def total(theta):
    loss, _ = losses.posterior_sample_loss(
        lambda x, _: theta[0] * x + theta[1], x_noisy, sigma, k1, step=step,
        chain_steps=chain_steps, target_min_ratio=ratio, target_max_ratio=ratio * 1.0001,
        chain_denoise_fn=gaussian.exact_denoiser(s=s))
    return jnp.mean(loss)

  a = float(_minimiser(total)[0])
  return s**2 * a / (1 - a)


def test_posterior_cov_draws_have_the_data_spread_where_euler_maruyama_overshoots():
  """σ_n = 2.5× the data's std: at the true model, one round of draws should reproduce the
  data's variance (the fixed point). 16 Euler–Maruyama steps draw it 12 % too wide (closed
  form; amplified to a fixed point 3.2× too wide, as the toy benchmark's EM runs show);
  posterior steps with Tweedie's variance are exact at any number of steps."""
  s2 = 0.08**2
  for steps in (1, 4):
    assert abs(_draw_variance("posterior_cov", steps) / s2 - 1) < 0.03, steps
  assert _draw_variance("euler_maruyama", 16) / s2 > 1.08
  assert _draw_variance("posterior", 16) / s2 < 0.85  # no x0 variance: too narrow


def _em_fixed_point_std(step, chain_steps, s=0.08, sigma_n=0.2, sigma_min=0.002):
  """Where expectation-maximisation with `posterior_sample_loss`'s draws settles for
  N(0, s²) data noised at σ_n, in closed form: a model N(0, v) draws x̂0 by the library's
  own (linear) step functions, whose variance is propagated exactly; one EM round maps v
  to Var[x̂0]; the fixed point is found by bisection. Returns √v*."""
  levels = np.geomspace(sigma_n, sigma_min, chain_steps + 1)
  one = jnp.ones(1)

  def draws_variance(v):
    var = s**2 + sigma_n**2  # x_n
    for s_i, s_j in zip(levels[:-1], levels[1:]):
      d = v / (v + s_i**2)  # D(x, σ_i) = d x
      x0_var = s_i**2 * d if step == "posterior_cov" else 0.0
      move = lambda x, noise: sampling.STEP_FUNCTIONS[step](
          d * x, x, s_i * one, s_j * one, noise, x0_var * one)
      a, b = float(move(one, 0 * one)[0]), float(move(0 * one, one)[0])
      var = a * a * var + b * b
    d = v / (v + sigma_min**2)
    if step == "posterior_cov":  # the loss ends on a draw of x0, not its mean
      return d * d * var + sigma_min**2 * d
    return d * d * var

  lo, hi = 1e-4, 1.0  # draws_variance(v) - v changes sign once on this bracket
  for _ in range(50):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if draws_variance(mid) > mid else (lo, mid)
  return float(np.sqrt(lo))


def test_em_fixed_point_is_far_too_wide_with_euler_maruyama_draws_and_exact_with_posterior_cov():
  """σ_n = 2.5× the data's std (0.08): one EM round contracts the error by only ~0.98, so
  a small per-round excess of variance settles far off — 16 Euler–Maruyama steps at std
  ≈ 0.144 (the toy benchmark's EM runs stall there: below-σ_n error ≈ 0.6–0.7 = 1 − s²/v*);
  "posterior_cov" draws settle on the data's std with 4 steps."""
  em = _em_fixed_point_std("euler_maruyama", 16)
  assert 0.13 < em < 0.16, em
  assert _em_fixed_point_std("euler_maruyama", 64) < em  # shrinks with the step size, slowly
  assert abs(_em_fixed_point_std("posterior_cov", 4) - 0.08) < 1e-3


def test_posterior_sample_loss_ignores_clean_examples_and_checks_its_options():
  _, x_noisy = _noisy_gaussian_data(n=64)
  sigma_n = jnp.where(jnp.arange(64) % 2 == 0, 0.0, SIGMA_N)
  loss, aux = losses.posterior_sample_loss(gaussian.exact_denoiser(), x_noisy, sigma_n,
                                           jax.random.key(0), step="euler_maruyama")
  assert bool(jnp.all(loss[::2] == 0)) and bool(jnp.all(loss[1::2] > 0))
  assert bool(jnp.all(aux["sigma_target"][1::2] <= SIGMA_N * (1 + 1e-6)))
  for bad in (dict(chain_steps=0), dict(target_min_ratio=0.5, target_max_ratio=0.4),
              dict(sigma_min=0.0), dict(step="ode")):
    with pytest.raises(ValueError):
      losses.posterior_sample_loss(gaussian.exact_denoiser(), x_noisy, sigma_n, jax.random.key(0), **bad)
