"""The training program of one stage on one mesh: the jitted step and its argument layouts.

Built in one place for the trainer (`train.trainer`) and the ahead-of-time compiler
(`parallel.aot`, `aot/compile_stage.py`), so the program compiled for a TPU pod on a CPU
machine is the program that trains. `build(config, mesh, encoder, use_cache=...)` returns
`TrainProgram`: the stage layer, optimizer, abstract train state and its `NamedSharding`s,
the batch and text-param shardings and the jitted step
`step(state, batch, rng, text_params) -> (state, metrics)` (`train.step`). Its abstract
arguments (`abstract_args`) lower and compile the step without allocating anything.

Batch (`[B]` = the global batch, split over the mesh's batch axes): `image` float32
`[B, H, W, 3]`, `text_mask` bool `[B, L]`, and either `text_ids` int32 `[B, L]` (the frozen
encoder runs inside the step) or `text_emb` float32 `[B, L, D]` (an embedding cache);
SR stages add `lowres` float32 `[B, h, w, 3]` (H, h: the stage's training sizes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax.parallel import sharding as sharding_lib
from imagen_jax.stage import Stage
from imagen_jax.train import optim
from imagen_jax.train import settings as settings_lib
from imagen_jax.train import state as state_lib
from imagen_jax.train import step as step_lib


@dataclasses.dataclass
class TrainProgram:
  """One stage's jitted train step on `mesh`, with the layouts of its arguments."""

  global_batch: int  # train.global_batch_size: the examples of one optimizer step
  mesh: jax.sharding.Mesh
  rules: tuple
  stage: Stage
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  abstract: state_lib.TrainState  # ShapeDtypeStruct leaves
  shardings: state_lib.TrainState  # NamedSharding leaves
  batch_sharding: NamedSharding
  text_shardings: Any
  text_abstract: Any  # the frozen encoder's param shapes
  use_cache: bool
  step: Callable

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch's shapes, dtypes and shardings (see the module docstring)."""
    b, st = self.global_batch, self.stage
    size, low, length = st.train_image_size, st.train_lowres_size, st.text_len
    shapes = {
        "image": ((b, size, size, 3), jnp.float32),
        "text_mask": ((b, length), jnp.bool_),
    }
    if self.use_cache:
      shapes["text_emb"] = ((b, length, st.text_dim), jnp.float32)
    else:
      shapes["text_ids"] = ((b, length), jnp.int32)
    if st.is_sr:
      shapes["lowres"] = ((b, low, low, 3), jnp.float32)
    return {
        k: jax.ShapeDtypeStruct(s, d, sharding=self.batch_sharding) for k, (s, d) in shapes.items()
    }

  def abstract_args(self) -> tuple:
    """(state, batch, rng, text_params) as ShapeDtypeStructs carrying their shardings."""
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract,
        self.shardings,
    )
    replicated = NamedSharding(self.mesh, P())
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
    text = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.text_abstract,
        self.text_shardings,
    )
    return state, self.abstract_batch(), rng, text

  def lower(self, *args):
    """`jax.jit(...).lower` of the step on `args` (concrete or abstract), under the step's
    mesh and logical rules."""
    return self.step.lower(*args)  # under the mesh; the step enters its logical rules itself


def check_batch(config, rules, mesh) -> tuple[str, ...]:
  """The mesh axes the global batch is split over; a ValueError unless they divide it (and,
  with gradient accumulation over k microbatches, each microbatch of B / k)."""
  axes = sharding_lib.batch_axes(rules, mesh)
  shards = math.prod(mesh.shape[a] for a in axes)
  batch = config.train.global_batch_size
  accum = int(config.train.get("grad_accum_steps", 1))
  if batch % (shards * accum):
    what = f"train.global_batch_size={batch}"
    if accum > 1:
      what += f" in train.grad_accum_steps={accum} microbatches"
    raise ValueError(
        f"{what} is not divisible by the {shards} batch shards ({' x '.join(axes)}) of mesh "
        f"{dict(mesh.shape)}; allowed: a multiple of {shards * accum}"
    )
  return axes


def build(config, mesh, encoder, *, use_cache: bool) -> TrainProgram:
  """The stage's train program on `mesh`.

  Args:
    config: a stage config (`configs/<stage>.py`).
    mesh: a `Mesh` with the config's axes (real devices, or a TPU topology's for AOT).
    encoder: the frozen text encoder (`text.registry.TextEncoder`; its `params` may be
      abstract): `encode_tokens`, `param_shardings`, `dim`, `max_length`.
    use_cache: batches carry cached `text_emb` (no encoder in the step).

  Raises:
    ValueError: the global batch does not divide over the batch axes, or the encoder's
      embeddings are not what the stage's network reads.
  """
  c = config
  rules = sharding_lib.rules_from_config(c)
  axes = check_batch(c, rules, mesh)
  stage = Stage.from_config(c)
  if (stage.text_dim, stage.text_len) != (encoder.dim, encoder.max_length):
    raise ValueError(
        f"text encoder {c.text.name!r} gives [L={encoder.max_length}, D={encoder.dim}] "
        f"embeddings, the stage expects [L={stage.text_len}, D={stage.text_dim}] (text.path "
        "names a checkpoint whose width differs from its preset?)"
    )
  tx, lr_schedule = optim.make_optimizer(
      c.optim, c.train.num_steps, freeze=str(c.train.get("freeze", ""))
  )
  abstract, specs = state_lib.state_specs(
      stage, tx, mesh, rules, fsdp_min_size=sharding_lib.fsdp_min_size_from_config(c)
  )
  shardings = sharding_lib.to_named(specs, mesh)
  text_shardings = encoder.param_shardings(mesh, rules)
  step_fn = step_lib.make_train_step(
      stage=stage,
      settings=settings_lib.StepSettings.from_config(c),
      tx=tx,
      lr_schedule=lr_schedule,
      encode_tokens=None if use_cache else encoder.encode_tokens,
  )
  batch_sharding = NamedSharding(mesh, P(axes or None))
  step = step_lib.jit_train_step(
      step_fn,
      mesh=mesh,
      rules=rules,
      state_shardings=shardings,
      batch_shardings=batch_sharding,
      text_shardings=text_shardings,
      constrain_activations=bool(c.mesh.constrain_activations),
  )
  # The trainer passes the encoder's params either way (its sample grids encode prompts).
  text_abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), encoder.params)
  return TrainProgram(
      global_batch=int(c.train.global_batch_size),
      mesh=mesh,
      rules=rules,
      stage=stage,
      tx=tx,
      lr_schedule=lr_schedule,
      abstract=abstract,
      shardings=shardings,
      batch_sharding=batch_sharding,
      text_shardings=text_shardings,
      text_abstract=text_abstract,
      use_cache=use_cache,
      step=step,
  )
