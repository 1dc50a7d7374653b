"""Multi-host sampling and evaluation: split rows over the processes, gather them, one writer.

In a multi-controller JAX job (one process per host, `jax.distributed.initialize`) every process
runs the same program. Cascade sampling and the evaluation networks (Inception, CLIP, random-conv
features) run on each process's own devices (`stage_sampler.default_mesh`,
`evals.batched.BatchRunner`), so the split across hosts is plain data parallelism over rows:
process p takes the contiguous block p of the N rows (`block_bounds`), computes it, and
`allgather_rows` concatenates the blocks in process order, so every process ends with all N
results in their global order, the array one process computes alone. Sample i draws its noise
from `fold_in(stage_key, first_index + i)` (`cascade.Cascade.sample`), so a sample does not
depend on which host draws it.

Rules for callers (every function here but `block_bounds` / `is_writer` is a collective):
* every process makes the same calls with the same arguments (same prompts, batch sizes), or
  the job hangs;
* whether to reuse a stored artefact is decided together (`agree`), and an output folder read
  back by the job must be shared by all processes (a bucket or a shared file system);
* only process 0 writes outputs (`is_writer`); a reader waits for it with `barrier`.

With one process every function is a no-op wrapper, so single-host code paths are unchanged.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from imagen_jax.diffusion import editing
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import ready
from imagen_jax.sampling import cascade_report


def is_writer() -> bool:
  """True on the one process that writes outputs (process 0)."""
  return jax.process_index() == 0


def block_bounds(n: int, block: int, index: int | None = None) -> tuple[int, int]:
  """Rows `[start, stop)` of `n` that process `index` (default: this one) owns, in blocks of
  `block` rows: process p owns `[p * block, (p + 1) * block)` clipped to `n`."""
  if block < 1:
    raise ValueError(f"block must be >= 1, got {block}")
  index = jax.process_index() if index is None else index
  start = min(n, index * block)
  return start, min(n, start + block)


def even_block(n: int, multiple: int = 1) -> int:
  """Rows per process for an even split of `n`: ceil(n / processes), rounded up to a multiple
  of `multiple` (the local batch size, for one static shape), at least `multiple`."""
  per = -(-n // jax.process_count())
  return max(multiple, -(-per // multiple) * multiple)


def allgather_rows(local: np.ndarray, n: int, block: int) -> np.ndarray:
  """Every process's block of rows, concatenated in process order: `[n, ...]` on every process.

  `local`: this process's rows `[k, ...]`, k <= block (process p holds rows
  `block_bounds(n, block, p)`); padded to `block` for the gather, the padding dropped after.
  """
  local = np.asarray(local)
  if len(local) > block:
    raise ValueError(f"{len(local)} local rows exceed the block of {block}")
  if jax.process_count() == 1:
    return local[:n]
  pad = np.zeros((block - len(local),) + local.shape[1:], local.dtype)
  ready.wait_for_peers("gather_rows")  # a peer may still be sampling its block
  gathered = multihost_utils.process_allgather(np.concatenate([local, pad]), tiled=False)
  # Only the last non-empty block is short, so the real rows are the first n in order.
  return np.asarray(gathered).reshape((-1,) + local.shape[1:])[:n]


def agree(flag: bool, what: str) -> bool:
  """`flag` when every process sees the same; otherwise a clear error on every process.

  Used for "is this artefact already stored?": if processes disagreed, some would skip a
  collective the others enter. `what` names the artefact for the error message.
  """
  if jax.process_count() == 1:
    return bool(flag)
  ready.wait_for_peers("agree")
  flags = np.asarray(multihost_utils.process_allgather(np.asarray(bool(flag), np.int32)))
  if len(set(flags.reshape(-1).tolist())) > 1:
    found = [i for i, f in enumerate(flags.reshape(-1)) if f]
    raise RuntimeError(
        f"processes disagree on whether {what} exists (found by processes {found} of "
        f"{len(flags)}): the output folder must be shared by all processes (a bucket or a shared "
        "file system), not a local directory on each host"
    )
  return bool(flag)


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (e.g. after process 0 wrote files the
  others read)."""
  ready.wait_for_peers(name)


def sample(
    model,
    prompts: Sequence[str],
    settings,
    *,
    seed: int = 0,
    batch_size: int = 64,
    first_index: int = 0,
    lowres: np.ndarray | None = None,
    init_image: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    edit=None,
    progress: bool = True,
    transform: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
    negative_prompts: Sequence[str] | None = None,
) -> list[np.ndarray]:
  """`model.sample` (a `cascade.Cascade`) over all processes; every process gets all N rows.

  Process p samples its block of the prompts on its own devices with `first_index` = its
  global offset (so sample i is the one a single process draws), in batches of
  `ceil(batch_size / processes)` (each stage in its own sub-batches, set by
  `application_batch_size`); its block is padded with empty prompts to a whole number of
  batches (one compiled shape). `transform` maps this process's per-stage outputs
  `[[k, S_j, S_j, 3], ...]` to the arrays gathered (e.g. the last stage as uint8 at 256px: what
  crosses hosts is what is kept); default: every stage's float output. `lowres`, and
  `init_image` / `mask` when given per sample (`[N, ...]`, see `Cascade.sample`), are split
  with the prompts; one image or mask for all prompts goes to every process as it is.
  `negative_prompts` (one per prompt) are split with the prompts. Returns the gathered arrays,
  each `[N, ...]`.
  """
  prompts = list(prompts)
  n = len(prompts)
  if n == 0:
    raise ValueError("hosts.sample needs at least one prompt")
  local_batch = -(-int(batch_size) // jax.process_count())
  block = even_block(n)
  start, stop = block_bounds(n, block)
  k = stop - start
  pad = max(local_batch, -(-k // local_batch) * local_batch) - k  # an empty block samples one
  local = prompts[start:stop] + [""] * pad

  def rows(a):  # this process's rows of a per-sample array, zero-padded like the prompts
    part = np.asarray(a[start:stop], np.float32)
    return np.concatenate([part, np.zeros((pad,) + part.shape[1:], np.float32)])

  # Per sample: [N, S, S, 3] images; [N, S, S] or [N, S, S, 1] masks (a [S, S, 1] mask is shared).
  per_sample_image, per_sample_mask = editing.per_sample(init_image, mask)
  outs = model.sample(
      local,
      settings,
      seed=seed,
      batch_size=local_batch,
      first_index=first_index + start,
      lowres=None if lowres is None else rows(lowres),
      init_image=rows(init_image) if per_sample_image else init_image,
      mask=rows(mask) if per_sample_mask else mask,
      edit=edit,
      progress=progress,
      **(
          {}
          if negative_prompts is None
          else {"negative_prompts": list(negative_prompts)[start:stop] + [""] * pad}
      ),
  )
  outs = [o[:k] for o in outs]
  kept = list(outs) if transform is None else list(transform(outs))
  return [allgather_rows(a, n, block) for a in kept]


def check_batch_size(model, batch_size: int, flag: str = "--config.batch_size") -> int:
  """`batch_size` (prompts per cascade call over all processes) if every process's share
  divides over its mesh's batch shards; otherwise a ValueError naming the sizes that do.

  model: a `cascade.Cascade` (its `batch_multiple`: the batch shards of this process's mesh).
  """
  m = int(model.batch_multiple) * jax.process_count()
  if (
      isinstance(batch_size, bool)
      or not isinstance(batch_size, int)
      or batch_size < 1
      or (batch_size % m)
  ):
    below = max(m, int(batch_size) // m * m) if isinstance(batch_size, int) else m
    above = -(-max(int(batch_size), 1) // m) * m if isinstance(batch_size, int) else m
    near = sorted({below, above})
    raise ValueError(
        f"{flag}={batch_size!r} does not divide over the {m} batch shards "
        f"({jax.process_count()} process(es) x {model.batch_multiple}); allowed: a multiple of "
        f"{m}, e.g. {' or '.join(map(str, near))}"
    )
  return batch_size


def stage_batch(setting: str, value, batch_setting: str, batch: int, shards: int) -> int:
  """A cascade stage's batch from its `setting` (`stageK.batch_size` = `value`): 0 = the
  cascade's `batch`; else a divisor of it (each batch of prompts splits into whole sub-batches)
  that divides over the `shards` batch shards. Raises ValueError naming the setting, its value
  and what is allowed. The one check of a stage batch, for the applications and the AOT tool."""
  if type(value) is int and value == 0:
    return batch
  divisors = [d for d in range(shards, batch + 1, shards) if batch % d == 0]
  if type(value) is not int or value not in divisors:
    raise ValueError(
        f"{setting}={value!r} is not a divisor of the cascade's batch {batch_setting}={batch} "
        f"that divides over its {shards} batch shards; allowed: 0 (the cascade's batch) or one "
        f"of {divisors}"
    )
  return value


def application_batch_size(model, flag_value: int | None, config) -> int:
  """An application's batches, all from the cascade config (the one place they are set); returns
  the cascade's batch and sets the model's per-stage ones (`Cascade.set_stage_batch_sizes`).

  * the cascade's batch: `--batch_size` when given (`flag_value`), else `config.batch_size`;
  * stage k's: `config.stageK.batch_size`, 0 or absent = the cascade's; it must divide the
    cascade's batch (each batch of prompts splits into whole sub-batches);
  * each divides over the batch shards of all processes (`check_batch_size`);
  * when `config.aot_report` names AOT cascade reports of this slice (comma-separated paths,
    `aot/compile_cascade.py --report_json`), each stage's batch is at most the largest that a
    report shows fitting (`cascade_report.check_batches`).

  Raises ValueError, one line naming the setting, its value and what is allowed.
  model: a `cascade.Cascade` (its stages and `batch_multiple`).
  """
  flag = "--batch_size" if flag_value else "--config.batch_size"
  batch = check_batch_size(model, flag_value or int(config.batch_size), flag)
  m = int(model.batch_multiple) * jax.process_count()
  batches = []  # per stage: (the setting that gave its batch, the batch, the stage's setting)
  for k in range(len(model.stages)):
    own = f"--config.stage{k + 1}.batch_size"
    block = config.get(f"stage{k + 1}", None)
    value = 0 if block is None else block.get("batch_size", 0)
    inherited = type(value) is int and value == 0
    batches.append((flag if inherited else own, stage_batch(own, value, flag, batch, m), own))
  reports = [p.strip() for p in str(config.get("aot_report", "") or "").split(",") if p.strip()]
  if reports:
    cascade_report.check_batches(reports, batches, jax.device_count())
  model.set_stage_batch_sizes(
      [None if setting == flag else b // jax.process_count() for setting, b, _ in batches]
  )
  return batch


def define_flags() -> None:
  """Adds `--distributed` (+ `--coordinator_address`, `--num_processes`, `--process_id`) to a
  script, for `initialize_from_flags`."""
  flags.DEFINE_bool(
      "distributed",
      False,
      "join a multi-process job (jax.distributed.initialize) and split the work over all "
      "processes; coordinator, count and id are auto-detected on TPU pods and SLURM",
  )
  flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0 (''=auto-detect)")
  flags.DEFINE_integer("num_processes", -1, "processes in the job (-1 = auto-detect)")
  flags.DEFINE_integer("process_id", -1, "this process's id (-1 = auto-detect)")


def initialize_from_flags() -> None:
  """`jax.distributed.initialize` from the `define_flags` flags when `--distributed` is set;
  must run before anything touches the jax backend."""
  f = flags.FLAGS
  mesh_lib.maybe_initialize_distributed(
      ml_collections.ConfigDict(
          {
              "initialize": f.distributed,
              "coordinator_address": f.coordinator_address,
              "num_processes": f.num_processes,
              "process_id": f.process_id,
          }
      )
  )
