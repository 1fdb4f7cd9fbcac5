"""benchmarks/memorization_comparison.py's copy criterion for models that draw noisy images."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
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
