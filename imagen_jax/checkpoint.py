"""Orbax checkpoints of one training run: {train state, EMA params, data iterators, config}.

Layout: `<workdir>/checkpoints/<step>/` with the items

  train_state   {step, params, opt_state}: what resuming needs besides the EMA params;
  ema_params    the EMA params alone, so a sampler restores them without an optimizer
                (`cascade.load_stage`);
  data_position the global data position as JSON ({"next_example", "global_batch_size",
                "num_records", "seed", "shuffle"}): the index of the next example of the global
                stream (`data.pipeline` module doc), the same on every process, so a run
                resumes on any number of processes (elastic resume);
  config        the stage config as JSON.

Orbax writes each step into a temporary directory and renames it only once every item (and every
host) has finished ("atomic finalize"), so a save cut short by a crash or SIGKILL is never listed
as a step and the run resumes from the last complete one. Saves are asynchronous: the arrays are
copied off the devices, then written by a background thread while training continues. Arrays
restore into the target's shardings, whatever mesh wrote them (a run saved on fsdp=4 resumes on
fsdp=2).

The config item records what the run *means* (`run_meaning.MEANING_FIELDS`: stage, network,
diffusion schedule / target / aug range / logSNR range, text encoder name, max_length and weights
fingerprint, image sizes and crop, a warm start's source). `check_compatible` compares them and the
array shapes with the current run before anything is loaded, so resuming (or sampling) under another
meaning fails naming each field, its saved and its current value, instead of training or sampling on
silently; every other setting (`train.*`, `optim.*`, `sample.*`, `mesh.*`, the data source,
text.path / dtype / drop_prob / embedding_cache) may change on resume. A checkpoint of an older
layout is refused naming what changed; one whose data position is per-process grain iterator state
(`data_iter_<k>/process_<i>-of-<n>.json`) is refused by `data_position` unless the caller opts in to
restarting the global stream at step x global batch (`train.data_position_from_step`).

Faults: a latest step that fails to load (a truncated array file, a corrupt item) is moved aside
to `<step>.corrupt` and the previous complete step is restored, with a loud warning naming the
bad step (`restore_latest`); a save that fails with an OSError (a full disk) raises one
`CheckpointSaveError` naming the step and the last complete step, which is kept (Orbax only
lists a step once it is finalized and deletes old steps only after that). Writers clean Orbax's
leftover temporary directories at start; readers (`read_only=True`) never touch the directory.
Retention: the newest `max_to_keep` steps plus every step divisible by `keep_period`.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath

from imagen_jax import paths, run_meaning
from imagen_jax.parallel import ready
from imagen_jax.run_meaning import CheckpointMismatchError

TRAIN_STATE, EMA, CONFIG = "train_state", "ema_params", "config"
DATA_POSITION = "data_position"
# Per-process grain iterator items of the earlier data layout (`data_iter_<k>`).
PER_PROCESS_DATA_PREFIX = "data_iter_"
# Items of the older layout (one `state` item holding the EMA params with the optimizer).
OLD_LAYOUT_ITEMS = ("state", "data_iter")


class CheckpointLayoutError(CheckpointMismatchError):
  """A checkpoint written with another item layout than this code's."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (e.g. a full disk); the last complete step is kept."""


class CheckpointCorruptError(RuntimeError):
  """No complete step of a checkpoint directory could be restored."""


def shapes_by_path(tree: Any) -> dict[str, tuple]:
  """'a/b/c' -> shape for every array-like leaf (metadata or ShapeDtypeStruct)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, "shape", None)
    if shape is None:
      continue
    key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    out[key] = tuple(shape)
  return out


class _ReadOnlyNotice(logging.Filter):
  """Drops Orbax's warning that a manager's directory is read only: ours are on purpose."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


_READ_ONLY_NOTICE = _ReadOnlyNotice()


@functools.cache  # once per process
def _whole_array_writes_on_cpu():
  """On CPU the devices are this host's memory: Orbax's replica-parallel writes (each replica
  writes a slice) only add a compile per array shape at a process's first save, seconds for a
  few hundred arrays. There each array is written whole by its first replica."""
  if jax.default_backend() == "cpu":
    absl_logger, level = logging.getLogger("absl"), logging.getLogger("absl").level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns of the override, expected here
    try:
      handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
      ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
      absl_logger.setLevel(level)


class Checkpointer:
  """Thin wrapper of `ocp.CheckpointManager` for the items of the module doc."""

  def __init__(
      self,
      directory: str | os.PathLike,
      *,
      max_to_keep: int | None = 3,
      keep_period: int = 0,
      async_save: bool = True,
      read_only: bool = False,
  ):
    """
    Args:
      max_to_keep: the newest steps kept (None: all).
      keep_period: > 0 also keeps every step divisible by it (e.g. every 50k steps); 0: none.
      read_only: for samplers: never creates, cleans or deletes anything (a sampler may read a
        workdir while its training run is writing a step there).
    """
    if max_to_keep is not None and int(max_to_keep) < 1:
      raise ValueError(f"max_to_keep={max_to_keep}; allowed: None (keep all) or >= 1")
    if int(keep_period) < 0:
      raise ValueError(f"keep_period={keep_period}; allowed: 0 (off) or > 0")
    self.directory = paths.absolute(directory)  # a gs:// path stays one
    if read_only:  # Orbax logs through absl's logger (idempotent: a filter is added once)
      logging.getLogger("absl").addFilter(_READ_ONLY_NOTICE)
    self._save_failed = False
    policies = ocp.checkpoint_managers
    keep = [policies.LatestN(n=None if max_to_keep is None else int(max_to_keep))]
    if keep_period:
      keep.append(policies.EveryNSteps(int(keep_period)))
    if read_only:
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, save_interval_steps=0, enable_async_checkpointing=False
      )
    else:
      options = ocp.CheckpointManagerOptions(
          preservation_policy=policies.AnyPreservationPolicy(keep),
          create=True,
          enable_async_checkpointing=async_save,
          # A save cut short (SIGKILL, full disk) leaves a temporary directory: removed at start.
          cleanup_tmp_directories=True,
      )
      _whole_array_writes_on_cpu()
    handlers = {
        TRAIN_STATE: ocp.StandardCheckpointHandler(),
        EMA: ocp.StandardCheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
        DATA_POSITION: ocp.JsonCheckpointHandler(),
    }
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
      data_position: dict | None = None,
      config_dict: dict,
      force: bool = True,
  ) -> bool:
    """Starts an (async) save of `step`; returns whether a save was started.

    Args:
      train_state: the pytree {step, params, opt_state}.
      ema_params: the EMA params.
      data_position: the global data position (module doc; None: no data item).
      config_dict: the run's config as JSON data.
    """
    args = {
        TRAIN_STATE: ocp.args.StandardSave(train_state),
        EMA: ocp.args.StandardSave(ema_params),
        CONFIG: ocp.args.JsonSave(run_meaning.json_normal(config_dict)),
    }
    if data_position is not None:
      args[DATA_POSITION] = ocp.args.JsonSave(run_meaning.json_normal(data_position))
    try:
      # Also waits for the previous async save, so its failure surfaces here.
      return self._mngr.save(step, args=ocp.args.Composite(**args), force=force)
    except OSError as e:
      raise self._save_error(step, e) from e

  def _save_error(self, step: int | None, e: OSError) -> CheckpointSaveError:
    self._save_failed = True
    # Orbax makes a save's temporary directory in a thread that a failed save does not wait
    # for: joined, so the directory exists before the next start's clean-up looks for it.
    for t in threading.enumerate():
      if type(t).__module__.startswith("orbax.") and type(t).__name__ == "_SignalingThread":
        t.join(timeout=60)
    self._mngr.reload()
    last = self._mngr.latest_step()
    why = "the disk is full" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {e}"
    return CheckpointSaveError(
        e.errno,
        f"checkpoint save{'' if step is None else f' of step {step}'} in {self.directory} "
        f"failed: {why}. The last complete checkpoint "
        + (f"(step {last}) is kept" if last is not None else "does not exist (none was saved)")
        + "; free space (or fix the directory) and rerun to resume from it.",
    )

  def wait(self) -> None:
    """Blocks until the pending async save is finalized (renamed into place)."""
    try:
      self._mngr.wait_until_finished()
    except OSError as e:
      raise self._save_error(None, e) from e

  def saved_items(self, step: int) -> list[str]:
    """The item directories of complete step `step`."""
    where = self.directory / str(step)
    return sorted(p.name for p in where.iterdir() if p.is_dir()) if where.exists() else []

  def check_layout(self, step: int, *, data: bool) -> None:
    """Raises `CheckpointLayoutError` if `step` lacks this layout's items (an older layout):
    with `data`, those a resume needs, else those sampling needs."""
    found = self.saved_items(step)
    want = [TRAIN_STATE, EMA, CONFIG] if data else [EMA, CONFIG]
    missing = [i for i in want if i not in found]
    where = self.directory / str(step)
    if missing:
      old = [i for i in OLD_LAYOUT_ITEMS if i in found]
      raise CheckpointLayoutError(
          f"checkpoint {where} was written by an older layout: items {found} found, "
          f"{want} expected"
          + (f" (it has the old items {old})" if old else "")
          + f". Missing: {missing}. EMA params are now their own item ('{EMA}') and the "
          f"optimizer state with the params is '{TRAIN_STATE}'. Retrain the stage in a fresh "
          "workdir (old checkpoints are not converted)."
      )

  def data_position(self, step: int, *, from_step: bool = False) -> dict | None:
    """The global data position saved with `step` (module doc); None when it has none.

    A step with per-process grain iterator state instead (`data_iter_<k>` items: a position in
    each process's own shard order, meaningless for the global stream) raises
    `CheckpointLayoutError`, unless `from_step`: then None is returned with a warning and the
    caller starts the global stream at step x global batch (other examples than the old run
    would have read next, none repeated within the new stream).
    """
    found = self.saved_items(step)
    if DATA_POSITION in found:
      out = self._mngr.restore(
          step, args=ocp.args.Composite(**{DATA_POSITION: ocp.args.JsonRestore()})
      )
      return out[DATA_POSITION]
    per_process = [i for i in found if i.startswith(PER_PROCESS_DATA_PREFIX)]
    if not per_process:
      return None
    where = self.directory / str(step)
    if not from_step:
      raise CheckpointLayoutError(
          f"checkpoint {where} stores the data position per process ({per_process}: grain "
          "iterator state in each process's own shard order), which does not carry over to the "
          "global data order of this code. Resume with --config.train.data_position_from_step"
          "=True to keep the train state and start the data at step x global_batch_size of the "
          "global order (not the examples the old run would have read next), or retrain."
      )
    logging.warning(
        "checkpoint %s has per-process data iterators %s: the data restarts at step x "
        "global batch of the global order (train.data_position_from_step)",
        where,
        per_process,
    )
    return None

  def reload(self) -> None:
    """Rereads the step list from the directory."""
    self._mngr.reload()

  def saved_config(self, step: int) -> dict:
    out = self._mngr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
    return out[CONFIG]

  def saved_shapes(self, step: int, item: str) -> dict[str, tuple]:
    meta = self._mngr.item_metadata(step)[item]
    meta = getattr(meta, "tree", meta)
    return shapes_by_path(meta)

  def check_compatible(self, step: int, config_dict: dict, abstract_items: dict) -> None:
    """Raises `CheckpointMismatchError` if `step` was written for another run or state.

    Compares the saved config's `MEANING_FIELDS` with `config_dict` (a checkpoint without a
    text fingerprint is let through with a warning: it cannot be verified), then the saved array
    shapes of each item of `abstract_items` ({item name: abstract tree}, e.g. the train state
    and the EMA params) with the tree. Nothing is loaded before this passes.
    """
    where = self.directory / str(step)
    saved = self.saved_config(step)
    diffs = run_meaning.meaning_diff(saved, config_dict)
    if diffs:
      raise run_meaning.meaning_error(where, diffs)
    if (
        run_meaning.field_value(saved, run_meaning.TEXT_FINGERPRINT) is run_meaning.ABSENT
        and run_meaning.field_value(config_dict, run_meaning.TEXT_FINGERPRINT)
        is not run_meaning.ABSENT
    ):
      logging.warning(
          "checkpoint %s records no text encoder fingerprint: the encoder's weights cannot be "
          "verified (they must be those it was trained with)",
          where,
      )
    for item, abstract in abstract_items.items():
      saved_shapes = self.saved_shapes(step, item)
      want = shapes_by_path(abstract)
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
      config_dict: dict | None = None,
  ) -> tuple[Any, Any]:
    """(train_state, ema_params) of `step`, for resuming; arrays land in the abstract trees'
    shardings (any mesh; `data_position` reads the data item).

    Args:
      train_state, ema_params: trees of `jax.ShapeDtypeStruct` with `.sharding` set.
      config_dict: when given, `check_compatible` runs first.
    """
    self.check_layout(step, data=True)
    if config_dict is not None:
      self.check_compatible(step, config_dict, {TRAIN_STATE: train_state, EMA: ema_params})
    args = {
        TRAIN_STATE: ocp.args.StandardRestore(train_state),
        EMA: ocp.args.StandardRestore(ema_params),
    }
    out = self._mngr.restore(step, args=ocp.args.Composite(**args))
    return out[TRAIN_STATE], out[EMA]

  def restore_latest(
      self,
      *,
      train_state: Any,
      ema_params: Any,
      config_dict: dict | None = None,
  ) -> tuple[int, Any, Any] | None:
    """(step, train_state, ema_params) of the newest step that restores; None without steps.

    A step that fails to load for another reason than a mismatch (a truncated or corrupt file)
    is skipped with a loud warning naming it and its error, and the previous complete step is
    tried; once one restores, the newer bad steps are moved aside to `<step>.corrupt` (kept for
    inspection; no longer steps, so the run saves those step numbers anew). A mismatch
    (`CheckpointMismatchError`) is raised at once: an older step of the same run would not fit
    either. `CheckpointCorruptError` when no step restores (nothing is moved then).
    """
    bad: list[tuple[int, Exception]] = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        got = self.restore(
            step,
            train_state=train_state,
            ema_params=ema_params,
            config_dict=config_dict,
        )
      except CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 - any read failure of this step means: try the previous
        logging.error(
            "CHECKPOINT STEP %d IN %s DOES NOT LOAD (%s: %s); trying the previous step",
            step,
            self.directory,
            type(e).__name__,
            str(e)[:500],
        )
        bad.append((step, e))
        continue
      if bad:
        self._move_aside([s for s, _ in bad])
        logging.warning(
            "RESUMED FROM STEP %d, NOT FROM THE LATEST: step(s) %s in %s did not load and were "
            "moved aside to <step>.corrupt (first error: %s)",
            step,
            [s for s, _ in bad],
            self.directory,
            str(bad[0][1])[:300],
        )
      return (step, *got)
    if bad:
      raise CheckpointCorruptError(
          f"no step of {self.directory} restores: "
          + "; ".join(f"step {s}: {type(e).__name__}: {str(e)[:300]}" for s, e in bad)
      ) from bad[0][1]
    return None

  def _move_aside(self, steps: Sequence[int]) -> None:
    if jax.process_index() == 0:
      for step in steps:
        src = self.directory / str(step)
        dst = self.directory / f"{step}.corrupt"
        n = 1
        while dst.exists():
          dst, n = self.directory / f"{step}.corrupt{n}", n + 1
        src.rename(dst)
    ready.wait_for_peers("checkpoint_move_aside")
    self._mngr.reload()

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
    """Waits for the pending save and closes. A save failure already raised is logged, not
    raised again, so the exception in flight stays the one reported."""
    failed_before = self._save_failed
    try:
      self.wait()
    except CheckpointSaveError as e:
      if not failed_before:
        raise
      logging.error("%s", e)
    finally:
      try:
        self._mngr.close()
      except OSError as e:
        if not self._save_failed:
          raise self._save_error(None, e) from e


def check_resume_meaning(directory: str | os.PathLike, config_dict: dict) -> int | None:
  """Before a trainer builds anything: its config's `MEANING_FIELDS` against the newest step
  whose config item reads (a corrupt one is left to `restore_latest`). Returns that step (None
  without steps); raises `CheckpointMismatchError` naming each differing field.

  The text fingerprint is compared later, at the restore, once the encoder is built (loading
  T5-XXL takes minutes: a changed schedule or max_length is refused before that).
  """
  if not epath.Path(directory).exists():
    return None
  ck = Checkpointer(directory, read_only=True)
  try:
    for step in sorted(ck.all_steps(), reverse=True):
      try:
        saved = ck.saved_config(step)
      except Exception:  # noqa: BLE001 - unreadable: restore_latest reports and falls back
        continue
      diffs = run_meaning.meaning_diff(saved, config_dict, fingerprint=False)
      if diffs:
        raise run_meaning.meaning_error(ck.directory / str(step), diffs)
      return step
    return None
  finally:
    ck.close()
