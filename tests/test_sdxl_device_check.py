"""benchmarks/sdxl_device_check.py on CPU: the real check refuses in one line (no
accelerator), and --quick runs its whole path — random weights in their shardings, compile,
warm-up, timed steps, the table — on a toy SDXL-structured UNet at 64²."""

import os
import sys

import jax
import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "benchmarks"))
import sdxl_device_check  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def test_refuses_on_cpu_in_one_line(capsys):
  if jax.default_backend() != "cpu":
    pytest.skip("an accelerator is present")
  assert sdxl_device_check.main([]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "no GPU or TPU here" in err


def test_quick_smoke_path_times_the_step(tmp_path, capsys):
  assert sdxl_device_check.main(["--quick", "--attention=chunked", "--per_device_batch=1",
                                 "--steps=1", f"--out={tmp_path}"]) == 0
  text = (tmp_path / "sdxl_device_check.txt").read_text()
  (row,) = [l for l in text.splitlines() if l.split()[:1] == ["chunked"]]
  fields = row.split()
  assert fields[1:4] == ["1", "1", "64"]  # batch per device, devices, resolution
  assert float(fields[6]) > 0 and float(fields[7]) > 0  # step s, images/s
  assert fields[8] == "n/a"  # XLA:CPU keeps no peak memory statistic
  assert f"wrote {tmp_path / 'sdxl_device_check.txt'}" in capsys.readouterr().out
