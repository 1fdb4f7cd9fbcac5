"""benchmarks/latent_speed.py without timing anything: its configs and flags."""

import os
import sys

import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import latent_speed  # noqa: E402

from ambient_jax.latent import unet, weights  # noqa: E402
from ambient_jax.models import count_params  # noqa: E402


def test_tiny_config_is_the_parity_tests_sdxl_shaped_unet():
  """The benchmark duplicates TINY_UNETS["sdxl"] (benchmarks do not import tests): keep equal."""
  pytest.importorskip("torch")  # latent_reference imports it
  from tests.latent_reference import TINY_POOLED, TINY_UNETS  # pylint: disable=g-import-not-at-top
  assert latent_speed.CONFIGS["tiny"]["unet"] == TINY_UNETS["sdxl"]
  assert latent_speed.CONFIGS["tiny"]["pooled"] == TINY_POOLED


@pytest.mark.parametrize("name", sorted(latent_speed.CONFIGS))
def test_configs_build_and_match_their_inputs(name):
  """Every benchmark config is accepted by our UNet and traces on the benchmark's inputs."""
  case = latent_speed.CONFIGS[name]
  model = weights.build_abstract(lambda: unet.UNet2DConditionModel(case["unet"], rngs=nnx.Rngs(0)))
  assert count_params(model) > 0
  inputs = latent_speed.unet_inputs(case, batch=1)
  graphdef, state = nnx.split(model)
  out = nnx.eval_shape(lambda s: nnx.merge(graphdef, s)(
      inputs["x"], inputs["t"], inputs["context"], text_embeds=inputs["text_embeds"],
      time_ids=inputs["time_ids"]), state)
  assert out.shape == inputs["x"].shape


def test_flags():
  quick = latent_speed.parse_args(["--quick"])
  assert (quick.configs, quick.batch, quick.iters, quick.rounds) == (["tiny"], 1, 2, 2)
  full = latent_speed.parse_args(["--configs", "mid,tiny", "--batch", "4", "--skip_counts"])
  assert full.configs == ["mid", "tiny"] and full.batch == 4 and full.skip_counts
  assert quick.attention == ("auto",) and not quick.ops
  assert latent_speed.parse_args(["--ops"]).ops
  assert latent_speed.parse_args(["--attention", "xla, chunked"]).attention == ("xla", "chunked")
  with pytest.raises(SystemExit):
    latent_speed.parse_args(["--configs", "huge"])
  with pytest.raises(SystemExit):
    latent_speed.parse_args(["--attention", "flash"])
