"""Bytes the compiled training step communicates, read from its HLO, vs the parameter bytes.

    python benchmarks/communication.py                       # configs/default.py, DP and FSDP on 8
    python benchmarks/communication.py --config=configs/cifar10.py --mesh=8x1 --mesh=1x8 --mesh=2x4

The step is `training.pixel.make_train_step` jitted exactly as the trainer does (`training.step.jit_train_step`,
state donated, batch on ("data", "fsdp")), lowered on abstract inputs and compiled for N fake
CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N; nothing runs, no data is
read). Every collective in `compiled.as_text()` is listed with its tensor bytes:
  all-reduce      the reduced tensor (operand = result)
  all-gather      the gathered (full) result
  reduce-scatter  the full operand (the result is one shard)
"payload" is the sum of those; "ring bytes/device" is what each device sends with ring
algorithms: 2(n-1)/n x all-reduce, (n-1)/n x all-gather / reduce-scatter, n the group size.
Data-parallel should all-reduce one gradient's worth (payload ~ parameter bytes, plus a few
scalars for the metrics); FSDP should reduce-scatter the gradients and all-gather the
parameters instead. Collectives inside a conditional or loop body (e.g. the consistency
term's lax.cond) are listed under that computation; they run when the branch runs.

Mesh "DxF" = data x fsdp. The XLA CPU backend does not form reduce-scatter itself; on CPU the
FSDP gradient appears as all-reduce + dynamic-slice, so read FSDP bytes here as an upper bound
on what TPU/GPU do (they rewrite that pair into reduce-scatter).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import sys
import time


def _setup_devices(n: int) -> None:
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+(" + "|".join(_OPS) +
                    r")(-start)?\((.*)$")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)="
                      r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def shape_bytes(text: str) -> int:
  """Total bytes of every array shape written in `text` (a shape, a tuple, operands)."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES[dtype]
  return total


def _group_size(attrs: str, num_devices: int) -> int:
  m = re.search(r"replica_groups=\{\{([0-9,]*)\}", attrs)
  if m:
    return len([x for x in m.group(1).split(",") if x])
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)  # iota form [groups,size]<=[...]
  if m:
    return int(m.group(2))
  return num_devices  # replica_groups={} = all devices


def _split_operands(rest: str) -> tuple[str, str]:
  """'operands), attrs' -> (operands, attrs), respecting nested parentheses."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      return rest[:i], rest[i + 1:]
  return rest, ""


def parse_hlo(hlo_text: str, num_devices: int) -> tuple[list[dict], dict, str]:
  """(collectives, call graph, entry name) of an HLO module's text.

  Each collective: op, computation, bytes (see the module doc), group size, ring bytes.
  Call graph: computation -> list of ("call" | "conditional" | "while", [callees]).
  """
  ops, graph, computation, entry = [], collections.defaultdict(list), "?", "?"
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{") and "(" in line:
      head = line.split("(")[0].split()
      is_entry = head[0] == "ENTRY"
      computation = head[-1].lstrip("%")
      if is_entry:
        entry = computation
      continue
    if "=" not in line:
      continue
    branches = _BRANCHES.search(line)
    callees = _CALLEES.findall(line)
    if " conditional(" in line:
      names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches
               else [c for k, c in callees if k in ("true_computation", "false_computation")])
      graph[computation].append(("conditional", names))
    elif " while(" in line:
      graph[computation].append(("while", [c for k, c in callees if k == "body"]))
    elif callees:
      graph[computation].append(("call", [c for k, c in callees if k in ("calls", "to_apply")]))
    m = _INSTR.match(line)
    if not m:
      continue
    name, result, op, _, rest = m.groups()
    operands, attrs = _split_operands(rest)
    res_b, opd_b = shape_bytes(result), shape_bytes(operands)
    is_tuple = result.lstrip().startswith("(")
    if op == "reduce-scatter":
      payload = opd_b or res_b * _group_size(attrs, num_devices)
    elif op == "all-gather":
      payload = res_b - opd_b if is_tuple else res_b   # async start: (operand, result) tuple
    else:
      payload = opd_b if (is_tuple and opd_b) else res_b
    n = _group_size(attrs, num_devices)
    factor = 2 * (n - 1) / n if op == "all-reduce" else (n - 1) / n
    ops.append(dict(name=name, op=op, computation=computation, bytes=payload, group=n,
                    ring_bytes=payload * factor))
  return ops, dict(graph), entry


def executed_bytes(ops: list[dict], graph: dict, entry: str, key: str = "bytes") -> tuple:
  """(min, max) bytes one execution of `entry` communicates: conditionals take their
  cheapest / dearest branch, while bodies count once (flagged by the caller)."""
  own = collections.defaultdict(float)
  for o in ops:
    own[o["computation"]] += o[key]
  memo = {}

  def walk(c):
    if c in memo:
      return memo[c]
    memo[c] = (0.0, 0.0)  # cycles cannot happen in HLO; guard anyway
    lo = hi = own.get(c, 0.0)
    for kind, callees in graph.get(c, []):
      sub = [walk(x) for x in callees]
      if not sub:
        continue
      if kind == "conditional":
        lo += min(s[0] for s in sub)
        hi += max(s[1] for s in sub)
      else:
        lo += sum(s[0] for s in sub)
        hi += sum(s[1] for s in sub)
    memo[c] = (lo, hi)
    return memo[c]

  return walk(entry)


def _load_config(spec: str):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def measure(config_spec, data: int, fsdp: int, batch_size: int | None = None,
            consistency: bool = False) -> dict:
  """Compiles the trainer's step for a data x fsdp mesh and measures its collectives.

  config_spec: "configs/X.py[:ARG]" or a ConfigDict (copied, not changed).
  consistency: compile the step of the consistency phase (λ_c on) instead of the plain one.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ambient_jax.training import config_validation  # pylint: disable=g-import-not-at-top
  from ambient_jax.training import pixel as pixel_task  # pylint: disable=g-import-not-at-top
  from ambient_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  from ambient_jax.runtime import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from ambient_jax.training import state as ts  # pylint: disable=g-import-not-at-top
  from ambient_jax.data import registry  # pylint: disable=g-import-not-at-top

  config = (_load_config(config_spec) if isinstance(config_spec, str)
            else config_spec.copy_and_resolve_references())
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp = data, fsdp
    if batch_size:
      config.batch_size = batch_size
  devices = jax.devices()[:data * fsdp]
  config_validation.validate(config, num_devices=len(devices))
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  spec = registry.get_spec(config.data.name)
  res = int(config.data.resolution)
  image_shape = (res, res, spec.channels)
  model_def = ts.make_model_def(config, image_shape)
  tx = ts.make_optimizer(config.optim)
  abstract_state, state_shardings = ts.abstract_train_state(config, mesh, tx)
  step = step_lib.jit_train_step(pixel_task.make_train_step(config, model_def, tx, state_shardings.params), mesh,
                              state_shardings)
  b, bsh = int(config.batch_size), sharding_lib.batch_sharding(mesh)
  batch = {"image": jax.ShapeDtypeStruct((b, *image_shape), jnp.uint8, sharding=bsh),
           "index": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=bsh),
           "sigma_n": jax.ShapeDtypeStruct((b,), jnp.float32, sharding=bsh),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=bsh)}
  t0 = time.time()
  text = step.lower(abstract_state, batch, consistency).compile().as_text()
  compile_s = time.time() - t0

  leaves = jax.tree.leaves(abstract_state.params)
  param_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
  sharded = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves
                if any(p is not None for p in x.sharding.spec))
  ops, graph, entry = parse_hlo(text, len(devices))
  by_op = collections.defaultdict(lambda: dict(count=0, bytes=0, ring_bytes=0.0))
  for o in ops:
    d = by_op[o["op"]]
    d["count"] += 1
    d["bytes"] += o["bytes"]
    d["ring_bytes"] += o["ring_bytes"]
  lo, hi = executed_bytes(ops, graph, entry)
  ring_lo, ring_hi = executed_bytes(ops, graph, entry, "ring_bytes")
  in_loops = sum(o["bytes"] for o in ops
                 if any(o["computation"] in callees for c in graph.values()
                        for kind, callees in c if kind == "while"))
  return dict(config=config_spec, mesh=f"{data}x{fsdp}",
              devices=len(devices), batch=b, model=config.model.name,
              num_params=sum(int(np.prod(x.shape)) for x in leaves), param_bytes=param_bytes,
              fsdp_sharded_param_bytes=sharded, compile_s=round(compile_s, 1),
              collectives=dict(by_op), listed_bytes=sum(o["bytes"] for o in ops),
              step_bytes=(lo, hi), step_over_params=(lo / param_bytes, hi / param_bytes),
              ring_bytes_per_device=(ring_lo, ring_hi), bytes_in_while_bodies=in_loops, ops=ops)


def _mb(x: float) -> str:
  return f"{x / 2**20:8.2f}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", action="append", help="configs/X.py[:ARG]; repeatable "
                 "(default configs/default.py)")
  p.add_argument("--mesh", action="append", help="DATAxFSDP, repeatable. Default: 8x1 2x4 1x8")
  p.add_argument("--devices", type=int, default=8, help="fake CPU devices (default 8)")
  p.add_argument("--batch-size", type=int, default=None, help="override config.batch_size")
  p.add_argument("--json", help="also write the results (without the op list) here")
  p.add_argument("--consistency", action="store_true",
                 help="measure the consistency phase's step (config.consistency.weight > 0)")
  p.add_argument("--ops", action="store_true", help="list every collective instruction")
  args = p.parse_args(argv)
  _setup_devices(args.devices)
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, here)
  configs = args.config or [os.path.join(here, "configs", "default.py")]
  meshes = []
  for m in args.mesh or ["8x1", "2x4", "1x8"]:
    if not re.fullmatch(r"\d+x\d+", m):
      p.error(f"--mesh={m!r}: write DATAxFSDP, e.g. 8x1, 2x4 or 1x8")
    d, f = map(int, m.split("x"))
    if d * f > args.devices:
      p.error(f"--mesh={m}: needs {d * f} devices, --devices={args.devices}")
    meshes.append((d, f))

  results = []
  print(f"{'config':22} {'mesh':>7} {'params MB':>9} {'all-reduce MB (n)':>18} "
        f"{'reduce-scatter MB (n)':>21} {'all-gather MB (n)':>18} {'per step MB':>15} "
        f"{'/ params':>13} {'ring MB/dev':>15}")
  for cfg in configs:
    for d, f in meshes:
      r = measure(cfg, d, f, args.batch_size, args.consistency)
      results.append(r)
      c = r["collectives"]

      def cell(op, width, c=c):
        x = c.get(op, dict(count=0, bytes=0))
        return f"{_mb(x['bytes'])} ({x['count']:3d})".rjust(width)

      def span(pair, fmt=_mb):
        lo, hi = pair
        return fmt(lo).strip() if abs(hi - lo) < 1e-9 * max(hi, 1) else (
            f"{fmt(lo).strip()}-{fmt(hi).strip()}")

      name = os.path.relpath(cfg, here) if os.path.isabs(cfg) else cfg
      mesh = r["mesh"] + ("+c" if args.consistency else "")  # +c: the consistency phase
      print(f"{name:22} {mesh:>7} {_mb(r['param_bytes']):>9} {cell('all-reduce', 18)} "
            f"{cell('reduce-scatter', 21)} {cell('all-gather', 18)} {span(r['step_bytes']):>15} "
            f"{span(r['step_over_params'], lambda v: f'{v:.3f}'):>13} "
            f"{span(r['ring_bytes_per_device']):>15}", flush=True)
      other = {k: v for k, v in c.items() if k not in ("all-reduce", "reduce-scatter", "all-gather")}
      notes = [f"{r['num_params']:,} params, global batch {r['batch']}, compiled in {r['compile_s']}s"]
      if f > 1:
        notes.append(f"FSDP-sharded parameter bytes {_mb(r['fsdp_sharded_param_bytes']).strip()} MB")
      if other:
        notes.append("also " + ", ".join(f"{k} {_mb(v['bytes']).strip()} MB ({v['count']})"
                                          for k, v in other.items()))
      if r["bytes_in_while_bodies"]:
        notes.append(f"{_mb(r['bytes_in_while_bodies']).strip()} MB inside while bodies "
                     "(counted once)")
      print("    " + "; ".join(notes))
      if args.ops:
        for o in r["ops"]:
          print(f"      {o['op']:18} {o['bytes']:>12,d} B  group {o['group']}  in {o['computation']}")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump([{k: v for k, v in r.items() if k != "ops"} for r in results], fh, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
