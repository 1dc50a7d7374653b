"""Cascade sampling: prompts -> frozen text encoder -> stage 1 -> (SR stage 2) -> (SR stage 3).

Imagen §2.4 / Fig. A.4: a base text->image model followed by text-conditioned super-resolution
models, each sampled with its own sampler, number of steps, guidance weight (§2.2) and
thresholding (§2.3), and each SR stage conditioned on the previous stage's output, upsampled
and noise-augmented at a chosen `aug_level` (noise conditioning augmentation, §2.4, App. D.2).

Stages train as independent jobs (`imagen_jax.main`); the cascade exists only here. Each stage
is loaded from its training workdir: the config saved there (`config.json`) rebuilds the
network, and the EMA params of its latest complete checkpoint are restored. Any prefix of the
cascade runs (only stage 1, stages 1-2, ...), so a partly trained cascade is usable.

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
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagen_jax import checkpoint as ckpt_lib
from imagen_jax import denoiser
from imagen_jax.diffusion import forward, samplers, schedules
from imagen_jax.nn import unet
from imagen_jax.text import registry

Array = jax.Array


class StageLoadError(ValueError):
  """A cascade stage's workdir is missing, incomplete, or does not fit the cascade."""


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """How one stage is sampled (all static except `guidance_weight`, a traced scalar).

  guidance_weight: the paper's w (§2.2); 1 = no guidance.
  aug_level: noise-conditioning-augmentation level of the low-res input, in [0, 1] (SR only;
    §2.4: 0 gives the best FID, 0.1-0.3 the "best samples").
  """

  sampler: str = "ddim"
  num_steps: int = 50
  guidance_weight: float = 1.0
  threshold: str = "dynamic"
  percentile: float = 99.5
  eta: float = 0.0
  aug_level: float = 0.0

  @classmethod
  def from_config(cls, c) -> "SamplingSettings":
    return cls(
        sampler=str(c.sampler),
        num_steps=int(c.num_steps),
        guidance_weight=float(c.guidance_weight),
        threshold=str(c.threshold),
        percentile=float(c.percentile),
        eta=float(c.eta),
        aug_level=float(c.aug_level),
    )


@dataclasses.dataclass
class Stage:
  """One trained stage: its config, network and EMA params."""

  workdir: str
  config: ml_collections.ConfigDict
  model: Any
  params: Any
  step: int

  @property
  def is_sr(self) -> bool:
    return int(self.config.lowres_size) > 0

  @property
  def image_size(self) -> int:
    return int(self.config.image_size)

  @property
  def lowres_size(self) -> int:
    return int(self.config.lowres_size)

  @property
  def schedule(self) -> schedules.Schedule:
    d = self.config.diffusion
    if d.schedule == "cosine":
      return schedules.get_schedule(
          "cosine", logsnr_min=float(d.logsnr_min), logsnr_max=float(d.logsnr_max)
      )
    return schedules.get_schedule(
        d.schedule,
        beta_start=float(d.beta_start),
        beta_end=float(d.beta_end),
        num_steps=int(d.num_timesteps),
    )


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


def load_stage(workdir: str, step: int | None = None) -> Stage:
  """Rebuilds a stage's network from its saved config and restores its EMA params.

  Raises StageLoadError when the workdir holds no config or no complete checkpoint, and
  `checkpoint.CheckpointMismatchError` when the checkpoint does not fit the saved config.
  """
  # Local imports: the training package is only needed to rebuild the train-state structure.
  from imagen_jax.train import optim, trainer
  from imagen_jax.train import state as state_lib

  config = read_stage_config(workdir)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.all_steps():
      raise StageLoadError(
          f"no complete checkpoint{'' if step is None else f' at step {step}'} in "
          f"{os.path.join(workdir, 'checkpoints')} (complete steps: {ckpt.all_steps()})"
      )
    model = unet.build_model(config.model)
    tx, _ = optim.make_optimizer(config.optim, int(config.train.num_steps))
    image_size, lowres_size = trainer.train_sizes(config)
    inputs = state_lib.model_inputs(
        batch=1,
        image_size=image_size,
        lowres_size=lowres_size,
        text_len=int(config.text.max_length),
        text_dim=registry.text_dim(config.text),
    )
    abstract = jax.eval_shape(state_lib.make_init_fn(model, tx, inputs), jax.random.key(0))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract
    )
    state, _ = ckpt.restore(step, target, config_dict=config.to_dict())
  finally:
    ckpt.close()
  return Stage(workdir=workdir, config=config, model=model, params=state.ema_params, step=step)


def check_cascade(stages: Sequence[Stage]) -> None:
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


@functools.partial(
    jax.jit, static_argnames=("model", "schedule", "target", "image_size", "settings", "guided")
)
def _sample_stage(
    params,
    text_emb,
    text_mask,
    lowres,
    guidance_weight,
    key,
    indices,
    *,
    model,
    schedule,
    target,
    image_size,
    settings: SamplingSettings,
    guided: bool,
):
  shape = (image_size, image_size, 3)
  key_noise, key_aug, key_sampler = jax.random.split(key, 3)
  noise = initial_noise(key_noise, indices, shape)
  # One sampler noise stream per sample (used by stochastic samplers only).
  sample_keys = jax.vmap(lambda i: jax.random.fold_in(key_sampler, i))(indices)
  cond = {"text_emb": text_emb, "text_mask": text_mask}
  if lowres is not None:
    # §2.4: upsample the previous stage's output, then corrupt it with the forward process at
    # aug_level and tell the network the level.
    up = forward.upsample_lowres(lowres, (image_size, image_size))
    aug = jnp.full((up.shape[0],), settings.aug_level, jnp.float32)
    aug_noise = initial_noise(key_aug, indices, shape)
    cond["lowres"] = forward.noise_condition_augment(up, aug, aug_noise)
    cond["aug_level"] = aug
  w = guidance_weight if guided else 1.0
  denoise_fn = denoiser.make_denoise_fn(model, params, target=target, guidance_weight=w)
  return samplers.sample(
      denoise_fn,
      cond,
      noise,
      sample_keys,
      schedule=schedule,
      settings=samplers.SamplerSettings(
          sampler=settings.sampler,
          num_steps=settings.num_steps,
          eta=settings.eta,
          threshold=settings.threshold,
          percentile=settings.percentile,
      ),
  )


def sample_stage(
    stage: Stage,
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
      model=stage.model,
      schedule=stage.schedule,
      target=str(stage.config.diffusion.target),
      image_size=stage.image_size,
      settings=static,
      guided=guided,
  )


class Cascade:
  """A loaded cascade (a prefix of base -> SR -> SR) with one frozen text encoder."""

  def __init__(self, stages: Sequence[Stage], devices: Sequence[Any] | None = None):
    """devices: where to sample (default: all of this process's devices); batches are split
    over them and every stage's params are replicated on each."""
    check_cascade(stages)
    self.mesh = jax.sharding.Mesh(np.array(list(devices or jax.local_devices())), ("batch",))
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.stages = [
        dataclasses.replace(s, params=jax.device_put(s.params, replicated)) for s in stages
    ]
    self.encoder = registry.get_text_encoder(self.stages[0].config.text)

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


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] float images -> uint8 [0, 255] (round half up)."""
  return np.clip(np.floor((np.asarray(images) + 1.0) * 127.5 + 0.5), 0, 255).astype(np.uint8)
