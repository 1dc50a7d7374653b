"""Cascade sampling: prompts -> frozen text encoder -> stage 1 -> (SR stage 2) -> (SR stage 3).

Imagen §2.4 / Fig. A.4: a base text->image model followed by text-conditioned super-resolution
models, each sampled with its own sampler, number of steps, guidance weight (§2.2) and
thresholding (§2.3), and each SR stage conditioned on the previous stage's output, upsampled
and noise-augmented at a chosen `aug_level` (noise conditioning augmentation, §2.4, App. D.2).

Stages train as independent jobs (`imagen_jax.train`); the cascade exists only here. Each stage
is loaded from its training workdir: the config recorded in its checkpoint must agree with the
workdir's `config.json` on every field that defines the stage's meaning
(`run_meaning.MEANING_FIELDS`: network, diffusion schedule / target, text encoder, sizes), the
network is rebuilt from it, and the EMA params of the latest complete checkpoint are restored.
The cascade's text encoder must have the weights the stages were trained with (their recorded
`text.fingerprint`). Any prefix of the cascade runs (only stage 1, stages 1-2, ...), so a partly
trained cascade is usable.

Determinism: sample i of a call draws its initial noise (and, for stochastic samplers, its
per-step noise) from `fold_in(stage_key, i)`, so the images do not depend on the batch they are
drawn in or on the number of devices, and the same seed gives the same images.

Devices: the cascade samples on a (data, fsdp, tensor) mesh (`stage_sampler`): each stage's
EMA params are restored straight into their shards (`Stage.param_specs`, ZeRO-3 style; no
replicated copies, nothing whole on one device), the frozen T5 encoder's params are sharded by
their logical specs and it encodes on the mesh, and each batch of prompts is split over the
mesh axes that the logical `batch` axis maps to. The jitted samplers are the building blocks of
`stage_sampler`, so what is compiled ahead of time for a TPU slice is what runs here. The
mesh holds this process's devices: a multi-host job gives each process its own prompts (e.g.
`first_index` = the process's offset).

Editing (`diffusion.editing`): `sample(..., init_image=, mask=, edit=)` inpaints (RePaint; mask
1 = known, imagen-pytorch's convention) and / or runs image-to-image (SDEdit, `edit.strength`)
at every stage, the image and mask given at the last stage's size and resized to each stage's
(`editing.resize_image`, `editing.resize_mask`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from imagen_jax import checkpoint as ckpt_lib
from imagen_jax import paths, run_meaning
from imagen_jax.diffusion import editing
from imagen_jax.parallel import ready
from imagen_jax.parallel import sharding as sharding_lib
from imagen_jax.sampling import deepfloyd_stage
from imagen_jax.sampling import stage_sampler as ss
from imagen_jax.stage import SamplingSettings, Stage
from imagen_jax.text import registry

Array = jax.Array


class StageLoadError(ValueError):
  """A cascade stage's workdir is missing, incomplete, or does not fit the cascade."""


@dataclasses.dataclass
class LoadedStage:
  """One trained stage: the config it was trained with (read once, here, at load time), its
  stage layer (`imagen_jax.stage.Stage`, built from that config) and EMA params."""

  workdir: str
  config: ml_collections.ConfigDict
  stage: Stage
  params: Any
  step: int

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
  path = paths.join(workdir, "config.json")
  if not paths.path(path).exists():
    raise StageLoadError(
        f"no trained stage in {workdir!r}: {path} does not exist (train it "
        "with `python -m imagen_jax.train --config=... --workdir=...`)"
    )
  return ml_collections.ConfigDict(json.loads(paths.path(path).read_text()))


def stage_image_size(workdir: str) -> int:
  """The side of the images the stage in `workdir` makes (ours, or an IF U-Net folder)."""
  if deepfloyd_stage.is_diffusers_unet(workdir):
    return deepfloyd_stage.image_size(workdir)
  return int(read_stage_config(workdir).image_size)


def load_stage(
    workdir: str,
    step: int | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
    fsdp_min_size: int | None = None,
    deepfloyd=None,
) -> LoadedStage:
  """Rebuilds a stage from its recorded config and restores the EMA params alone.

  The config is the checkpoint's (what the weights were trained with); the workdir's
  `config.json` must agree with it on `run_meaning.MEANING_FIELDS` and then supplies the other
  settings (e.g. a moved `text.path`). The params' abstract tree comes from the stage layer; no
  optimizer is built and no optimizer state is read.

  The params are restored straight into their shards on `mesh` (default
  `stage_sampler.default_mesh()`), laid out by `rules` and `fsdp_min_size` (default: the
  stage config's `mesh.logical_axis_rules` / `mesh.fsdp_min_size`); the Orbax restore target
  carries the `NamedSharding`s, so no device ever holds a whole copy of a sharded param.

  A DeepFloyd IF U-Net folder (`deepfloyd_stage.is_diffusers_unet`) is loaded from its
  safetensors with the cascade's `deepfloyd` block (`deepfloyd_stage.load_stage`; step 0).

  Raises StageLoadError when the workdir holds no config or no complete checkpoint, and
  `checkpoint.CheckpointMismatchError` when config.json and the checkpoint disagree on the
  stage's meaning or the checkpoint's arrays do not fit it (`checkpoint.CheckpointLayoutError`
  when it was written by an older layout).
  """
  if deepfloyd_stage.is_diffusers_unet(workdir):  # a published IF U-Net (`deepfloyd` block)
    config, stage, params = deepfloyd_stage.load_stage(
        workdir, deepfloyd, mesh=mesh, rules=rules, fsdp_min_size=fsdp_min_size
    )
    return LoadedStage(workdir=workdir, config=config, stage=stage, params=params, step=0)
  json_path = paths.join(workdir, "config.json")
  ckpt_dir = paths.join(workdir, "checkpoints")
  json_exists, ckpt_exists = paths.path(json_path).exists(), paths.path(ckpt_dir).is_dir()
  if not json_exists and not ckpt_exists:
    read_stage_config(workdir)  # raises: no trained stage here
  if not ckpt_exists:
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
    if json_exists:
      config = read_stage_config(workdir)
      diffs = run_meaning.meaning_diff(recorded, config.to_dict())
      if diffs:
        raise ckpt_lib.CheckpointMismatchError(
            f"{json_path} and checkpoint step {step} disagree on what the stage is: "
            + run_meaning.format_meaning_diff(diffs, "in the checkpoint", "config.json has")
            + ". The checkpoint's config is what the weights were trained with: restore "
            "config.json from it (or remove config.json to use it as is)."
        )
    else:
      logging.warning("%s is missing: the stage's config is the checkpoint's", json_path)
      config = ml_collections.ConfigDict(recorded)
    stage = Stage.from_config(config)
    target = ss.abstract_stage_params(
        stage,
        ss.default_mesh() if mesh is None else mesh,
        sharding_lib.rules_from_config(config) if rules is None else rules,
        sharding_lib.fsdp_min_size_from_config(config) if fsdp_min_size is None else fsdp_min_size,
    )
    params = ckpt.restore_ema(step, target, config_dict=config.to_dict())
  finally:
    ckpt.close()
  return LoadedStage(workdir=workdir, config=config, stage=stage, params=params, step=step)


def stage_settings(cascade_config, num_stages: int | None = None) -> list[SamplingSettings]:
  """Each stage's `SamplingSettings` from a cascade config (configs/cascade.py): the blocks
  `stage1` .. `stage{num_stages}` (default: the config's `num_stages`). The one place a
  cascade config's sampling settings are read, for the CLI, the experiments and the AOT tools."""
  n = int(cascade_config.num_stages) if num_stages is None else int(num_stages)
  return [SamplingSettings.from_config(cascade_config[f"stage{k + 1}"]) for k in range(n)]


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


class Cascade:
  """A loaded cascade (a prefix of base -> SR -> SR) with one frozen text encoder, on a mesh."""

  def __init__(
      self,
      stages: Sequence[LoadedStage],
      devices: Sequence[Any] | None = None,
      *,
      mesh: jax.sharding.Mesh | None = None,
      mesh_shape: Mapping[str, int] | None = None,
      rules=None,
      fsdp_min_size: int | None = None,
  ):
    """Places the stages' params and the text encoder on the sampling mesh.

    Args:
      mesh: the (data, fsdp, tensor) mesh to sample on; default: `devices` (default: this
        process's devices) shaped `mesh_shape` (default `stage_sampler.DEFAULT_MESH_SHAPE`:
        all on fsdp, see there why).
      rules: logical axis rules of params, activations and the batch; default stage 1's config
        `mesh.logical_axis_rules` (one layout for the whole cascade).
      fsdp_min_size: the fsdp fallback threshold for every stage; default each stage config's
        `mesh.fsdp_min_size`.
    """
    check_cascade(stages)
    if mesh is not None and (devices is not None or mesh_shape is not None):
      raise ValueError("Cascade: pass mesh, or devices / mesh_shape, not both")
    self.mesh = ss.default_mesh(devices, mesh_shape) if mesh is None else mesh
    rules = sharding_lib.rules_from_config(stages[0].config) if rules is None else tuple(rules)
    self.rules = sharding_lib.rules_for_mesh(rules, self.mesh)
    self.fsdp_min_sizes = [
        sharding_lib.fsdp_min_size_from_config(s.config)
        if fsdp_min_size is None
        else int(fsdp_min_size)
        for s in stages
    ]
    # A no-op for params load_stage restored onto this layout; otherwise a reshard.
    self.stages = [
        dataclasses.replace(s, params=jax.device_put(s.params, self.param_shardings(s.stage, m)))
        for s, m in zip(stages, self.fsdp_min_sizes)
    ]
    self.encoder = registry.get_text_encoder(
        self.stages[0].config.text, mesh=self.mesh, rules=self.rules
    )
    check_text_encoder(self.stages, self.encoder)
    self._samplers: dict[tuple, ready.ReadyJit] = {}
    # Per stage: prompts per jitted call on this mesh, None = the call's batch_size.
    self.stage_batch_sizes: tuple[int | None, ...] = (None,) * len(self.stages)

  @classmethod
  def from_workdirs(
      cls,
      workdirs: Sequence[str],
      devices: Sequence[Any] | None = None,
      *,
      mesh: jax.sharding.Mesh | None = None,
      mesh_shape: Mapping[str, int] | None = None,
      rules=None,
      fsdp_min_size: int | None = None,
      deepfloyd=None,
  ) -> "Cascade":
    """Loads each stage's EMA params straight into its shards on the mesh (see `__init__`);
    `deepfloyd`: the cascade config's block for IF U-Net folders (`load_stage`)."""
    if mesh is not None and (devices is not None or mesh_shape is not None):
      raise ValueError("Cascade: pass mesh, or devices / mesh_shape, not both")
    mesh = ss.default_mesh(devices, mesh_shape) if mesh is None else mesh
    if rules is None and workdirs and deepfloyd_stage.is_diffusers_unet(workdirs[0]):
      rules = sharding_lib.rules_from_config(ml_collections.ConfigDict({"mesh": deepfloyd or {}}))
    elif rules is None:
      rules = sharding_lib.rules_from_config(read_stage_config(workdirs[0])) if workdirs else ()
    stages = [
        load_stage(w, mesh=mesh, rules=rules, fsdp_min_size=fsdp_min_size, deepfloyd=deepfloyd)
        for w in workdirs
    ]
    return cls(stages, mesh=mesh, rules=rules, fsdp_min_size=fsdp_min_size)

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  @property
  def batch_multiple(self) -> int:
    """Batches are padded to a multiple of this (the number of batch shards)."""
    return ss.batch_size_multiple(self.mesh, self.rules)

  def set_stage_batch_sizes(self, sizes: Sequence[int | None]) -> None:
    """Stage k's prompts per jitted call on this process's mesh, one entry per loaded stage
    (None: the call's `batch_size`); `sample` runs each batch of prompts through stage k in
    sub-batches of this many (at most the call's batch, rounded up to a multiple of
    `batch_multiple`). A memory setting: the samples do not change (sample i's noise comes from
    its index alone), e.g. a smaller batch for the 1024px stage (configs/cascade.py,
    `stageK.batch_size`; `parallel.hosts.application_batch_size` sets it from there)."""
    sizes = tuple(sizes)
    if len(sizes) != len(self.stages):
      raise ValueError(
          f"{len(sizes)} stage batch sizes for a {len(self.stages)}-stage cascade; give one each"
      )
    for k, b in enumerate(sizes, start=1):
      if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
        raise ValueError(f"stage {k} batch size {b!r}; allowed: None or an integer >= 1")
    self.stage_batch_sizes = sizes

  def param_shardings(self, stage: Stage, fsdp_min_size: int) -> Any:
    return ss.stage_param_shardings(stage, self.mesh, self.rules, fsdp_min_size)

  def _shard(self, x) -> Array:
    """`[B, ...]` -> split over the mesh's batch axes (B a multiple of `batch_multiple`)."""
    return jax.device_put(x, ss.batch_sharding(self.mesh, self.rules, np.ndim(x)))

  def encode(self, prompts: Sequence[str]) -> tuple[Array, Array]:
    """`(text_emb [B, L, D], text_mask [B, L])` on the mesh (B a multiple of `batch_multiple`)."""
    return self.encoder.encode(list(prompts))

  def _batch_inputs(self, prompts, negative_prompts, a, z, pad, first_index, deepfloyd):
    """Prompts `[a, z)` padded with `pad` empty ones, on the mesh: `(text_emb, text_mask,
    uncond | None, indices)` (`uncond`: the negative prompts' embeddings, or the null text's
    for DeepFloyd IF stages)."""
    emb, text_mask = self.encode(list(prompts[a:z]) + [""] * pad)
    uncond = None
    if negative_prompts is not None:
      uncond = self.encode(list(negative_prompts[a:z]) + [""] * pad)
    elif deepfloyd:
      uncond = self.encode([""] * (z - a + pad))
    idx = self._shard(np.arange(first_index + a, first_index + z + pad, dtype=np.int32))
    return emb, text_mask, uncond, idx

  def sampler(
      self,
      k: int,
      settings: SamplingSettings,
      edit: editing.EditSettings | None = None,
      negative: bool = False,
  ) -> ready.ReadyJit:
    """Stage k's (0-based) jitted sampler for `settings` (built once per static setting); with
    `edit`, the editing sampler; with `negative`, the one reading negative prompts
    (`stage_sampler.make_stage_sampler`)."""
    guided = settings.guidance_weight != 1.0
    static = dataclasses.replace(settings, guidance_weight=0.0)  # w is traced, not static
    key = (k, static, guided, edit, negative)
    if key not in self._samplers:
      self._samplers[key] = ss.make_stage_sampler(
          self.stages[k].stage,
          static,
          self.mesh,
          self.rules,
          guided=guided,
          fsdp_min_size=self.fsdp_min_sizes[k],
          edit=edit,
          negative=negative,
      )
    return self._samplers[key]

  def sample_stage(
      self,
      k: int,
      settings: SamplingSettings,
      text_emb: Array,
      text_mask: Array,
      key: Array,
      indices: Array,
      lowres: Array | None = None,
      *,
      init_image: Array | None = None,
      mask: Array | None = None,
      edit: editing.EditSettings | None = None,
      uncond: tuple[Array, Array] | None = None,
  ) -> Array:
    """Samples stage k (0-based) for a batch: `[B, S, S, 3]` in [-1, 1] on the mesh.

    Args:
      text_emb, text_mask: `[B, L, D]`, `[B, L]` from the shared frozen encoder.
      key: the stage's PRNG key; indices: `[B]` global sample indices (per-sample noise).
      lowres: `[B, s, s, 3]`, the previous stage's output (SR stages only).
      init_image, mask, edit: an edit at this stage's size S (`[B, S, S, 3]` in [-1, 1],
        `[B, S, S, 1]` in [0, 1] with 1 = known, or None; `editing.EditSettings`).
    """
    stage = self.stages[k]
    if stage.is_sr != (lowres is not None):
      raise ValueError(
          f"stage {stage.stage.name} {'needs' if stage.is_sr else 'takes no'} low-res input"
      )
    if lowres is not None and lowres.shape[1] != stage.lowres_size:
      raise ValueError(
          f"stage {stage.stage.name} expects {stage.lowres_size}px low-res "
          f"inputs, got {lowres.shape}"
      )
    w = np.float32(settings.guidance_weight)
    args = (stage.params, text_emb, text_mask, lowres, w, key, indices)
    negative = uncond is not None
    args += tuple(uncond) if negative else ()
    if init_image is None:
      if mask is not None or edit is not None:
        raise ValueError("an edit (mask / edit settings) needs init_image")
      return self.sampler(k, settings, negative=negative)(*args)
    edit = editing.EditSettings() if edit is None else edit
    s = stage.image_size
    editing.check_init_image(init_image, (len(indices), s, s, 3))
    if mask is not None:
      editing.check_mask(mask, (len(indices), s, s, 3))
    return self.sampler(k, settings, edit, negative)(*args, init_image, mask)

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
      init_image: np.ndarray | None = None,
      mask: np.ndarray | None = None,
      edit: editing.EditSettings | Sequence[editing.EditSettings] | None = None,
      negative_prompts: Sequence[str] | None = None,
  ) -> list[np.ndarray]:
    """Runs the cascade on `prompts`; returns one `[N, S_k, S_k, 3]` float array per stage.

    Args:
      settings: one `SamplingSettings` per stage (its length picks the cascade prefix).
      first_index: global index of the first prompt (per-sample seeds, for resumable sweeps).
      lowres: optional `[N, s, s, 3]` images in [-1, 1] that replace stage 1's output (to run
        the SR stages alone on real low-res inputs); then `settings[0]` is for stage 2.
      batch_size: prompts per batch, rounded up to a multiple of `batch_multiple` (a short
        batch is padded with empty prompts whose samples are dropped); stage k runs each batch
        in sub-batches of its own size when `stage_batch_sizes` sets one (smaller batches for
        the larger images; the text is encoded once per sub-batch size).
      init_image: optional image to edit, `[S, S, 3]` (one for all prompts) or `[N, S, S, 3]`,
        in [-1, 1], at the last stage's size S; each stage gets it resized
        (`editing.resize_image`). Alone (or with `edit.strength` < 1): image-to-image.
      mask: optional inpainting mask `[S, S]`, `[S, S, 1]`, `[N, S, S]` or `[N, S, S, 1]` in
        [0, 1], 1 = known (kept), 0 = regenerated; resized per stage by `editing.resize_mask`.
      edit: `editing.EditSettings` (strength, resample_steps) for every stage, or one per stage;
        default `EditSettings()` when `init_image` is given.
      negative_prompts: one per prompt, or None: the unconditional half of guidance reads their
        embeddings instead of the null text. DeepFloyd IF stages always read a prompt's
        embedding there (their pipeline's: "" when none is given).
    """
    offset = 1 if lowres is not None else 0
    n_stages = len(settings)
    if not 1 <= n_stages + offset <= len(self.stages):
      raise ValueError(
          f"got {n_stages} stage settings for a {len(self.stages)}-stage "
          f"cascade{' starting at stage 2' if offset else ''}"
      )
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
      raise ValueError(
          f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts; give one each"
      )
    sizes = [self.stages[k + offset].image_size for k in range(n_stages)]
    init_image, mask, edits = editing.prepare_edit(init_image, mask, edit, len(prompts), sizes)
    m = self.batch_multiple
    batch_size = -(-batch_size // m) * m
    # Stage k's sub-batch: its own batch size (at most the call's), a multiple of m.
    stage_batches = [
        min(batch_size, -(-(self.stage_batch_sizes[k + offset] or batch_size) // m) * m)
        for k in range(n_stages)
    ]
    deepfloyd = [self.stages[k + offset].stage.is_deepfloyd for k in range(n_stages)]
    key = jax.random.key(seed)
    outs = [[] for _ in range(n_stages)]
    chunks = range(0, len(prompts), batch_size)
    for start in tqdm(chunks, desc="cascade", unit="batch", disable=not progress):
      n = min(batch_size, len(prompts) - start)
      chunk_image = chunk_mask = None
      if init_image is not None:
        chunk_image = init_image[start : start + n]
      if mask is not None:
        chunk_mask = mask[start : start + n]
      # The previous stage's output for this batch: on the host (its sub-batches re-cut for the
      # next stage's batch size) and, per sub-batch, on the mesh (handed on as it is).
      prev_host = None if lowres is None else np.asarray(lowres[start : start + n], np.float32)
      prev_dev: dict[tuple[int, int], Array] = {}
      inputs: dict[tuple[int, int], tuple] = {}  # per sub-batch: text, indices (stages share)
      for k, s in enumerate(settings):
        b = stage_batches[k]
        if k and b != stage_batches[k - 1]:
          inputs = {}  # other sub-batches than the previous stage's: encoded anew
        pieces = {}
        for a in range(0, n, b):
          z = min(a + b, n)
          pad = (-(z - a)) % m  # padded samples get the following indices; dropped after
          if (a, z) not in inputs:
            inputs[(a, z)] = self._batch_inputs(
                prompts, negative_prompts, start + a, start + z, pad, first_index, any(deepfloyd)
            )
          emb, text_mask, uncond, idx = inputs[(a, z)]
          prev = prev_dev.get((a, z))
          if prev is None and prev_host is not None:
            prev = self._shard(_pad_rows(prev_host[a:z], pad, 0.0))
          edit_kw = {}
          if chunk_image is not None:
            sub_mask = None if chunk_mask is None else _pad_rows(chunk_mask[a:z], pad, 1.0)
            edit_kw = dict(
                init_image=self._shard(
                    editing.resize_image(_pad_rows(chunk_image[a:z], pad, 0.0), sizes[k])
                ),
                mask=None
                if sub_mask is None
                else self._shard(editing.resize_mask(sub_mask, sizes[k])),
                edit=edits[k],
            )
          pieces[(a, z)] = self.sample_stage(
              k + offset,
              s,
              emb,
              text_mask,
              jax.random.fold_in(key, k + offset),
              idx,
              lowres=prev,
              uncond=uncond if negative_prompts is not None or deepfloyd[k] else None,
              **edit_kw,
          )
        prev_dev = pieces
        prev_host = np.concatenate([np.asarray(x)[: z - a] for (a, z), x in pieces.items()])
        outs[k].append(prev_host)
    return [np.concatenate(o) for o in outs]


def _pad_rows(x: np.ndarray, pad: int, value: float) -> np.ndarray:
  """`x [n, ...]` with `pad` rows of `value` appended (float32)."""
  x = np.asarray(x, np.float32)
  return np.concatenate([x, np.full((pad,) + x.shape[1:], value, np.float32)])
