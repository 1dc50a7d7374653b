"""Orbax checkpoints of one training run: {train state, data iterator state, config}.

Layout: `<workdir>/checkpoints/<step>/{state, data_iter, config}`. Orbax writes each step into a
temporary directory and renames it only once every item (and every host) has finished
("atomic finalize"), so a save cut short by a crash or SIGKILL is never listed as a step and the
run resumes from the last complete one. Saves are asynchronous: the arrays are copied off the
devices, then written by a background thread while training continues.

The data iterator state is one JSON file per process (`process_<i>-of-<n>.json`): every host
reads its own shard of the data (grain), so each resumes its own position. The config is saved
as JSON; `check_compatible` compares it and the saved array shapes with the current run before
anything is loaded, so restoring into a different model fails with a clear message instead of a
partial or mis-shaped load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

STATE, DATA, CONFIG = "state", "data_iter", "config"


class CheckpointMismatchError(ValueError):
  """A checkpoint does not match the model / train state it is being restored into."""


class DataStateHandler(ocp.CheckpointHandler):
  """Per-process JSON file of the data iterator position (grain's pattern)."""

  def save(self, directory: epath.Path, args: "DataStateSave") -> None:
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (epath.Path(directory) / name).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> Any:
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    path = epath.Path(directory) / name
    if not path.exists():
      found = sorted(p.name for p in epath.Path(directory).iterdir())
      raise CheckpointMismatchError(
          f"no data iterator state {path}; the checkpoint has {found} (was it written "
          f"with a different number of processes than {jax.process_count()}?)"
      )
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path) -> None:
    del directory
    return None

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


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
  """Thin wrapper of `ocp.CheckpointManager` for {state, data_iter, config}."""

  def __init__(
      self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = True
  ):
    self.directory = epath.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
    )
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
            STATE: ocp.StandardCheckpointHandler(),
            DATA: DataStateHandler(),
            CONFIG: ocp.JsonCheckpointHandler(),
        },
    )

  def latest_step(self) -> int | None:
    """Latest *complete* step (unfinished temporary directories are not steps)."""
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(
      self, step: int, state: Any, *, data_state: dict | None, config_dict: dict, force: bool = True
  ) -> bool:
    """Starts an (async) save of `step`; returns whether a save was started.

    `data_state` is captured now (a JSON copy), so the iterator may move on while the
    arrays are being written.
    """
    args = {
        STATE: ocp.args.StandardSave(state),
        CONFIG: ocp.args.JsonSave(_json_normal(config_dict)),
    }
    args[DATA] = DataStateSave(_json_normal(data_state))
    return self._mngr.save(step, args=ocp.args.Composite(**args), force=force)

  def wait(self) -> None:
    """Blocks until the pending async save is finalized (renamed into place)."""
    self._mngr.wait_until_finished()

  def saved_config(self, step: int) -> dict:
    out = self._mngr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
    return out[CONFIG]

  def saved_shapes(self, step: int) -> dict[str, tuple]:
    meta = self._mngr.item_metadata(step)[STATE]
    meta = getattr(meta, "tree", meta)
    return _shapes_by_path(meta)

  def check_compatible(self, step: int, config_dict: dict, abstract_state: Any) -> None:
    """Raises `CheckpointMismatchError` if `step` was written for another model or state.

    Compares the saved config's `stage` and `model` sections with `config_dict`, then the
    saved array shapes of the train state with `abstract_state` (params, EMA, optimizer
    state). Nothing is loaded into the train state before this passes.
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
    saved_shapes = self.saved_shapes(step)
    want = _shapes_by_path(abstract_state)
    if set(saved_shapes) != set(want) or any(saved_shapes[k] != want[k] for k in want):
      missing = sorted(set(want) - set(saved_shapes))[:5]
      extra = sorted(set(saved_shapes) - set(want))[:5]
      shape = [
          f"{k}: {saved_shapes[k]} saved, {want[k]} now"
          for k in sorted(want)
          if k in saved_shapes and saved_shapes[k] != want[k]
      ][:5]
      raise CheckpointMismatchError(
          f"checkpoint {where} does not match the train state: missing {missing}, "
          f"unexpected {extra}, shape mismatches {shape} (a different optimizer or "
          "network?). Use a fresh workdir."
      )

  def restore(
      self, step: int, abstract_state: Any, *, config_dict: dict | None = None
  ) -> tuple[Any, dict | None]:
    """(state, data_state) of `step`; arrays land in `abstract_state`'s shardings.

    Args:
      abstract_state: tree of `jax.ShapeDtypeStruct` with `.sharding` set.
      config_dict: when given, `check_compatible` runs first.
    """
    if config_dict is not None:
      self.check_compatible(step, config_dict, abstract_state)
    out = self._mngr.restore(
        step,
        args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state), DATA: DataStateRestore()}
        ),
    )
    return out[STATE], out[DATA]

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
