"""Flax Linen T5 encoder (the frozen text encoder of Imagen, §2.1 / §4.4).

Imagen conditions every stage on the output sequence of a frozen T5-XXL encoder
(Saharia et al. 2022, §2.1). This module is a clean re-implementation of the T5 *encoder stack*
(Raffel et al. 2020, "Exploring the Limits of Transfer Learning", §2.1 and Appendix; the v1.1
changes: google-research/text-to-text-transfer-transformer, released_checkpoints.md) that
matches Hugging Face's PyTorch ``T5EncoderModel`` numerically, so real checkpoints load.

For an input of token ids ``x [B, L]`` with a boolean mask ``m [B, L]`` (True = real token):

    h_0 = E[x]                                          # [B, L, D], no sqrt(D) scaling in T5
    b   = RelPosBias(j - i)                             # [H, L, L], bucketed, computed once
    for each layer l:
        h = h + Attn(RMSNorm(h), b, m)                  # pre-norm residual
        h = h + FF(RMSNorm(h))
    y = RMSNorm(h) * m[..., None]                       # [B, L, D], zero at padding

    RMSNorm(h) = w * h / sqrt(mean(h^2) + eps)          # no mean subtraction, no bias, float32
    Attn: softmax(Q K^T + b + mask) V                   # no 1/sqrt(d_kv): T5 folds it into init
    FF (T5 1.0):            W_o relu(W_i h)
    FF (T5 1.1/ByT5/Flan):  W_o (act(W_i0 h) * W_i1 h)  # act = gelu_new (tanh approximation)

Params carry logical axis names (``vocab, embed, heads, kv, mlp``) so that a T5-XXL encoder
(4.6B params, Imagen §4.4) shards over the training mesh; the logical->mesh rules live in config.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# A large finite negative for masked attention logits: -inf would give NaN for a fully
# masked row (a dropped text has an all-False mask), and exp(-1e9 - max) underflows to exactly 0.
MASK_VALUE = -1e9

ACTIVATIONS = ("relu", "gelu_new", "gelu", "silu")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 encoder stack (field names follow HF ``T5Config``).

  ``is_gated`` + ``act`` encode HF's ``feed_forward_proj``: "relu" (T5 1.0) or "gated-gelu"
  (T5 1.1, ByT5, Flan-T5; HF maps its activation to ``gelu_new``).
  """

  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  act: str = "gelu_new"
  is_gated: bool = True
  # Compute dtype of matmuls; norms and softmax always run in float32 (DESIGN.md, dtype policy).
  dtype: Any = jnp.float32
  # Storage dtype of params.
  param_dtype: Any = jnp.float32
  # Matmul precision; None = "highest" for float32 compute (GPUs otherwise use TF32, which
  # moves the outputs far off the float32 reference: docs/results/numerics.md), "default" for
  # bf16/fp16 compute.
  precision: str | None = None
  # Zero the output at padding (ours); False keeps what HF's encoder computes there, which
  # DeepFloyd IF's U-Nets were trained to read (their pipeline attends to all 77 tokens).
  zero_padding: bool = True

  def __post_init__(self):
    if self.act not in ACTIVATIONS:
      raise ValueError(f"T5Config.act={self.act!r}; allowed: {ACTIVATIONS}")
    if self.precision not in (None, "default", "high", "highest"):
      raise ValueError(
          f"T5Config.precision={self.precision!r}; allowed: None (auto), "
          "'default', 'high', 'highest'"
      )
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
      if int(getattr(self, field)) <= 0:
        raise ValueError(f"T5Config.{field}={getattr(self, field)!r} must be positive")

  @property
  def matmul_precision(self) -> jax.lax.Precision:
    if self.precision is not None:
      return jax.lax.Precision(self.precision)
    is_f32 = jnp.dtype(self.dtype) == jnp.float32
    return jax.lax.Precision.HIGHEST if is_f32 else jax.lax.Precision.DEFAULT

  @property
  def feed_forward_proj(self) -> str:
    return f"gated-{self.act}" if self.is_gated else self.act

  @classmethod
  def from_hf_dict(cls, hf: dict, **overrides) -> "T5Config":
    """Builds a config from a HF ``config.json`` dict (T5 / ByT5 / Flan-T5 / T5 v1.1)."""
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    is_gated = parts[0] == "gated"
    act = parts[-1]
    if len(parts) > 2 or (len(parts) == 2 and not is_gated):
      raise ValueError(
          f"config.json feed_forward_proj={proj!r} is not of the form " "'{ACT}' or 'gated-{ACT}'"
      )
    if proj == "gated-gelu":
      act = "gelu_new"  # what HF's T5Config does for backwards compatibility
    # umt5 has a relative-position table per layer: a different architecture.
    if hf.get("model_type", "t5") not in ("t5", "mt5"):
      raise ValueError(
          f"config.json model_type={hf.get('model_type')!r}; "
          "this encoder loads T5-family checkpoints (model_type 't5' or 'mt5')"
      )
    kwargs = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        d_kv=hf["d_kv"],
        d_ff=hf["d_ff"],
        num_layers=hf["num_layers"],
        num_heads=hf["num_heads"],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        act=act,
        is_gated=is_gated,
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def relative_position_buckets(
    query_len: int, key_len: int, num_buckets: int, max_distance: int
) -> np.ndarray:
  """Bidirectional T5 relative-position buckets, ``[query_len, key_len]`` int32.

  T5 paper §2.1 ("Position embeddings"): relative offsets ``n = j - i`` share one scalar bias
  per head and bucket. Half of the buckets are for n > 0; within a half, offsets
  ``|n| < max_exact = num_buckets / 4`` each get their own bucket and larger ones are binned
  logarithmically up to ``max_distance`` (beyond it, the last bucket):

      bucket(n) = (n > 0) * nb/2 + (|n| if |n| < max_exact else
                  min(nb/2 - 1, max_exact + floor(log(|n| / max_exact)
                      / log(max_distance / max_exact) * (nb/2 - max_exact))))

  Computed in float32 with truncation exactly as HF's ``T5Attention._relative_position_bucket``
  does, so bucket boundaries agree bit-for-bit (checked against it in the tests). Sequence
  lengths are static, so this runs in numpy at trace time.
  """
  context = np.arange(query_len, dtype=np.int64)[:, None]
  memory = np.arange(key_len, dtype=np.int64)[None, :]
  rel = memory - context
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  max_exact = half // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):  # log(0) in the branch that is_small discards
    large = (
        np.log(rel.astype(np.float32) / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(half - max_exact)
    )
  large = max_exact + np.where(is_small, 0, large).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(is_small, rel, large)).astype(np.int32)


def _broadcast_last(v: jax.Array, ndim: int) -> jax.Array:
  """Reshapes a ``[D]`` vector to ``[1, ..., 1, D]`` (explicit: rank promotion is an error)."""
  return v.reshape((1,) * (ndim - 1) + v.shape)


# Activation constraints (logical names of `nn.layers`; no-ops without a mesh and rules): the
# batch stays split over the mesh's batch axes. Without them XLA lays the token activations out
# like the embedding table (d_model split over fsdp, the batch whole), and inside a train step
# T5-XXL then holds [global batch, L, d_ff] activations on every chip.
TOKEN_AXES = ("activation_batch", "activation_length", "activation_text_embed")
HEAD_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
MLP_AXES = ("activation_batch", "activation_length", "activation_mlp")


def constrain(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
  """`x` under the logical activation axes `names` (the text encoders: T5, BERT)."""
  return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
  """T5 layer norm: ``w * h / sqrt(mean(h^2) + eps)`` over the last axis, in float32."""

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        (x.shape[-1],),
        self.param_dtype,
    )
    x = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(var + self.eps)
    return (y * _broadcast_last(scale.astype(jnp.float32), y.ndim)).astype(self.dtype)


def init_std(config: T5Config, name: str) -> float:
  """Std of the normal init of param ``name`` (HF ``T5PreTrainedModel._init_weights``, factor 1).

  Q gets (D * d_kv)^-1/2, which stands in for the 1/sqrt(d_kv) logit scale T5 does not apply.
  """
  c = config
  stds = {
      "token_embedding": 1.0,
      "relative_attention_bias": c.d_model**-0.5,
      "query": (c.d_model * c.d_kv) ** -0.5,
      "key": c.d_model**-0.5,
      "value": c.d_model**-0.5,
      "out": (c.num_heads * c.d_kv) ** -0.5,
      "wi": c.d_model**-0.5,
      "wi_0": c.d_model**-0.5,
      "wi_1": c.d_model**-0.5,
      "wo": c.d_ff**-0.5,
  }
  return stds[name]


def _normal(config: T5Config, name: str):
  return nn.initializers.normal(stddev=init_std(config, name))


class SelfAttention(nn.Module):
  """Multi-head self-attention without logit scaling (T5): ``softmax(QK^T + bias) V W_o``.

  x: [B, L, D]; bias: [B or 1, H, L, L] float32, with the padding mask already folded in.
  Init: ``init_std``.
  """

  config: T5Config

  def _proj(self, name, shape, axes):
    return self.param(
        name,
        nn.with_logical_partitioning(_normal(self.config, name), axes),
        shape,
        self.config.param_dtype,
    )

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    c = self.config
    d, h, k = c.d_model, c.num_heads, c.d_kv
    wq = self._proj("query", (d, h, k), ("embed", "heads", "kv"))
    wk = self._proj("key", (d, h, k), ("embed", "heads", "kv"))
    wv = self._proj("value", (d, h, k), ("embed", "heads", "kv"))
    wo = self._proj("out", (h, k, d), ("heads", "kv", "embed"))
    x = x.astype(c.dtype)
    einsum = functools.partial(jnp.einsum, precision=c.matmul_precision)
    q = constrain(einsum("bld,dhk->blhk", x, wq.astype(c.dtype)), HEAD_AXES)
    kk = constrain(einsum("bld,dhk->blhk", x, wk.astype(c.dtype)), HEAD_AXES)
    v = constrain(einsum("bld,dhk->blhk", x, wv.astype(c.dtype)), HEAD_AXES)
    logits = einsum("bqhk,bshk->bhqs", q, kk, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits + bias, axis=-1)  # float32 softmax (HF: .float())
    out = einsum("bhqs,bshk->bqhk", probs.astype(c.dtype), v)
    return einsum("bqhk,hkd->bqd", out, wo.astype(c.dtype))


class FeedForward(nn.Module):
  """T5 1.0 ``W_o relu(W_i h)`` or gated (T5 1.1) ``W_o (act(W_i0 h) * W_i1 h)``; x: [B, L, D]."""

  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config

    def kernel(name, shape, axes):
      return self.param(
          name, nn.with_logical_partitioning(_normal(c, name), axes), shape, c.param_dtype
      ).astype(c.dtype)

    act = {
        "relu": jax.nn.relu,
        "gelu_new": lambda u: jax.nn.gelu(u, approximate=True),
        "gelu": lambda u: jax.nn.gelu(u, approximate=False),
        "silu": jax.nn.silu,
    }[c.act]
    x = x.astype(c.dtype)
    dot = functools.partial(jnp.matmul, precision=c.matmul_precision)
    if c.is_gated:
      gate = dot(x, kernel("wi_0", (c.d_model, c.d_ff), ("embed", "mlp")))
      lin = dot(x, kernel("wi_1", (c.d_model, c.d_ff), ("embed", "mlp")))
      hidden = act(gate) * lin
    else:
      hidden = act(dot(x, kernel("wi", (c.d_model, c.d_ff), ("embed", "mlp"))))
    hidden = constrain(hidden, MLP_AXES)
    return dot(hidden, kernel("wo", (c.d_ff, c.d_model), ("mlp", "embed")))


class EncoderLayer(nn.Module):
  """Pre-norm residual block: ``h += Attn(RMSNorm(h)); h += FF(RMSNorm(h))``."""

  config: T5Config

  @nn.compact
  def __call__(self, h: jax.Array, bias: jax.Array) -> jax.Array:
    c = self.config

    def norm(name):
      return RMSNorm(c.layer_norm_epsilon, c.dtype, c.param_dtype, name=name)

    # The residual stream h stays float32 (bf16 sums drift over 24 layers); the sublayers
    # compute in c.dtype and their outputs are added in float32.
    h = h + SelfAttention(c, name="attention")(norm("pre_attention_layer_norm")(h), bias)
    h = h + FeedForward(c, name="mlp")(norm("pre_mlp_layer_norm")(h))
    return constrain(h, TOKEN_AXES)


class T5Encoder(nn.Module):
  """The T5 encoder stack: ``(ids [B, L] int32, mask [B, L] bool) -> emb [B, L, D] float32``.

  The output is zero at padding positions (HF returns garbage there; Imagen's consumers mask
  it anyway, and zeros make a dropped text exactly the null embedding), unless
  `config.zero_padding` is False (DeepFloyd IF reads HF's values there).
  """

  config: T5Config

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"ids {ids.shape} and mask {mask.shape} must both be [B, L]")
    embedding = self.param(
        "token_embedding",
        nn.with_logical_partitioning(_normal(c, "token_embedding"), ("vocab", "embed")),
        (c.vocab_size, c.d_model),
        c.param_dtype,
    )
    h = jnp.take(embedding, ids, axis=0).astype(jnp.float32)  # residual stream in float32
    h = constrain(h, TOKEN_AXES)

    # Relative position bias: computed once (in HF it lives in layer 0) and shared by layers.
    rel_table = self.param(
        "relative_attention_bias",
        nn.with_logical_partitioning(_normal(c, "relative_attention_bias"), (None, "heads")),
        (c.relative_attention_num_buckets, c.num_heads),
        c.param_dtype,
    )
    length = ids.shape[1]
    buckets = relative_position_buckets(
        length, length, c.relative_attention_num_buckets, c.relative_attention_max_distance
    )
    bias = jnp.take(rel_table.astype(jnp.float32), jnp.asarray(buckets), axis=0)  # [L, L, H]
    bias = jnp.transpose(bias, (2, 0, 1))[None]  # [1, H, L, L]
    mask_bias = jnp.where(mask.astype(bool), 0.0, MASK_VALUE).astype(jnp.float32)
    bias = bias + mask_bias[:, None, None, :]  # [B, H, L, L]; keys at padding get -1e9

    for i in range(c.num_layers):
      h = EncoderLayer(c, name=f"layers_{i}")(h, bias)
    y = RMSNorm(c.layer_norm_epsilon, jnp.float32, c.param_dtype, name="final_layer_norm")(h)
    return y * mask.astype(jnp.float32)[..., None] if c.zero_padding else y


def abstract_params(config: T5Config, seq_len: int = 8):
  """Boxed (logically partitioned) param shapes via ``jax.eval_shape``; allocates nothing."""
  ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, seq_len), jnp.bool_)
  return jax.eval_shape(
      lambda i, m: T5Encoder(config).init(jax.random.PRNGKey(0), i, m), ids, mask
  )["params"]


def logical_specs(config: T5Config):
  """Tree of ``PartitionSpec`` with logical axis names, matching the (unboxed) params tree."""
  return nn.get_partition_spec(abstract_params(config))


def count_params(config: T5Config) -> int:
  """Number of encoder parameters (from shapes only)."""
  leaves = jax.tree_util.tree_leaves(nn.unbox(abstract_params(config)))
  return int(sum(math.prod(x.shape) for x in leaves))


def per_device_param_bytes(config: T5Config, rules, axis_sizes: dict[str, int]) -> int:
  """Bytes of params held by one device when sharded by logical ``rules`` over a mesh.

  Computed from shapes and PartitionSpecs only (no devices): each dim is split over the
  product of the mesh axes it maps to (ceil, as JAX pads uneven shards); unmapped dims and
  unmapped logical axes are replicated. ``axis_sizes``: e.g. ``{"data": 1, "fsdp": 16}``.
  """
  abstract = abstract_params(config)
  specs = jax.tree_util.tree_leaves(
      nn.get_partition_spec(abstract), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
  )
  leaves = jax.tree_util.tree_leaves(nn.unbox(abstract))
  itemsize = jnp.dtype(config.param_dtype).itemsize
  total = 0
  for leaf, spec in zip(leaves, specs):
    mesh_axes = nn.logical_to_mesh_axes(spec, rules)
    local = 1
    for i, dim in enumerate(leaf.shape):
      axes = mesh_axes[i] if i < len(mesh_axes) else None
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      unknown = [a for a in axes if a not in axis_sizes]
      if unknown:
        raise ValueError(f"rules map to mesh axes {unknown} not in {sorted(axis_sizes)}")
      split = math.prod(axis_sizes[a] for a in axes)
      local *= -(-dim // split)
    total += local * itemsize
  return total


@functools.partial(jax.jit, static_argnums=(1,))
def _standard_normal(seed: jax.Array, size: int) -> jax.Array:
  return jax.random.normal(jax.random.PRNGKey(seed), (size,), jnp.float32)


def init_params(config: T5Config, seed: int):
  """Random T5 params (``init_std`` scales, unit norm scales) from a constant seed, unboxed.

  One threefry draw of all the normals, sliced per param in tree order, then scaled: the same
  distribution as ``T5Encoder.init`` but a single small program (``init`` compiles a threefry
  per param plus the forward pass, tens of seconds on a loaded CPU). ``jax.random``'s threefry
  is deterministic across machines and backends for a given JAX version.
  """
  abstract = nn.unbox(abstract_params(config))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  names = [path[-1].key for path, _ in leaves]
  drawn = [math.prod(leaf.shape) for (_, leaf), n in zip(leaves, names) if n != "scale"]
  # Slicing and scaling on the host: eager jnp ops would each compile a tiny program.
  flat = np.asarray(_standard_normal(seed, sum(drawn)))
  out, offset = [], 0
  for (_, leaf), name in zip(leaves, names):
    if name == "scale":
      value = np.ones(leaf.shape, np.float32)
    else:
      size = math.prod(leaf.shape)
      value = flat[offset : offset + size].reshape(leaf.shape) * np.float32(init_std(config, name))
      offset += size
    out.append(jnp.asarray(value.astype(jnp.dtype(config.param_dtype))))
  return jax.tree_util.tree_unflatten(treedef, out)


# Encoder sizes of the published checkpoints (the checkpoint's config.json always wins when a
# path is given; these serve eval_shape, memory planning and a name/path consistency check).
_V11 = dict(vocab_size=32128, d_kv=64, act="gelu_new", is_gated=True)
_V10 = dict(vocab_size=32128, act="relu", is_gated=False)
_BYT5 = dict(vocab_size=384, d_kv=64, act="gelu_new", is_gated=True)
PRESETS: dict[str, dict] = {
    "t5-v1_1-small": dict(_V11, d_model=512, d_ff=1024, num_layers=8, num_heads=6),
    "t5-v1_1-base": dict(_V11, d_model=768, d_ff=2048, num_layers=12, num_heads=12),
    "t5-v1_1-large": dict(_V11, d_model=1024, d_ff=2816, num_layers=24, num_heads=16),
    "t5-v1_1-xl": dict(_V11, d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    "t5-v1_1-xxl": dict(_V11, d_model=4096, d_ff=10240, num_layers=24, num_heads=64),
    "t5-small": dict(_V10, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "t5-base": dict(_V10, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "t5-large": dict(_V10, d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16),
    "t5-3b": dict(_V10, d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_heads=32),
    "t5-11b": dict(_V10, d_model=1024, d_kv=128, d_ff=65536, num_layers=24, num_heads=128),
    "byt5-small": dict(_BYT5, d_model=1472, d_ff=3584, num_layers=12, num_heads=6),
    "byt5-base": dict(_BYT5, d_model=1536, d_ff=3968, num_layers=18, num_heads=12),
    # Offline demo/test encoder: ByT5 vocabulary, T5 1.1 block, fixed random weights.
    "byt5-tiny-random": dict(_BYT5, d_model=256, d_kv=64, d_ff=512, num_layers=2, num_heads=4),
}
# Flan-T5 checkpoints are T5 1.1 architectures (Chung et al. 2022).
for _size in ("small", "base", "large", "xl", "xxl"):
  PRESETS[f"flan-t5-{_size}"] = PRESETS[f"t5-v1_1-{_size}"]


def preset_config(name: str, **overrides) -> T5Config:
  """The ``T5Config`` of a named published encoder (see ``PRESETS``)."""
  if name not in PRESETS:
    raise ValueError(f"unknown T5 preset {name!r}; known: {sorted(PRESETS)}")
  return T5Config(**{**PRESETS[name], **overrides})
