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
