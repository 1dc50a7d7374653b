r"""One network's training step, built, compiled, counted and timed: what the step benchmarks
share (benchmarks/unet_step.py, benchmarks/efficient_vs_unet.py). No flags: a library of the
benchmarks, imported by them.

The step is the plain loss of the paper (App. A): x0 ~ batch, t ~ U(0,1), logsnr = cosine(t),
z_t = alpha x0 + sigma eps, loss = |eps_hat - eps|^2, then an Adam update. The diffusion math is
inlined here (a few lines) so the benchmarks depend on nothing but the network. Inputs:
x_t `[B, S, S, 3]`, text_emb `[B, L, D]` (random: the step's cost does not depend on the text),
and for an SR network lowres `[B, S, S, 3]` and aug_level `[B]`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from imagen_jax.nn import attention, unet
from imagen_jax.nn import flops as flops_lib
from imagen_jax.text import registry


def inputs(cfg, text, batch, key) -> dict:
  """The network's keyword inputs at the model config's nominal `image_size` (random)."""
  s, length, dim = cfg.image_size, int(text.max_length), registry.text_dim(text)
  k = jax.random.split(key, 4)
  out = dict(
      x_t=jax.random.normal(k[0], (batch, s, s, 3)),
      logsnr=jnp.zeros((batch,)),
      text_emb=jax.random.normal(k[1], (batch, length, dim)),
      text_mask=jnp.ones((batch, length), bool),
  )
  if cfg.lowres_cond:
    out["lowres"] = jax.random.normal(k[2], (batch, s, s, 3))
    out["aug_level"] = jax.random.uniform(k[3], (batch,))
  return out


def param_count(cfg, text, batch=1) -> int:
  """Parameters of the network (eval_shape: nothing is allocated)."""
  model = unet.build_model(cfg)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), **inputs(cfg, text, batch, jax.random.key(0)))
  )
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def xla_flops(compiled) -> float:
  """XLA's FLOP count of a lowered or compiled program (NaN when it gives none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device program
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def median_time(fn, n):
  """(median wall seconds, median process CPU seconds) of fn() over n calls.

  CPU time (all threads of this process) is the steadier figure on a shared machine: on an
  otherwise idle C-core CPU the wall time approaches cpu / C.
  """
  times, cpu = [], []
  for _ in range(n):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return statistics.median(times), statistics.median(cpu)


def make_train_step(model, tx, cond, batch):
  """Adam step on the eps-MSE loss with the cosine schedule (App. A), x0 given."""

  def train_step(params, opt_state, x0, key):
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    t = jax.random.uniform(k_t, (batch,))
    logsnr = -2.0 * jnp.log(jnp.tan(0.5 * math.pi * jnp.clip(t, 1e-4, 1 - 1e-4)))  # cosine
    alpha = jnp.sqrt(jax.nn.sigmoid(logsnr))[:, None, None, None]
    sigma = jnp.sqrt(jax.nn.sigmoid(-logsnr))[:, None, None, None]
    eps = jax.random.normal(k_eps, x0.shape)
    z_t = alpha * x0 + sigma * eps

    def loss_fn(p):
      eps_hat = model.apply(p, z_t, logsnr, **cond, train=True, rngs={"dropout": k_drop})
      return jnp.mean((eps_hat - eps) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


@dataclasses.dataclass
class TrainStep:
  """A network's compiled training step with its state (`step()` runs one and updates it)."""

  cfg: Any  # the model config
  model: Any
  tx: Any
  inputs: dict  # the network's inputs (x_t is the step's x0)
  cond: dict  # the conditioning inputs (all but x_t, logsnr)
  params: Any
  opt_state: Any
  compiled: Any
  key: Any
  init_s: float  # init: compile + run
  compile_s: float  # the train step's lower + compile
  attention: str  # the attention implementations the step runs (nn.attention)

  @property
  def batch(self) -> int:
    return int(self.inputs["x_t"].shape[0])

  @property
  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.params))

  def step(self):
    """One training step (params and optimizer state donated and replaced); the loss."""
    self.params, self.opt_state, loss = self.compiled(
        self.params, self.opt_state, self.inputs["x_t"], self.key
    )
    return loss

  def time(self, n: int):
    """One warm-up step, then `median_time` of n steps."""
    jax.block_until_ready(self.step())
    return median_time(self.step, n)

  def model_flops(self):
    """(3 x the network's forward FLOPs (`nn.flops.TRAIN_FACTOR`, no remat), the forward count
    `nn.flops.network_forward_flops` with its conv / attention split)."""
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self.inputs.items()}
    forward = flops_lib.network_forward_flops(self.cfg, abstract)
    return flops_lib.TRAIN_FACTOR * forward.total, forward

  def xla_flops(self) -> float:
    """XLA's FLOPs of the step. XLA's cost analysis counts a loop body once, so the
    per-example attention loop (attn_impl per_example, or auto on one CPU device) hides most
    attention FLOPs: then the same step with dense attention is counted instead (analysis of
    the lowered module, no compile)."""
    if self.cfg.attn_impl == "dense":
      return xla_flops(self.compiled)
    dense_cfg = self.cfg.copy_and_resolve_references()
    dense_cfg.attn_impl = "dense"
    step = make_train_step(unet.build_model(dense_cfg), self.tx, self.cond, self.batch)
    return xla_flops(jax.jit(step).lower(self.params, self.opt_state, self.inputs["x_t"], self.key))

  def memory(self) -> dict:
    """XLA's memory analysis of the compiled step, in bytes: arguments (params, optimizer
    state, batch), outputs, aliased (donated) outputs, temporaries (activations kept for the
    backward, workspace) and XLA's peak of live buffers where this backend reports one
    (else None)."""
    mem = self.compiled.memory_analysis()
    peak = getattr(mem, "peak_memory_in_bytes", None)
    return dict(
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        peak_bytes=None if not peak else int(peak),
    )


def build(cfg, text, batch: int, lr: float = 1e-4) -> TrainStep:
  """Initialises the network of model config `cfg` and compiles its Adam training step."""
  model = unet.build_model(cfg)
  net_inputs = inputs(cfg, text, batch, jax.random.key(0))
  cond = {k: v for k, v in net_inputs.items() if k not in ("x_t", "logsnr")}
  # An "rbg" key: compiling init with threefry costs ~0.1 s of CPU per param leaf here (one
  # threefry kernel per initializer); the benchmark does not care about init quality.
  t0 = time.perf_counter()
  params = jax.block_until_ready(jax.jit(model.init)(jax.random.key(0, impl="rbg"), **net_inputs))
  init_s = time.perf_counter() - t0
  tx = optax.adam(lr)
  opt_state = tx.init(params)
  key = jax.random.key(1)
  t0 = time.perf_counter()
  with attention.recording() as seen:
    lowered = jax.jit(make_train_step(model, tx, cond, batch), donate_argnums=(0, 1)).lower(
        params, opt_state, net_inputs["x_t"], key
    )
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  return TrainStep(
      cfg=cfg,
      model=model,
      tx=tx,
      inputs=net_inputs,
      cond=cond,
      params=params,
      opt_state=opt_state,
      compiled=compiled,
      key=key,
      init_s=init_s,
      compile_s=compile_s,
      attention="+".join(sorted(set(seen))) or "none",
  )
