"""grain input pipeline: a TFDS data source -> per-host batches -> global sharded jax.Arrays.

The examples form one global stream, the same for any number of hosts (JAX processes):
global example g (g = 0, 1, ...) is record `perm_e(g mod N)` of the N-record split, `perm_e` a
seeded random-access permutation per epoch e = g // N (grain's index shuffle), and its random
augmentation (crop, caption choice) is drawn from a generator keyed by (seed, g). The global
batch of step k is examples [k B, (k + 1) B); host p of P reads its slice
[k B + p b, k B + (p + 1) b), b = B / P. So the data position is one global number, the index
of the next example (`HostLoader.position`), and a run checkpointed with P hosts resumes with
any other number of hosts on exactly the batches it would have read (`make_loader(...,
start_index=position)`). Preprocessing is per stage (`preprocess.StageSpec`); captions become
tokens (or cached embeddings); `to_global_batch` assembles the host batches into one global
`jax.Array` per field, sharded over the mesh's batch axes.

Data sources by `data_config.name`:
- 'shapes': the offline shapes dataset (built into `data_dir` on first use, see shapes.py);
- 'image_text': a local folder of images + captions (see image_text.py; `image_dir`);
- 'records': a prepared dataset (`data_dir`: local, `gs://` or a mount; records.py), e.g. from
  img2dataset webdataset shards by `python -m imagen_jax.data.prepare_webdataset`; each host
  reads the records of its own slice by range reads, nothing else;
- anything else: a prepared TFDS dataset read with `tfds.data_source(name, data_dir=...)`,
  e.g. 'coco_captions/2014' with caption_key 'captions/text' (preparing that one needs the
  optional TensorFlow extra; reading it does not).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Sequence

import grain.python as grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags as absl_flags
from jax.sharding import NamedSharding, PartitionSpec

from imagen_jax import paths
from imagen_jax.data import image_text, preprocess, records
from imagen_jax.data import shapes as shapes_lib

BUILT_HERE = ("shapes", "image_text")  # datasets this library builds (small; copied to a host)
Tokenizer = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


def default_data_config(name: str = "shapes", **overrides: Any) -> ml_collections.ConfigDict:
  """The data settings of one training stage (every field is documented inline).

  Overrides are applied before locking; an unknown field raises a KeyError naming it.
  """
  c = ml_collections.ConfigDict()
  c.name = name  # 'shapes', 'image_text', 'records', or a TFDS name ('coco_captions/2014')
  c.data_dir = ""  # TFDS data_dir ('' = TFDS default); for 'records' the prepared folder
  c.split = "train"  # TFDS split spec, e.g. 'train', 'test', 'train[:90%]'
  c.image_key = "image"  # feature names; '/' reaches into nested features
  c.caption_key = "caption"
  c.random_caption = True  # several captions per image (COCO): pick one at random
  # shapes only: the builder config (a different setting is a different dataset directory).
  c.resolution = 64
  c.num_train = shapes_lib.ShapesConfig.num_train
  c.num_test = shapes_lib.ShapesConfig.num_test
  c.shapes_seed = 0
  c.shapes_background = "black"  # 'black' | 'grey' | 'texture' (shapes.BACKGROUNDS)
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


def check_named(data_config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError naming the flags unless `data_config` names a dataset (the
  paper variants name none: their data is not public, and toy shapes would train silently)."""
  if not data_config.name:
    raise ValueError(
        "no dataset named (data.name is empty): pass --config.data.name=records "
        "--config.data.data_dir=gs://BUCKET/PREPARED (img2dataset shards prepared by "
        "python -m imagen_jax.data.prepare_webdataset), or a TFDS name and its data_dir"
    )


def open_data_source(data_config: ml_collections.ConfigDict, *, build: bool = True):
  """The random-access data source of `data_config.split` (len() and [i] give raw examples)."""
  check_named(data_config)
  name = data_config.name
  data_dir = data_config.data_dir or None
  if name == "records":
    if not data_dir:
      raise ValueError(
          "data_config.data_dir must name the prepared dataset for 'records' (a folder with "
          "dataset.json: local, gs:// or a gcsfuse mount)"
      )
    return records.RecordSource(data_dir)  # range reads of the records asked for, no copy
  if data_dir and paths.is_remote(data_dir) and name not in BUILT_HERE:
    raise ValueError(
        f"data_dir={data_dir!r}: a TFDS dataset in a bucket is read through a gcsfuse mount "
        "(`gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`, then data_dir=/mnt/BUCKET/...; "
        "ArrayRecord opens local files and reads only the records asked for), or prepared "
        "with imagen_jax.data.prepare_webdataset and read as data.name='records'; it is never "
        "copied whole to each host"
    )
  if data_dir and paths.is_remote(data_dir):
    # A small dataset built here (shapes, image_text) from a seed or a folder: read a local
    # copy (TFDS's ArrayRecord readers open local files); uploaded for the next reader.
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
        # .get: configs saved before the field existed hold black data
        background=data_config.get("shapes_background", "black"),
    )
    return builder.as_data_source(split=data_config.split)
  if name == "image_text":
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
      global_batch_size: int,
      start_index: int = 0,
      source: Any = None,
  ):
    self._loader = loader
    self.source = source  # the data source (a records.RecordSource counts what it reads)
    self._it = iter(loader)
    self.host_batch_size = host_batch_size
    self.global_batch_size = global_batch_size
    self.num_records = num_records  # records in the whole split (all hosts)
    self.spec = spec
    self._start = start_index
    self._batches = 0  # host batches handed out

  def __iter__(self) -> "HostLoader":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self._batches += 1
    return batch

  @property
  def position(self) -> int:
    """The global index of the next example, the same on every host (what a checkpoint
    stores; `make_loader(..., start_index=position)` continues from it with any host count)."""
    return self._start + self._batches * self.global_batch_size


class GlobalSampler:
  """grain sampler of this host's slice of the global example stream (module doc).

  Local index i (the i-th example this host reads) is global example
  g = start + (i // b) B + p b + i mod b; its record is `perm_{g // N}(g mod N)` (identity
  without shuffle) and its rng is keyed by (seed, g), so neither depends on the host count.
  """

  def __init__(
      self,
      num_records: int,
      *,
      global_batch_size: int,
      process_index: int,
      process_count: int,
      seed: int,
      shuffle: bool,
      repeat: bool,
      drop_remainder: bool,
      start_index: int = 0,
  ):
    if num_records < 1:
      raise ValueError(f"the split has num_records={num_records}; it needs at least 1")
    if start_index < 0:
      raise ValueError(f"start_index={start_index}; allowed: >= 0 (a global example index)")
    self._n = num_records
    self._batch = global_batch_size
    self._host_batch = global_batch_size // process_count
    self._process = process_index
    self._seed = int(seed) & 0x7FFFFFFF  # grain wants a non-negative 32-bit seed
    self._shuffle = bool(shuffle)
    self._start = int(start_index)
    self._keys = grain.MapDataset.range(num_records)
    if shuffle:
      self._keys = self._keys.shuffle(seed=self._seed)
    self._len = sys.maxsize if repeat else self._one_pass_length(drop_remainder)

  def _one_pass_length(self, drop_remainder: bool) -> int:
    """Local examples of the global indices [start, N) (whole global batches only with
    `drop_remainder`, so every host steps the same number of times)."""
    left = max(self._n - self._start, 0)
    full = left // self._batch
    share = 0 if drop_remainder else left - full * self._batch - self._process * self._host_batch
    return full * self._host_batch + min(max(share, 0), self._host_batch)

  def global_index(self, index: int) -> int:
    step, j = divmod(index, self._host_batch)
    return self._start + step * self._batch + self._process * self._host_batch + j

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:
    return (
        f"GlobalSampler(num_records={self._n}, global_batch_size={self._batch}, "
        f"process={self._process}, seed={self._seed}, shuffle={self._shuffle}, "
        f"start_index={self._start})"
    )

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if not 0 <= index < self._len:
      raise IndexError(f"index {index} out of [0, {self._len})")
    g = self.global_index(index)
    epoch, pos = divmod(g, self._n)
    key = int(self._keys[epoch * self._n + pos]) % self._n if self._shuffle else pos
    rng = np.random.Generator(np.random.Philox(key=(self._seed << 64) + g))
    return grain.RecordMetadata(index=index, record_key=key, rng=rng)


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
    start_index: int = 0,
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
      jax.process_count()); each host reads its slice of every global batch (module doc).
    embedding_lookup: `keys -> (emb float32 [B, L, D], mask bool [B, L])`; keys are the
      captions, or the values of `data_config.embedding_id_key` (e.g.
      `TextEmbeddingCache(path).get_batch` with the ids it was written with); replaces the
      tokenizer.
    start_index: the global index of the first example to read (a checkpoint's
      `HostLoader.position`); 0 starts the stream.

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
  sampler = GlobalSampler(
      num_records,
      global_batch_size=global_batch_size,
      process_index=process_index,
      process_count=process_count,
      seed=seed,
      shuffle=bool(data_config.shuffle),
      repeat=bool(data_config.repeat),
      drop_remainder=bool(data_config.drop_remainder),
      start_index=start_index,
  )
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
      # The sampler already picks this host's slice of the global stream.
      shard_options=grain.NoSharding(),
      operations=ops,
      worker_count=int(data_config.num_workers),
      worker_buffer_size=int(data_config.worker_buffer_size),
      read_options=grain.ReadOptions(
          num_threads=int(data_config.read_threads),
          prefetch_buffer_size=int(data_config.read_buffer),
      ),
  )
  logging.info(
      "data: %s split %r, %d records, host %d/%d, host batch %d, from example %d, stage %s",
      data_config.name,
      data_config.split,
      num_records,
      process_index,
      process_count,
      host_batch,
      start_index,
      spec,
  )
  return HostLoader(
      loader,
      host_batch_size=host_batch,
      num_records=num_records,
      spec=spec,
      global_batch_size=global_batch_size,
      start_index=start_index,
      source=source,
  )


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
