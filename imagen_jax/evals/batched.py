"""Run a jitted evaluation network over host arrays in fixed-size, device-sharded batches.

Shared by FID (InceptionV3) and CLIP score. Every call sees the same static batch shape, so the
network compiles once: a short final batch is zero-padded to `batch_size` and the padding rows
are dropped from the result. When `batch_size` divides by the number of local devices the batch
axis is sharded over all of them (data parallel, weights replicated); otherwise everything runs on
the first local device. Results come back to the host as numpy arrays.

Multi-host (`jax.process_count() > 1`): each call is a collective. Every process passes the same
batch; process p runs its block of `ceil(batch_size / processes)` rows on its own devices and the
outputs (the features) are gathered across hosts (`parallel.hosts`), so every process gets the
whole batch's outputs in order, as one process computes them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax.sampling import hosts


def rebatch(
    source: np.ndarray | Iterable[np.ndarray],
    batch_size: int,
    check: Callable[[np.ndarray], np.ndarray] = np.asarray,
) -> Iterator[np.ndarray]:
  """Re-chunk one array, or an iterable of arrays (e.g. a data loader), into batches of
  exactly `batch_size` rows (the last one may be shorter). `check` validates each chunk."""
  if isinstance(source, np.ndarray) or hasattr(source, "__array__"):
    source = [np.asarray(source)]
  pending: list[np.ndarray] = []
  count = 0
  for chunk in source:
    chunk = check(chunk)
    while len(chunk):
      take = chunk[: batch_size - count]
      chunk = chunk[len(take) :]
      pending.append(take)
      count += len(take)
      if count == batch_size:
        yield np.concatenate(pending)
        pending, count = [], 0
  if count:
    yield np.concatenate(pending)


class BatchRunner:
  """`runner(*arrays) -> np.ndarray`: `jit(fn)(consts, *arrays)` on one padded, sharded batch.

  Args:
    fn: `fn(consts, *batch_arrays) -> array [B, ...]`, traceable.
    consts: pytree of weights; replicated to the devices once.
    batch_size: the static batch size; every input's leading axis must be <= it. Each process
      runs `local_batch = ceil(batch_size / processes)` rows of it.
  """

  def __init__(self, fn: Callable[..., Any], consts: Any, batch_size: int):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.batch_size = batch_size
    self.local_batch = -(-batch_size // jax.process_count())
    devices = jax.local_devices()
    if self.local_batch % len(devices) == 0:
      mesh = jax.sharding.Mesh(np.array(devices), ("data",))
      self.sharding = NamedSharding(mesh, P("data"))
      replicated = NamedSharding(mesh, P())
    else:
      self.sharding = jax.sharding.SingleDeviceSharding(devices[0])
      replicated = self.sharding
    self.num_shards = len(self.sharding.device_set)
    self._consts = jax.device_put(consts, replicated)
    self._fn = jax.jit(fn)

  def __call__(self, *arrays: np.ndarray) -> np.ndarray:
    n = len(arrays[0])
    if n > self.batch_size or any(len(a) != n for a in arrays):
      raise ValueError(
          f"inputs must share a leading size <= batch_size={self.batch_size}, "
          f"got {[np.shape(a) for a in arrays]}"
      )
    start, stop = hosts.block_bounds(n, self.local_batch)
    padded = []
    for a in arrays:
      a = np.asarray(a)[start:stop]
      if len(a) < self.local_batch:  # one static shape: no recompilation for the tail batch
        a = np.concatenate([a, np.zeros((self.local_batch - len(a),) + a.shape[1:], a.dtype)])
      padded.append(jax.device_put(a, self.sharding))
    out = np.asarray(jax.device_get(self._fn(self._consts, *padded)))
    return hosts.allgather_rows(out[: stop - start], n, self.local_batch)
