"""Fused attention kernels of the accelerators, behind `attention.masked_attention`'s contract.

Both compute o = softmax(q k^T / sqrt(D), masked) v without materialising the [B, N, T, S]
logits in HBM. q: [B, T, N, D]; k, v: [B, S, N, D]; mask: bool [B, S] (True = may be attended
to); returns [B, T, N, D] in `dtype`.

- `flash` (TPU): Pallas' flash attention kernel (Dao et al. 2022;
  `jax.experimental.pallas.ops.tpu.flash_attention`). The key mask is its segment ids: every
  query has segment 1, a key 1 if it may be attended to and 0 if not, so a masked key gets
  exactly zero weight. Keys are padded (masked) to the kernel's 128-lane blocks and queries to
  its sublane blocks; the padding is cut off again. The kernel works on one device's arrays,
  so on a mesh it runs under `shard_map` over the batch (and heads) axes that the logical
  rules in effect give to `HEAD_AXES`: each device attends over its own examples, which is
  what the dense einsum did under GSPMD. Off TPU it needs Pallas' interpret mode
  (`jax.experimental.pallas.tpu.force_tpu_interpret_mode`, around the traced forward and
  backward), which the parity tests use.
- `dot_product` (GPU): `jax.nn.dot_product_attention` with cuDNN's fused kernel where it
  accepts the inputs (bf16 / fp16, head_dim a multiple of 8 up to 128), else XLA's version.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash
from jax.sharding import PartitionSpec as P

# TPU vreg shape: keys are blocked by lanes (128), queries by sublanes (8).
_LANES = 128
_SUBLANES = 8
_MAX_BLOCK_Q = 128


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _flash_local(q, k, v, mask, dtype):
  """Pallas flash attention on one device's arrays (shapes as the module docstring)."""
  b, t, _, d = q.shape
  s = k.shape[1]
  block_q = min(_MAX_BLOCK_Q, _round_up(t, _SUBLANES))
  tp, sp = _round_up(t, block_q), _round_up(s, _LANES)
  # [B, X, N, D] -> [B, N, X', D] (the kernel's layout), zero-padded along X to X'.
  to_kernel = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(  # noqa: E731
      0, 2, 1, 3
  )
  segments = pallas_flash.SegmentIds(
      q=jnp.ones((b, tp), jnp.int32),
      kv=jnp.pad(mask.astype(jnp.int32), ((0, 0), (0, sp - s))),  # padded keys: masked
  )
  blocks = pallas_flash.BlockSizes(
      block_q=block_q,
      block_k_major=_LANES,
      block_k=_LANES,
      block_b=1,
      block_q_major_dkv=block_q,
      block_k_major_dkv=_LANES,
      block_k_dkv=_LANES,
      block_q_dkv=block_q,
      block_k_major_dq=_LANES,
      block_k_dq=_LANES,
      block_q_dq=block_q,
  )
  out = pallas_flash.flash_attention(
      to_kernel(q.astype(dtype), tp),
      to_kernel(k.astype(dtype), sp),
      to_kernel(v.astype(dtype), sp),
      segment_ids=segments,
      sm_scale=d**-0.5,
      block_sizes=blocks,
  )
  return out.transpose(0, 2, 1, 3)[:, :t]


def _split_spec(entry, size: int, mesh) -> str | tuple[str, ...] | None:
  """A spec entry kept only when its mesh axes divide `size` (else that dim stays whole)."""
  if entry is None:
    return None
  axes = (entry,) if isinstance(entry, str) else tuple(entry)
  axes = tuple(a for a in axes if a in mesh.axis_names)
  shards = math.prod(mesh.shape[a] for a in axes)
  return entry if axes and size % shards == 0 else None


def flash(q, k, v, mask, dtype):
  """TPU flash attention, under `shard_map` over the batch / heads axes on a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _flash_local(q, k, v, mask, dtype)
  # The logical rules in effect (none: every dim whole) place batch and heads.
  spec = nn.logical_to_mesh_axes(("activation_batch", None, "activation_heads", None))
  spec = tuple(spec) + (None,) * (4 - len(spec))
  batch = _split_spec(spec[0], q.shape[0], mesh)
  heads = _split_spec(spec[2], q.shape[2], mesh)
  qkv_spec = P(batch, None, heads, None)
  fn = jax.shard_map(
      lambda a, b_, c, m: _flash_local(a, b_, c, m, dtype),
      mesh=mesh,
      in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch, None)),
      out_specs=qkv_spec,
      check_vma=False,  # a Pallas kernel carries no varying-axes annotations
  )
  return fn(q, k, v, mask)


def cudnn_applies(q: jax.Array) -> bool:
  """cuDNN's fused attention takes bf16 / fp16 with head_dim a multiple of 8, at most 128."""
  d = q.shape[-1]
  return q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128


def dot_product(q, k, v, mask, dtype, *, cudnn: bool):
  """`jax.nn.dot_product_attention` (cuDNN's kernel when `cudnn`, else XLA's)."""
  return jax.nn.dot_product_attention(
      q.astype(dtype),
      k.astype(dtype),
      v.astype(dtype),
      mask=mask[:, None, None, :],
      implementation="cudnn" if cudnn else "xla",
  ).astype(dtype)
