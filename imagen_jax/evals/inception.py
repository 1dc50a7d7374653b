"""InceptionV3 of the FID: the TF "2015-12-05" graph, as pytorch-fid ports it, in Flax Linen.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium") is defined on the 2048-d "pool3" features of one specific network: the InceptionV3
of TensorFlow's `inception-2015-12-05.tgz`. Imagen (Saharia et al. 2022, §4.2 and App. C) reports
FID-30K / FID-10K with it. Any other InceptionV3 (torchvision's, Keras') gives other numbers, so
this module reproduces that graph exactly as pytorch-fid (`pt_inception-2015-12-05-6726825d.pth`)
ports it:

* 94 conv+BN units (`BasicConv`): Conv (no bias) -> BatchNorm (eps = 1e-3, running statistics)
  -> ReLU;
* `FIDInceptionA` / `FIDInceptionC` / `FIDInceptionE_1`: the pooling branch averages a 3x3 window
  with `count_include_pad=False` (TF's average pool ignores the zero padding);
* `FIDInceptionE_2` (Mixed_7c): the pooling branch is a 3x3 *max* pool (a quirk of the 2015 graph);
* no auxiliary head; a 1008-way fc (1000 classes + 8 unused) on the pooled features.

Input: `[B, 299, 299, 3]` float32, NHWC, already resized and scaled (see `fid_preprocess.py`).
Output: a dict with `pool3` `[B, 2048]` = mean over H, W of Mixed_7c, and `logits` `[B, 1008]`.

Convolutions and the fc run at `precision=HIGHEST`: TPUs and Ampere+ GPUs otherwise compute
float32 convolutions in bf16 / tf32, and the features then differ from pytorch-fid's by 6e-4
(relative) instead of 8e-7 (docs/results/numerics.md).

Parameter names mirror the PyTorch module tree (`Mixed_5b/branch5x5_1/conv/kernel`), so that the
converter (`convert_weights.py`) is a name-for-name transpose.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from imagen_jax import paths

# Network input size of the 2015-12-05 graph.
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
_PRECISION = jax.lax.Precision.HIGHEST

Pair = tuple[int, int]


def _pair(v: int | Pair) -> Pair:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm(eps=1e-3, inference statistics) -> ReLU; pytorch's BasicConv2d.

  `padding` is symmetric per spatial axis (ph, pw), as in PyTorch's `padding=(ph, pw)`.
  """

  features: int
  kernel: int | Pair
  stride: int | Pair = 1
  padding: int | Pair = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(
        self.features,
        _pair(self.kernel),
        strides=_pair(self.stride),
        padding=((ph, ph), (pw, pw)),
        use_bias=False,
        precision=_PRECISION,
        name="conv",
    )(x)
    # Inference-mode BN: y = (x - mean) / sqrt(var + 1e-3) * scale + bias.
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  # TF's AvgPool with SAME padding divides by the number of real (unpadded) pixels.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int, pad: int) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class FIDInceptionA(nn.Module):
  """Mixed_5b/5c/5d: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool(no pad count)->1x1."""

  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, 1, name="branch1x1")(x)
    b5 = BasicConv(48, 1, name="branch5x5_1")(x)
    b5 = BasicConv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv(64, 1, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, 3, stride=2, name="branch3x3")(x)
    bd = BasicConv(64, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2, 0)], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b..6e: factorised 7x7 branches (1x7 / 7x1) and an avgpool(no pad count) branch."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, 1, name="branch1x1")(x)
    b7 = BasicConv(c7, 1, name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, 1, name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, 1, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (grid reduction 17 -> 8)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, 1, name="branch3x3_1")(x)
    b3 = BasicConv(320, 3, stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, 1, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2, 0)], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (`pool="avg"`, FIDInceptionE_1) and Mixed_7c (`pool="max"`, FIDInceptionE_2)."""

  pool: str

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, 1, name="branch1x1")(x)
    b3 = BasicConv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate(
        [
            BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
        ],
        axis=-1,
    )
    bd = BasicConv(448, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
        [
            BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
        ],
        axis=-1,
    )
    if self.pool == "avg":
      pooled = _avg_pool_3x3_same(x)
    elif self.pool == "max":
      # The 2015-12-05 graph max-pools here (the paper's InceptionV3 average-pools).
      pooled = _max_pool_3x3(x, 1, 1)
    else:
      raise ValueError(f"pool={self.pool!r}; allowed: 'avg', 'max'")
    bp = BasicConv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """The FID InceptionV3. `__call__(x [B, H, W, 3]) -> {"pool3": [B, 2048], "logits": [B, 1008]}`.

  `x` is the preprocessed input (299x299 for FID; any size >= 75 runs). The module has no
  train mode: BatchNorm always uses the stored statistics (`variables["batch_stats"]`).
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected NHWC input [B, H, W, 3], got shape {x.shape}")
    x = x.astype(jnp.float32)
    x = BasicConv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x, 2, 0)
    x = BasicConv(80, 1, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3(x, 2, 0)
    x = FIDInceptionA(32, name="Mixed_5b")(x)
    x = FIDInceptionA(64, name="Mixed_5c")(x)
    x = FIDInceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = FIDInceptionC(128, name="Mixed_6b")(x)
    x = FIDInceptionC(160, name="Mixed_6c")(x)
    x = FIDInceptionC(160, name="Mixed_6d")(x)
    x = FIDInceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = FIDInceptionE("avg", name="Mixed_7b")(x)
    x = FIDInceptionE("max", name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))  # [B, 2048], "pool_3:0" of the TF graph
    logits = nn.Dense(NUM_CLASSES, precision=_PRECISION, name="fc")(pool3)
    return {"pool3": pool3, "logits": logits}


def variable_shapes() -> dict[str, tuple[int, ...]]:
  """Flat `{"params/Mixed_5b/branch1x1/conv/kernel": shape, ...}` of the network (no compute)."""
  return dict(_variable_shapes())


@functools.lru_cache(maxsize=1)
def _variable_shapes() -> dict[str, tuple[int, ...]]:
  # Tracing the 94-layer graph takes a second or two; the shapes never change.
  shapes = jax.eval_shape(
      FIDInceptionV3().init,
      jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32),
  )
  flat = flax_flatten(shapes)
  return {k: tuple(v.shape) for k, v in flat.items()}


def flax_flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dict -> `{"a/b/c": leaf}` (the key format of our safetensors files)."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flax_flatten(v, key))
    else:
      out[key] = v
  return out


def flax_unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flax_flatten`."""
  tree: dict[str, Any] = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def load_inception_variables(path: str) -> dict[str, Any]:
  """Load `{"params": ..., "batch_stats": ...}` from a safetensors file made by the converter.

  Every tensor the network needs must be present with the right shape, and nothing else: a
  partial or foreign file fails here, naming the first offending keys, not later as a bad FID.
  A bucket path (`gs://`) is read from its local copy (`paths.local_file`).
  """
  flat = load_file(paths.local_file(path))
  expected = variable_shapes()
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  if missing or extra:
    raise ValueError(
        f"{path}: not an FID InceptionV3 weights file: missing {missing[:5]} "
        f"({len(missing)} in all), unexpected {extra[:5]} ({len(extra)} in all). Make it with "
        "`python -m imagen_jax.evals.convert_weights --inception_pth=... --out=...`."
    )
  bad = [(k, flat[k].shape, expected[k]) for k in expected if tuple(flat[k].shape) != expected[k]]
  if bad:
    raise ValueError(f"{path}: wrong shapes (key, got, expected): {bad[:5]}")
  return flax_unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
