"""Processes enter a program's collectives only once every peer is ready to run it.

XLA's CPU collectives (gloo) give a peer 30 s to show up, and that deadline cannot be set from
JAX: the first collective of a program fails with `DEADLINE_EXCEEDED` when one process is still
compiling it half a minute after another started to run it, which happens on a loaded machine
(several processes compiling on 2 cores). TPU and GPU runtimes wait longer, but a late peer is
still a hang there rather than an error. So each program is compiled first, then every process
waits at a barrier of jax's coordination service (an RPC with a deadline we choose, not a
collective), and only then runs it.

With one process every function here is a no-op or a plain call.
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Any, Callable

import jax
from jax._src import distributed  # the coordination-service client (no public accessor)

# A peer may still be compiling a paper-size program (minutes) or restoring a checkpoint.
DEFAULT_TIMEOUT_S = float(os.environ.get("IMAGEN_JAX_BARRIER_TIMEOUT_S", 1800))

_calls: collections.Counter = collections.Counter()


def wait_for_peers(name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
  """Blocks until every process reaches the barrier `name` (the coordination service's).

  Every process must call it with the same names in the same order: a name may repeat (a
  per-name call count keeps each barrier distinct).
  """
  if jax.process_count() == 1:
    return
  client = distributed.global_state.client
  if client is None:
    raise RuntimeError(
        f"barrier {name!r}: {jax.process_count()} processes but no jax.distributed client; "
        "call jax.distributed.initialize first"
    )
  _calls[name] += 1
  client.wait_at_barrier(f"imagen_jax/{name}/{_calls[name]}", int(timeout_s * 1000))


def _signature(args: Any) -> tuple:
  """What selects a compiled program: the tree, shapes, dtypes and shardings of `args`."""
  leaves, tree = jax.tree.flatten(args)
  return (tree,) + tuple(
      (getattr(x, "shape", None), str(getattr(x, "dtype", type(x))), getattr(x, "sharding", None))
      for x in leaves
  )


class ReadyJit:
  """Calls a jitted function; with several processes, the first call of each signature compiles
  the program, waits for every peer to have compiled it (`wait_for_peers`), then runs it.

  `lower(*args)` lowers under the context (ahead-of-time: `.lower(...).compile()`); once a
  program is compiled, `jax.jit`'s in-memory cache serves the call without compiling again.
  `context` (optional) is entered around lowering and calling, e.g. `jax.set_mesh(mesh)`.
  """

  def __init__(self, jitted: Callable, name: str, context: Callable | None = None):
    self.jitted = jitted
    self.name = name
    self._context = context
    self._ready: set = set()

  def _enter(self):
    return self._context() if self._context is not None else contextlib.nullcontext()

  def lower(self, *args):
    with self._enter():
      return self.jitted.lower(*args)

  def __call__(self, *args):
    if jax.process_count() > 1:
      key = _signature(args)
      if key not in self._ready:
        self.lower(*args).compile()
        wait_for_peers(f"compiled/{self.name}")
        self._ready.add(key)
    with self._enter():
      return self.jitted(*args)
