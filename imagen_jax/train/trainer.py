"""`train_and_evaluate(config, workdir)`: train one cascade stage, resumably, on any mesh.

Each Imagen stage (base 64x64, SR 64->256, SR 256->1024) trains as an independent job
(Imagen §4.1: batch 2048, 2.5M steps; 256 TPU-v4 chips for the base model, 128 per SR model).
One run:
  1. mesh from `config.mesh` (data, fsdp[, tensor]); frozen text encoder placed by the same
     logical rules;
  2. the train state, either restored from the workdir's latest complete checkpoint (after
     checking it was written for this model) or initialised straight into its shardings;
  3. the data: `train.data_shards` grain loaders (one per process by default) whose host
     batches become one global batch sharded over the batch axes;
  4. the loop: jitted `train_step`, metrics (loss, grad norm, lr, steps/s, images/s) to
     TensorBoard + JSONL, EMA sample grids as PNG, async Orbax checkpoints every
     `train.ckpt_every` steps, at the end and on SIGTERM.

Exactness of resume: the step's randomness is `fold_in(key(seed), step)` and the data iterator
positions are stored in the checkpoint, so a run restarted from step k replays exactly the
steps an uninterrupted run would have taken.
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
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax import checkpoint as ckpt_lib
from imagen_jax import metrics as metrics_lib
from imagen_jax.data import pipeline
from imagen_jax.nn import unet
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import sharding as sharding_lib
from imagen_jax.text import cache as text_cache_lib
from imagen_jax.text import registry
from imagen_jax.train import optim, sampling
from imagen_jax.train import state as state_lib
from imagen_jax.train import step as step_lib

NONFINITE = ("stop", "skip")
Hook = Callable[[int, Any, dict], None]


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm was NaN/inf (with `train.nonfinite='stop'`)."""


def config_to_dict(config) -> dict:
  """The config as plain JSON data (what is written to the workdir and the checkpoint)."""
  return json.loads(config.to_json_best_effort())


def train_sizes(config) -> tuple[int, int]:
  """(image, lowres) sides the network trains at; SR1024 trains on aligned crops (F.3)."""
  crop = int(config.data.get("sr_crop_size", 0) or 0)
  image, lowres = int(config.image_size), int(config.lowres_size or 0)
  if crop and lowres:
    return crop, crop * lowres // image
  return image, lowres


class _Preemption:
  """SIGTERM -> a flag the loop polls (the handler itself does no work: it may interrupt
  anything, including a half-written checkpoint)."""

  def __init__(self):
    self.flag = False
    self._previous = None

  def install(self) -> None:
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

  def reached(self, step: int, every: int) -> bool:
    """True on every process once any process got SIGTERM (checked every `every` steps)."""
    if jax.process_count() == 1:
      return self.flag
    if every > 1 and step % every:
      return False
    flags = multihost_utils.process_allgather(np.asarray([int(self.flag)], np.int32))
    return bool(np.max(flags))


class _ShardedLoader:
  """Global-batch feeder from `data_shards` grain loaders, this process's share of them.

  Shard s of S reads the records of grain shard s (`make_loader(process_index=s,
  process_count=S)`); process p owns shards [p*k, (p+1)*k) with k = S / process_count and
  concatenates their batches in order, so the global batch, and hence the whole run, is the
  same for any number of processes (our choice; with S = process_count it is the plain
  one-loader-per-host setup).
  """

  def __init__(self, config, tokenizer, num_shards: int, embedding_lookup=None):
    pc, pi = jax.process_count(), jax.process_index()
    num_shards = num_shards or pc
    if num_shards % pc:
      raise ValueError(
          f"train.data_shards={num_shards} must be a multiple of the " f"process count {pc}"
      )
    k = num_shards // pc
    lowres = int(config.lowres_size or 0) or None
    self.loaders = [
        pipeline.make_loader(
            config.data,
            image_size=int(config.image_size),
            lowres_size=lowres,
            global_batch_size=int(config.train.global_batch_size),
            tokenizer=None if embedding_lookup else tokenizer,
            embedding_lookup=embedding_lookup,
            seed=int(config.train.seed),
            process_index=s,
            process_count=num_shards,
        )
        for s in range(pi * k, (pi + 1) * k)
    ]

  def __next__(self) -> dict:
    batches = [next(it) for it in self.loaders]
    if len(batches) == 1:
      return batches[0]
    return {key: np.concatenate([b[key] for b in batches], axis=0) for key in batches[0]}

  def get_state(self) -> dict:
    return {"shards": [it.get_state() for it in self.loaders]}

  def set_state(self, state: dict) -> None:
    shards = state.get("shards") if isinstance(state, dict) else None
    if shards is None or len(shards) != len(self.loaders):
      raise ckpt_lib.CheckpointMismatchError(
          f"checkpointed data state has {None if shards is None else len(shards)} shard "
          f"positions for this process, the run has {len(self.loaders)} "
          "(train.data_shards or the process count changed?)"
      )
    for it, s in zip(self.loaders, shards):
      it.set_state(s)


def _mean_metrics(pending: Sequence[tuple[int, dict]]) -> dict:
  rows = jax.device_get([m for _, m in pending])
  out = {k: float(np.mean([r[k] for r in rows])) for k in ("loss", "grad_norm")}
  out["lr"] = float(rows[-1]["lr"])
  out["text_kept"] = float(np.mean([r["text_kept"] for r in rows]))
  out["nonfinite_steps"] = float(sum(1 - int(r["finite"]) for r in rows))
  return out


def _first_nonfinite(pending: Sequence[tuple[int, dict]]) -> tuple[int, dict] | None:
  for step, m in pending:
    m = jax.device_get(m)
    if not int(m["finite"]):
      return step, m
  return None


def open_text_cache(text_config, encoder) -> text_cache_lib.TextEmbeddingCache | None:
  """The `text.embedding_cache` of the stage (None when unset), checked against `encoder`.

  With a cache the step reads precomputed embeddings instead of running the frozen encoder
  (on the 2-core CPU demo the tiny encoder alone is ~12% of the base stage's step).
  """
  path = text_config.get("embedding_cache", "")
  if not path:
    return None
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
    {"step": last step, "history": logged metric rows, "preempted": bool}.
  """
  c = config
  if c.train.nonfinite not in NONFINITE:
    raise ValueError(f"train.nonfinite={c.train.nonfinite!r}; allowed: {NONFINITE}")
  config_dict = config_to_dict(c)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)

  mesh = mesh_lib.make_mesh(dict(c.mesh.shape))
  rules = tuple(tuple(r) for r in c.mesh.logical_axis_rules)
  batch_axes = sharding_lib.batch_axes(rules, mesh)
  num_batch_shards = int(np.prod([mesh.shape[a] for a in batch_axes])) if batch_axes else 1
  if c.train.global_batch_size % num_batch_shards:
    raise ValueError(
        f"train.global_batch_size={c.train.global_batch_size} is not divisible "
        f"by the {num_batch_shards} batch shards of mesh {dict(mesh.shape)}"
    )
  logging.info("mesh %s on %d processes", dict(mesh.shape), jax.process_count())

  encoder = registry.get_text_encoder(c.text, mesh=mesh, rules=rules)
  text_shardings = encoder.param_shardings(mesh, rules)
  model = unet.build_model(c.model)
  tx, lr_schedule = optim.make_optimizer(c.optim, c.train.num_steps)
  image_size, lowres_size = train_sizes(c)
  inputs = state_lib.model_inputs(
      batch=1,
      image_size=image_size,
      lowres_size=lowres_size,
      text_len=encoder.max_length,
      text_dim=encoder.dim,
  )
  abstract, specs = state_lib.state_specs(
      model, tx, inputs, mesh, rules, fsdp_min_size=int(c.mesh.fsdp_min_size)
  )
  shardings = sharding_lib.to_named(specs, mesh)

  text_cache = open_text_cache(c.text, encoder)
  loader = _ShardedLoader(
      c,
      encoder.tokenize,
      int(c.train.data_shards),
      embedding_lookup=text_cache.get_batch if text_cache else None,
  )
  ckpt = ckpt_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=int(c.train.max_to_keep)
  )
  base_rng = jax.random.key(int(c.train.seed))
  init_rng, step_rng, sample_rng = jax.random.split(base_rng, 3)
  latest = ckpt.latest_step()
  if latest is not None:
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    state, data_state = ckpt.restore(latest, target, config_dict=config_dict)
    loader.set_state(data_state)
    logging.info("resumed from %s at step %d", ckpt.directory, latest)
  else:
    init = jax.jit(state_lib.make_init_fn(model, tx, inputs), out_shardings=shardings)
    # Runs once, so on CPU skip XLA's backend optimizations: the demo base stage's init
    # compiles in 4 s instead of 19 (same values up to float rounding).
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    state = init.lower(init_rng).compile(options)(init_rng)
  # Written once the checkpoint (if any) is known to fit this config: a refused resume leaves
  # the workdir's config.json describing its checkpoints.
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_dict, f, indent=2, sort_keys=True)
  step = int(jax.device_get(state.step))
  logging.info("%d params", state_lib.param_count(abstract.params))

  step_fn = step_lib.make_train_step(
      model=model,
      tx=tx,
      lr_schedule=lr_schedule,
      config=c,
      encode_tokens=None if text_cache else encoder.encode_tokens,
  )
  batch_sharding = NamedSharding(mesh, P(batch_axes or None))
  train_step = step_lib.jit_train_step(
      step_fn,
      mesh=mesh,
      rules=rules,
      state_shardings=shardings,
      batch_shardings=batch_sharding,
      text_shardings=text_shardings,
      constrain_activations=bool(c.mesh.constrain_activations),
  )

  writer = metrics_lib.MetricWriter(workdir)
  sampler = _Sampler(c, model, encoder, mesh) if c.train.sample_every else None
  preemption = _Preemption()
  preemption.install()
  history, pending = [], []
  preempted = False
  from tqdm import tqdm  # local: only the loop needs it

  bar = tqdm(
      total=int(c.train.num_steps),
      initial=step,
      unit="step",
      disable=not (is_main and c.train.progress_bar),
      dynamic_ncols=True,
  )
  t_log, steps_since = time.perf_counter(), 0

  def flush():
    nonlocal t_log, steps_since
    if not pending:
      return
    bad = _first_nonfinite(pending)
    if bad is not None and c.train.nonfinite == "stop":
      s, m = bad
      raise NonFiniteLossError(
          f"non-finite loss at step {s} (loss={float(m['loss'])}, grad_norm="
          f"{float(m['grad_norm'])}); the update was not applied. Set "
          "train.nonfinite='skip' to skip such steps, or lower optim.learning_rate."
      )
    row = _mean_metrics(pending)
    dt = time.perf_counter() - t_log
    row["steps_per_sec"] = steps_since / dt
    row["images_per_sec"] = steps_since * c.train.global_batch_size / dt
    writer.write_scalars(pending[-1][0], row)
    history.append({"step": pending[-1][0], **row})
    bar.set_postfix(loss=f"{row['loss']:.4f}")
    pending.clear()
    t_log, steps_since = time.perf_counter(), 0

  try:
    while step < c.train.num_steps:
      host_batch = next(loader)
      batch = pipeline.to_global_batch(host_batch, mesh, batch_axes)
      state, metrics = train_step(state, batch, step_rng, encoder.params)
      step += 1
      steps_since += 1
      pending.append((step, metrics))
      bar.update(1)
      if sampler is not None and sampler.batch is None:
        sampler.keep(batch, host_batch.get("caption"))
      for hook in hooks:
        hook(step, state, metrics)
      if step % c.train.log_every == 0 or step == c.train.num_steps:
        flush()
      if sampler is not None and step % c.train.sample_every == 0:
        flush()
        writer.write_images(step, sampler(state, encoder.params, sample_rng))
        if sampler.captions:
          writer.write_text(step, "ema_samples_prompts", "\n".join(sampler.captions))
      if preemption.reached(step, int(c.train.preemption_check_every)):
        flush()
        ckpt.save(step, state, data_state=loader.get_state(), config_dict=config_dict)
        ckpt.wait()
        logging.warning("SIGTERM: saved step %d, exiting", step)
        preempted = True
        break
      if step % c.train.ckpt_every == 0 or step == c.train.num_steps:
        flush()  # never checkpoint past an unreported non-finite step
        ckpt.save(step, state, data_state=loader.get_state(), config_dict=config_dict)
    flush()
    if not preempted and ckpt.latest_step() != step:
      ckpt.save(step, state, data_state=loader.get_state(), config_dict=config_dict)
  finally:
    preemption.uninstall()
    bar.close()
    ckpt.close()
    writer.close()
    # (the text cache stays open: grain's reader threads may still be prefetching with it)
  return {"step": step, "history": history, "preempted": preempted, "state": state}


class _Sampler:
  """EMA sample grids of `sample.num_images` training examples (prompts + SR low-res)."""

  def __init__(self, config, model, encoder, mesh):
    self.n = int(config.sample.num_images)
    self.mesh = mesh
    self.batch = None
    self.captions: list[str] = []
    replicated = NamedSharding(mesh, P())
    fn = sampling.make_sample_fn(
        model=model,
        config=config,
        schedule=step_lib.make_schedule(config.diffusion),
        encode_tokens=encoder.encode_tokens,
    )
    self._sample = jax.jit(fn, out_shardings=replicated)
    self._take = jax.jit(lambda b: jax.tree.map(lambda x: x[: self.n], b), out_shardings=replicated)

  def keep(self, batch: dict, captions=None) -> None:
    """Holds the first `n` examples of `batch` (process 0's host batch comes first in the
    global batch, so its `captions` - kept with data.keep_caption - are their prompts)."""
    if self.n > next(iter(batch.values())).shape[0]:
      raise ValueError(f"sample.num_images={self.n} exceeds the global batch")
    self.batch = self._take(batch)
    if captions is not None and len(captions) >= self.n:
      self.captions = [str(c) for c in list(captions)[: self.n]]

  def __call__(self, state, text_params, rng) -> dict:
    with jax.set_mesh(self.mesh):
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
