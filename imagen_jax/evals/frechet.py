"""Frechet distance between Gaussians, streaming moments, and statistics files (host, float64).

FID (Heusel et al. 2017) fits a Gaussian N(mu, S) to the InceptionV3 pool3 features of each image
set and reports the Frechet (2-Wasserstein squared) distance

    d^2 = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2}).

`tr((S_1 S_2)^{1/2})` is computed by the symmetric route

    tr((S_1 S_2)^{1/2}) = tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2}) = sum_i sqrt(lambda_i),

with lambda_i the eigenvalues of the symmetric PSD matrix M = S_1^{1/2} S_2 S_1^{1/2} (S_1 S_2 is
similar to M, so they share eigenvalues). Two `eigh` calls in float64, no complex arithmetic and
no iterative `scipy.linalg.sqrtm` (pytorch-fid's route, which can return tiny imaginary parts on
near-singular products). Eigenvalues below 0 are rounding and clipped to 0.

Statistics are saved as `.npz` (loaded with `allow_pickle=False`) holding `mu [D]`, `sigma [D, D]`
(float64, ddof=1 like `np.cov`), `n`, the preprocessing `mode` and the `feature` extractor name,
and, when saved with an `identity`, the provenance key of what produced them (feature weights,
reference set; see `provenance`), checked on load. Distances between files of different modes
or features are refused.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from imagen_jax import atomic, paths
from imagen_jax.evals import provenance
from imagen_jax.sampling import hosts

STATS_FORMAT = "imagen_jax.frechet_stats.v1"
# Features of the FID network; other extractors must use another name so their Frechet
# distances are never mistaken for FID.
INCEPTION_FEATURE = "inception-2015-12-05/pool3"


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
  """Symmetric PSD square root `V diag(sqrt(max(w, 0))) V^T` of `a [D, D]` via `eigh` (float64)."""
  a = np.asarray(a, np.float64)
  w, v = np.linalg.eigh((a + a.T) / 2.0)
  return (v * np.sqrt(np.maximum(w, 0.0))) @ v.T


def trace_sqrt_product(
    sigma1: np.ndarray, sigma2: np.ndarray, sigma1_sqrt: np.ndarray | None = None
) -> float:
  """`tr((S_1 S_2)^{1/2})` = sum of sqrt of eigenvalues of `S_1^{1/2} S_2 S_1^{1/2}`;
  `sigma1_sqrt`: `sqrtm_psd(sigma1)` when the caller has it (a reference's, reused)."""
  s1h = sqrtm_psd(sigma1) if sigma1_sqrt is None else sigma1_sqrt
  m = s1h @ np.asarray(sigma2, np.float64) @ s1h
  w = np.linalg.eigvalsh((m + m.T) / 2.0)
  return float(np.sum(np.sqrt(np.maximum(w, 0.0))))


def frechet_distance(mu1, sigma1, mu2, sigma2, *, sigma2_sqrt=None) -> float:
  """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); `mu [D]`, `sigma [D, D]`.
  `sigma2_sqrt`: `sqrtm_psd(sigma2)` when the caller has it (the trace term is symmetric:
  S_1 S_2 and S_2 S_1 share their eigenvalues)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(
        f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 "
        f"{sigma1.shape}, sigma2 {sigma2.shape}"
    )
  diff = mu1 - mu2
  return float(
      diff @ diff
      + np.trace(sigma1)
      + np.trace(sigma2)
      - 2.0 * trace_sqrt_product(sigma2, sigma1, sigma2_sqrt)
  )


class StreamingMoments:
  """Mean and covariance of feature rows, accumulated batch by batch in float64.

  Chan et al.'s pairwise update: for the running (n, mu, M2) and a batch (m, mu_b, M2_b),
  delta = mu_b - mu; mu += delta m / (n + m); M2 += M2_b + delta delta^T n m / (n + m),
  where M2 = sum (x - mu)(x - mu)^T. Unlike sum(x x^T) - n mu mu^T it does not cancel
  catastrophically when |mu| is large against the spread. `cov = M2 / (n - 1)`.
  """

  def __init__(self, dim: int):
    self.dim = dim
    self.n = 0
    self.mean = np.zeros(dim, np.float64)
    self.m2 = np.zeros((dim, dim), np.float64)

  def update(self, x: np.ndarray) -> None:
    """Add feature rows `x [B, D]`."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"expected features [B, {self.dim}], got shape {x.shape}")
    if x.shape[0] == 0:
      return
    mb = x.mean(axis=0)
    xc = x - mb
    self._combine(x.shape[0], mb, xc.T @ xc)

  def merge(self, other: "StreamingMoments") -> None:
    """Add another accumulator (e.g. another host's or another shard's), same formula."""
    if other.dim != self.dim:
      raise ValueError(f"cannot merge moments of dim {other.dim} into dim {self.dim}")
    if other.n:
      self._combine(other.n, other.mean, other.m2)

  def _combine(self, m: int, mb: np.ndarray, m2b: np.ndarray) -> None:
    total = self.n + m
    delta = mb - self.mean
    self.mean = self.mean + delta * (m / total)
    self.m2 = self.m2 + m2b + np.outer(delta, delta) * (self.n * m / total)
    self.n = total

  def covariance(self) -> np.ndarray:
    if self.n < 2:
      raise ValueError(f"covariance needs at least 2 samples, have {self.n}")
    return self.m2 / (self.n - 1)


@dataclasses.dataclass(frozen=True)
class FrechetStats:
  """Gaussian fit of a feature set: `mu [D]`, `sigma [D, D]` (float64), sample count `n`,
  preprocessing `mode` (see `fid_preprocess.MODES`) and `feature` extractor name."""

  mu: np.ndarray
  sigma: np.ndarray
  n: int
  mode: str
  feature: str = INCEPTION_FEATURE

  @classmethod
  def from_moments(
      cls, moments: StreamingMoments, mode: str, feature: str = INCEPTION_FEATURE
  ) -> "FrechetStats":
    return cls(moments.mean.copy(), moments.covariance(), moments.n, mode, feature)

  @classmethod
  def from_features(
      cls, features: np.ndarray, mode: str, feature: str = INCEPTION_FEATURE
  ) -> "FrechetStats":
    moments = StreamingMoments(np.shape(features)[1])
    moments.update(features)
    return cls.from_moments(moments, mode, feature)

  @functools.cached_property
  def sigma_sqrt(self) -> np.ndarray:
    """`sqrtm_psd(sigma)`, computed once: a reference's is reused by every distance to it (one
    `eigh` of [D, D], seconds at D = 2048)."""
    return sqrtm_psd(self.sigma)

  def arrays(self) -> dict[str, np.ndarray]:
    """The `.npz` fields of these statistics (plain arrays and strings: loads without pickle)."""
    return dict(
        mu=np.asarray(self.mu, np.float64),
        sigma=np.asarray(self.sigma, np.float64),
        n=np.int64(self.n),
        mode=np.str_(self.mode),
        feature=np.str_(self.feature),
        format=np.str_(STATS_FORMAT),
    )

  def save(self, path: str, identity: dict | None = None) -> None:
    """Write an `.npz` atomically; with `identity` (what produced the statistics: feature
    extractor, weights, reference set) its provenance key is stored too (`provenance`)."""
    if identity is None:
      atomic.save_npz(path, **self.arrays())
    else:
      provenance.save_npz(path, identity, **self.arrays())

  @classmethod
  def from_arrays(cls, arrays, path: str = "<arrays>") -> "FrechetStats":
    missing = {"mu", "sigma", "n", "mode", "feature", "format"} - set(arrays)
    if missing:
      raise ValueError(
          f"{path}: not a statistics file of this project (missing "
          f"{sorted(missing)}); pytorch-fid/clean-fid .npz files carry no "
          "mode and must be re-saved with FrechetStats(..., mode=...)"
      )
    return cls(
        np.asarray(arrays["mu"]),
        np.asarray(arrays["sigma"]),
        int(arrays["n"]),
        str(arrays["mode"]),
        str(arrays["feature"]),
    )

  def check(
      self, path: str, expected_mode: str | None = None, expected_feature: str | None = None
  ) -> "FrechetStats":
    if expected_mode is not None and self.mode != expected_mode:
      raise ValueError(
          f"{path}: statistics were computed with preprocessing mode "
          f"{self.mode!r}, expected {expected_mode!r}"
      )
    if expected_feature is not None and self.feature != expected_feature:
      raise ValueError(
          f"{path}: statistics are of features {self.feature!r}, expected {expected_feature!r}"
      )
    return self

  @classmethod
  def load(
      cls,
      path: str,
      expected_mode: str | None = None,
      expected_feature: str | None = None,
      expected_identity: dict | None = None,
  ) -> "FrechetStats":
    """Read a file written by `save`; with `expected_*` given, a mismatch is an error
    (`expected_identity`: `provenance.StaleArtefactError` naming each differing field)."""
    if expected_identity is not None:
      arrays = provenance.require(path, expected_identity)
    else:
      arrays = paths.load_npz(path)
    return cls.from_arrays(arrays, path).check(path, expected_mode, expected_feature)

  @classmethod
  def cached(cls, path: str, identity: dict, compute) -> "FrechetStats":
    """The statistics stored at `path` when they were produced by `identity`; otherwise
    `compute()` (absent, or a mismatch: warned and recomputed, never reused), saved there.
    Multi-host: the processes decide together and compute together; process 0 saves."""
    arrays = provenance.load_if_matches(path, identity)
    if hosts.agree(arrays is not None, f"the statistics {path}"):
      return cls.from_arrays(arrays, path)
    stats = compute()
    if hosts.is_writer():
      stats.save(path, identity)  # atomic: an interrupted run leaves no half-written statistics
    return stats


def fid_from_statistics(a: FrechetStats, b: FrechetStats) -> float:
  """Frechet distance between two statistics; refuses different modes or feature extractors.
  Pass the reference as `b`: its square root is computed once and reused (a sweep's points)."""
  if a.mode != b.mode:
    raise ValueError(
        f"preprocessing modes differ: {a.mode!r} vs {b.mode!r}; a distance "
        "between them is not an FID. Recompute one side with the other's mode"
    )
  if a.feature != b.feature:
    raise ValueError(f"feature extractors differ: {a.feature!r} vs {b.feature!r}")
  return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, sigma2_sqrt=b.sigma_sqrt)
