"""benchmarks/sdxl_memory.py on a tiny SDXL-shaped UNet: the abstract build, the compile on
the 8 fake devices with the config's FSDP mesh, and the printed memory analysis; and its
--quick command line with chunked attention, remat (compiled with XLA:CPU's
concurrency-optimized scheduler off) and 2 accumulation micro-batches (the real SDXL
compile takes many minutes: benchmarks/results/sdxl_memory.txt)."""

import os
import sys

import jax
import pytest

from tests.latent_reference import TINY_UNETS

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "benchmarks"))
import sdxl_memory  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def test_tiny_unet_compiles_abstractly_and_reports_memory():
  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
  config = sdxl_memory.load_config(os.path.join(HERE, "configs", "sdxl.py"))
  built = sdxl_memory.build(config, resolution=64, unet_config=TINY_UNETS["sdxl_small"])
  state, batch, frozen = built["args"]
  assert built["mesh"].shape == {"data": 1, "fsdp": 8}
  assert batch["latent"].shape == (16, 8, 8, 4) and batch["text_embeds"].shape == (16, 12)
  # Only the adapters train (float32); the base stays bf16 and is never materialised.
  assert {x.dtype.name for x in jax.tree.leaves(state.params)} == {"float32"}
  assert {x.dtype.name for x in jax.tree.leaves(frozen)} == {"bfloat16"}
  assert built["trainable_params"] > 0 and built["frozen_params"] > 20 * built["trainable_params"]
  lines = []
  assert (built["attention"], built["remat"]) == ("auto", True)  # configs/sdxl.py's defaults
  assert sdxl_memory.scheduler_options(built) == {
      "xla_cpu_enable_concurrency_optimized_scheduler": False}
  built = sdxl_memory.build(config, resolution=64, unet_config=TINY_UNETS["sdxl_small"],
                            attention="xla", remat=False)
  assert sdxl_memory.scheduler_options(built) == {}
  (r,) = sdxl_memory.report(built, "tiny", ["ambient"], lines.append)
  assert r["arguments"] > 0 and r["temporaries"] > 0 and r["compile_s"] > 0
  assert r["total"] == r["arguments"] + r["outputs"] - r["aliased"] + r["temporaries"]
  assert r["aliased"] > 0  # the donated state is updated in place
  assert lines[0].startswith("# tiny: frozen UNet") and lines[1].startswith("tiny ")
  assert "TPU v5e 16 GiB: fits" in lines[2] and "H100 80 GiB: fits" in lines[2]


def test_quick_command_line_writes_the_table(tmp_path, capsys):
  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
  assert sdxl_memory.main(["--quick", "--attention=chunked", "--remat=on", "--scan=on",
                           "--accum=2", f"--out={tmp_path}"]) == 0
  text = (tmp_path / "sdxl_memory.txt").read_text()
  (line,) = [l for l in text.splitlines() if l.startswith("default ")]
  # attention, remat, scan, k, global batch, per device, per micro-batch, resolution, mesh, phase
  assert line.split()[1:11] == ["chunked", "on", "on", "2", "16", "2", "1", "64", "1x8",
                                "ambient"]
  assert "compiled with xla_cpu_enable_concurrency_optimized_scheduler=False" in text
  assert f"wrote {tmp_path / 'sdxl_memory.txt'}" in capsys.readouterr().out
