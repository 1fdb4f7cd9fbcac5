"""benchmarks/memorization_comparison.py: its copy criterion for models that draw noisy
images, and a --quick run at toy sizes that saves its samples and re-measures them."""

import json
import pathlib
import sys
import tempfile

import numpy as np
import pytest

from tests import benchmark_outputs

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import memorization_comparison  # noqa: E402


def test_seen_copies_counts_reproduced_noisy_images_not_smooth_or_fresh_ones():
  rng = np.random.default_rng(0)
  clean = rng.uniform(-1, 1, (100, 16, 16, 1)).astype(np.float32)
  heldout = rng.uniform(-1, 1, (500, 16, 16, 1)).astype(np.float32)
  seen = clean + 1.6 * rng.standard_normal(clean.shape).astype(np.float32)  # the noisy training set

  def frac(samples):
    return memorization_comparison.seen_copies(samples, seen, heldout, 1.6, 0.01, 0)["frac_seen_copies"]

  copies = seen[rng.integers(0, 100, 300)] + 0.1 * rng.standard_normal((300, 16, 16, 1))
  assert frac(copies) > 0.95
  # smooth images are closer to every noisy training image than fresh noisy ones: a plain
  # distance threshold would call them copies; the nearest/second-nearest ratio does not
  smooth = 0.01 * rng.standard_normal((300, 16, 16, 1)).astype(np.float32)
  assert frac(smooth) < 0.05
  fresh = clean[rng.integers(0, 100, 300)] + 1.6 * rng.standard_normal((300, 16, 16, 1))  # new noise
  assert frac(fresh) < 0.05


def test_quick_run_saves_its_samples_and_recompute_gives_its_figures(tmp_path, monkeypatch,
                                                                      capsys):
  """--quick at toy sizes (2 training steps) from the repository root with no --out writes
  only into a temporary folder; every row's samples are saved as uint8, and --recompute on
  them (no model) gives the run's own sample measures, noisy_edm's noise-matched ones too."""
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where --quick's folder is made
  before = benchmark_outputs.git_status(ROOT)
  memorization_comparison.main([
      "--quick", "--steps", "2", "--train_size", "20", "--num_samples", "24", "--batch", "8",
      "--methods", "noisy_edm", "--attack_sigma", "1", "--posterior_steps", "1"])
  written = benchmark_outputs.printed_paths(capsys.readouterr().out)
  assert all(p.is_file() and tmp_path in p.parents for p in written)
  assert benchmark_outputs.git_status(ROOT) <= before  # nothing new in the repository
  out = written[0].parent / "memorization_comparison_quick"
  assert {out.with_suffix(".json"), out.with_suffix(".md"),
          pathlib.Path(f"{out}_samples.npz"), pathlib.Path(f"{out}_samples.png")} <= set(written)
  result = json.loads(out.with_suffix(".json").read_text())
  rows = result["rows"]
  assert [r["method"] for r in rows] == ["held-out real", "memorizer", "noisy_edm"]
  assert "frac_seen_copies" in rows[2]["samples_nn"] and "output_noise_sigma" in rows[2]["samples_nn"]
  assert list(rows[2]["attack"]) == ["1"] and rows[2]["attack"]["1"]["posterior"]["count"] == 20
  with np.load(f"{out}_samples.npz") as saved:
    assert [saved[f"row_{i}"].shape for i in range(3)] == [(24, 16, 16, 1)] * 3
    assert saved["row_0"].dtype == np.uint8
    _, _, heldout = memorization_comparison.training_set(20, 16, 0)
    np.testing.assert_array_equal(saved["row_0"], memorization_comparison.images_lib.to_uint8(
        heldout[:24]))  # the held-out row's "samples" are those real digits

  memorization_comparison.main(["--recompute", "--quick", "--out", str(out.parent)])
  again = json.loads(out.with_suffix(".json").read_text())
  assert "recomputed" in again
  for old, new in zip(rows, again["rows"]):
    for key in ("fd", "kid", "kid_std"):
      assert new[key] == pytest.approx(old[key], rel=1e-5), (old["method"], key)
    assert new["samples_nn"] == pytest.approx(old["samples_nn"], rel=1e-5), old["method"]
    assert new["attack"] == old["attack"]  # kept as recorded
  assert "recomputed from memorization_comparison_quick_samples.npz" in out.with_suffix(
      ".md").read_text()
  with pytest.raises(SystemExit, match="missing"):
    memorization_comparison.main(["--recompute", "--out", str(tmp_path / "nowhere")])
