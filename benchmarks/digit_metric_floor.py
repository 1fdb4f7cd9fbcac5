"""What `ambient_jax.evaluate`'s fd / kid read for real digits: the floor and the noisy data.

    python benchmarks/digit_metric_floor.py [--resolution=28] [--num=1000] [--sigma_n=0.2]

Against the reference `evaluate` uses (all 5,000 clean training digits), with the same
digit feature network and the same KID settings (50 subsets of 1,000): `--num` real
digits drawn at random (what a perfect generator would score with that many samples), and
the same digits with σ_n Gaussian noise, quantized like saved samples (what reproducing
the noisy training images would score). Three draws each.
"""

import argparse
import time

import numpy as np

from ambient_jax.evaluation.common import quantize
from ambient_jax.metrics import digit_features, frechet


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--resolution", type=int, default=28)
  parser.add_argument("--num", type=int, default=1000)
  parser.add_argument("--sigma_n", type=float, default=0.2)
  parser.add_argument("--draws", type=int, default=3)
  parser.add_argument("--cache_dir", default=None, help="default: evaluate's cache")
  args = parser.parse_args()
  t0 = time.time()
  net = digit_features.get_digit_feature_net(args.resolution, cache_dir=args.cache_dir)
  digits, _ = digit_features.load_digits(args.resolution)
  reference = net.features(digits)
  rng = np.random.default_rng(0)
  print(f"{args.resolution}x{args.resolution} digits, feature net held-out accuracy "
        f"{net.test_accuracy:.4f}; {args.num} images vs all {len(digits)}")
  for draw in range(args.draws):
    chosen = digits[rng.choice(len(digits), args.num, replace=False)]
    noisy = quantize(chosen + args.sigma_n * rng.standard_normal(chosen.shape))
    for name, images in (("real", chosen), (f"noisy σ_n={args.sigma_n:g}", noisy)):
      features = net.features(images.astype(np.float32))
      fd = frechet.fd_from_features(features, reference)
      kid, kid_std = frechet.kernel_inception_distance(features, reference, num_subsets=50,
                                                       subset_size=1000, seed=0)
      print(f"draw {draw} {name:>14}: FD {fd:6.2f}  KID {kid:7.2f} ± {kid_std:5.2f}", flush=True)
  print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
  main()
