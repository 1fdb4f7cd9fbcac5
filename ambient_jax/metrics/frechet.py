"""Fréchet distance between Gaussians, feature statistics and KID. float64 numpy only.

- `FeatureStats`: streaming mean / covariance of features [n, d] (sums in float64), so
  feature batches never have to be held together.
- `frechet_distance(mu1, cov1, mu2, cov2)`: ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1^½ Σ2 Σ1^½)^½.
  The trace of the matrix square root is taken from the eigenvalues of the symmetric
  PSD matrix Σ1^½ Σ2 Σ1^½ (`eigh`, negative round-off clipped to 0), which is the same
  number as tr √(Σ1 Σ2) but never goes complex or needs `sqrtm`'s ε-regularisation.
- `kernel_inception_distance(f1, f2)`: KID (Bińkowski et al. 2018): unbiased MMD² with
  the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³, averaged over random subsets.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np

from ambient_jax.runtime import storage


def _sym_sqrt(m: np.ndarray) -> np.ndarray:
  """Square root of a symmetric PSD matrix by eigh (negative round-off clipped)."""
  w, v = np.linalg.eigh((m + m.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
  """tr √(Σ1 Σ2) = Σ √λ_i(Σ1^½ Σ2 Σ1^½) for symmetric PSD Σ1, Σ2."""
  s1 = _sym_sqrt(np.asarray(cov1, np.float64))
  m = s1 @ np.asarray(cov2, np.float64) @ s1
  w = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
  """Fréchet (2-Wasserstein²) distance between N(mu1, cov1) and N(mu2, cov2)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f"means must be vectors of equal length; got {mu1.shape} and {mu2.shape}.")
  d = mu1.shape[0]
  if cov1.shape != (d, d) or cov2.shape != (d, d):
    raise ValueError(f"covariances must be [{d}, {d}]; got {cov1.shape} and {cov2.shape}.")
  if not (np.all(np.isfinite(mu1)) and np.all(np.isfinite(mu2)) and np.all(np.isfinite(cov1))
          and np.all(np.isfinite(cov2))):
    raise ValueError("feature statistics contain NaN or inf (non-finite samples or features?).")
  diff = mu1 - mu2
  value = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt_product(cov1, cov2)
  return float(max(value, 0.0))


@dataclasses.dataclass
class FeatureStats:
  """Streaming feature mean and (unbiased, ddof=1) covariance, as pytorch-fid's np.cov."""
  dim: int
  count: int = 0
  total: np.ndarray | None = None
  outer: np.ndarray | None = None

  def __post_init__(self):
    if self.total is None:
      self.total = np.zeros((self.dim,), np.float64)
    if self.outer is None:
      self.outer = np.zeros((self.dim, self.dim), np.float64)

  def update(self, features) -> "FeatureStats":
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[1] != self.dim:
      raise ValueError(f"features must be [n, {self.dim}]; got {f.shape}.")
    # Shift by the running mean estimate would be more stable for huge n; features here
    # are O(1) and n ≤ 1e5, where plain float64 sums lose < 1e-9 relative.
    self.count += f.shape[0]
    self.total += f.sum(0)
    self.outer += f.T @ f
    return self

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    if other.dim != self.dim:
      raise ValueError(f"cannot merge stats of dims {self.dim} and {other.dim}.")
    return FeatureStats(self.dim, self.count + other.count, self.total + other.total,
                        self.outer + other.outer)

  @property
  def mean(self) -> np.ndarray:
    if self.count < 1:
      raise ValueError("FeatureStats is empty.")
    return self.total / self.count

  @property
  def cov(self) -> np.ndarray:
    if self.count < 2:
      raise ValueError(f"need at least 2 feature vectors for a covariance; have {self.count}.")
    mu = self.mean
    return (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)

  def save(self, path) -> None:
    """Writes {mu, sigma, count} as .npz atomically (several processes may share a cache)."""
    buffer = io.BytesIO()
    np.savez(buffer, mu=self.mean, sigma=self.cov, count=self.count)
    storage.write_atomic(path, buffer.getvalue())


def stats_of(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean, cov) of features [n, d], covariance with ddof=1."""
  f = np.asarray(features, np.float64)
  s = FeatureStats(f.shape[1]).update(f)
  return s.mean, s.cov


def fd_from_features(f1, f2) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets [n1, d], [n2, d]."""
  return frechet_distance(*stats_of(f1), *stats_of(f2))


# ----------------------------------------------------------------------------- KID


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0):
  """(xᵀy / d + coef0)^degree, the kernel of KID."""
  return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, **kernel_kwargs) -> float:
  """Unbiased MMD² between samples x [m, d], y [n, d] (diagonals of Kxx, Kyy dropped)."""
  m, n = x.shape[0], y.shape[0]
  if m < 2 or n < 2:
    raise ValueError("MMD² needs at least 2 samples per set.")
  kxx, kyy = polynomial_kernel(x, x, **kernel_kwargs), polynomial_kernel(y, y, **kernel_kwargs)
  kxy = polynomial_kernel(x, y, **kernel_kwargs)
  sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
  syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
  return float(sxx + syy - 2.0 * kxy.mean())


def kernel_inception_distance(f1, f2, *, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
  """KID: mean and std of the unbiased polynomial-kernel MMD² over random subsets.

  Each subset draws min(subset_size, n1, n2) rows of each set without replacement.
  The mean is unbiased (it may be slightly negative when the sets match).
  """
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f"features must be [n, d] with equal d; got {f1.shape} and {f2.shape}.")
  size = min(subset_size, f1.shape[0], f2.shape[0])
  rng = np.random.default_rng(seed)
  values = np.array([
      mmd2_unbiased(f1[rng.choice(f1.shape[0], size, replace=False)],
                    f2[rng.choice(f2.shape[0], size, replace=False)])
      for _ in range(num_subsets)])
  return float(values.mean()), float(values.std())
