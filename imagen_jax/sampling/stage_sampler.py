"""Cascade sampling on a (data, fsdp, tensor) device mesh: the jitted building blocks.

Each stage's EMA params are laid out by `Stage.param_specs` (ZeRO-3 style: big params split
over `fsdp`, `mlp` / `heads` over `tensor`; `parallel.sharding`), the frozen T5 encoder's params
by its logical specs (`text.registry.make_encode`), and every per-sample array (`text_emb`,
`text_mask`, `lowres`, `indices`, the images) is split over the mesh axes the logical `batch`
axis maps to (`parallel.sharding.batch_axes`). The paper's cascade (T5-XXL 4.7B + base 2B +
SR 600M + SR 400M params, Imagen §2.1, §4.1) does not fit one 32 GiB TPU-v4 chip replicated;
sharded, it does.

The builders return jitted functions with explicit in / out shardings that take concrete
arrays or `jax.ShapeDtypeStruct`s carrying `NamedSharding`s (`abstract_*_inputs`), so the same
program that `cascade.Cascade` runs can be lowered and compiled ahead of time for a TPU
topology that is not attached (`fn.lower(*abstract).compile()`, then `memory_analysis()`,
`cost_analysis()`):

  make_stage_sampler: the whole reverse process of one stage (App. A), what the cascade runs;
  make_denoise_step:  one guided denoiser evaluation (§2.2: the 2B-batch conditional +
                      unconditional pass of `denoiser.make_denoise_fn`);
  make_encode:        the frozen T5 encode (`text.registry.make_encode`).

Determinism (as in `cascade`): sample i draws its noise from `fold_in(stage_key, i)`, so images
depend neither on the batch nor on the mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax.diffusion import editing
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import ready
from imagen_jax.parallel import sharding as sharding_lib
from imagen_jax.stage import SamplingSettings, Stage
from imagen_jax.text import registry

__all__ = [
    "DEFAULT_MESH_SHAPE",
    "PARAM_DTYPE",
    "abstract_denoise_inputs",
    "abstract_encode_inputs",
    "abstract_sampler_inputs",
    "abstract_stage_params",
    "batch_sharding",
    "batch_size_multiple",
    "default_mesh",
    "initial_noise",
    "make_denoise_step",
    "make_encode",
    "make_stage_sampler",
    "stage_param_shardings",
]

Array = jax.Array
Rules = Sequence[tuple[str, Any]]

# Our choice (the paper is silent on how it sampled): every device on the fsdp axis. With the
# configs' rules (`batch -> (data, fsdp)`) the batch is still split over all devices, so it is
# data parallel, while each param is stored once over the mesh (ZeRO-3) and gathered layer by
# layer. Replicated params would save those gathers but a paper cascade replicated needs
# ~31 GB per chip (7.7B float32 params), more than a v4 chip holds; one layout for tiny and
# paper cascades keeps the path tested on CPU the one that runs on a pod.
DEFAULT_MESH_SHAPE = {"data": 1, "fsdp": -1, "tensor": 1}
# Sampling params are restored in float32 (EMA params are kept in float32 by the trainer).
PARAM_DTYPE = jnp.float32


def default_mesh(
    devices: Sequence[jax.Device] | None = None, shape: Mapping[str, int] | None = None
) -> jax.sharding.Mesh:
  """The sampling mesh over `devices` (default: this process's devices; each process samples
  its own prompts) of `shape` (default `DEFAULT_MESH_SHAPE`)."""
  devices = list(jax.local_devices() if devices is None else devices)
  return mesh_lib.make_mesh(DEFAULT_MESH_SHAPE if shape is None else shape, devices=devices)


def batch_sharding(mesh, rules: Rules, ndim: int) -> NamedSharding:
  """`[B, ...]` (ndim dims) split over the mesh axes of the logical `batch` axis."""
  axes = sharding_lib.batch_axes(rules, mesh)
  return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


def batch_size_multiple(mesh, rules: Rules) -> int:
  """A batch must be a multiple of this: the product of the batch axes' sizes."""
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  return math.prod(sizes[a] for a in sharding_lib.batch_axes(rules, mesh))


def _check_batch(batch: int, mesh, rules: Rules) -> None:
  m = batch_size_multiple(mesh, rules)
  if batch < 1 or batch % m:
    raise ValueError(
        f"batch {batch} does not divide over the mesh's batch axes "
        f"{sharding_lib.batch_axes(rules, mesh)} ({m} shards); allowed: a positive multiple of {m}"
    )


def stage_param_shardings(stage: Stage, mesh, rules: Rules, fsdp_min_size: int = 0) -> Any:
  """`NamedSharding` tree of the stage's params (`Stage.param_specs`: rules + fsdp fallback)."""
  return sharding_lib.to_named(stage.param_specs(mesh, rules, fsdp_min_size=fsdp_min_size), mesh)


def abstract_stage_params(
    stage: Stage, mesh, rules: Rules, fsdp_min_size: int = 0, dtype=PARAM_DTYPE
) -> Any:
  """`ShapeDtypeStruct` tree of the params in their shards (the Orbax restore target)."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s),
      stage.abstract_params(),
      stage_param_shardings(stage, mesh, rules, fsdp_min_size),
  )


def make_encode(encoder, mesh, rules: Rules):
  """The frozen T5 encode jitted on `mesh` (`text.registry.make_encode`, §2.1): `fn(params,
  ids [B, L] int32, mask [B, L] bool) -> emb float32 [B, L, D]`, params sharded by their logical
  specs, the batch over the batch axes; `rules` naming axes the mesh lacks are restricted."""
  return registry.make_encode(encoder, mesh, sharding_lib.rules_for_mesh(rules, mesh))


def initial_noise(key: Array, indices: Array, shape: tuple[int, ...]) -> Array:
  """N(0, I) noise `[B, *shape]` for samples `indices` ([B] int): sample i uses fold_in(key, i)."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(indices)


def make_stage_sampler(
    stage: Stage,
    settings: SamplingSettings,
    mesh,
    rules: Rules,
    *,
    guided: bool,
    fsdp_min_size: int = 0,
    edit: editing.EditSettings | None = None,
    negative: bool = False,
) -> ready.ReadyJit:
  """The whole sampler of one stage, jitted on `mesh` (App. A reverse process, §2.2-§2.4).

  Returns `fn(params, text_emb [B, L, D], text_mask [B, L], lowres [B, s, s, 3] | None,
  guidance_weight [], key [], indices [B] int32) -> x0 [B, S, S, 3]` in [-1, 1]: noise
  `fold_in(k_noise, i)` per sample i; for SR stages the low-res input is upsampled and
  noise-augmented at `settings.aug_level` with noise `fold_in(k_aug, i)` (§2.4). `guidance_weight`
  is traced (one compile serves every w); `guided=False` compiles the single-pass sampler.
  Params sharded by `stage_param_shardings`; per-sample arrays over the batch axes; `key` and
  `guidance_weight` replicated. Set `lowres=None` for a base stage.

  With `edit` (static `diffusion.editing.EditSettings`) the function takes two more arguments,
  `init_image [B, S, S, 3]` in [-1, 1] and `mask [B, S, S, 1]` in [0, 1] (1 = known) or None,
  at the stage's size, and edits the image (SDEdit from `edit.strength`; RePaint inpainting
  with a mask, `edit.resample_steps` times per step; its noise from the per-sample keys).

  With `negative` the function takes, right after `indices`, `uncond_emb [B, L, D]` and
  `uncond_mask [B, L]`: the negative prompts the unconditional half of guidance reads instead
  of the null text (`denoiser.uncond_text`).
  """
  static = dataclasses.replace(settings, guidance_weight=0.0)  # w is traced, not static
  shape = (stage.image_size, stage.image_size, 3)
  batch = lambda ndim: batch_sharding(mesh, rules, ndim)  # noqa: E731
  replicated = NamedSharding(mesh, P())

  def sample(params, text_emb, text_mask, lowres, guidance_weight, key, indices, *extra):
    uncond, edit_inputs = (extra[:2], extra[2:]) if negative else (None, extra)
    key_noise, key_aug, key_sampler = jax.random.split(key, 3)
    noise = initial_noise(key_noise, indices, shape)
    # One sampler noise stream per sample (used by stochastic samplers only).
    sample_keys = jax.vmap(lambda i: jax.random.fold_in(key_sampler, i))(indices)
    aug = aug_noise = None
    if lowres is not None:
      # §2.4: the previous stage's output, upsampled and noise-augmented at aug_level.
      aug = jnp.full((lowres.shape[0],), static.aug_level, jnp.float32)
      aug_noise = initial_noise(key_aug, indices, shape)
    cond = stage.condition(text_emb, text_mask, lowres, aug_level=aug, aug_noise=aug_noise)
    if uncond is not None:
      cond["uncond_text_emb"], cond["uncond_text_mask"] = uncond[0], uncond[1].astype(bool)
    init_image, mask = edit_inputs if edit is not None else (None, None)
    return stage.sample(
        params,
        cond,
        noise,
        sample_keys,
        static,
        guidance_weight if guided else 1.0,
        init_image=init_image,
        mask=mask,
        edit=edit,
    )

  in_shardings = (
      stage_param_shardings(stage, mesh, rules, fsdp_min_size),
      batch(3),
      batch(2),
      batch(4) if stage.is_sr else None,
      replicated,
      replicated,
      batch(1),
  )
  if negative:
    in_shardings += (batch(3), batch(2))  # uncond_emb, uncond_mask
  if edit is not None:
    in_shardings += (batch(4), batch(4))  # init_image, mask (a None mask is an empty tree)
  return sharding_lib.mesh_jit(
      sample, mesh, rules, name="sample", in_shardings=in_shardings, out_shardings=batch(4)
  )


def make_denoise_step(
    stage: Stage, mesh, rules: Rules, *, guided: bool, fsdp_min_size: int = 0
) -> ready.ReadyJit:
  """One guided denoiser evaluation on `mesh` (§2.2, `Stage.denoise_fn`).

  Returns `fn(params, z_t [B, S, S, 3], logsnr [B], cond, guidance_weight []) -> eps [B, S, S, 3]`
  with `cond = stage.condition(...)`: `text_emb [B, L, D]`, `text_mask [B, L]` and, for SR
  stages, `lowres [B, S, S, 3]` (upsampled and augmented) and `aug_level [B]`. Guided, the
  network runs once on the 2B batch (conditional and null text) and returns
  `w eps(z, c) + (1 - w) eps(z, null)`; unguided, once on B.
  """
  batch = lambda ndim: batch_sharding(mesh, rules, ndim)  # noqa: E731
  cond_shardings = {"text_emb": batch(3), "text_mask": batch(2)}
  if stage.is_sr:
    cond_shardings.update(lowres=batch(4), aug_level=batch(1))

  def denoise(params, z_t, logsnr, cond, guidance_weight):
    return stage.denoise_fn(params, guidance_weight if guided else 1.0)(z_t, logsnr, cond)

  in_shardings = (
      stage_param_shardings(stage, mesh, rules, fsdp_min_size),
      batch(4),
      batch(1),
      cond_shardings,
      NamedSharding(mesh, P()),
  )
  return sharding_lib.mesh_jit(
      denoise, mesh, rules, name="denoise_step", in_shardings=in_shardings, out_shardings=batch(4)
  )


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_sampler_inputs(
    stage: Stage,
    batch: int,
    mesh,
    rules: Rules,
    *,
    fsdp_min_size: int = 0,
    edit: editing.EditSettings | None = None,
) -> tuple:
  """Sharded `ShapeDtypeStruct`s of `make_stage_sampler`'s arguments for a batch of `batch`
  samples at the stage's sampling sizes (no memory); with `edit`, an inpainting run's too
  (`init_image`, `mask`)."""
  _check_batch(batch, mesh, rules)
  b = lambda ndim: batch_sharding(mesh, rules, ndim)  # noqa: E731
  replicated = NamedSharding(mesh, P())
  lr, s = stage.lowres_size, stage.image_size
  key = jax.eval_shape(jax.random.key, 0)
  args = (
      abstract_stage_params(stage, mesh, rules, fsdp_min_size),
      _sds((batch, stage.text_len, stage.text_dim), jnp.float32, b(3)),
      _sds((batch, stage.text_len), jnp.bool_, b(2)),
      _sds((batch, lr, lr, 3), jnp.float32, b(4)) if stage.is_sr else None,
      _sds((), jnp.float32, replicated),
      _sds((), key.dtype, replicated),
      _sds((batch,), jnp.int32, b(1)),
  )
  if edit is not None:
    args += (_sds((batch, s, s, 3), jnp.float32, b(4)), _sds((batch, s, s, 1), jnp.float32, b(4)))
  return args


def abstract_denoise_inputs(
    stage: Stage, batch: int, mesh, rules: Rules, *, fsdp_min_size: int = 0
) -> tuple:
  """Sharded `ShapeDtypeStruct`s of `make_denoise_step`'s arguments at the sampling size."""
  _check_batch(batch, mesh, rules)
  b = lambda ndim: batch_sharding(mesh, rules, ndim)  # noqa: E731
  s = stage.image_size
  cond = {
      "text_emb": _sds((batch, stage.text_len, stage.text_dim), jnp.float32, b(3)),
      "text_mask": _sds((batch, stage.text_len), jnp.bool_, b(2)),
  }
  if stage.is_sr:
    cond.update(
        lowres=_sds((batch, s, s, 3), jnp.float32, b(4)),
        aug_level=_sds((batch,), jnp.float32, b(1)),
    )
  return (
      abstract_stage_params(stage, mesh, rules, fsdp_min_size),
      _sds((batch, s, s, 3), jnp.float32, b(4)),
      _sds((batch,), jnp.float32, b(1)),
      cond,
      _sds((), jnp.float32, NamedSharding(mesh, P())),
  )


def abstract_encode_inputs(config, batch: int, max_length: int, mesh, rules: Rules) -> tuple:
  """Sharded `ShapeDtypeStruct`s of `make_encode`'s arguments: `(params, ids [B, L] int32,
  mask [B, L] bool)` (params in the config's `param_dtype`, sharded by their logical specs);
  `config`: a `t5.T5Config` or `bert.BertConfig`."""
  _check_batch(batch, mesh, rules)
  shardings = nn.logical_to_mesh_sharding(
      registry.logical_specs(config), mesh, sharding_lib.rules_for_mesh(rules, mesh)
  )
  params = jax.tree.map(
      lambda a, s: _sds(a.shape, a.dtype, s), nn.unbox(registry.abstract_params(config)), shardings
  )
  tokens = batch_sharding(mesh, rules, 2)
  return (
      params,
      _sds((batch, max_length), jnp.int32, tokens),
      _sds((batch, max_length), jnp.bool_, tokens),
  )
