"""random_draws: one key is today's jax.random call bit for bit; with one key per example,
example i's draws (and every loss's per-example draws) are the same in a batch of 4 or 8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ambient_jax import losses, precond, random_draws, sampling
from tests import gaussian

KEY = jax.random.key(7)
SHAPE = (4, 6)  # per example


def _keys(batch):
  """[batch] keys; example i's key is fold_in(KEY, i) in any batch size."""
  return random_draws.example_keys(KEY, jnp.arange(batch))


DRAWS = {
    "normal": (lambda k, s: random_draws.normal(k, s), lambda k, s: jax.random.normal(k, s)),
    "uniform": (lambda k, s: random_draws.uniform(k, s, minval=-2.0, maxval=3.0),
                lambda k, s: jax.random.uniform(k, s, minval=-2.0, maxval=3.0)),
    "randint": (lambda k, s: random_draws.randint(k, s, 0, 1000),
                lambda k, s: jax.random.randint(k, s, 0, 1000)),
    "rademacher": (lambda k, s: random_draws.rademacher(k, s), lambda k, s: jax.random.rademacher(k, s)),
}


@pytest.mark.parametrize("name", sorted(DRAWS))
def test_one_key_is_jax_random_and_per_example_draws_do_not_depend_on_the_batch(name):
  ours, theirs = DRAWS[name]
  shape = (8,) + SHAPE
  np.testing.assert_array_equal(ours(KEY, shape), theirs(KEY, shape))
  eight, four = ours(_keys(8), shape), ours(_keys(4), (4,) + SHAPE)
  np.testing.assert_array_equal(eight[:4], four)
  np.testing.assert_array_equal(eight[5], theirs(jax.random.fold_in(KEY, 5), SHAPE))
  assert len(np.unique(np.asarray(eight).reshape(8, -1), axis=0)) == 8  # examples differ


def test_split_fold_in_repeat_and_shape_checks():
  for a, b in zip(random_draws.split(KEY, 3), jax.random.split(KEY, 3)):
    np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
  np.testing.assert_array_equal(jax.random.key_data(random_draws.fold_in(KEY, 4)),
                                jax.random.key_data(jax.random.fold_in(KEY, 4)))
  assert random_draws.repeat(KEY, 2) is KEY
  keys = _keys(4)
  parts = random_draws.split(keys, 3)
  assert parts.shape == (3, 4)
  np.testing.assert_array_equal(jax.random.key_data(parts[1][2]),
                                jax.random.key_data(jax.random.split(keys[2], 3)[1]))
  stacked = random_draws.repeat(keys, 2)
  assert stacked.shape == (8,)
  np.testing.assert_array_equal(jax.random.key_data(stacked[5]),
                                jax.random.key_data(jax.random.fold_in(keys[1], 1)))
  # Raw uint32 keys work as well, one or [B].
  raw = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(random_draws.normal(raw, (2,)), jax.random.normal(raw, (2,)))
  assert random_draws.normal(jax.random.split(raw, 4), (4, 2)).shape == (4, 2)
  with pytest.raises(ValueError, match="first axis is the batch"):
    random_draws.normal(keys, (5, 2))
  with pytest.raises(ValueError, match="one per example"):
    random_draws.normal(jax.random.split(KEY, (2, 2)), (2,))


def _loss_calls():
  """name -> loss(keys, x_n [B, D], σ_n VE [B]) -> (per-example loss, aux)."""
  d = gaussian.exact_denoiser()
  vp = lambda x, s: (x - gaussian.MU) * 0.3 + s[:, None]  # any per-example ε-model
  cons = {"chain_steps": 2, "gap": 0.3, "anchor_steps": 2}
  return {
      "edm": lambda k, x, s: losses.edm_loss(d, x, k),
      "ambient": lambda k, x, s: losses.ambient_loss(d, x, s, k),
      "ambient_vp": lambda k, x, s: losses.ambient_loss_vp(
          vp, x * 0.5, precond.ve_to_vp_sigma(s), k, prediction="eps",
          sigma_schedule=precond.ddpm_sigmas()),
      "ambient_vp_lognormal": lambda k, x, s: losses.ambient_loss_vp(
          vp, x * 0.5, precond.ve_to_vp_sigma(s), k),
      "ddpm": lambda k, x, s: losses.ddpm_loss(vp, x, k, precond.ddpm_sigmas()),
      "consistency": lambda k, x, s: losses.consistency_loss(d, x, s, k, **cons),
      "consistency_em": lambda k, x, s: losses.consistency_loss(d, x, s, k, "euler_maruyama", **cons),
      "posterior_sample": lambda k, x, s: losses.posterior_sample_loss(d, x, s, k, chain_steps=2),
      "posterior_sample_plain": lambda k, x, s: losses.posterior_sample_loss(
          d, x, s, k, chain_steps=2, step="posterior"),
  }


@pytest.mark.parametrize("name", sorted(_loss_calls()))
def test_each_loss_draws_example_i_the_same_in_a_batch_of_4_or_8(name):
  loss = _loss_calls()[name]
  x = gaussian.MU + 0.4 * jax.random.normal(jax.random.key(1), (8, 6))
  sigma_n = jnp.array([0.3, 0.0, 0.5, 0.2, 0.3, 0.1, 0.0, 0.4])
  full, aux_full = loss(_keys(8), x, sigma_n)
  half, aux_half = loss(_keys(4), x[:4], sigma_n[:4])
  np.testing.assert_allclose(full[:4], half, rtol=1e-5, atol=1e-7)
  for k in aux_half:
    np.testing.assert_allclose(aux_full[k][:4], aux_half[k], rtol=1e-6)
  assert len(np.unique(np.asarray(full))) > 4  # not all zero / the same


def test_reverse_chain_per_example_keys():
  x = jax.random.normal(jax.random.key(2), (8, 5))
  args = (gaussian.exact_denoiser(), jnp.ones(8), jnp.full((8,), 0.3), 3)
  for step in sampling.STEP_KINDS:
    full = sampling.reverse_chain(args[0], x, *args[1:], _keys(8), step)
    half = sampling.reverse_chain(args[0], x[:4], args[1][:4], args[2][:4], 3, _keys(4), step)
    np.testing.assert_allclose(full[:4], half, rtol=1e-6)
