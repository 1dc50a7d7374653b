"""`train_and_evaluate(config, workdir)`: train one cascade stage, resumably, on any mesh.

Each Imagen stage (base 64x64, SR 64->256, SR 256->1024) trains as an independent job
(Imagen §4.1: batch 2048, 2.5M steps; 256 TPU-v4 chips for the base model, 128 per SR model).
One run:
  1. mesh from `config.mesh` (data, fsdp[, tensor]); frozen text encoder placed by the same
     logical rules;
  2. the stage layer (`imagen_jax.stage`: network, schedule, conditioning, abstract params);
     the train state, either restored from the workdir's latest complete checkpoint (after
     checking it was written for this model) or initialised straight into its shardings;
  3. the data: this process's slice of each global batch of the global example stream, from
     the checkpoint's global position (`data.pipeline`), sharded over the batch axes;
  4. the loop: jitted `train_step`, metrics (loss, grad norm, lr, steps/s, images/s) to
     TensorBoard + JSONL, EMA sample grids as PNG (`make_sample_fn`), async Orbax checkpoints every
     `train.ckpt_every` steps, at the end and on preemption (SIGTERM to any process: every
     process saves the same step and returns with "preempted": True; `_Preemption`).

Faults: the settings are checked before anything is built (`train.settings.check`); a resume
under another meaning (model, diffusion, text encoder name / max_length / weights fingerprint,
sizes: `run_meaning.MEANING_FIELDS`) is refused before the encoder loads, and the workdir's
config.json is only written once the run is known to fit its checkpoints; a latest checkpoint
that does not load falls back to the previous one (`Checkpointer.restore_latest`); a failed save
(full disk) is one `CheckpointSaveError`; metric rows past the resumed step (a run killed after
logging them) are dropped; with `train.nonfinite='skip'`, `train.max_nonfinite_steps` non-finite
steps in a row stop the run and skipped steps are reported at exit.

Exactness of resume: the step's randomness is `fold_in(key(seed), step)` and the global data
position is stored in the checkpoint, so a run restarted from step k replays exactly the
steps an uninterrupted run would have taken, on any number of processes and any mesh shape
(Orbax restores the arrays into the current shardings).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import distributed
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from imagen_jax import atomic, metric_writers, paths, profiling, run_meaning
from imagen_jax import checkpoint as ckpt_lib
from imagen_jax.data import pipeline, records
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import ready
from imagen_jax.parallel import sharding as sharding_lib
from imagen_jax.stage import SamplingSettings, Stage
from imagen_jax.text import cache as text_cache_lib
from imagen_jax.text import registry
from imagen_jax.text import shards as text_shards
from imagen_jax.train import program as program_lib
from imagen_jax.train import settings as settings_lib
from imagen_jax.train import state as state_lib
from imagen_jax.train import warm_start

Hook = Callable[[int, Any, dict], None]


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm was NaN/inf (with `train.nonfinite='stop'`)."""


def config_to_dict(config) -> dict:
  """The config as plain JSON data (what is written to the workdir and the checkpoint)."""
  return json.loads(config.to_json_best_effort())


class _Preemption:
  """Whether every process has reached the step at which to checkpoint and exit after a
  preemption notice (SIGTERM) to any of them.

  With `jax.distributed` initialised, jax's coordination service does it: its preemption
  notifier catches SIGTERM on each process (TPU maintenance events too) and the sync manager
  agrees, in the background, on the step max(every process's step) + 1;
  `multihost_utils.reached_preemption_sync_point(step)`, called at every step, is a local check
  (no per-step collective). No Python handler is installed then: it would replace the
  notifier's. With one process: a SIGTERM handler sets a flag the loop polls (it does no work
  itself: it may interrupt anything, a half-written checkpoint included). With several
  processes but jax's preemption service turned off (`jax_enable_preemption_service=False`):
  the handler's flag, agreed by an all-gather every `train.preemption_check_every` steps.
  """

  def __init__(self, check_every: int):
    self.flag = False
    self._previous = None
    self._every = int(check_every)
    self._service = jax.process_count() > 1 and _preemption_service_running()

  def install(self) -> None:
    if self._service:
      logging.info("preemption: jax's coordination service (SIGTERM on any process)")
      return
    if threading.current_thread() is not threading.main_thread():
      logging.warning("not on the main thread: no SIGTERM handler installed")
      return
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def reached(self, step: int) -> bool:
    """True, on every process at the same step, once any process got SIGTERM. Call it at
    every step (the service's protocol counts the calls)."""
    if self._service:
      return multihost_utils.reached_preemption_sync_point(step)
    if jax.process_count() == 1:
      return self.flag
    if step % self._every:
      return False
    flags = multihost_utils.process_allgather(np.asarray([int(self.flag)], np.int32))
    return bool(np.max(flags))


def _preemption_service_running() -> bool:
  """Whether jax.distributed runs a preemption sync manager (on unless the jax flag
  `jax_enable_preemption_service` was turned off before `jax.distributed.initialize`)."""
  state = distributed.global_state
  return state.client is not None and state.preemption_sync_manager is not None


def make_train_loader(
    settings: settings_lib.LoaderSettings, tokenizer, start_index: int, embedding_lookup=None
):
  """This process's loader of its slice of the global batches, from global example
  `start_index` (`data.pipeline` module doc: the batches are the same for any process count)."""
  return pipeline.make_loader(
      settings.data,
      image_size=settings.image_size,
      lowres_size=settings.lowres_size,
      global_batch_size=settings.global_batch_size,
      tokenizer=None if embedding_lookup else tokenizer,
      embedding_lookup=embedding_lookup,
      seed=settings.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      start_index=start_index,
  )


def data_start(settings: settings_lib.LoaderSettings, saved: dict | None, step: int) -> int:
  """The global example index a run resuming at `step` reads next: the checkpoint's saved
  position, else step x global batch (a fresh run: 0)."""
  if saved is None:
    return step * settings.global_batch_size
  changed = [
      f"{k}: {saved.get(k)!r} saved, {now!r} now"
      for k, now in (("seed", settings.seed), ("shuffle", settings.shuffle))
      if saved.get(k) != now
  ]
  if changed:
    logging.warning(
        "the data order differs from the checkpoint's (%s): the run continues at example %d "
        "of the new order",
        "; ".join(changed),
        saved["next_example"],
    )
  return int(saved["next_example"])


def _mean_metrics(pending: Sequence[tuple[int, dict]]) -> dict:
  rows = jax.device_get([m for _, m in pending])
  out = {k: float(np.mean([r[k] for r in rows])) for k in ("loss", "grad_norm")}
  out["lr"] = float(rows[-1]["lr"])
  out["text_kept"] = float(np.mean([r["text_kept"] for r in rows]))
  out["nonfinite_steps"] = float(sum(1 - int(r["finite"]) for r in rows))
  return out


def open_text_cache(text_config, encoder, data_config=None):
  """The `text.embedding_cache` of the stage (None when unset), checked against `encoder`: a
  caption cache (`text.cache`) or the embeddings of a prepared dataset (`text.shards`, read per
  record with `data.embedding_id_key='index'`).

  With a cache the step reads precomputed embeddings instead of running the frozen encoder
  (on the 2-core CPU demo the tiny encoder alone is ~12% of the base stage's step).
  """
  path = text_config.get("embedding_cache", "")
  if not path:
    return None
  if text_shards.is_shards(path):
    if data_config is None or (data_config.name, data_config.embedding_id_key) != (
        "records",
        "index",
    ):
      raise text_cache_lib.CacheError(
          f"text embeddings {path!r} are per record of a prepared dataset: pass "
          "--config.data.name=records --config.data.embedding_id_key=index"
      )
    cache = text_shards.EmbeddingShards(path, records.RecordSource(data_config.data_dir))
  else:
    cache = text_cache_lib.TextEmbeddingCache(path)
  cache.check_encoder(encoder.name, encoder.dim, encoder.max_length, encoder.fingerprint)
  logging.info("text embeddings from the cache %s (%d captions)", path, len(cache))
  return cache


def train_and_evaluate(config, workdir: str, *, hooks: Sequence[Hook] = ()) -> dict:
  """Trains `config.stage` in `workdir` to `config.train.num_steps`, resuming if possible.

  Args:
    config: a stage config (`configs/base64.py` etc.).
    workdir: output directory: config.json, checkpoints/, metrics.jsonl, tensorboard/,
      samples/.
    hooks: callables `hook(step, state, metrics)` run after every step (tests, profiling).

  Returns:
    {"step": last step, "history": logged metric rows, "preempted": bool, "state": the train
    state, "skipped_steps": the steps of this call whose update was skipped as non-finite}.
  """
  c = config
  settings_lib.check(c)
  config_dict = config_to_dict(c)
  is_main = jax.process_index() == 0
  paths.makedirs(workdir)  # a bucket folder is implied by its objects
  # Before the mesh and the encoder (minutes for T5-XXL): a resume under another meaning fails.
  ckpt_lib.check_resume_meaning(os.path.join(workdir, "checkpoints"), config_dict)

  mesh = mesh_lib.make_mesh(dict(c.mesh.shape))
  rules = sharding_lib.rules_from_config(c)
  # Before the encoder loads (minutes for T5-XXL): a batch the mesh cannot split fails at once.
  batch_axes = program_lib.check_batch(c, rules, mesh)
  logging.info("mesh %s on %d processes", dict(mesh.shape), jax.process_count())

  encoder = registry.get_text_encoder(c.text, mesh=mesh, rules=rules)
  config_dict = run_meaning.with_text_fingerprint(config_dict, encoder.fingerprint)
  text_cache = open_text_cache(c.text, encoder, c.data)
  program = program_lib.build(c, mesh, encoder, use_cache=text_cache is not None)
  stage, abstract, shardings = program.stage, program.abstract, program.shardings
  ckpt = ckpt_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      max_to_keep=c.train.max_to_keep,
      keep_period=int(c.train.keep_period),
  )
  base_rng = jax.random.key(int(c.train.seed))
  init_rng, step_rng, sample_rng = jax.random.split(base_rng, 3)
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  train_target, ema_target = target.checkpoint_items()
  restored = ckpt.restore_latest(
      train_state=train_target,
      ema_params=ema_target,
      config_dict=config_dict,
  )
  saved_position = None
  if restored is not None:
    latest, train_state, ema = restored
    state = state_lib.TrainState.from_checkpoint_items(train_state, ema)
    saved_position = ckpt.data_position(latest, from_step=bool(c.train.data_position_from_step))
    logging.info("resumed from %s at step %d", ckpt.directory, latest)
    saved_train = ckpt.saved_config(latest).get("train", {})
    for key in ("init_step", "init_fingerprint"):  # the warm start's record, kept
      if key in saved_train:
        config_dict["train"][key] = saved_train[key]
  elif c.train.get("init_from"):
    params, record = warm_start.load(str(c.train.init_from), target.params)
    state = state_lib.state_from_params(program.tx, shardings, params)
    config_dict["train"].update(record)
    logging.info(
        "warm start from %s (step %s, params fingerprint %s)",
        record["init_from"],
        record["init_step"],
        record["init_fingerprint"],
    )
  else:
    state = state_lib.create_state(stage, program.tx, shardings, init_rng)
  # Written once the checkpoint (if any) is known to fit this config: a refused resume leaves
  # the workdir's config.json describing its checkpoints.
  if is_main:
    # Atomic: a crash mid-write never leaves a truncated config.json for the sampler.
    atomic.write_text(
        os.path.join(workdir, "config.json"), json.dumps(config_dict, indent=2, sort_keys=True)
    )
  step = int(jax.device_get(state.step))
  logging.info("%d params", state_lib.param_count(abstract.params))
  loader_settings = settings_lib.LoaderSettings.from_config(c)
  loader = make_train_loader(
      loader_settings,
      encoder.tokenize,
      data_start(loader_settings, saved_position, step),
      embedding_lookup=text_cache.get_batch if text_cache else None,
  )

  train_step = program.step

  # Rows past the start step were logged by a run that died before checkpointing them.
  writer = metric_writers.MetricWriter(workdir, start_step=step)
  sampler = _Sampler(stage, encoder, mesh, c.sample) if c.train.sample_every else None

  def save(step: int) -> None:
    train_state, ema = state.checkpoint_items()
    ckpt.save(
        step,
        train_state=train_state,
        ema_params=ema,
        data_position={
            "next_example": loader.position,
            "global_batch_size": int(c.train.global_batch_size),
            "num_records": loader.num_records,
            "seed": int(c.train.seed),
            "shuffle": bool(c.data.shuffle),
        },
        config_dict=config_dict,
    )

  preemption = _Preemption(int(c.train.preemption_check_every))
  preemption.install()
  history, pending = [], []
  preempted = False
  skipped: list[int] = []  # steps whose update was skipped (non-finite loss or grad norm)
  checked = 0  # entries of `pending` whose `finite` flag has been read
  in_a_row = 0  # non-finite steps in a row
  max_in_a_row = int(c.train.max_nonfinite_steps)
  bar = tqdm(
      total=int(c.train.num_steps),
      initial=step,
      unit="step",
      disable=not (is_main and c.train.progress_bar),
      dynamic_ncols=True,
  )
  t_log, steps_since = time.perf_counter(), 0
  # train.profile_steps: a jax.profiler trace beside the scalars (imagen_jax.profiling).
  profile = profiling.StepWindow(c.train.profile_steps, paths.join(workdir, "tensorboard"))

  def check_finite():
    """Reads the `finite` flags not read yet; raises per `train.nonfinite` (see module doc)."""
    nonlocal checked, in_a_row
    for s, m in pending[checked:]:
      m = jax.device_get(m)
      if int(m["finite"]):
        in_a_row = 0
        continue
      if c.train.nonfinite == "stop":
        raise NonFiniteLossError(
            f"non-finite loss at step {s} (loss={float(m['loss'])}, grad_norm="
            f"{float(m['grad_norm'])}); the update was not applied. Set "
            "train.nonfinite='skip' to skip such steps, or lower optim.learning_rate."
        )
      skipped.append(s)
      in_a_row += 1
      if in_a_row >= max_in_a_row:
        raise NonFiniteLossError(
            f"{in_a_row} non-finite steps in a row ({s - in_a_row + 1}..{s}) with "
            f"train.nonfinite='skip' (train.max_nonfinite_steps={max_in_a_row}): the run "
            f"diverged; no update was applied since step {s - in_a_row}. Lower "
            "optim.learning_rate (or clip gradients) and resume, or retrain."
        )
    checked = len(pending)

  def flush():
    nonlocal t_log, steps_since, checked
    if not pending:
      return
    check_finite()
    row = _mean_metrics(pending)
    row["nonfinite_steps_total"] = float(len(skipped))
    dt = time.perf_counter() - t_log
    row["steps_per_sec"] = steps_since / dt
    row["images_per_sec"] = steps_since * c.train.global_batch_size / dt
    writer.write_scalars(pending[-1][0], row)
    history.append({"step": pending[-1][0], **row})
    bar.set_postfix(loss=f"{row['loss']:.4f}")
    pending.clear()
    checked = 0
    t_log, steps_since = time.perf_counter(), 0

  try:
    while step < c.train.num_steps:
      host_batch = next(loader)
      batch = pipeline.to_global_batch(host_batch, mesh, batch_axes)
      with profile.before(step + 1):
        state, metrics = train_step(state, batch, step_rng, encoder.params)
      step += 1
      profile.after(step, metrics)
      steps_since += 1
      pending.append((step, metrics))
      bar.update(1)
      if sampler is not None and sampler.batch is None:
        sampler.keep(batch, host_batch.get("caption"))
      for hook in hooks:
        hook(step, state, metrics)
      if len(pending) - checked >= max_in_a_row:
        check_finite()  # a diverged run stops within max_nonfinite_steps, whatever log_every
      if settings_lib.every(step, c.train.log_every) or step == c.train.num_steps:
        flush()
      if sampler is not None and settings_lib.every(step, c.train.sample_every):
        flush()
        writer.write_images(step, sampler(state, encoder.params, sample_rng))
        if sampler.captions:
          writer.write_text(step, "ema_samples_prompts", "\n".join(sampler.captions))
      if preemption.reached(step):
        flush()
        save(step)
        ckpt.wait()
        logging.warning("preempted (SIGTERM): saved step %d on every process, exiting", step)
        preempted = True
        break
      if settings_lib.every(step, c.train.ckpt_every) or step == c.train.num_steps:
        flush()  # never checkpoint past an unreported non-finite step
        save(step)
    flush()
    if not preempted and ckpt.latest_step() != step:
      save(step)
  finally:
    profile.close()
    preemption.uninstall()
    bar.close()
    try:
      ckpt.close()  # a save failure surfaces here once (not again if already raised)
    finally:
      writer.close()
    # (the text cache stays open: grain's reader threads may still be prefetching with it)
  if skipped:
    logging.warning(
        "%d of the steps of this run were non-finite and skipped (no update applied): %s%s",
        len(skipped),
        skipped[:20],
        " ..." if len(skipped) > 20 else "",
    )
  return {
      "step": step,
      "history": history,
      "preempted": preempted,
      "state": state,
      "skipped_steps": skipped,
  }


def make_sample_fn(
    stage: Stage, encode_tokens: Callable | None, settings: SamplingSettings
) -> Callable:
  """`sample(ema_params, text_params, batch, rng) -> images [N, H, W, C]` (pure; jit it).

  Periodic EMA sample grids (a progress check, not the paper's evaluation) with `settings`
  (the config's `sample` section): prompts are the text of real training examples (`batch`:
  `text_ids` / `text_mask` or `text_emb`, `image` for the size), SR stages condition on those
  examples' real low-res images at `settings.aug_level` (§2.4), guided by
  `settings.guidance_weight` (§2.2).
  """

  def sample(ema_params, text_params, batch, rng):
    emb, mask = stage.text_embeddings(batch, encode_tokens, text_params)
    shape = batch["image"].shape  # [N, H, W, C]
    k_noise, k_aug, k_sample = jax.random.split(rng, 3)
    lowres = aug = aug_noise = None
    if stage.is_sr:
      lowres = batch["lowres"]
      aug = jnp.full(shape[:1], settings.aug_level, jnp.float32)
      aug_noise = jax.random.normal(k_aug, shape, jnp.float32)
    cond = stage.condition(emb, mask, lowres, aug_level=aug, aug_noise=aug_noise)
    noise = jax.random.normal(k_noise, shape, jnp.float32)
    return stage.sample(ema_params, cond, noise, k_sample, settings)

  return sample


class _Sampler:
  """EMA sample grids of `sample.num_images` training examples (prompts + SR low-res)."""

  def __init__(self, stage: Stage, encoder, mesh, sample_config):
    self.n = int(sample_config.num_images)
    self.mesh = mesh
    self.batch = None
    self.captions: list[str] = []
    replicated = NamedSharding(mesh, P())
    settings = SamplingSettings.from_config(sample_config)
    fn = make_sample_fn(stage, encoder.encode_tokens, settings)
    # The grid program takes the layouts of its inputs (no activation constraints).
    self._sample = sharding_lib.mesh_jit(
        fn, mesh, (), name="ema_samples", out_shardings=replicated, constrain_activations=False
    )
    self._take = ready.ReadyJit(
        jax.jit(lambda b: jax.tree.map(lambda x: x[: self.n], b), out_shardings=replicated),
        "ema_sample_batch",
    )

  def keep(self, batch: dict, captions=None) -> None:
    """Holds the first `n` examples of `batch` (process 0's host batch comes first in the
    global batch, so its `captions` - kept with data.keep_caption - are their prompts)."""
    if self.n > next(iter(batch.values())).shape[0]:
      raise ValueError(f"sample.num_images={self.n} exceeds the global batch")
    self.batch = self._take(batch)
    if captions is not None and len(captions) >= self.n:
      self.captions = [str(c) for c in list(captions)[: self.n]]

  def __call__(self, state, text_params, rng) -> dict:
    images = self._sample(
        state.ema_params, text_params, self.batch, jax.random.fold_in(rng, state.step)
    )
    out = {
        "ema_samples": np.asarray(jax.device_get(images)),
        "real_images": np.asarray(jax.device_get(self.batch["image"])),
    }
    if "lowres" in self.batch:
      out["real_lowres"] = np.asarray(jax.device_get(self.batch["lowres"]))
    return out
