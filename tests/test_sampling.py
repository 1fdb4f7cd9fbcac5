"""Samplers against closed forms for Gaussian data, and their invariances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ambient_jax import precond, sampling
from tests import gaussian

N, DIM = 8192, 4


def _latents(n=N, seed=0):
  return sampling.latents_from_keys(jax.random.split(jax.random.key(seed), n), (DIM,))


def test_full_sampling_with_the_exact_denoiser_reproduces_the_data_law():
  x = jax.jit(lambda z: sampling.edm_sampler(gaussian.exact_denoiser(), z, num_steps=128))(_latents())
  assert abs(float(x.mean()) - gaussian.MU) < 0.01
  assert abs(float(x.std()) - gaussian.S) / gaussian.S < 0.02


def test_truncated_sampling_reproduces_the_law_of_the_posterior_mean():
  """Stopping at σ_n and taking one Tweedie step samples E[x0 | x_n]: std s²/√(s² + σ_n²)."""
  sigma_n = 0.3
  x = sampling.edm_sampler(gaussian.exact_denoiser(), _latents(), num_steps=128,
                           sigma_stop=jnp.full((N,), sigma_n))
  expected = gaussian.S**2 / np.sqrt(gaussian.S**2 + sigma_n**2)
  assert abs(float(x.std()) - expected) / expected < 0.02
  assert abs(float(x.std()) - gaussian.S) / gaussian.S > 0.2  # clearly not the full law


def test_truncated_zero_entries_fall_back_to_full_sampling():
  z = _latents(16)
  full = sampling.edm_sampler(gaussian.exact_denoiser(), z)
  mixed = sampling.edm_sampler(gaussian.exact_denoiser(), z,
                               sigma_stop=jnp.where(jnp.arange(16) < 8, 0.0, 0.3))
  np.testing.assert_allclose(np.asarray(mixed[:8]), np.asarray(full[:8]), rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(mixed[8:]), np.asarray(full[8:]))


def test_edm_schedule_matches_edm():
  steps = sampling.edm_sigma_steps(18)
  np.testing.assert_allclose(float(steps[0]), 80.0, rtol=1e-5)
  np.testing.assert_allclose(float(steps[-1]), 0.002, rtol=1e-5)
  assert bool(jnp.all(jnp.diff(steps) < 0))


def test_stochastic_images_do_not_depend_on_batch_split_or_order():
  keys = jax.random.split(jax.random.key(1), 16)
  z = sampling.latents_from_keys(keys, (DIM,))
  run = jax.jit(lambda z, k: sampling.edm_sampler(gaussian.exact_denoiser(), z, keys=k, S_churn=40.0))
  whole = run(z, keys)
  halves = jnp.concatenate([run(z[:8], keys[:8]), run(z[8:], keys[8:])])
  perm = jnp.arange(16)[::-1]
  reversed_ = run(z[perm], keys[perm])[perm]
  np.testing.assert_allclose(np.asarray(whole), np.asarray(halves), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(whole), np.asarray(reversed_), rtol=1e-6, atol=1e-6)
  deterministic = sampling.edm_sampler(gaussian.exact_denoiser(), z)
  assert not np.allclose(np.asarray(whole), np.asarray(deterministic))  # churn really adds noise


def test_images_are_the_same_on_one_and_on_eight_devices():
  assert jax.device_count() == 8, "tests/conftest.py must give 8 fake CPU devices"
  keys = jax.random.split(jax.random.key(2), 32)
  z = sampling.latents_from_keys(keys, (DIM,))
  run = jax.jit(lambda z, k: sampling.edm_sampler(gaussian.exact_denoiser(), z, keys=k, S_churn=10.0))
  single = run(jax.device_put(z, jax.devices()[0]), jax.device_put(keys, jax.devices()[0]))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = NamedSharding(mesh, P("data"))
  multi = run(jax.device_put(z, sharded), jax.device_put(keys, sharded))
  assert len(multi.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(multi), np.asarray(single), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("step", sampling.STEP_KINDS)
def test_ancestral_sampler_with_exact_denoiser_reproduces_the_data_law(step):
  sigma_from = 2.0
  keys = jax.random.split(jax.random.key(3), N)
  x = gaussian.MU + np.sqrt(gaussian.S**2 + sigma_from**2) * _latents(seed=4)
  out = sampling.ancestral_sampler(gaussian.exact_denoiser(), x, jnp.full((N,), sigma_from), keys,
                                   num_steps=256, step=step)
  assert abs(float(out.std()) - gaussian.S) / gaussian.S < 0.03
  assert abs(float(out.mean()) - gaussian.MU) < 0.01


def test_tweedie_moments_give_the_gaussian_posterior_and_posterior_cov_steps_are_exact_when_few():
  """Var[x0 | x_σ] = σ² s²/(s² + σ²) for Gaussian data (one Rademacher probe is exact for
  an isotropic Jacobian); with it, 2 posterior steps from σ = 2 reproduce the data's std,
  where plain posterior and Euler–Maruyama steps need hundreds."""
  x = jnp.linspace(-2, 2, 6)[:, None] * jnp.ones((6, 3))
  sigma = jnp.array([0.05, 0.1, 0.3, 1.0, 2.0, 5.0])
  probe = jnp.sign(jax.random.normal(jax.random.key(0), x.shape))
  denoised, var = sampling.tweedie_moments(gaussian.exact_denoiser(), x, sigma, probe)
  np.testing.assert_allclose(np.asarray(var), np.asarray(sigma**2 * gaussian.clean_shrinkage(sigma)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(denoised), np.asarray(gaussian.exact_denoiser()(x, sigma)), rtol=1e-6)
  keys = jax.random.split(jax.random.key(3), N)
  x = gaussian.MU + np.sqrt(gaussian.S**2 + 4.0) * _latents(seed=4)
  stds = {step: float(sampling.ancestral_sampler(gaussian.exact_denoiser(), x, jnp.full((N,), 2.0), keys,
                                                 num_steps=2, step=step).std())
          for step in sampling.STEP_KINDS}
  assert abs(stds["posterior_cov"] - gaussian.S) / gaussian.S < 0.03, stds
  assert abs(stds["posterior"] - gaussian.S) / gaussian.S > 0.1, stds
  assert abs(stds["euler_maruyama"] - gaussian.S) / gaussian.S > 0.1, stds


def test_reverse_chain_then_to_zero_ends_on_x0():
  """then_to_zero: one more step to σ = 0. Plain posterior steps then end exactly on
  D(x_K, σ_to) (the same first K steps); "posterior_cov" steps on a draw of x0 with the
  data's spread (2 steps from σ = 2 for Gaussian data); Euler–Maruyama refuses."""
  d = gaussian.exact_denoiser()
  keys = jax.random.split(jax.random.key(5), N)
  x = gaussian.MU + np.sqrt(gaussian.S**2 + 4.0) * _latents(seed=6)
  start, stop = jnp.full((N,), 2.0), jnp.full((N,), 0.01)
  x_k = sampling.reverse_chain(d, x, start, stop, 2, keys, "posterior")
  ended = sampling.reverse_chain(d, x, start, stop, 2, keys, "posterior", then_to_zero=True)
  np.testing.assert_allclose(np.asarray(ended), np.asarray(d(x_k, stop)), rtol=1e-6, atol=1e-7)
  drawn = sampling.reverse_chain(d, x, start, stop, 2, keys, "posterior_cov", then_to_zero=True)
  assert abs(float(drawn.std()) - gaussian.S) / gaussian.S < 0.03
  assert abs(float(d(x_k, stop).std()) - gaussian.S) / gaussian.S > 0.1  # the mean alone is too narrow
  with pytest.raises(ValueError, match="Euler–Maruyama"):
    sampling.reverse_chain(d, x, start, stop, 2, keys, "euler_maruyama", then_to_zero=True)


def test_posterior_step_mean_is_exact_for_any_step_size():
  """E[x_j | x_i] of a posterior step = the true E[x_{σ_j} | x_{σ_i}] for Gaussian data."""
  x = jnp.linspace(-2, 2, 9)[:, None]
  s_i, s_j = jnp.full((9,), 1.5), jnp.full((9,), 0.1)
  d = gaussian.exact_denoiser()
  mean = sampling.posterior_step(d(x, s_i), x, s_i, s_j, jnp.zeros_like(x))
  # Gaussian x_j given x_i: regression of x_j on x_i with cov (s² + σ_j²) / (s² + σ_i²)
  slope = (gaussian.S**2 + 0.1**2) / (gaussian.S**2 + 1.5**2)
  np.testing.assert_allclose(np.asarray(mean), np.asarray(gaussian.MU + slope * (x - gaussian.MU)), rtol=1e-5)


def test_ve_vp_conversions_round_trip_and_map_denoisers():
  sigma = jnp.array([0.002, 0.1, 0.5, 1.0, 80.0])
  np.testing.assert_allclose(np.asarray(precond.vp_to_ve_sigma(precond.ve_to_vp_sigma(sigma))),
                             np.asarray(sigma), rtol=1e-3)  # σ_t ≈ 1 − 8e-5 at σ = 80 in float32
  sigma_t = precond.ve_to_vp_sigma(sigma)
  assert bool(jnp.all((sigma_t > 0) & (sigma_t < 1)))
  x = jnp.linspace(-3, 3, 5)[:, None] * jnp.ones((5, 3))
  as_ve = precond.ve_denoiser_from_vp(gaussian.exact_vp_denoiser())(x, sigma)
  np.testing.assert_allclose(np.asarray(as_ve), np.asarray(gaussian.exact_denoiser()(x, sigma)), rtol=1e-4, atol=1e-5)
  x_t = x * precond.vp_scale(sigma_t)[:, None]
  as_vp = precond.vp_denoiser_from_ve(gaussian.exact_denoiser())(x_t, sigma_t)
  np.testing.assert_allclose(np.asarray(as_vp), np.asarray(gaussian.exact_vp_denoiser()(x_t, sigma_t)), rtol=1e-4, atol=1e-5)


def test_bad_sampler_input_gets_clear_errors():
  z = _latents(4)
  with pytest.raises(ValueError, match="keys"):
    sampling.edm_sampler(gaussian.exact_denoiser(), z, S_churn=1.0)
  with pytest.raises(ValueError, match="keys"):
    sampling.edm_sampler(gaussian.exact_denoiser(), z, S_churn=1.0, keys=jax.random.split(jax.random.key(0), 3))
  with pytest.raises(ValueError, match="sigma_stop"):
    sampling.edm_sampler(gaussian.exact_denoiser(), z, sigma_stop=jnp.full((3,), 0.2))
  with pytest.raises(ValueError, match="step"):
    sampling.reverse_chain(gaussian.exact_denoiser(), z, jnp.ones(4), jnp.full((4,), 0.5), 2,
                           jax.random.key(0), step="ddim")


def test_geometric_levels_and_a_chain_given_its_first_denoised_value():
  """The σ ladder: exact endpoints, equal ratios, per example. reverse_chain with
  first_denoised = D(x, σ_from) gives the same result with one network call fewer; its
  network steps run in a scan, so the network is traced once whatever the number of steps."""
  sigma_from, sigma_to = jnp.array([2.0, 0.5]), jnp.array([0.02, 0.4])
  levels = sampling.geometric_levels(sigma_from, sigma_to, 4)
  assert levels.shape == (5, 2)
  np.testing.assert_array_equal(levels[0], sigma_from)
  np.testing.assert_array_equal(levels[-1], sigma_to)
  ratios = levels[1:] / levels[:-1]
  np.testing.assert_allclose(ratios, np.broadcast_to((sigma_to / sigma_from) ** 0.25, (4, 2)),
                             rtol=1e-5)
  traces, calls = [], []

  def denoise(x, sigma):
    traces.append(1)
    jax.debug.callback(lambda: calls.append(1))  # once per evaluation, in a scan too
    return x / (1.0 + sigma.reshape(-1, 1) ** 2)

  def counted(fn):
    traces.clear(), calls.clear()
    out = jax.block_until_ready(fn())
    return out, len(traces), len(calls)

  x = jax.random.normal(jax.random.key(0), (2, 3))
  key = jax.random.key(1)
  plain, plain_traces, plain_calls = counted(
      lambda: sampling.reverse_chain(denoise, x, sigma_from, sigma_to, 4, key))
  given, given_traces, given_calls = counted(lambda: sampling.reverse_chain(
      denoise, x, sigma_from, sigma_to, 4, key, first_denoised=denoise(x, sigma_from)))
  assert (plain_calls, given_calls) == (4, 4)  # 4 in the chain; 1 outside + 3 in the chain
  assert (plain_traces, given_traces) == (1, 2)
  _, long_traces, long_calls = counted(
      lambda: sampling.reverse_chain(denoise, x, sigma_from, sigma_to, 16, key))
  assert (long_traces, long_calls) == (1, 16)
  _, one_traces, one_calls = counted(lambda: sampling.reverse_chain(
      denoise, x, sigma_from, sigma_to, 1, key, first_denoised=denoise(x, sigma_from)))
  assert (one_traces, one_calls) == (1, 1)  # the configs' chain: no network in the chain
  np.testing.assert_allclose(given, plain, rtol=1e-6)
