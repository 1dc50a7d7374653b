"""Image features for the Frechet distance of a sweep: FID's Inception or an offline stand-in.

Both extractors map uint8 images `[N, H, W, 3]` to `frechet.FrechetStats` through
`statistics(images)` and carry `mode`, `name` (stored with the stats, so distances of different
extractors never mix), `label` (how tables and plots name the distance) and `identity` (what the
features depend on, for the provenance keys of cached statistics and sweep points).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.evals import batched, frechet

RANDOM_CONV_LABEL = "FD (random-conv features; not FID)"


class RandomConvFeatures:
  """Features of a fixed, seeded, random-weight conv net, for an offline Frechet distance.

  Why: FID needs the pretrained InceptionV3 (downloaded weights); the shapes demo must be
  scored offline. A randomly initialised conv net with a fixed seed is a deterministic
  embedding that needs no data or downloads, responds to colour, edges and layout at several
  scales, and has been found to rank generative models sensibly (Naeem et al. 2020, "Reliable
  Fidelity and Diversity Metrics for Generative Models", random embeddings). Its distances are
  only comparable with distances of the same extractor (name includes seed and size) and are
  never FID: stats carry `feature=self.name`, and `frechet.fid_from_statistics` refuses to mix.

  Network: images uint8 `[N, H, W, 3]` -> bilinear resize to `size` -> [-1, 1] -> three 3x3
  stride-2 convs (3->32->64->`dim`, He-normal, ReLU) -> global mean -> `[N, dim]`. A small dim
  (64) keeps the covariance estimable from the few hundred samples of a sweep point.
  """

  def __init__(self, *, seed: int = 0, size: int = 64, dim: int = 64, batch_size: int = 64):
    rng = np.random.default_rng(seed)
    chans = (3, 32, 64, dim)
    self.weights = [
        rng.standard_normal((3, 3, a, b)).astype(np.float32) * np.sqrt(2.0 / (9 * a))
        for a, b in zip(chans[:-1], chans[1:])
    ]
    self.size, self.dim = size, dim
    self.name = f"random-conv-{dim}d-seed{seed}@{size}px"
    self.mode = "random-conv"
    self.label = RANDOM_CONV_LABEL
    self.identity = {"feature": self.name, "mode": self.mode}  # the name holds seed, size, dim
    size_ = size

    def features(weights, images):
      x = images.astype(jnp.float32) / 127.5 - 1.0  # images.from_uint8, on device
      x = jax.image.resize(x, (x.shape[0], size_, size_, 3), "bilinear", antialias=True)
      for w in weights:
        x = jax.nn.relu(
            jax.lax.conv_general_dilated(
                x,
                w,
                (2, 2),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=jax.lax.Precision.HIGHEST,
            )
        )
      return jnp.mean(x, axis=(1, 2))

    self._runner = batched.BatchRunner(features, self.weights, batch_size)
    self.batch_size = batch_size

  def statistics(self, images: np.ndarray) -> frechet.FrechetStats:
    moments = frechet.StreamingMoments(self.dim)
    for batch in batched.rebatch(np.asarray(images, np.uint8), self.batch_size):
      moments.update(self._runner(batch))
    return frechet.FrechetStats.from_moments(moments, self.mode, self.name)


class InceptionFeatures:
  """FID features (`fid.FIDComputer`) behind the same interface as `RandomConvFeatures`."""

  def __init__(self, computer):
    self.computer = computer
    self.mode = computer.mode
    self.name = frechet.INCEPTION_FEATURE
    self.label = f"FID ({computer.mode} preprocessing; small-N FID is biased upwards)"

  @property
  def identity(self) -> dict:
    return self.computer.identity

  def statistics(self, images: np.ndarray) -> frechet.FrechetStats:
    return self.computer.statistics(np.asarray(images, np.uint8))
