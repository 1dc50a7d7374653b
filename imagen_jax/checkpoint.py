"""Orbax checkpoints of one training run: {train state, EMA params, data iterators, config}.

Layout: `<workdir>/checkpoints/<step>/` with the items

  train_state   {step, params, opt_state}: what resuming needs besides the EMA params;
  ema_params    the EMA params alone, so a sampler restores them without an optimizer
                (`cascade.load_stage`);
  data_iter_<k> the position of this process's k-th grain iterator (`train.data_shards` / process
                count of them), written by grain's own `grain.checkpoint.CheckpointHandler` as
                one `process_<i>-of-<n>.json` per process;
  config        the stage config as JSON.

Orbax writes each step into a temporary directory and renames it only once every item (and every
host) has finished ("atomic finalize"), so a save cut short by a crash or SIGKILL is never listed
as a step and the run resumes from the last complete one. Saves are asynchronous: the arrays are
copied off the devices, then written by a background thread while training continues (the data
iterator positions are written before `save` returns, so the iterators may move on).

`check_compatible` compares the saved config and array shapes with the current run before
anything is loaded, so restoring into a different model fails with a clear message instead of a
partial or mis-shaped load; a checkpoint of an older layout is refused naming what changed.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import grain.checkpoint as grain_ckpt
import jax
import orbax.checkpoint as ocp
from etils import epath

TRAIN_STATE, EMA, CONFIG = "train_state", "ema_params", "config"
DATA_PREFIX = "data_iter_"
# Items of the older layout (one `state` item holding the EMA params with the optimizer).
OLD_LAYOUT_ITEMS = ("state", "data_iter")


class CheckpointMismatchError(ValueError):
  """A checkpoint does not match the model / train state it is being restored into."""


class CheckpointLayoutError(CheckpointMismatchError):
  """A checkpoint written with another item layout than this code's."""


def data_item(k: int) -> str:
  """The item of this process's k-th data iterator."""
  return f"{DATA_PREFIX}{k}"


def _json_normal(x: Any) -> Any:
  """Round-trips through JSON so tuples/lists and ConfigDicts compare like saved JSON."""
  return json.loads(
      json.dumps(x, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o))
  )


# Model fields added after checkpoints were written, with the value that reproduces what those
# checkpoints were trained with: a config without the field (an older checkpoint's, or a
# hand-written one) compares as if it had that value.
MODEL_FIELDS_ADDED = {"text_positions": False}


def _with_added_fields(config: dict) -> dict:
  model = config.get("model")
  if not isinstance(model, dict):
    return config
  return {**config, "model": {**MODEL_FIELDS_ADDED, **model}}


def _diff(saved: Any, current: Any, prefix: str = "") -> list[str]:
  if isinstance(saved, dict) and isinstance(current, dict):
    out = []
    for k in sorted(set(saved) | set(current), key=str):
      where = f"{prefix}.{k}" if prefix else str(k)
      if k not in saved:
        out.append(f"{where}: not in checkpoint, now {current[k]!r}")
      elif k not in current:
        out.append(f"{where}: {saved[k]!r} in checkpoint, absent now")
      else:
        out.extend(_diff(saved[k], current[k], where))
    return out
  return [] if saved == current else [f"{prefix}: {saved!r} in checkpoint, now {current!r}"]


def _shapes_by_path(tree: Any) -> dict[str, tuple]:
  """'a/b/c' -> shape for every array-like leaf (metadata or ShapeDtypeStruct)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, "shape", None)
    if shape is None:
      continue
    key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    out[key] = tuple(shape)
  return out


class Checkpointer:
  """Thin wrapper of `ocp.CheckpointManager` for the items of the module doc."""

  def __init__(
      self,
      directory: str | os.PathLike,
      *,
      max_to_keep: int | None = 3,
      async_save: bool = True,
      num_data_iters: int = 0,
  ):
    """num_data_iters: grain iterators this process saves and restores (0 for samplers)."""
    self.directory = epath.Path(directory).absolute()
    self.num_data_iters = int(num_data_iters)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
    )
    handlers = {
        TRAIN_STATE: ocp.StandardCheckpointHandler(),
        EMA: ocp.StandardCheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
    }
    for k in range(self.num_data_iters):
      handlers[data_item(k)] = grain_ckpt.CheckpointHandler()
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    """Latest *complete* step (unfinished temporary directories are not steps)."""
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(
      self,
      step: int,
      *,
      train_state: Any,
      ema_params: Any,
      data_iters: Sequence[Any] = (),
      config_dict: dict,
      force: bool = True,
  ) -> bool:
    """Starts an (async) save of `step`; returns whether a save was started.

    Args:
      train_state: the pytree {step, params, opt_state}.
      ema_params: the EMA params.
      data_iters: this process's grain iterators (`num_data_iters` of them), in shard order.
      config_dict: the run's config as JSON data.
    """
    if len(data_iters) != self.num_data_iters:
      raise ValueError(
          f"got {len(data_iters)} data iterators, the checkpointer was made for "
          f"{self.num_data_iters}"
      )
    args = {
        TRAIN_STATE: ocp.args.StandardSave(train_state),
        EMA: ocp.args.StandardSave(ema_params),
        CONFIG: ocp.args.JsonSave(_json_normal(config_dict)),
    }
    for k, it in enumerate(data_iters):
      args[data_item(k)] = grain_ckpt.CheckpointSave(it)
    return self._mngr.save(step, args=ocp.args.Composite(**args), force=force)

  def wait(self) -> None:
    """Blocks until the pending async save is finalized (renamed into place)."""
    self._mngr.wait_until_finished()

  def saved_items(self, step: int) -> list[str]:
    """The item directories of complete step `step`."""
    where = self.directory / str(step)
    return sorted(p.name for p in where.iterdir() if p.is_dir()) if where.exists() else []

  def check_layout(self, step: int, *, data: bool) -> None:
    """Raises `CheckpointLayoutError` if `step` lacks this layout's items (an older layout)
    or, with `data`, holds another number of data iterators than this process has."""
    found = self.saved_items(step)
    want = [TRAIN_STATE, EMA, CONFIG] if data else [EMA, CONFIG]
    missing = [i for i in want if i not in found]
    where = self.directory / str(step)
    if missing:
      old = [i for i in OLD_LAYOUT_ITEMS if i in found]
      raise CheckpointLayoutError(
          f"checkpoint {where} was written by an older layout: items {found} found, "
          f"{want + [data_item(k) for k in range(self.num_data_iters if data else 0)]} expected"
          + (f" (it has the old items {old})" if old else "")
          + f". Missing: {missing}. EMA params are now their own item ('{EMA}') and the "
          f"optimizer state with the params is '{TRAIN_STATE}'; data iterators are written by "
          "grain per iterator. Retrain the stage in a fresh workdir (old checkpoints are not "
          "converted)."
      )
    if not data:
      return
    saved_iters = sorted(i for i in found if i.startswith(DATA_PREFIX))
    want_iters = [data_item(k) for k in range(self.num_data_iters)]
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    absent = [i for i in want_iters if not (where / i / name).exists()]
    if saved_iters != sorted(want_iters) or absent:
      raise CheckpointMismatchError(
          f"checkpoint {where} holds data iterators {saved_iters}, this process has "
          f"{len(want_iters)} ({want_iters}); missing {name} in {absent}. "
          "train.data_shards or the process count changed? Resume with the same ones."
      )

  def saved_config(self, step: int) -> dict:
    out = self._mngr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
    return out[CONFIG]

  def saved_shapes(self, step: int, item: str) -> dict[str, tuple]:
    meta = self._mngr.item_metadata(step)[item]
    meta = getattr(meta, "tree", meta)
    return _shapes_by_path(meta)

  def check_compatible(self, step: int, config_dict: dict, abstract_items: dict) -> None:
    """Raises `CheckpointMismatchError` if `step` was written for another model or state.

    Compares the saved config's `stage` and `model` sections with `config_dict`, then the
    saved array shapes of each item of `abstract_items` ({item name: abstract tree}, e.g.
    the train state and the EMA params) with the tree. Nothing is loaded before this passes.
    """
    where = self.directory / str(step)
    saved = _with_added_fields(self.saved_config(step))
    current = _with_added_fields(_json_normal(config_dict))
    diffs = []
    for section in ("stage", "model"):
      diffs += _diff(saved.get(section), current.get(section), section)
    if diffs:
      raise CheckpointMismatchError(
          f"checkpoint {where} was written for a different model; differences: "
          + "; ".join(diffs[:12])
          + (" ..." if len(diffs) > 12 else "")
          + ". Use a fresh workdir, or the config saved in the checkpoint."
      )
    for item, abstract in abstract_items.items():
      saved_shapes = self.saved_shapes(step, item)
      want = _shapes_by_path(abstract)
      if set(saved_shapes) != set(want) or any(saved_shapes[k] != want[k] for k in want):
        missing = sorted(set(want) - set(saved_shapes))[:5]
        extra = sorted(set(saved_shapes) - set(want))[:5]
        shape = [
            f"{k}: {saved_shapes[k]} saved, {want[k]} now"
            for k in sorted(want)
            if k in saved_shapes and saved_shapes[k] != want[k]
        ][:5]
        raise CheckpointMismatchError(
            f"checkpoint {where} item {item!r} does not match: missing {missing}, "
            f"unexpected {extra}, shape mismatches {shape} (a different optimizer or "
            "network?). Use a fresh workdir."
        )

  def restore(
      self,
      step: int,
      *,
      train_state: Any,
      ema_params: Any,
      data_iters: Sequence[Any] = (),
      config_dict: dict | None = None,
  ) -> tuple[Any, Any]:
    """(train_state, ema_params) of `step`, for resuming; arrays land in the abstract trees'
    shardings and `data_iters` (this process's grain iterators) are set to their saved
    positions.

    Args:
      train_state, ema_params: trees of `jax.ShapeDtypeStruct` with `.sharding` set.
      config_dict: when given, `check_compatible` runs first.
    """
    self.check_layout(step, data=True)
    if len(data_iters) != self.num_data_iters:
      raise ValueError(f"got {len(data_iters)} data iterators, expected {self.num_data_iters}")
    if config_dict is not None:
      self.check_compatible(step, config_dict, {TRAIN_STATE: train_state, EMA: ema_params})
    args = {
        TRAIN_STATE: ocp.args.StandardRestore(train_state),
        EMA: ocp.args.StandardRestore(ema_params),
    }
    for k, it in enumerate(data_iters):
      args[data_item(k)] = grain_ckpt.CheckpointRestore(it)
    out = self._mngr.restore(step, args=ocp.args.Composite(**args))
    return out[TRAIN_STATE], out[EMA]

  def restore_ema(self, step: int, ema_params: Any, *, config_dict: dict | None = None) -> Any:
    """The EMA params of `step` alone (what sampling needs; no optimizer state is read).

    Args:
      ema_params: tree of `jax.ShapeDtypeStruct` (with `.sharding` set) of the params.
      config_dict: when given, `check_compatible` runs first.
    """
    self.check_layout(step, data=False)
    if config_dict is not None:
      self.check_compatible(step, config_dict, {EMA: ema_params})
    out = self._mngr.restore(
        step, args=ocp.args.Composite(**{EMA: ocp.args.StandardRestore(ema_params)})
    )
    return out[EMA]

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
