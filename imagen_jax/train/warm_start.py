"""Warm start: a new run begins from another run's EMA params, with a fresh optimizer.

`train.init_from = <workdir>` (fine-tuning, a new dataset, a changed schedule): at step 0 the
new run's params and EMA params are the source's EMA params of its latest complete step, and
the optimizer state, the step and the data position start afresh. Applied only when the new
workdir holds no checkpoint; once it does, the run resumes from its own.

* Params are matched by name (the `/`-joined path of the param tree). A missing, unexpected or
  differently shaped name is refused, listing them, before anything is loaded.
* The source is part of the new run's meaning: `train.init_from` is compared on resume like the
  network (`run_meaning.MEANING_FIELDS`), and the run's config.json / checkpoints record
  `train.init_step` and `train.init_fingerprint` (`fingerprint`: a hash of every param's name,
  shape and bits, computed on the mesh without gathering anything, the same for any layout).
* `train.freeze = <regex>`: params whose name matches (`re.search`) get no updates
  (`train.optim.make_optimizer`), e.g. `'^(?!.*text_proj)'` trains only the text projection.

Other sources (a DeepFloyd IF or diffusers folder) plug in through `FOREIGN_LOADERS`: each is
`loader(path, abstract_params) -> params | None` (None: not its format), tried in order when
`path` is not a workdir of this project; the params returned must match `abstract_params` by
name and shape and carry its shardings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

from imagen_jax import checkpoint as ckpt_lib
from imagen_jax import paths

FOREIGN_LOADERS: list[Callable[[str, Any], Any]] = []


class WarmStartError(ValueError):
  """`train.init_from` names no usable source, or its params do not fit the new network."""


def param_name(path) -> str:
  """A param's name: its tree path joined with '/' (e.g. `down_0/res_0/conv_0/kernel`)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def names_and_shapes(tree: Any) -> dict[str, tuple]:
  """name -> shape of every array-like leaf (arrays, ShapeDtypeStructs, Orbax metadata)."""
  return ckpt_lib.shapes_by_path(tree)


def check_names(saved: dict[str, tuple], want: dict[str, tuple], source: str) -> None:
  """Raises `WarmStartError` unless both name -> shape maps are equal, naming what differs."""
  missing = sorted(set(want) - set(saved))
  extra = sorted(set(saved) - set(want))
  shapes = [
      f"{k}: {saved[k]} in the source, {want[k]} now"
      for k in sorted(want)
      if k in saved and saved[k] != want[k]
  ]
  if missing or extra or shapes:

    def show(xs):
      return ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "") or "none"

    raise WarmStartError(
        f"train.init_from={source!r}: its params do not fit this network: missing "
        f"{show(missing)}; unexpected {show(extra)}; shape mismatches {show(shapes)}"
    )


def _bit_sums(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Two uint32 sums of a param's float32 bits: plain and weighted by a hash of the element
  index. Integer sums wrap exactly in any order, so they do not depend on the layout."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  idx = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
  weights = idx * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)


def fingerprint(params: Any) -> str:
  """A content hash of a param tree: each param's name, shape, dtype and two exact integer
  sums of its float32 bits (`_bit_sums`), reduced on the mesh: nothing is gathered to one host
  and the hash is the same for any sharding."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  sums = jax.device_get(jax.jit(lambda xs: [_bit_sums(x) for x in xs])([x for _, x in leaves]))
  h = hashlib.sha256()
  for (path, x), (s1, s2) in zip(leaves, sums):
    h.update(json.dumps([param_name(path), list(x.shape), str(x.dtype), int(s1), int(s2)]).encode())
  return h.hexdigest()[:16]


def load(source: str, abstract_params: Any) -> tuple[Any, dict]:
  """(params in `abstract_params`' shardings, record {init_from, init_step, init_fingerprint}).

  Args:
    source: a workdir of this project (`<source>/checkpoints/<step>`), or a folder one of
      `FOREIGN_LOADERS` reads.
    abstract_params: the new network's params as `jax.ShapeDtypeStruct`s with `.sharding`.
  """
  ckpt_dir = os.path.join(source, "checkpoints")
  params, step = None, None
  if paths.path(ckpt_dir).exists():
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
    try:
      step = ckpt.latest_step()
      if step is None:
        raise WarmStartError(f"train.init_from={source!r}: no complete checkpoint in {ckpt_dir}")
      check_names(
          ckpt.saved_shapes(step, ckpt_lib.EMA),
          names_and_shapes(abstract_params),
          source,
      )
      target = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding),
          abstract_params,
      )
      params = ckpt.restore_ema(step, target)
    finally:
      ckpt.close()
  else:
    for loader in FOREIGN_LOADERS:
      params = loader(source, abstract_params)
      if params is not None:
        check_names(names_and_shapes(params), names_and_shapes(abstract_params), source)
        break
  if params is None:
    raise WarmStartError(
        f"train.init_from={source!r} is not a workdir of this project (no {ckpt_dir}) and no "
        f"loader of warm_start.FOREIGN_LOADERS ({len(FOREIGN_LOADERS)}) reads it"
    )
  params = jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract_params)
  record = {"init_from": source, "init_step": step, "init_fingerprint": fingerprint(params)}
  return params, record


def freeze_labels(pattern: str) -> Callable[[Any], Any]:
  """`params -> tree of "freeze" | "train"` by `re.search(pattern, name)` (optax labels)."""
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"train.freeze={pattern!r} is not a regular expression: {e}") from None

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "freeze" if rx.search(param_name(p)) else "train", params
    )

  return labels
