"""benchmarks/communication.py reads collectives and their bytes from compiled HLO correctly."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("communication", ROOT / "benchmarks" / "communication.py")
comm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(comm)


def test_shape_bytes():
  assert comm.shape_bytes("f32[3,4]{1,0}") == 48
  assert comm.shape_bytes("(bf16[8]{0}, s32[], pred[2])") == 16 + 4 + 2
  assert comm.shape_bytes("f32[]") == 4


def _compiled(fn, *args):
  return fn.lower(*args).compile().as_text()


def test_collectives_of_a_compiled_program():
  n = jax.device_count()
  assert n == 8, "conftest gives 8 fake CPU devices"
  mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
  rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  x = jax.ShapeDtypeStruct((8 * n, 256), jnp.float32, sharding=rows)

  # A data-parallel "gradient": the batch mean of per-row vectors = one all-reduce of 1 KiB.
  text = _compiled(jax.jit(lambda v: v.mean(0), out_shardings=rep), x)
  ops, graph, entry = comm.parse_hlo(text, n)
  reduces = [o for o in ops if o["op"] == "all-reduce"]
  assert len(reduces) == 1 and reduces[0]["bytes"] == 256 * 4 and reduces[0]["group"] == n
  assert reduces[0]["ring_bytes"] == 256 * 4 * 2 * (n - 1) / n
  assert comm.executed_bytes(ops, graph, entry) == (1024.0, 1024.0)

  # Gathering a row-sharded array: one all-gather whose result is the full 8n x 256 array.
  text = _compiled(jax.jit(lambda v: v * 2, out_shardings=rep), x)
  ops, _, _ = comm.parse_hlo(text, n)
  gathers = [o for o in ops if o["op"] == "all-gather"]
  assert len(gathers) == 1 and gathers[0]["bytes"] == 8 * n * 256 * 4

  # A collective in one branch of a conditional: counted as (0, its bytes) per execution.
  def f(v, flag):
    return jax.lax.cond(flag, lambda: v.mean(0), lambda: jnp.zeros((256,), jnp.float32))

  flag = jax.ShapeDtypeStruct((), jnp.bool_, sharding=rep)
  text = _compiled(jax.jit(f, out_shardings=rep), x, flag)
  ops, graph, entry = comm.parse_hlo(text, n)
  lo, hi = comm.executed_bytes(ops, graph, entry)
  assert lo == 0 and hi == 1024, (lo, hi, ops)
  assert np.isclose(sum(o["bytes"] for o in ops), 1024)


def test_trainer_step_moves_one_gradient_dp_and_gathers_each_sharded_param_once_fsdp():
  """The trainer's compiled step on 8 devices for a small conv U-Net. Data-parallel: one
  all-reduce of one gradient's worth. FSDP 1x8: all-gathers of exactly the sharded
  parameter bytes (each sharded parameter gathered once before use) and all-reduces of one
  gradient's worth (XLA:CPU writes a reduce-scatter as all-reduce + slice; TPU/GPU fuse the
  pair). Without the gather XLA keeps weights sharded and moves activations instead
  (35 all-gathers of 1.5x the sharded bytes and 13 all-reduces of other sizes)."""
  from tests.test_train import _default_config  # pylint: disable=g-import-not-at-top
  config = _default_config()
  config.batch_size = 16
  config.data.resolution = 8
  config.model.update(img_resolution=8, model_channels=64, channel_mult=(1,), num_blocks=1)
  metrics_bytes = 1024  # metrics and per-shard partial sums (grad norm) ride along: scalars
  dp = comm.measure(config, 8, 1)
  assert set(dp["collectives"]) == {"all-reduce"} and dp["collectives"]["all-reduce"]["count"] == 1
  assert 0 <= dp["collectives"]["all-reduce"]["bytes"] - dp["param_bytes"] < metrics_bytes
  fsdp = comm.measure(config, 1, 8)
  c = fsdp["collectives"]
  assert set(c) == {"all-reduce", "all-gather"}, c
  assert fsdp["fsdp_sharded_param_bytes"] > 0.5 * fsdp["param_bytes"]
  assert c["all-gather"]["bytes"] == fsdp["fsdp_sharded_param_bytes"], c
  assert 0 <= c["all-reduce"]["bytes"] - fsdp["param_bytes"] < metrics_bytes, c
