"""Attention over image tokens with the text sequence joined to the keys/values.

Imagen App. F.1 (and GLIDE, which it follows): "text embedding ... concatenated to the
key-value pairs of each self-attention layer". Efficient U-Net (App. B.1, F.2) uses the same
layer in its last DBlock/UBlock; F.3 (SR1024) drops the self-attention and keeps the explicit
text cross-attention, i.e. keys/values come from the text only (`self_attention=False`).

Structure (ADM attention block, residual, pre-norm):
  h = GroupNorm(x)                                   [B, H, W, C] -> [B, T=H*W, C]
  q, k_img, v_img = fused Dense(h)                   [B, T, N, D] each   (one matmul for qkv)
  k_txt, v_txt = Dense(LayerNorm(text))              [B, L, N, D]        (LayerNorm: §2.5)
  k = [k_null ; k_img ; k_txt],  v likewise          [B, 1+T+L, N, D]
  o = softmax(q k^T / sqrt(D), masked) v             [B, T, N, D]
  x + Dense(o)                                       [B, H, W, C]

The learned null key/value (imagen-pytorch's `null_kv`) is a token every query can always
attend to, so a dropped text (all-False mask) with `self_attention=False` still has a finite
softmax; masked text tokens get exactly zero weight (their logits are replaced before the max).
Logits and softmax are float32 regardless of the compute dtype.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.nn import attention_kernels, layers

Dtype = Any


def resolve_heads(channels: int, num_heads: int | None, head_dim: int | None) -> tuple[int, int]:
  """(heads, head_dim) from a config that fixes either or both.

  - only `head_dim` (ADM's num_head_channels; Imagen F.1 uses 64): heads = channels // head_dim.
  - only `num_heads` (Efficient U-Net's 8 heads, App. F.2): head_dim = channels // num_heads.
  - both (imagen-pytorch's heads x dim_head): the attention width is heads * head_dim,
    independent of `channels`.
  """
  if num_heads is None and head_dim is None:
    raise ValueError("attention needs num_heads or head_dim (or both); got neither")
  if num_heads is not None and head_dim is not None:
    return int(num_heads), int(head_dim)
  if head_dim is not None:
    if channels % head_dim:
      raise ValueError(f"head_dim={head_dim} must divide the channel count {channels}")
    return channels // head_dim, int(head_dim)
  if channels % num_heads:
    raise ValueError(f"num_heads={num_heads} must divide the channel count {channels}")
  return int(num_heads), channels // num_heads


ATTN_IMPLS = ("auto", "dense", "per_example", "flash", "dot_product")
# Implementations that only make sense when the program runs on CPU.
CPU_ONLY_IMPLS = ("per_example",)


# The scope of softmax(q k^T) v, what a fused attention kernel computes (the projections are
# outside it).
CORE_SCOPE = "attention_core"


def _dense_attention(q, k, v, mask, dtype):
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("...tnd,...snd->...nts", q, k, preferred_element_type=jnp.float32)
  logits = logits * scale
  # `where`, not an additive bias: masked logits become exactly -inf-like before the max, so
  # their exp underflows to exactly 0 and masked keys/values have no effect at all.
  logits = jnp.where(mask[..., None, None, :], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum("...nts,...snd->...tnd", weights, v.astype(dtype))


def target_platform() -> str:
  """The platform the program being traced is compiled for: that of the mesh in effect
  (`jax.set_mesh`; a TPU topology's devices in an ahead-of-time compile on a CPU machine),
  else the default backend's."""
  mesh = jax.sharding.get_abstract_mesh()  # works inside `jax.jit`, unlike get_mesh
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def _target_device_count() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return jax.device_count() if mesh.empty else mesh.size


def resolve_impl(impl: str, num_queries: int, num_keys: int, platform: str | None = None) -> str:
  """The implementation `impl` stands for on `platform` (default: `target_platform()`).

  "auto": TPU -> "flash" (Pallas' kernel); GPU -> "dot_product" (cuDNN's kernel where it
  applies); CPU -> "per_example" on one device with T * S > 2**16 (the dense logits make
  CPU attention memory-bound, docs/results/cpu_speed.md), else "dense".
  """
  if impl not in ATTN_IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; allowed: {ATTN_IMPLS}")
  if impl != "auto":
    return impl
  platform = platform or target_platform()
  if platform == "tpu":
    return "flash"
  if platform in ("gpu", "cuda", "rocm"):
    return "dot_product"
  big = num_queries * num_keys > 2**16
  return "per_example" if big and _target_device_count() == 1 else "dense"


_RECORDERS: list[list[str]] = []


@contextlib.contextmanager
def recording():
  """Collects the implementation every attention layer traced inside resolves to (for
  example `dot_product(cudnn)`), so a compiler can report and check what it compiled."""
  seen: list[str] = []
  _RECORDERS.append(seen)
  try:
    yield seen
  finally:
    _RECORDERS.remove(seen)


def masked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dtype: Dtype, impl: str = "dense"
) -> jax.Array:
  """softmax(q k^T / sqrt(D) + mask) v with float32 logits and softmax.

  q: [B, T, N, D]; k, v: [B, S, N, D]; mask: bool [B, S] (True = may be attended to; every
  row needs at least one True, which the null token guarantees). Returns [B, T, N, D].

  impl "dense": one batched einsum; the [B, N, T, S] logits are materialised. "per_example":
  `lax.map` over the batch, one example's [N, T, S] logits at a time, rematerialised on the
  backward pass (flash-attention's memory idea without a kernel; CPU only: the loop runs over
  the batch axis, which a mesh shards). "flash": Pallas' TPU kernel, "dot_product":
  `jax.nn.dot_product_attention`, cuDNN on GPU (`attention_kernels`). "auto" follows the
  platform the program is compiled for (`resolve_impl`), not the one tracing it.
  """
  impl = resolve_impl(impl, q.shape[1], k.shape[1])
  if impl == "dot_product":
    cudnn = target_platform() in ("gpu", "cuda") and attention_kernels.cudnn_applies(q)
    name = f"dot_product({'cudnn' if cudnn else 'xla'})"
  else:
    name = impl
  for seen in _RECORDERS:
    seen.append(name)
  # Named: the FLOP count (`nn.flops`) and the HLO breakdown tell the core from the projections.
  with jax.named_scope(CORE_SCOPE):
    if impl == "dense":
      return _dense_attention(q, k, v, mask, dtype)
    if impl == "flash":
      return attention_kernels.flash(q, k, v, mask, dtype)
    if impl == "dot_product":
      return attention_kernels.dot_product(q, k, v, mask, dtype, cudnn=cudnn)
    body = jax.checkpoint(lambda a: _dense_attention(*a, dtype))
    return jax.lax.map(body, (q, k, v, mask))


def learned_null_kv(
    module: nn.Module, batch: int, heads: int, head_dim: int
) -> tuple[jax.Array, jax.Array]:
  """The learned null key and value (imagen-pytorch's `null_kv`), the param `null_kv` [2, N, D]
  of `module`, in its compute dtype, broadcast over the batch: k_null, v_null [B, 1, N, D]."""
  null_kv = module.param(
      "null_kv",
      nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "heads", "kv")),
      (2, heads, head_dim),
      module.param_dtype,
  )
  null_kv = jnp.broadcast_to(null_kv.astype(module.dtype)[None], (batch, 2, heads, head_dim))
  return null_kv[:, 0:1], null_kv[:, 1:2]


class Attention(nn.Module):
  """Self-attention (optional) + text keys/values (optional) + a learned null key/value.

  __call__(x [B,H,W,C], text [B,L,Dt] or None, text_mask bool [B,L] or None) -> [B,H,W,C].
  `text` is the (already projected, masked-to-zero) text sequence; pass None for layers
  without text (e.g. a self-attention-only layer).
  """

  num_heads: int | None = None
  head_dim: int | None = None
  self_attention: bool = True
  norm_groups: int = 32
  impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x: jax.Array, text: jax.Array | None = None, text_mask: jax.Array | None = None
  ) -> jax.Array:
    b, hgt, wid, c = x.shape
    heads, hd = resolve_heads(c, self.num_heads, self.head_dim)
    if not self.self_attention and text is None:
      raise ValueError("a cross-attention-only layer (self_attention=False) needs text")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.GroupNorm(self.norm_groups, self.param_dtype)(x).astype(self.dtype)
    h = h.reshape(b, hgt * wid, c)

    ks, vs, masks = [], [], []
    k_null, v_null = learned_null_kv(self, b, heads, hd)  # always attendable
    ks.append(k_null)
    vs.append(v_null)
    masks.append(jnp.ones((b, 1), bool))

    if self.self_attention:
      # One fused matmul for q, k, v (C -> 3 N D).
      qkv = layers.DenseGeneral((3, heads, hd), ("embed", None, "heads", "kv"), name="qkv", **kw)(h)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      ks.append(k)
      vs.append(v)
      masks.append(jnp.ones((b, hgt * wid), bool))
    else:
      q = layers.DenseGeneral((heads, hd), ("embed", "heads", "kv"), name="q", **kw)(h)
    q = layers.constrain(q, layers.HEAD_AXES)

    if text is not None:
      if text_mask is None:
        raise ValueError("text given without text_mask")
      t = layers.LayerNorm(self.param_dtype)(text).astype(self.dtype)
      kv_txt = layers.DenseGeneral(
          (2, heads, hd), ("text_embed", None, "heads", "kv"), name="text_kv", **kw
      )(t)
      ks.append(kv_txt[:, :, 0])
      vs.append(kv_txt[:, :, 1])
      masks.append(text_mask.astype(bool))

    k = layers.constrain(jnp.concatenate(ks, axis=1), layers.HEAD_AXES)
    v = layers.constrain(jnp.concatenate(vs, axis=1), layers.HEAD_AXES)
    out = masked_attention(q, k, v, jnp.concatenate(masks, axis=1), self.dtype, self.impl)
    out = layers.constrain(out, layers.HEAD_AXES)
    # Zero-initialised output projection (ADM zero_module): the block starts as identity.
    out = layers.DenseGeneral(
        (c,), ("heads", "kv", "embed"), in_axes=2, zero_init=True, name="out", **kw
    )(out)
    # Pinned like a conv's output (layers.Conv): the kernel moves, not the batch.
    out = layers.constrain(out, ("activation_batch", None, "activation_embed"))
    out = out.reshape(b, hgt, wid, c)
    return layers.constrain(x + out.astype(x.dtype), layers.FEATURE_AXES)
