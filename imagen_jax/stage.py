"""One cascade stage: the layer that training and sampling both stand on.

From a stage config (`configs/<stage>.py`) a `Stage` holds

  * the network `model` (`nn.unet.build_model(config.model)`), which predicts in the stage's
    `target` space ("eps" as in the paper, or "v" / "x0"; `diffusion.parameterization.TARGETS`);
  * the logSNR `schedule` (cosine or linear_beta, App. A / F), `make_schedule`;
  * the kind: base (text -> image) or super-resolution (`is_sr`: `config.lowres_size > 0`);
  * the sizes: `image_size` / `lowres_size` at sampling time and `train_image_size` /
    `train_lowres_size` at training time (SR1024 trains on aligned crops, App. F.3);
  * the text input: `text_dim` D = `text.registry.text_dim(config.text)` (T5-XXL: 4096, §2.1)
    and `text_len` L = `config.text.max_length`.

It forms the network's conditioning once, for the train step, the in-training sample grids and
the cascade alike (`condition`):

    cond = {text_emb [B, L, D], text_mask bool [B, L]}                           (base)
    cond |= {lowres: a * up(x_lr) + s * noise [B, H, W, C], aug_level: aug [B]}   (SR, §2.4)

with a = cos(pi/2 * aug), s = sin(pi/2 * aug) (noise conditioning augmentation, App. D.2) and
`up` the bicubic upsampling to the output size; the null text of classifier-free guidance
(§2.2: zero embeddings, all-False mask) is `denoiser.null_text`, used both when training drops
the text (`drop_text`) and when sampling guides (`denoise_fn`).

And it owns the abstract param tree (`abstract_params`, `param_specs`, `init_params`): shapes
and logical axis names from `jax.eval_shape` of the network's init at the train sizes, so a
sampler restores EMA params without building an optimizer and a trainer creates every array
directly in its shard.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax import denoiser
from imagen_jax.diffusion import (
    discrete,
    forward,
    guidance,
    parameterization,
    samplers,
    schedules,
)
from imagen_jax.nn import unet
from imagen_jax.parallel import sharding as sharding_lib
from imagen_jax.text import registry

Array = jax.Array
CHANNELS = 3  # RGB in and out (the paper's stages are all RGB)


def make_schedule(diffusion_config) -> schedules.Schedule:
  """The stage's logSNR schedule from `config.diffusion` (cosine or linear_beta, App. A/F; IF's
  squaredcos_cap_v2)."""
  c = diffusion_config
  if c.schedule == "cosine":
    return schedules.get_schedule(
        "cosine", logsnr_min=float(c.logsnr_min), logsnr_max=float(c.logsnr_max)
    )
  if c.schedule == "linear_beta":
    return schedules.get_schedule(
        "linear_beta",
        beta_start=float(c.beta_start),
        beta_end=float(c.beta_end),
        num_steps=int(c.num_timesteps),
    )
  if c.schedule == "squaredcos_cap_v2":  # DeepFloyd IF's discrete table (diffusion/discrete.py)
    return schedules.get_schedule("squaredcos_cap_v2", num_steps=int(c.num_timesteps))
  raise ValueError(
      f"unknown diffusion.schedule {c.schedule!r}; allowed: cosine, linear_beta, squaredcos_cap_v2"
  )


def train_sizes(config) -> tuple[int, int]:
  """(image, lowres) sides the network trains at; SR1024 trains on aligned crops (F.3)."""
  crop = int(config.data.get("sr_crop_size", 0) or 0)
  image, lowres = int(config.image_size), int(config.lowres_size or 0)
  if crop and lowres:
    return crop, crop * lowres // image
  return image, lowres


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """How one stage is sampled (all static except `guidance_weight`, a traced scalar).

  guidance_weight: the paper's w (§2.2); 1 = no guidance.
  aug_level: noise-conditioning-augmentation level of the low-res input, in [0, 1] (SR only;
    §2.4: 0 gives the best FID, 0.1-0.3 the "best samples").
  sampler, num_steps, threshold, percentile, eta, time_grid, max_scale: the reverse process
    (`diffusion.samplers.SamplerSettings`, `sampler_settings()`); `max_scale` is DeepFloyd IF's
    cap c >= 1 on the dynamic-thresholding s (None = no cap), `time_grid` one of
    `samplers.TIME_GRIDS` ("karras": EDM's grid, Karras et al. 2022).
  guidance_schedule: w(t) per network call, "constant" (the paper) or "linear"
    (`guidance.guidance_weight_at`).
  guidance_rescale: CFG rescale phi in [0, 1] (Lin et al. 2023 §3.4,
    `guidance.rescale_guidance`); 0 = off.
  """

  sampler: str = "ddim"
  num_steps: int = 50
  guidance_weight: float = 1.0
  threshold: str = "dynamic"
  percentile: float = 99.5
  eta: float = 0.0
  aug_level: float = 0.0
  time_grid: str = "uniform_t"
  max_scale: float | None = None
  guidance_schedule: str = "constant"
  guidance_rescale: float = 0.0

  def __post_init__(self):
    # A NaN / inf w would make every guided eps, hence every image, NaN; inside the jitted
    # sampler w is traced and cannot be checked, so it is checked here.
    object.__setattr__(
        self, "guidance_weight", guidance.check_guidance_weight(self.guidance_weight)
    )
    if not 0.0 <= float(self.aug_level) <= 1.0:
      raise ValueError(f"aug_level={self.aug_level!r} must be in [0, 1] (§2.4)")
    guidance.check_guidance_schedule(self.guidance_schedule)
    object.__setattr__(
        self, "guidance_rescale", guidance.check_guidance_rescale(self.guidance_rescale)
    )

  def sampler_settings(self) -> samplers.SamplerSettings:
    """The sampler's own settings (checked there: a bad name or range is a clear error)."""
    return samplers.SamplerSettings(
        sampler=self.sampler,
        num_steps=self.num_steps,
        eta=self.eta,
        threshold=self.threshold,
        percentile=self.percentile,
        time_grid=self.time_grid,
        max_scale=self.max_scale,
    )

  @classmethod
  def from_config(cls, c) -> "SamplingSettings":
    """From a `sample` block (a cascade stage's, or a stage config's `sample` section; a
    block without `eta` / `time_grid` / the guidance extras gets the defaults: deterministic
    DDIM on uniform t, constant w, no rescale, no cap)."""
    max_scale = c.get("max_scale", None)
    return cls(
        sampler=str(c.sampler),
        num_steps=int(c.num_steps),
        guidance_weight=float(c.guidance_weight),
        threshold=str(c.threshold),
        percentile=float(c.percentile),
        eta=float(c.get("eta", cls.eta)),
        aug_level=float(c.aug_level),
        time_grid=str(c.get("time_grid", cls.time_grid)),
        max_scale=None if max_scale is None else float(max_scale),
        guidance_schedule=str(c.get("guidance_schedule", cls.guidance_schedule)),
        guidance_rescale=float(c.get("guidance_rescale", cls.guidance_rescale)),
    )


def override_settings(settings, overrides: dict) -> list[SamplingSettings]:
  """Every stage's `SamplingSettings` with the fields in `overrides` replaced (e.g. a CLI's
  `--sampler=heun` for all stages), each checked as it would be when sampling: a bad name or
  range raises ValueError / TypeError naming the value and what is allowed."""
  out = [dataclasses.replace(s, **overrides) for s in settings]
  for s in out:
    s.sampler_settings()
  return out


# eq=False: hashed by identity, so a Stage can be a static argument of jitted functions.
@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
  """One stage's network, schedule, target, kind, sizes and text input (see module doc).

  Typed fields only: `from_config` is the one place a stage config is read; the ConfigDict
  itself stays with whoever read it (the trainer, `sampling.cascade.LoadedStage`, the AOT
  tools). `name`: `config.stage`; `is_deepfloyd`: a published DeepFloyd IF U-Net
  (`model.kind == "deepfloyd"`: IF's lowres conditioning, and "ddpm" is IF's own DDPM with its
  learned variance, `diffusion.discrete`); `schedule_steps`: the discrete schedule's length
  (`diffusion.num_timesteps`, IF's 1000); `text_name`: the frozen encoder's registry name.
  """

  name: str
  model: nn.Module
  schedule: schedules.Schedule
  target: str
  is_sr: bool
  image_size: int
  lowres_size: int
  train_image_size: int
  train_lowres_size: int
  text_dim: int
  text_len: int
  text_name: str = ""
  is_deepfloyd: bool = False
  schedule_steps: int = discrete.NUM_TRAIN_TIMESTEPS

  @classmethod
  def from_config(cls, config, *, model: nn.Module | None = None) -> "Stage":
    """The stage of `config` (its network from `config.model` unless `model` is given)."""
    target = str(config.diffusion.target)
    if target not in parameterization.TARGETS:
      raise ValueError(
          f"unknown diffusion.target {target!r}; allowed: {', '.join(parameterization.TARGETS)}"
      )
    image, lowres = train_sizes(config)
    return cls(
        name=str(config.stage),
        model=unet.build_model(config.model) if model is None else model,
        schedule=make_schedule(config.diffusion),
        target=target,
        is_sr=int(config.lowres_size or 0) > 0,
        image_size=int(config.image_size),
        lowres_size=int(config.lowres_size or 0),
        train_image_size=image,
        train_lowres_size=lowres,
        text_dim=registry.text_dim(config.text),
        text_len=int(config.text.max_length),
        text_name=str(config.text.name),
        is_deepfloyd=str(config.model.kind) == "deepfloyd",
        schedule_steps=int(config.diffusion.get("num_timesteps", discrete.NUM_TRAIN_TIMESTEPS)),
    )

  # ----- conditioning (Imagen §2.2, §2.4, App. D.2) -----

  def text_embeddings(
      self, batch: dict, encode_tokens: Callable | None, text_params: Any
  ) -> tuple[Array, Array]:
    """(text_emb float32 [B, L, D], text_mask bool [B, L]) of a batch.

    From the batch's cached `text_emb` when present, else the frozen encoder
    `encode_tokens(text_params, text_ids [B, L], text_mask [B, L])` (never trained: a
    stop_gradient, §2.1).
    """
    mask = batch["text_mask"].astype(jnp.bool_)
    if "text_emb" in batch:
      emb = batch["text_emb"]
    elif encode_tokens is None:
      raise ValueError("the batch has no text_emb and no text encoder was given")
    else:
      emb = encode_tokens(text_params, batch["text_ids"], mask)
    if emb.shape[-1] != self.text_dim:
      raise ValueError(
          f"text embeddings of width D={emb.shape[-1]} for stage {self.name}, whose network "
          f"reads D={self.text_dim} (text.registry.text_dim of text.name={self.text_name!r})"
      )
    return jax.lax.stop_gradient(emb.astype(jnp.float32)), mask

  @staticmethod
  def drop_text(text_emb: Array, text_mask: Array, keep: Array) -> tuple[Array, Array]:
    """Replaces the text of examples with `keep [B] = False` by the null text (§2.2: what
    classifier-free guidance contrasts with; training drops it with p = text.drop_prob)."""
    null_emb, null_mask = denoiser.null_text(text_emb, text_mask)
    emb = jnp.where(keep[:, None, None], text_emb, null_emb)
    return emb, jnp.where(keep[:, None], text_mask, null_mask)

  def condition(
      self,
      text_emb: Array,
      text_mask: Array,
      lowres: Array | None = None,
      *,
      aug_level: Array | None = None,
      aug_noise: Array | None = None,
  ) -> dict[str, Array]:
    """The network's conditioning dict (the `cond` of `DenoiseFn(z_t, logsnr, cond)`).

    Args:
      text_emb, text_mask: `[B, L, D]`, `[B, L]`.
      lowres: SR stages only: `[B, h, w, C]` in [-1, 1] (the real low-res image in training,
        the previous stage's output when sampling).
      aug_level: `[B]` in [0, 1], the noise-conditioning-augmentation level (SR only).
      aug_noise: N(0, I) `[B, H, W, C]` at the output size H x W (SR only); the low-res image
        is upsampled to its size, then `lowres = cos(pi/2 aug) up + sin(pi/2 aug) aug_noise`.
    """
    cond = {"text_emb": text_emb, "text_mask": text_mask.astype(jnp.bool_)}
    if self.is_sr != (lowres is not None):
      raise ValueError(
          f"stage {self.name} {'needs' if self.is_sr else 'takes no'} low-res input "
          f"(lowres_size={self.lowres_size})"
      )
    if lowres is None:
      return cond
    if aug_level is None or aug_noise is None:
      raise ValueError(f"SR stage {self.name} needs aug_level [B] and aug_noise [B, H, W, C]")
    aug_level = jnp.asarray(aug_level, jnp.float32)
    if self.is_deepfloyd:  # IF-II: bilinear (align_corners) up, noised at its integer level
      up = discrete.upsample_bilinear_align_corners(lowres, aug_noise.shape[1:3])
      cond["lowres"] = discrete.augment_lowres(up, discrete.noise_level_of(aug_level), aug_noise)
      cond["aug_level"] = aug_level
      return cond
    up = forward.upsample_lowres(jnp.asarray(lowres, jnp.float32), aug_noise.shape[1:3])
    cond["lowres"] = forward.noise_condition_augment(up, aug_level, aug_noise)
    cond["aug_level"] = aug_level
    return cond

  # ----- sampling (one call of the sampler for training grids and the cascade) -----

  def denoise_fn(
      self,
      params: Any,
      guidance_weight=1.0,
      *,
      guidance_schedule: str = "constant",
      guidance_rescale: float = 0.0,
  ) -> Callable:
    """The guided `DenoiseFn(z_t, logsnr, cond) -> eps_hat` of `params` (§2.2), with w(t) of
    `guidance_schedule` at each call's t = schedule.t_fn(logsnr) and CFG rescale phi =
    `guidance_rescale` (`diffusion.guidance`)."""
    w = guidance_weight
    unguided = isinstance(w, (int, float)) and w == 1.0  # w(t) = 1 at every t: one pass
    if guidance.check_guidance_schedule(guidance_schedule) != "constant" and not unguided:
      w = lambda logsnr: guidance.guidance_weight_at(  # noqa: E731
          guidance_weight, self.schedule.t_fn(logsnr), guidance_schedule
      )
    return denoiser.make_denoise_fn(
        self.model,
        params,
        target=self.target,
        guidance_weight=w,
        guidance_rescale=guidance_rescale,
    )

  def sample(
      self,
      params: Any,
      cond: dict,
      noise: Array,
      rng: Array | None,
      settings: SamplingSettings,
      guidance_weight=None,
      *,
      init_image: Array | None = None,
      mask: Array | None = None,
      edit=None,
  ) -> Array:
    """x0 `[B, H, W, C]` in [-1, 1] from the initial `noise` (App. A reverse process).

    `guidance_weight` overrides `settings.guidance_weight` (pass a traced scalar so one
    compile serves every w; a Python 1.0 skips the unconditional half). `rng`: a key or `[B]`
    keys (one noise stream per sample) for the stochastic samplers and inpainting.
    `init_image`, `mask`, `edit`: an edit of `init_image` (`diffusion.editing`: SDEdit,
    RePaint inpainting), passed to `samplers.sample`.
    """
    w = settings.guidance_weight if guidance_weight is None else guidance_weight
    if settings.sampler == "ddpm" and self.is_deepfloyd:
      if init_image is not None or mask is not None or edit is not None:
        raise ValueError("IF's DDPM sampler does not edit; use sampler ddim for SDEdit/inpainting")
      return self._sample_if_ddpm(params, cond, noise, rng, settings, w)
    fn = self.denoise_fn(
        params,
        w,
        guidance_schedule=settings.guidance_schedule,
        guidance_rescale=settings.guidance_rescale,
    )
    return samplers.sample(
        fn,
        cond,
        noise,
        rng,
        schedule=self.schedule,
        settings=settings.sampler_settings(),
        init_image=init_image,
        mask=mask,
        edit=edit,
    )

  def _sample_if_ddpm(self, params, cond, noise, rng, settings: SamplingSettings, w) -> Array:
    """IF's own sampler: DDPM over `leading_timesteps(num_steps)` with the learned-range
    variance, eps guided and v from the conditional half (IF's pipeline); thresholding from
    `settings` (IF: dynamic, percentile 95, max_scale 1.5; static = clip to [-1, 1])."""
    model_fn = denoiser.make_deepfloyd_model_fn(
        self.model, params, guidance_weight=w, num_steps=self.schedule_steps
    )
    thr = settings.threshold
    return discrete.sample(
        model_fn,
        cond,
        noise,
        rng,
        timesteps=tuple(int(t) for t in discrete.leading_timesteps(settings.num_steps)),
        num_steps=self.schedule_steps,
        thresholding=thr == "dynamic",
        dynamic_thresholding_ratio=settings.percentile / 100.0,
        sample_max_value=settings.max_scale,
        clip_sample=thr == "static",
    )

  # ----- the abstract param tree -----

  def model_inputs(self, batch: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract inputs of `model.init` at the train sizes: `x_t [B, S, S, C]`, `logsnr [B]`,
    `text_emb [B, L, D]`, `text_mask [B, L]` and, for SR, `lowres [B, S, S, C]` (already
    upsampled, like x_t) and `aug_level [B]`."""
    f32, s = jnp.float32, self.train_image_size
    out = dict(
        x_t=jax.ShapeDtypeStruct((batch, s, s, CHANNELS), f32),
        logsnr=jax.ShapeDtypeStruct((batch,), f32),
        text_emb=jax.ShapeDtypeStruct((batch, self.text_len, self.text_dim), f32),
        text_mask=jax.ShapeDtypeStruct((batch, self.text_len), jnp.bool_),
    )
    if self.is_sr:
      out["lowres"] = jax.ShapeDtypeStruct((batch, s, s, CHANNELS), f32)
      out["aug_level"] = jax.ShapeDtypeStruct((batch,), f32)
    return out

  def init_boxed_params(self, rng: Array) -> Any:
    """The network's freshly initialised params, boxed with their logical axis names."""
    a = {k: jnp.zeros(v.shape, v.dtype) for k, v in self.model_inputs().items()}
    variables = self.model.init(
        {"params": rng, "dropout": rng},
        a.pop("x_t"),
        a.pop("logsnr"),
        a.pop("text_emb"),
        a.pop("text_mask"),
        train=False,
        **a,
    )
    extra = set(variables) - {"params"}
    if extra:
      raise ValueError(
          f"the network has variable collections {sorted(extra)} besides 'params'; a stage "
          "only holds params"
      )
    return variables["params"]

  def init_params(self, rng: Array) -> Any:
    """Unboxed initial params (jit it with `out_shardings` to create them in their shards)."""
    return nn.unbox(self.init_boxed_params(rng))

  def abstract_boxed_params(self) -> Any:
    """`jax.eval_shape` of the init: shapes + logical names, no memory."""
    return self._abstract_boxed_params

  # Traced once per stage: loading a cascade asks for the shapes and the specs several times,
  # and each trace of a network costs about a second on a CPU. The tree is immutable.
  @functools.cached_property
  def _abstract_boxed_params(self) -> Any:
    return jax.eval_shape(self.init_boxed_params, jax.random.key(0))

  def abstract_params(self) -> Any:
    """`jax.ShapeDtypeStruct` tree of the params (what EMA params are restored into)."""
    return nn.unbox(self.abstract_boxed_params())

  def param_specs(self, mesh, rules, *, fsdp_min_size: int = 0) -> Any:
    """Mesh `PartitionSpec`s of the params from the logical rules (`parallel.sharding`)."""
    return sharding_lib.mesh_specs(
        self.abstract_boxed_params(), mesh, rules, fsdp_min_size=fsdp_min_size
    )
