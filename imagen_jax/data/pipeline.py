"""grain input pipeline: a TFDS data source -> per-host batches -> global sharded jax.Arrays.

Each host (JAX process) reads its own shard of the split (grain `ShardOptions(process_index,
process_count)`), shuffles with a seed shared by all hosts, repeats for training, preprocesses
per stage (`preprocess.StageSpec`), batches `global_batch_size // process_count` examples and
turns captions into tokens (or cached embeddings). `to_global_batch` assembles the host batches
into one global `jax.Array` per field, sharded over the mesh's batch axes.

The iterator is checkpointable: `HostLoader.get_state()` returns a JSON-serialisable dict
(grain's sampler position), `set_state(state)` resumes exactly at the next batch, so the
training checkpoint can store it beside the train state.

Data sources by `data_config.name`:
- 'shapes': the offline shapes dataset (built into `data_dir` on first use, see shapes.py);
- 'image_text': a local folder of images + captions (see image_text.py; `image_dir`);
- anything else: a prepared TFDS dataset read with `tfds.data_source(name, data_dir=...)`,
  e.g. 'coco_captions/2014' with caption_key 'captions/text' (preparing that one needs the
  optional TensorFlow extra; reading it does not).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Sequence

import grain.python as grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags as absl_flags
from jax.sharding import NamedSharding, PartitionSpec

from imagen_jax import paths
from imagen_jax.data import preprocess
from imagen_jax.data import shapes as shapes_lib

Tokenizer = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


def default_data_config(name: str = "shapes", **overrides: Any) -> ml_collections.ConfigDict:
  """The data settings of one training stage (every field is documented inline).

  Overrides are applied before locking; an unknown field raises a KeyError naming it.
  """
  c = ml_collections.ConfigDict()
  c.name = name  # 'shapes', 'image_text', or a TFDS name ('coco_captions/2014')
  c.data_dir = ""  # TFDS data_dir ('' = TFDS default, ~/tensorflow_datasets)
  c.split = "train"  # TFDS split spec, e.g. 'train', 'test', 'train[:90%]'
  c.image_key = "image"  # feature names; '/' reaches into nested features
  c.caption_key = "caption"
  c.random_caption = True  # several captions per image (COCO): pick one at random
  # shapes only: the builder config (a different setting is a different dataset directory).
  c.resolution = 64
  c.num_train = shapes_lib.ShapesConfig.num_train
  c.num_test = shapes_lib.ShapesConfig.num_test
  c.shapes_seed = 0
  # image_text only: the folder of images (+ manifest.jsonl or .txt captions).
  c.image_dir = ""
  # image_text only: the RGB colour under transparent pixels (alpha is composited on it).
  c.background = (255, 255, 255)
  # preprocessing (see preprocess.StageSpec)
  c.crop = "center"  # 'center' | 'random' (square crop after resizing the shorter side)
  c.sr_crop_size = 0  # SR1024 crop training (App. F.3): 256; 0 = off
  c.resample = "bicubic"
  c.lowres_resample = "bicubic"  # anti-aliased downsampling for the SR conditioning image
  # iteration
  c.shuffle = True
  c.repeat = True  # False: one pass (evaluation)
  c.drop_remainder = True  # whole batches only (every host must step the same number)
  c.num_workers = 0  # grain worker processes; 0 = in-process (they start slowly on 2 cores)
  c.worker_buffer_size = 2
  # grain reads records ahead with threads; its defaults (16 threads, 500 records) hold
  # ~1.5 GB of decoded 1024 images and fight over 2 cores. Raise both on big hosts.
  c.read_threads = 2
  c.read_buffer = 64
  # with an embedding_lookup: the feature whose value is the cache key ('' = the caption
  # text); e.g. 'index' for shapes when the cache was written with the example indices.
  c.embedding_id_key = ""
  c.keep_caption = False  # keep caption strings in host batches (logging); never to devices
  c.extra_keys = ()  # more features to pass through, e.g. ('color', 'shape') for evals
  unknown = sorted(set(overrides) - set(c.keys()))
  if unknown:
    raise KeyError(f"unknown data_config fields {unknown}; known: {sorted(c.keys())}")
  c.update(overrides)
  c.lock()
  return c


def open_data_source(data_config: ml_collections.ConfigDict, *, build: bool = True):
  """The random-access data source of `data_config.split` (len() and [i] give raw examples)."""
  name = data_config.name
  data_dir = data_config.data_dir or None
  if data_dir and paths.is_remote(data_dir):
    # TFDS's ArrayRecord readers open local files: read a local copy; a dataset built here
    # (shapes, image_text) is uploaded for the next reader.
    source = open_data_source(
        ml_collections.ConfigDict(
            {**data_config.to_dict(), "data_dir": paths.local_copy(data_dir, missing_ok=build)}
        ),
        build=build,
    )
    if build:
      paths.upload_missing(paths.local_path(data_dir), data_dir)
    return source
  if name == "shapes":
    if not data_dir:
      raise ValueError("data_config.data_dir must name a directory for the shapes dataset")
    make = shapes_lib.build_shapes if build else shapes_lib.shapes_builder
    builder = make(
        data_dir,
        data_config.resolution,
        num_train=data_config.num_train,
        num_test=data_config.num_test,
        seed=data_config.shapes_seed,
    )
    return builder.as_data_source(split=data_config.split)
  if name == "image_text":
    from imagen_jax.data import image_text  # local import: only this source needs it

    if not data_config.image_dir:
      raise ValueError("data_config.image_dir must name the image folder for 'image_text'")
    builder = image_text.build_image_text(
        data_config.image_dir, data_dir, background=tuple(data_config.background)
    )
    return builder.as_data_source(split=data_config.split)
  return tfds.data_source(name, split=data_config.split, data_dir=data_dir, download=False)


class HostLoader:
  """Iterator of host batches with a JSON-serialisable, restorable position.

  Batches are dicts of numpy arrays: 'image' f32 [b, H, W, 3] in [-1, 1], 'lowres'
  f32 [b, h, w, 3] (SR stages), 'text_ids' i32 [b, L] + 'text_mask' bool [b, L] (with a
  tokenizer) or 'text_emb' f32 [b, L, D] + 'text_mask' (with a lookup), else 'caption'.
  """

  def __init__(
      self,
      loader: grain.DataLoader,
      *,
      host_batch_size: int,
      num_records: int,
      spec: preprocess.StageSpec,
  ):
    self._loader = loader
    self._it = iter(loader)
    self.host_batch_size = host_batch_size
    self.num_records = num_records  # records in the whole split (all hosts)
    self.spec = spec

  def __iter__(self) -> "HostLoader":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  @property
  def iterator(self) -> grain.DataLoaderIterator:
    """The grain iterator (what `grain.checkpoint.CheckpointHandler` saves and restores)."""
    return self._it

  def get_state(self) -> dict:
    """The position as a JSON-serialisable dict (store it in the training checkpoint)."""
    return json.loads(self._it.get_state().decode("utf-8"))

  def set_state(self, state: dict) -> None:
    """Resume at the position `state` (from `get_state` of a loader built the same way)."""
    if not isinstance(state, dict):
      raise TypeError(f"loader state must be the dict from get_state(), got {type(state)}")
    self._it.set_state(json.dumps(state).encode("utf-8"))


def get_loader_state(loader: HostLoader) -> dict:
  return loader.get_state()


def set_loader_state(loader: HostLoader, state: dict) -> None:
  loader.set_state(state)


def make_loader(
    data_config: ml_collections.ConfigDict,
    *,
    image_size: int,
    lowres_size: int | None = None,
    global_batch_size: int,
    tokenizer: Tokenizer | None = None,
    seed: int,
    process_index: int,
    process_count: int,
    embedding_lookup: Tokenizer | None = None,
) -> HostLoader:
  """Builds this host's loader for one stage.

  Args:
    data_config: see `default_data_config`.
    image_size: the stage's output resolution (64 base, 256 / 1024 SR).
    lowres_size: the SR stage's input resolution (64 / 256); None for the base stage.
    global_batch_size: examples per step over all hosts; must divide by process_count.
    tokenizer: `texts -> (ids int32 [B, L], mask bool [B, L])`.
    seed: shuffling and augmentation seed (the same on every host).
    process_index, process_count: this host and the number of hosts (jax.process_index(),
      jax.process_count()); each host reads a disjoint 1/process_count of the split.
    embedding_lookup: `keys -> (emb float32 [B, L, D], mask bool [B, L])`; keys are the
      captions, or the values of `data_config.embedding_id_key` (e.g.
      `TextEmbeddingCache(path).get_batch` with the ids it was written with); replaces the
      tokenizer.

  Returns:
    A `HostLoader` of host batches of global_batch_size // process_count examples.
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size {global_batch_size} is not divisible by process_count "
        f"{process_count}"
    )
  if tokenizer is not None and embedding_lookup is not None:
    raise ValueError("give a tokenizer or an embedding_lookup, not both")
  host_batch = global_batch_size // process_count
  spec = preprocess.StageSpec(
      image_size=image_size,
      lowres_size=lowres_size,
      crop=data_config.crop,
      sr_crop_size=data_config.sr_crop_size,
      resample=data_config.resample,
      lowres_resample=data_config.lowres_resample,
  )
  source = open_data_source(data_config)
  num_records = len(source)
  # drop_remainder: every host gets exactly floor(n / hosts) records, so hosts step in
  # lockstep; up to process_count - 1 records of the split are never read.
  shard = grain.ShardOptions(
      shard_index=process_index, shard_count=process_count, drop_remainder=True
  )
  if num_records // process_count < 1:
    raise ValueError(
        f"split {data_config.split!r} has {num_records} records, fewer than "
        f"the {process_count} hosts"
    )
  sampler = grain.IndexSampler(
      num_records=num_records,
      shard_options=shard,
      shuffle=bool(data_config.shuffle),
      num_epochs=None if data_config.repeat else 1,
      seed=int(seed) & 0x7FFFFFFF,
  )  # grain wants a non-negative 32-bit seed
  extra_keys = tuple(data_config.extra_keys)
  id_key = data_config.embedding_id_key if embedding_lookup is not None else ""
  if id_key and id_key not in extra_keys:
    extra_keys += (id_key,)
  ops: list = [
      preprocess.StagePreprocess(
          spec,
          image_key=data_config.image_key,
          caption_key=data_config.caption_key or None,
          random_caption=bool(data_config.random_caption),
          extra_keys=extra_keys,
      )
  ]
  ops.append(grain.Batch(host_batch, drop_remainder=bool(data_config.drop_remainder)))
  if data_config.caption_key and (tokenizer is not None or embedding_lookup is not None):
    ops.append(
        preprocess.TextFromCaptions(
            tokenizer=tokenizer,
            lookup=embedding_lookup,
            keep_caption=bool(data_config.keep_caption),
            lookup_id_key=id_key.replace("/", "_") or None,
            # a feature also asked for in extra_keys stays in the batch
            keep_ids=id_key in tuple(data_config.extra_keys),
        )
    )
  if int(data_config.num_workers) > 0 and not absl_flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside absl.app (notebooks, pytest,
    # plain scripts) they are unparsed and the workers would die on the first access.
    absl_flags.FLAGS.mark_as_parsed()
  loader = grain.DataLoader(
      data_source=source,
      sampler=sampler,
      operations=ops,
      worker_count=int(data_config.num_workers),
      worker_buffer_size=int(data_config.worker_buffer_size),
      read_options=grain.ReadOptions(
          num_threads=int(data_config.read_threads),
          prefetch_buffer_size=int(data_config.read_buffer),
      ),
  )
  logging.info(
      "data: %s split %r, %d records, host %d/%d, host batch %d, stage %s",
      data_config.name,
      data_config.split,
      num_records,
      process_index,
      process_count,
      host_batch,
      spec,
  )
  return HostLoader(loader, host_batch_size=host_batch, num_records=num_records, spec=spec)


def to_global_batch(
    host_batch: dict[str, Any],
    mesh: jax.sharding.Mesh,
    batch_axes: str | Sequence[str] = ("data", "fsdp"),
) -> dict[str, jax.Array]:
  """Host batches -> global jax.Arrays, batch dim sharded over `batch_axes` of `mesh`.

  Every host passes its own [b, ...] arrays; the global batch is [b * process_count, ...].
  String / object fields (captions) stay on the host and are left out of the result.
  """
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f"batch axes {unknown} are not mesh axes {mesh.axis_names}")
  out = {}
  for key, value in host_batch.items():
    value = np.asarray(value)
    if value.dtype.kind in "USO":
      continue
    if value.ndim == 0:
      raise ValueError(f"batch field {key!r} is a scalar; fields need a batch dimension")
    spec = PartitionSpec(axes, *([None] * (value.ndim - 1)))
    out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), value)
  return out
