"""benchmarks/trace_cost.py --quick: both draws traced, the table written where --out says."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import trace_cost  # noqa: E402  pylint: disable=wrong-import-position

from ambient_jax.models import layers  # noqa: E402


def test_quick_traces_both_draws_and_restores_the_library_one(tmp_path, capsys):
  ours = layers.next_key
  assert trace_cost.main(["--quick", "--out", str(tmp_path)]) == 0
  assert layers.next_key is ours
  row = (tmp_path / "trace_cost_quick.txt").read_text().splitlines()[-1]
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[:2] == ["cifar10.py:smoke", "0.13"]
  assert all(float(c) > 0 for c in cells[2:4]) and cells[4].endswith("×")
  assert f"wrote {tmp_path / 'trace_cost_quick.txt'}" in capsys.readouterr().out
