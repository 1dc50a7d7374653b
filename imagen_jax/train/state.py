"""Train state and its sharded initialisation.

`TrainState(step, params, ema_params, opt_state)` is one pytree. Its shardings are computed
abstractly from the stage's abstract param tree (`stage.Stage.param_specs`: the networks'
logical axis names and the config's rules), then `jax.jit(init, out_shardings=...)`
materialises every array directly in its shard: no host or single-device copy of the full
model ever exists (what makes the 2B base model of Imagen §4.1 fit).

In a checkpoint the state is two items (`checkpoint.Checkpointer`): `train_state` = {step,
params, opt_state} and `ema_params`, so samplers restore the EMA params alone.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from imagen_jax.parallel import ready
from imagen_jax.parallel import sharding as sharding_lib
from imagen_jax.stage import Stage


@flax.struct.dataclass
class TrainState:
  """step: int32 []; params: the network's float32 params (trained); ema_params: float32
  exponential moving average of params (what samples use); opt_state: optax state."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any

  def checkpoint_items(self) -> tuple[dict, Any]:
    """(train_state item {step, params, opt_state}, ema_params item)."""
    return {"step": self.step, "params": self.params, "opt_state": self.opt_state}, (
        self.ema_params
    )

  @classmethod
  def from_checkpoint_items(cls, train_state: dict, ema_params: Any) -> "TrainState":
    return cls(
        step=train_state["step"],
        params=train_state["params"],
        ema_params=ema_params,
        opt_state=train_state["opt_state"],
    )


def state_specs(
    stage: Stage,
    tx: optax.GradientTransformation,
    mesh,
    rules,
    *,
    fsdp_min_size: int = 0,
) -> tuple[TrainState, TrainState]:
  """(abstract TrainState, mesh PartitionSpec TrainState) computed without allocation.

  EMA params share the params' layout; optimizer slots with a param's shape share its layout
  (`sharding.specs_like_params`), the rest (counts, Adafactor's factored statistics) replicate.
  """
  p_specs = stage.param_specs(mesh, rules, fsdp_min_size=fsdp_min_size)
  params = stage.abstract_params()
  ema = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
  opt = jax.eval_shape(tx.init, params)
  o_specs = sharding_lib.specs_like_params(opt, params, p_specs)
  abstract = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params, ema_params=ema, opt_state=opt
  )
  specs = TrainState(step=P(), params=p_specs, ema_params=p_specs, opt_state=o_specs)
  return abstract, specs


def make_init_fn(
    stage: Stage, tx: optax.GradientTransformation
) -> Callable[[jax.Array], TrainState]:
  """`init(rng) -> TrainState` at step 0 (EMA starts equal to the initial params)."""

  def init(rng):
    params = stage.init_params(rng)
    ema = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, ema_params=ema, opt_state=tx.init(params)
    )

  return init


def create_state(
    stage: Stage, tx: optax.GradientTransformation, shardings: TrainState, rng: jax.Array
) -> TrainState:
  """The step-0 state, created directly in its `NamedSharding`s.

  Runs once, so on CPU XLA's backend optimizations are skipped: the init's compile would
  dominate a short CPU run (same values up to float rounding).
  """
  init = jax.jit(make_init_fn(stage, tx), out_shardings=shardings)
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
  compiled = init.lower(rng).compile(options)
  ready.wait_for_peers("compiled/init_state")  # no process starts its collectives alone
  return compiled(rng)


def state_from_params(
    tx: optax.GradientTransformation, shardings: TrainState, params: Any
) -> TrainState:
  """The step-0 state of a warm start: `params` (and EMA params) given, a fresh optimizer."""

  def init(params):
    ema = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, ema_params=ema, opt_state=tx.init(params)
    )

  return jax.jit(init, out_shardings=shardings)(params)


def param_count(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
