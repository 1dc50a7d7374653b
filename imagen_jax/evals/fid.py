"""FID of uint8 image sets with the Flax FID InceptionV3: features, statistics, distances.

    fid = FIDComputer("inception_fid.safetensors", mode="tf")
    ref = fid.statistics(reference_images)          # or FrechetStats.load("ref.npz", "tf")
    ref.save("ref.npz")
    score = fid.fid(generated_images, ref)          # float, Heusel et al. (2017)

Images are uint8 `[N, H, W, 3]`: one array, or any iterable of such batches (a data loader), so
that 30K or 40K images never have to sit in memory at once. The network runs jitted in batches of
`batch_size` (`batched.BatchRunner`: the last batch zero-padded so it compiles once; sharded over
all local devices when `batch_size` divides by their number, else on the first device). Features
come back to the host and are accumulated in float64 (`frechet.StreamingMoments`).

Conventions (document them next to every number; Imagen §4.2 / App. C): preprocessing `mode`
(see `fid_preprocess`), the number of images (FID is biased upwards for small N: FID-10K and
FID-30K are not comparable), and the reference set.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from imagen_jax import paths
from imagen_jax.evals import batched, convert_weights, fid_preprocess, inception, provenance
from imagen_jax.evals.frechet import (
    INCEPTION_FEATURE,
    FrechetStats,
    StreamingMoments,
    fid_from_statistics,
)

ImageSource = np.ndarray | Iterable[np.ndarray]


class FIDComputer:
  """Holds the FID InceptionV3 and one preprocessing mode.

  Args:
    weights: path of the safetensors file made by `convert_weights` (a bucket object is read
      from its local copy), or a variables dict
      `{"params": ..., "batch_stats": ...}` (tests use random weights).
    mode: `tf` (default), `pytorch_fid` or `clean`; recorded in every statistics object.
    batch_size: images per network call; a multiple of the device count shards the batch.
    progress: show a tqdm bar (with `total` if the caller passes it).
  """

  def __init__(
      self,
      weights,
      *,
      mode: str = fid_preprocess.DEFAULT_MODE,
      batch_size: int = 64,
      progress: bool = True,
  ):
    self.mode = fid_preprocess.check_mode(mode)
    self.progress = progress
    if isinstance(weights, str):
      weights = paths.local_file(weights)  # a bucket object: its local copy
    # A weights file is identified before it is read (its stat matches the loaded bytes); a
    # variables dict is hashed on the first use of `identity`.
    self._weights = (
        {"file": provenance.file_identity(weights)} if isinstance(weights, str) else None
    )
    self._variables = None if isinstance(weights, str) else weights
    self._identity = None
    variables = inception.load_inception_variables(weights) if isinstance(weights, str) else weights
    model = inception.FIDInceptionV3()
    mode_ = self.mode

    def features(variables, images):
      x = fid_preprocess.device_preprocess(images, mode_)
      return model.apply(variables, x)["pool3"]

    self._runner = batched.BatchRunner(features, variables, batch_size)
    self.batch_size = batch_size

  @property
  def identity(self) -> dict:
    """What these features depend on (for artefact keys, `provenance`): the feature name, the
    preprocessing mode and the weights (a file by path, size and mtime; a dict by digest)."""
    if self._identity is None:
      weights = self._weights or {"params_sha256": provenance.tree_digest(self._variables)}
      self._identity = {"feature": INCEPTION_FEATURE, "mode": self.mode, "weights": weights}
    return self._identity

  def features(self, images: ImageSource, total: int | None = None) -> np.ndarray:
    """pool3 features float32 `[N, 2048]` of uint8 images `[N, H, W, 3]` (array or batches)."""
    out = list(self._iter_features(images, total))
    if not out:
      return np.zeros((0, inception.FEATURE_DIM), np.float32)
    return np.concatenate(out)

  def _iter_features(self, images: ImageSource, total: int | None) -> Iterator[np.ndarray]:
    if total is None and isinstance(images, np.ndarray):
      total = len(images)
    bar = tqdm(
        total=total, unit="img", desc=f"FID features ({self.mode})", disable=not self.progress
    )
    for batch in batched.rebatch(images, self.batch_size, fid_preprocess.check_images):
      feats = self._runner(fid_preprocess.host_preprocess(batch, self.mode))
      yield feats.astype(np.float32)
      bar.update(len(batch))
    bar.close()

  def statistics(self, images: ImageSource, total: int | None = None) -> FrechetStats:
    """Streaming float64 mean/covariance of the features, tagged with this mode."""
    moments = StreamingMoments(inception.FEATURE_DIM)
    for feats in self._iter_features(images, total):
      moments.update(feats)
    return FrechetStats.from_moments(moments, self.mode, INCEPTION_FEATURE)

  def fid(
      self, images: ImageSource, reference: FrechetStats | str, total: int | None = None
  ) -> float:
    """FID of `images` against reference statistics (object or `.npz` path of the same mode)."""
    if isinstance(reference, str):
      reference = FrechetStats.load(
          reference, expected_mode=self.mode, expected_feature=INCEPTION_FEATURE
      )
    return fid_from_statistics(self.statistics(images, total), reference)


def random_variables(seed: int = 0) -> dict:
  """Deterministic random weights of the FID network (for tests and smoke runs, never FID)."""
  flat = convert_weights.convert_state_dict(convert_weights.random_torch_state_dict(seed))
  return inception.flax_unflatten({k: jnp.asarray(v) for k, v in flat.items()})
