"""Model FLOPs of a network: every convolution and matmul counted from its shapes.

The useful work of a step, independent of how it is compiled (PaLM, Chowdhery et al. 2022,
App. B: model FLOPs exclude rematerialisation): each layer of the forward pass contributes
2 x its multiply-accumulates,

    conv   2 * |out| * kh * kw * C_in / groups       (|out| = B * H' * W' * C_out)
    matmul 2 * |lhs| * prod(rhs free dims)           (q k^T and w v of attention included)

and a training step costs 3 x the forward (the backward pass computes the gradients of the
activations and of the weights, one forward's worth each). Elementwise work (normalisation,
activations, softmax) is left out, as in the MFU convention. The layers are read from the
traced forward (`jax.make_jaxpr`, no compile) of the network with dense attention and no
remat, grouped by kind through the Flax module path of each operation:

  attention  every matmul inside an attention layer (`Attention_*`, `SelfAttention`,
             `TextCrossAttention`): q / k / v / out projections, text keys, logits, values
  conv       every convolution
  dense      the other matmuls (timestep and text conditioning, pooling, FiLM)

and, apart, `attention_core`: the part of `attention` a fused kernel computes (q k^T and the
weighted values, `nn.attention.CORE_SCOPE`). XLA's cost analysis sees the Pallas flash kernel's
forward (its cost estimate) but not its backward, so `kernel_train_flops` gives that work, to
add to XLA's count for a roofline.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
import ml_collections
from jax.extend import core as jex_core

from imagen_jax.nn import attention, unet

_ATTENTION_SCOPE = re.compile(r"\w*Attention(_\d+)?")


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """FLOPs of one forward pass by kind of layer."""

  conv: float = 0.0
  attention: float = 0.0
  dense: float = 0.0
  attention_core: float = 0.0  # part of `attention`: q k^T and the weighted values

  @property
  def total(self) -> float:
    return self.conv + self.attention + self.dense

  def __add__(self, other: "FlopCount") -> "FlopCount":
    return FlopCount(*(a + b for a, b in zip(self.astuple(), other.astuple())))

  def scale(self, factor: float) -> "FlopCount":
    return FlopCount(*(a * factor for a in self.astuple()))

  def astuple(self) -> tuple[float, float, float, float]:
    return (self.conv, self.attention, self.dense, self.attention_core)

  def as_dict(self) -> dict[str, float]:
    return dict(
        conv=self.conv,
        attention=self.attention,
        dense=self.dense,
        total=self.total,
        attention_core=self.attention_core,
    )


def _kind(eqn) -> str:
  if eqn.primitive.name == "conv_general_dilated":
    return "conv"
  scopes = str(eqn.source_info.name_stack).split("/")
  return "attention" if any(_ATTENTION_SCOPE.fullmatch(s) for s in scopes) else "dense"


def _eqn_flops(eqn) -> float:
  if eqn.primitive.name == "dot_general":
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)]
    return 2.0 * math.prod(lhs) * math.prod(rhs_free)
  if eqn.primitive.name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / out_features
  return 0.0


def count_jaxpr(jaxpr) -> FlopCount:
  """Conv and matmul FLOPs of a (closed) jaxpr, nested calls included; a `scan` body counts
  `length` times, a `cond` its costliest branch. A `while` loop has no static trip count and is
  refused."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = FlopCount()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "while":
      raise ValueError("a while loop has no static trip count; count a program without one")
    if name == "cond":
      branches = [count_jaxpr(b) for b in eqn.params["branches"]]
      total += max(branches, key=lambda c: c.total)
      continue
    flops = _eqn_flops(eqn)
    if flops:
      total += FlopCount(**{_kind(eqn): flops})
      if attention.CORE_SCOPE in str(eqn.source_info.name_stack).split("/"):
        total += FlopCount(attention_core=flops)
    subs = [count_jaxpr(j) for j in jex_core.jaxprs_in_params(eqn.params)]
    sub = sum(subs, FlopCount())
    total += sub.scale(eqn.params["length"]) if name == "scan" else sub
  return total


def count(fn: Callable, *args: Any) -> FlopCount:
  """Conv and matmul FLOPs of `fn(*args)` (arrays or `jax.ShapeDtypeStruct`s; nothing runs)."""
  return count_jaxpr(jax.make_jaxpr(fn)(*args))


def network_forward_flops(
    model_config: ml_collections.ConfigDict, inputs: dict[str, jax.ShapeDtypeStruct]
) -> FlopCount:
  """FLOPs of one forward pass of the network `model_config` describes, on `inputs`
  (`Stage.model_inputs(batch)`: x_t, logsnr, text_emb, text_mask [, lowres, aug_level]),
  with dense attention and no remat: what the model computes, not how it is compiled."""
  c = model_config.copy_and_resolve_references()
  with c.unlocked():
    c.attn_impl, c.remat = "dense", False
  model = unet.build_model(c)

  def split(i):
    i = dict(i)
    return (i.pop("x_t"), i.pop("logsnr"), i.pop("text_emb"), i.pop("text_mask")), i

  def init(i):
    args, kw = split(i)
    return model.init(jax.random.key(0), *args, train=False, **kw)

  def forward(p, i):
    args, kw = split(i)
    return model.apply(p, *args, train=False, **kw)

  return count(forward, jax.eval_shape(init, inputs), inputs)


TRAIN_FACTOR = 3  # forward + backward (activation and weight gradients)

# The Pallas TPU flash kernel's backward, in forwards of the attention core (q k^T, then p v: 2
# matmuls): 7 matmuls of that size (its dK / dV kernel recomputes the logits and forms dV, dP and
# dK; its dQ kernel the logits, dP and dQ). XLA's cost analysis counts the forward kernel (the
# Pallas call carries a cost estimate, also when remat runs it again) but not the backward's.
FLASH_BACKWARD_PASSES = 7 / 2


def kernel_train_flops(forward: FlopCount) -> float:
  """FLOPs per example of a training step that run inside the flash kernel's backward, unseen
  by XLA's cost analysis: the attention core's forward x FLASH_BACKWARD_PASSES."""
  return forward.attention_core * FLASH_BACKWARD_PASSES
