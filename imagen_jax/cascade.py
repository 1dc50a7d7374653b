"""Cascade sampling: prompts -> frozen text encoder -> stage 1 -> (SR stage 2) -> (SR stage 3).

Imagen §2.4 / Fig. A.4: a base text->image model followed by text-conditioned super-resolution
models, each sampled with its own sampler, number of steps, guidance weight (§2.2) and
thresholding (§2.3), and each SR stage conditioned on the previous stage's output, upsampled
and noise-augmented at a chosen `aug_level` (noise conditioning augmentation, §2.4, App. D.2).

Stages train as independent jobs (`imagen_jax.main`); the cascade exists only here. Each stage
is loaded from its training workdir: the config recorded in its checkpoint must agree with the
workdir's `config.json` on every field that defines the stage's meaning
(`checkpoint.MEANING_FIELDS`: network, diffusion schedule / target, text encoder, sizes), the
network is rebuilt from it, and the EMA params of the latest complete checkpoint are restored.
The cascade's text encoder must have the weights the stages were trained with (their recorded
`text.fingerprint`). Any prefix of the cascade runs (only stage 1, stages 1-2, ...), so a partly
trained cascade is usable.

Determinism: sample i of a call draws its initial noise (and, for stochastic samplers, its
per-step noise) from `fold_in(stage_key, i)`, so the images do not depend on the batch they are
drawn in or on the number of devices, and the same seed gives the same images.

Devices: each batch is sharded over a 1-D mesh of this process's devices (axis "batch"; params
replicated), so one jitted sampler runs data-parallel on all local devices. A multi-host job
gives each process its own prompts (e.g. `first_index` = the process's offset).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagen_jax import checkpoint as ckpt_lib
from imagen_jax.stage import SamplingSettings, Stage
from imagen_jax.text import registry

Array = jax.Array


class StageLoadError(ValueError):
  """A cascade stage's workdir is missing, incomplete, or does not fit the cascade."""


@dataclasses.dataclass
class LoadedStage:
  """One trained stage: its stage layer (`imagen_jax.stage.Stage`) and EMA params."""

  workdir: str
  stage: Stage
  params: Any
  step: int

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.stage.config

  @property
  def is_sr(self) -> bool:
    return self.stage.is_sr

  @property
  def image_size(self) -> int:
    return self.stage.image_size

  @property
  def lowres_size(self) -> int:
    return self.stage.lowres_size


def read_stage_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a stage was trained with (`<workdir>/config.json`, written by the trainer)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise StageLoadError(
        f"no trained stage in {workdir!r}: {path} does not exist (train it "
        "with `python -m imagen_jax.main --config=... --workdir=...`)"
    )
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_stage(workdir: str, step: int | None = None) -> LoadedStage:
  """Rebuilds a stage from its recorded config and restores the EMA params alone.

  The config is the checkpoint's (what the weights were trained with); the workdir's
  `config.json` must agree with it on `checkpoint.MEANING_FIELDS` and then supplies the other
  settings (e.g. a moved `text.path`). The params' abstract tree comes from the stage layer; no
  optimizer is built and no optimizer state is read.

  Raises StageLoadError when the workdir holds no config or no complete checkpoint, and
  `checkpoint.CheckpointMismatchError` when config.json and the checkpoint disagree on the
  stage's meaning or the checkpoint's arrays do not fit it (`checkpoint.CheckpointLayoutError`
  when it was written by an older layout).
  """
  json_path = os.path.join(workdir, "config.json")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.exists(json_path) and not os.path.isdir(ckpt_dir):
    read_stage_config(workdir)  # raises: no trained stage here
  if not os.path.isdir(ckpt_dir):
    raise StageLoadError(f"no complete checkpoint in {ckpt_dir} (the directory does not exist)")
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.all_steps():
      raise StageLoadError(
          f"no complete checkpoint{'' if step is None else f' at step {step}'} in "
          f"{ckpt_dir} (complete steps: {ckpt.all_steps()})"
      )
    recorded = ckpt.saved_config(step)
    if os.path.exists(json_path):
      config = read_stage_config(workdir)
      diffs = ckpt_lib.meaning_diff(recorded, config.to_dict())
      if diffs:
        raise ckpt_lib.CheckpointMismatchError(
            f"{json_path} and checkpoint step {step} disagree on what the stage is: "
            + ckpt_lib.format_meaning_diff(diffs, "in the checkpoint", "config.json has")
            + ". The checkpoint's config is what the weights were trained with: restore "
            "config.json from it (or remove config.json to use it as is)."
        )
    else:
      logging.warning("%s is missing: the stage's config is the checkpoint's", json_path)
      config = ml_collections.ConfigDict(recorded)
    stage = Stage.from_config(config)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=device),
        stage.abstract_params(),
    )
    params = ckpt.restore_ema(step, target, config_dict=config.to_dict())
  finally:
    ckpt.close()
  return LoadedStage(workdir=workdir, stage=stage, params=params, step=step)


def check_text_encoder(stages: Sequence[LoadedStage], encoder) -> None:
  """Every stage was trained with `encoder`'s weights (its recorded `text.fingerprint`, §2.1:
  the frozen encoder is part of the model); a stage recording none is let through with a
  warning."""
  for i, s in enumerate(stages, start=1):
    want = s.config.text.get("fingerprint", None)
    if want is None:
      logging.warning(
          "stage %d (%s) records no text encoder fingerprint: its encoder weights are unverified",
          i,
          s.workdir,
      )
    elif want != encoder.fingerprint:
      raise StageLoadError(
          f"stage {i} ({s.workdir}) was trained with text encoder {s.config.text.name!r} weights "
          f"of fingerprint {want}, but text.path={s.config.text.get('path', None)!r} holds "
          f"weights of fingerprint {encoder.fingerprint}: other weights under the same name. "
          "Point text.path (in the stage's config.json) at the weights it was trained with."
      )


def check_cascade(stages: Sequence[LoadedStage]) -> None:
  """Stage 1 is a base stage, every later one an SR stage reading its predecessor's size, and
  all share one text encoder (the embeddings are computed once)."""
  if not stages:
    raise StageLoadError("a cascade needs at least one stage")
  if stages[0].is_sr:
    raise StageLoadError(
        f"stage 1 ({stages[0].workdir}) is an SR stage "
        f"({stages[0].config.stage}); the first stage must be text->image"
    )
  for i, (prev, cur) in enumerate(zip(stages, stages[1:]), start=2):
    if not cur.is_sr:
      raise StageLoadError(
          f"stage {i} ({cur.workdir}) is not an SR stage "
          f"({cur.config.stage}): stages after the first must take a low-res input"
      )
    if cur.lowres_size != prev.image_size:
      raise StageLoadError(
          f"stage {i} ({cur.workdir}) expects {cur.lowres_size}x{cur.lowres_size} inputs but "
          f"stage {i - 1} makes {prev.image_size}x{prev.image_size} images"
      )
  for i, s in enumerate(stages[1:], start=2):
    a, b = stages[0].config.text, s.config.text
    if (a.name, a.path, int(a.max_length)) != (b.name, b.path, int(b.max_length)):
      raise StageLoadError(
          f"stage {i} uses text encoder {b.name!r} (max_length "
          f"{b.max_length}) but stage 1 uses {a.name!r} ({a.max_length})"
      )


def initial_noise(key: Array, indices: Array, shape: tuple[int, ...]) -> Array:
  """N(0, I) noise for samples `indices` ([B] int): sample i uses fold_in(key, i)."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(indices)


@functools.partial(jax.jit, static_argnames=("stage", "settings", "guided"))
def _sample_stage(
    params,
    text_emb,
    text_mask,
    lowres,
    guidance_weight,
    key,
    indices,
    *,
    stage: Stage,
    settings: SamplingSettings,
    guided: bool,
):
  shape = (stage.image_size, stage.image_size, 3)
  key_noise, key_aug, key_sampler = jax.random.split(key, 3)
  noise = initial_noise(key_noise, indices, shape)
  # One sampler noise stream per sample (used by stochastic samplers only).
  sample_keys = jax.vmap(lambda i: jax.random.fold_in(key_sampler, i))(indices)
  aug = aug_noise = None
  if lowres is not None:
    # §2.4: the previous stage's output, upsampled and noise-augmented at aug_level.
    aug = jnp.full((lowres.shape[0],), settings.aug_level, jnp.float32)
    aug_noise = initial_noise(key_aug, indices, shape)
  cond = stage.condition(text_emb, text_mask, lowres, aug_level=aug, aug_noise=aug_noise)
  return stage.sample(
      params, cond, noise, sample_keys, settings, guidance_weight if guided else 1.0
  )


def sample_stage(
    stage: LoadedStage,
    settings: SamplingSettings,
    text_emb: Array,
    text_mask: Array,
    key: Array,
    indices: Array,
    lowres: Array | None = None,
) -> Array:
  """Samples one stage for a batch: `[B, S, S, 3]` in [-1, 1] (S = the stage's image size).

  Args:
    text_emb, text_mask: `[B, L, D]`, `[B, L]` from the shared frozen encoder.
    key: the stage's PRNG key; indices: `[B]` global sample indices (per-sample noise).
    lowres: `[B, s, s, 3]`, the previous stage's output (SR stages only).
  """
  if stage.is_sr != (lowres is not None):
    raise ValueError(
        f"stage {stage.config.stage} {'needs' if stage.is_sr else 'takes no'} " "low-res input"
    )
  if lowres is not None and lowres.shape[1] != stage.lowres_size:
    raise ValueError(
        f"stage {stage.config.stage} expects {stage.lowres_size}px low-res "
        f"inputs, got {lowres.shape}"
    )
  guided = settings.guidance_weight != 1.0
  static = dataclasses.replace(settings, guidance_weight=0.0)  # w is traced, not static
  return _sample_stage(
      stage.params,
      text_emb,
      text_mask,
      lowres,
      jnp.float32(settings.guidance_weight),
      key,
      indices,
      stage=stage.stage,
      settings=static,
      guided=guided,
  )


class Cascade:
  """A loaded cascade (a prefix of base -> SR -> SR) with one frozen text encoder."""

  def __init__(self, stages: Sequence[LoadedStage], devices: Sequence[Any] | None = None):
    """devices: where to sample (default: all of this process's devices); batches are split
    over them and every stage's params are replicated on each."""
    check_cascade(stages)
    self.mesh = jax.sharding.Mesh(np.array(list(devices or jax.local_devices())), ("batch",))
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.stages = [
        dataclasses.replace(s, params=jax.device_put(s.params, replicated)) for s in stages
    ]
    self.encoder = registry.get_text_encoder(self.stages[0].config.text)
    check_text_encoder(self.stages, self.encoder)

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  def _shard(self, x: Array) -> Array:
    """`[B, ...]` -> split over the mesh's batch axis (B a multiple of the device count)."""
    spec = jax.sharding.PartitionSpec("batch", *([None] * (x.ndim - 1)))
    return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, spec))

  @classmethod
  def from_workdirs(cls, workdirs: Sequence[str]) -> "Cascade":
    return cls([load_stage(w) for w in workdirs])

  def encode(self, prompts: Sequence[str]) -> tuple[Array, Array]:
    return self.encoder.encode(list(prompts))

  def sample(
      self,
      prompts: Sequence[str],
      settings: Sequence[SamplingSettings],
      *,
      seed: int = 0,
      batch_size: int = 64,
      first_index: int = 0,
      lowres: np.ndarray | None = None,
      progress: bool = True,
  ) -> list[np.ndarray]:
    """Runs the cascade on `prompts`; returns one `[N, S_k, S_k, 3]` float array per stage.

    Args:
      settings: one `SamplingSettings` per stage (its length picks the cascade prefix).
      first_index: global index of the first prompt (per-sample seeds, for resumable sweeps).
      lowres: optional `[N, s, s, 3]` images in [-1, 1] that replace stage 1's output (to run
        the SR stages alone on real low-res inputs); then `settings[0]` is for stage 2.
      batch_size: prompts per jitted call, rounded up to a multiple of the device count (a
        short batch is padded with empty prompts whose samples are dropped).
    """
    from tqdm import tqdm

    offset = 1 if lowres is not None else 0
    n_stages = len(settings)
    if not 1 <= n_stages + offset <= len(self.stages):
      raise ValueError(
          f"got {n_stages} stage settings for a {len(self.stages)}-stage "
          f"cascade{' starting at stage 2' if offset else ''}"
      )
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_dev = self.num_devices
    batch_size = -(-batch_size // n_dev) * n_dev
    key = jax.random.key(seed)
    outs = [[] for _ in range(n_stages)]
    chunks = range(0, len(prompts), batch_size)
    for start in tqdm(chunks, desc="cascade", unit="batch", disable=not progress):
      chunk = list(prompts[start : start + batch_size])
      n = len(chunk)
      pad = (-n) % n_dev  # padded samples get the following indices; their outputs are dropped
      emb, mask = self.encode(chunk + [""] * pad)
      idx = jnp.arange(first_index + start, first_index + start + n + pad)
      prev = None
      if lowres is not None:
        prev = np.asarray(lowres[start : start + n], np.float32)
        prev = np.concatenate([prev, np.zeros((pad,) + prev.shape[1:], np.float32)])
        prev = self._shard(jnp.asarray(prev))
      emb, mask, idx = self._shard(emb), self._shard(mask), self._shard(idx)
      for k, s in enumerate(settings):
        stage = self.stages[k + offset]
        prev = sample_stage(
            stage, s, emb, mask, jax.random.fold_in(key, k + offset), idx, lowres=prev
        )
        outs[k].append(np.asarray(prev)[:n])
    return [np.concatenate(o) for o in outs]
