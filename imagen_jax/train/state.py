"""Train state and its sharded initialisation.

`TrainState(step, params, ema_params, opt_state)` is one pytree. Shardings for all of it are
computed abstractly (`jax.eval_shape`) from the networks' logical axis names and the config's
rules, then `jax.jit(init, out_shardings=...)` materialises every array directly in its shard:
no host or single-device copy of the full model ever exists (what makes the 2B base model of
Imagen §4.1 fit).
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from imagen_jax.parallel import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  """step: int32 []; params: the network's float32 params (trained); ema_params: float32
  exponential moving average of params (what samples use); opt_state: optax state."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def model_inputs(
    *,
    batch: int,
    image_size: int,
    lowres_size: int,
    text_len: int,
    text_dim: int,
    channels: int = 3,
) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract example inputs for `model.init` (the apply signature of docs/interfaces.md).

  `lowres` arrives already upsampled to the image size (the step upsamples and noise-augments
  it), so it is `[B, S, S, C]` like `x_t`; it and `aug_level [B]` are present for SR stages
  (`lowres_size > 0`) only.
  """
  f32 = jnp.float32
  s = image_size
  out = dict(
      x_t=jax.ShapeDtypeStruct((batch, s, s, channels), f32),
      logsnr=jax.ShapeDtypeStruct((batch,), f32),
      text_emb=jax.ShapeDtypeStruct((batch, text_len, text_dim), f32),
      text_mask=jax.ShapeDtypeStruct((batch, text_len), jnp.bool_),
  )
  if lowres_size:
    out["lowres"] = jax.ShapeDtypeStruct((batch, s, s, channels), f32)
    out["aug_level"] = jax.ShapeDtypeStruct((batch,), f32)
  return out


def _zeros(inputs: dict) -> dict:
  return {k: jnp.zeros(v.shape, v.dtype) for k, v in inputs.items()}


def _init_params(model: nn.Module, rng: jax.Array, inputs: dict) -> Any:
  """Boxed (logically partitioned) params of `model`."""
  a = _zeros(inputs)
  variables = model.init(
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
        f"the network has variable collections {sorted(extra)} besides "
        "'params'; the train state only holds params"
    )
  return variables["params"]


def abstract_boxed_params(model: nn.Module, inputs: dict) -> Any:
  """`jax.eval_shape` of the network's init: shapes + logical names, no memory."""
  return jax.eval_shape(lambda r: _init_params(model, r, inputs), jax.random.key(0))


def state_specs(
    model: nn.Module,
    tx: optax.GradientTransformation,
    inputs: dict,
    mesh,
    rules,
    *,
    fsdp_min_size: int = 0,
) -> tuple[TrainState, TrainState]:
  """(abstract TrainState, mesh PartitionSpec TrainState) computed without allocation.

  EMA params share the params' layout; optimizer slots with a param's shape share its layout
  (`sharding.specs_like_params`), the rest (counts, Adafactor's factored statistics) replicate.
  """
  boxed = abstract_boxed_params(model, inputs)
  p_specs = sharding_lib.mesh_specs(boxed, mesh, rules, fsdp_min_size=fsdp_min_size)
  params = nn.unbox(boxed)
  ema = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
  opt = jax.eval_shape(tx.init, params)
  o_specs = sharding_lib.specs_like_params(opt, params, p_specs)
  abstract = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params, ema_params=ema, opt_state=opt
  )
  specs = TrainState(step=P(), params=p_specs, ema_params=p_specs, opt_state=o_specs)
  return abstract, specs


def make_init_fn(
    model: nn.Module, tx: optax.GradientTransformation, inputs: dict
) -> Callable[[jax.Array], TrainState]:
  """`init(rng) -> TrainState` at step 0 (EMA starts equal to the initial params)."""

  def init(rng):
    params = nn.unbox(_init_params(model, rng, inputs))
    ema = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, ema_params=ema, opt_state=tx.init(params)
    )

  return init


def create_sharded_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    inputs: dict,
    mesh,
    rules,
    rng: jax.Array,
    *,
    fsdp_min_size: int = 0,
) -> tuple[TrainState, TrainState]:
  """(state, NamedSharding TrainState): the state is created directly in its shardings."""
  _, specs = state_specs(model, tx, inputs, mesh, rules, fsdp_min_size=fsdp_min_size)
  shardings = sharding_lib.to_named(specs, mesh)
  init = jax.jit(make_init_fn(model, tx, inputs), out_shardings=shardings)
  return init(rng), shardings


def param_count(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
