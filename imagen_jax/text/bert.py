"""Flax Linen BERT encoder: a small pretrained frozen text encoder beside T5 (Imagen §2.1, §4.4).

Imagen's central finding is that a frozen, pretrained language model conditions the diffusion
model (§2.1; Fig. 4a compares T5, CLIP and BERT encoders, §4.4). T5-XXL is out of reach on a CPU;
a 6-layer BERT (sentence-transformers' all-MiniLM-L6-v2, 22M params, width 384) is not. This
module re-implements the encoder of Hugging Face's PyTorch ``BertModel`` (Devlin et al. 2019,
"BERT", §3 and Vaswani et al. 2017 §3) so that its checkpoints load and match numerically.

For token ids ``x [B, L]`` with a boolean mask ``m [B, L]`` (True = real token):

    h_0 = LN(E_word[x] + E_pos[0..L) + E_type[0])       # [B, L, D]
    for each layer l:                                   # post-norm residual blocks
        h = LN(h + Attn(h, m))
        h = LN(h + W_2 act(W_1 h + b_1) + b_2)          # act = exact gelu for BERT
    y = h * m[..., None]                                # [B, L, D], zero at padding

    LN(h) = w * (h - mean(h)) / sqrt(var(h) + eps) + b  # float32
    Attn: softmax(Q K^T / sqrt(d_head) + mask) V W_o + b_o, with Q = h W_q + b_q (same K, V)

The output is the last hidden state sequence (what Imagen reads from T5), not a pooled vector.
Params carry the logical axis names of ``t5`` (``vocab, embed, heads, kv, mlp``) so that the
mesh rules in config shard both encoders alike.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.text.t5 import HEAD_AXES, MASK_VALUE, MLP_AXES, TOKEN_AXES, constrain

ACTIVATIONS = ("gelu", "gelu_new", "relu")
# Checkpoint tensors that are not part of the encoder: skipped by name, never read (the pooler
# and MLM head of a BertForPreTraining; position_ids is a buffer, not a weight).
SKIPPED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids")
# A BertFor* checkpoint prefixes the encoder's tensors with "bert."; a BertModel does not.
KEY_PREFIX = "bert."


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder (field names follow HF ``BertConfig``)."""

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  initializer_range: float = 0.02
  # Compute dtype of matmuls; norms and softmax always run in float32 (as in t5).
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Matmul precision; None = "highest" for float32 compute, "default" for bf16/fp16 (as in t5).
  precision: str | None = None
  # Zero the output at padding (as t5's option; False keeps what HF's encoder computes there).
  zero_padding: bool = True

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"BertConfig.hidden_act={self.hidden_act!r}; allowed: {ACTIVATIONS}")
    if self.precision not in (None, "default", "high", "highest"):
      raise ValueError(
          f"BertConfig.precision={self.precision!r}; allowed: None (auto), "
          "'default', 'high', 'highest'"
      )
    for field in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
    ):
      if int(getattr(self, field)) <= 0:
        raise ValueError(f"BertConfig.{field}={getattr(self, field)!r} must be positive")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"BertConfig.hidden_size={self.hidden_size} is not a multiple of "
          f"num_attention_heads={self.num_attention_heads}"
      )

  @property
  def d_model(self) -> int:
    """The embedding width D (the name the stages and the registry use for every encoder)."""
    return self.hidden_size

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def matmul_precision(self) -> jax.lax.Precision:
    if self.precision is not None:
      return jax.lax.Precision(self.precision)
    is_f32 = jnp.dtype(self.dtype) == jnp.float32
    return jax.lax.Precision.HIGHEST if is_f32 else jax.lax.Precision.DEFAULT

  @classmethod
  def from_hf_dict(cls, hf: dict, **overrides) -> "BertConfig":
    """Builds a config from a HF ``config.json`` dict of a ``BertModel`` checkpoint."""
    if hf.get("model_type") != "bert":
      raise ValueError(
          f"config.json model_type={hf.get('model_type')!r}; this encoder loads 'bert' checkpoints"
      )
    pos = hf.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise ValueError(f"config.json position_embedding_type={pos!r}; only 'absolute' is supported")
    kwargs = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        hidden_act=hf.get("hidden_act", "gelu"),
        initializer_range=hf.get("initializer_range", 0.02),
    )
    kwargs.update(overrides)
    return cls(**kwargs)


# Encoder sizes of published checkpoints (the checkpoint's config.json wins when a path is given;
# these serve text_dim without files and the name/path consistency check).
PRESETS: dict[str, dict] = {
    # sentence-transformers/all-MiniLM-L6-v2 (Wang et al. 2020, "MiniLM", fine-tuned on 1B
    # sentence pairs): the offline pretrained encoder of the demo's encoder comparison.
    "all-minilm-l6-v2": dict(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
    ),
    "bert-base-uncased": dict(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
    ),
}


def preset_config(name: str, **overrides) -> BertConfig:
  """The ``BertConfig`` of a named published encoder (see ``PRESETS``)."""
  if name not in PRESETS:
    raise ValueError(f"unknown BERT preset {name!r}; known: {sorted(PRESETS)}")
  return BertConfig(**{**PRESETS[name], **overrides})


def _broadcast_last(v: jax.Array, ndim: int) -> jax.Array:
  return v.reshape((1,) * (ndim - 1) + v.shape)


class LayerNorm(nn.Module):
  """``w * (h - mean) / sqrt(var + eps) + b`` over the last axis, in float32 (HF ``LayerNorm``)."""

  eps: float = 1e-12
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    part = lambda init: nn.with_logical_partitioning(init, ("embed",))  # noqa: E731
    scale = self.param("scale", part(nn.initializers.ones), (d,), self.param_dtype)
    bias = self.param("bias", part(nn.initializers.zeros), (d,), self.param_dtype)
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return y * _broadcast_last(scale.astype(jnp.float32), y.ndim) + _broadcast_last(
        bias.astype(jnp.float32), y.ndim
    )


class _Params(nn.Module):
  """Shared helper: a normal(initializer_range) kernel or zero bias with logical axes."""

  config: BertConfig

  def kernel(self, name, shape, axes):
    init = nn.initializers.normal(stddev=self.config.initializer_range)
    p = self.param(name, nn.with_logical_partitioning(init, axes), shape, self.config.param_dtype)
    return p.astype(self.config.dtype)

  def bias(self, name, shape, axes):
    init = nn.with_logical_partitioning(nn.initializers.zeros, axes)
    return self.param(name, init, shape, self.config.param_dtype).astype(jnp.float32)


class SelfAttention(_Params):
  """``softmax(Q K^T / sqrt(d_head) + mask_bias) V W_o + b_o``; x: [B, L, D], mask_bias:
  [B, 1, 1, L] float32 (0 at real keys, -1e9 at padding)."""

  @nn.compact
  def __call__(self, x: jax.Array, mask_bias: jax.Array) -> jax.Array:
    c = self.config
    d, h, k = c.hidden_size, c.num_attention_heads, c.head_dim
    x = x.astype(c.dtype)
    einsum = functools.partial(jnp.einsum, precision=c.matmul_precision)

    def proj(name):
      w = self.kernel(name, (d, h, k), ("embed", "heads", "kv"))
      b = self.bias(f"{name}_bias", (h, k), ("heads", "kv"))
      y = einsum("bld,dhk->blhk", x, w, preferred_element_type=jnp.float32) + b[None, None]
      return constrain(y.astype(c.dtype), HEAD_AXES)

    q, kk, v = proj("query"), proj("key"), proj("value")
    logits = einsum("bqhk,bshk->bhqs", q, kk, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits / math.sqrt(k) + mask_bias, axis=-1)
    out = einsum("bhqs,bshk->bqhk", probs.astype(c.dtype), v)
    wo = self.kernel("out", (h, k, d), ("heads", "kv", "embed"))
    y = einsum("bqhk,hkd->bqd", out, wo, preferred_element_type=jnp.float32)
    return y + _broadcast_last(self.bias("out_bias", (d,), ("embed",)), 3)


class FeedForward(_Params):
  """``W_2 act(W_1 h + b_1) + b_2``; x: [B, L, D]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    d, f = c.hidden_size, c.intermediate_size
    act = {
        "gelu": lambda u: jax.nn.gelu(u, approximate=False),
        "gelu_new": lambda u: jax.nn.gelu(u, approximate=True),
        "relu": jax.nn.relu,
    }[c.hidden_act]
    dot = functools.partial(jnp.matmul, precision=c.matmul_precision)
    u = dot(x.astype(c.dtype), self.kernel("wi", (d, f), ("embed", "mlp"))).astype(jnp.float32)
    hidden = act(u + _broadcast_last(self.bias("wi_bias", (f,), ("mlp",)), 3))
    hidden = constrain(hidden.astype(c.dtype), MLP_AXES)
    y = dot(hidden, self.kernel("wo", (f, d), ("mlp", "embed"))).astype(jnp.float32)
    return y + _broadcast_last(self.bias("wo_bias", (d,), ("embed",)), 3)


class EncoderLayer(nn.Module):
  """Post-norm residual block: ``h = LN(h + Attn(h)); h = LN(h + FF(h))`` (float32 stream)."""

  config: BertConfig

  @nn.compact
  def __call__(self, h: jax.Array, mask_bias: jax.Array) -> jax.Array:
    c = self.config
    h = LayerNorm(c.layer_norm_eps, c.param_dtype, name="attention_norm")(
        h + SelfAttention(c, name="attention")(h, mask_bias)
    )
    h = LayerNorm(c.layer_norm_eps, c.param_dtype, name="mlp_norm")(
        h + FeedForward(c, name="mlp")(h)
    )
    return constrain(h, TOKEN_AXES)


class BertEncoder(nn.Module):
  """The BERT encoder: ``(ids [B, L] int32, mask [B, L] bool) -> emb [B, L, D] float32``.

  Every token has segment (token type) 0, as for a single sentence. The output is zero at
  padding positions (as ``t5.T5Encoder``; a dropped text is then exactly the null embedding).
  """

  config: BertConfig

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"ids {ids.shape} and mask {mask.shape} must both be [B, L]")
    length = ids.shape[1]
    if length > c.max_position_embeddings:
      raise ValueError(
          f"sequence length {length} exceeds max_position_embeddings="
          f"{c.max_position_embeddings}; allowed: text max_length <= {c.max_position_embeddings}"
      )

    def table(name, rows, axes):
      init = nn.initializers.normal(stddev=c.initializer_range)
      shape = (rows, c.hidden_size)
      p = self.param(name, nn.with_logical_partitioning(init, axes), shape, c.param_dtype)
      return p.astype(jnp.float32)

    words = table("word_embeddings", c.vocab_size, ("vocab", "embed"))
    positions = table("position_embeddings", c.max_position_embeddings, (None, "embed"))
    types = table("token_type_embeddings", c.type_vocab_size, (None, "embed"))
    h = jnp.take(words, ids, axis=0) + positions[None, :length] + types[None, :1]
    h = LayerNorm(c.layer_norm_eps, c.param_dtype, name="embeddings_norm")(h)
    h = constrain(h, TOKEN_AXES)
    mask_bias = jnp.where(mask.astype(bool), 0.0, MASK_VALUE).astype(jnp.float32)
    mask_bias = mask_bias[:, None, None, :]  # [B, 1, 1, L]: keys at padding get -1e9
    for i in range(c.num_hidden_layers):
      h = EncoderLayer(c, name=f"layers_{i}")(h, mask_bias)
    return h * mask.astype(jnp.float32)[..., None] if c.zero_padding else h


def abstract_params(config: BertConfig, seq_len: int = 8):
  """Boxed (logically partitioned) param shapes via ``jax.eval_shape``; allocates nothing."""
  ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, seq_len), jnp.bool_)
  return jax.eval_shape(
      lambda i, m: BertEncoder(config).init(jax.random.PRNGKey(0), i, m), ids, mask
  )["params"]


def logical_specs(config: BertConfig):
  """Tree of ``PartitionSpec`` with logical axis names, matching the (unboxed) params tree."""
  return nn.get_partition_spec(abstract_params(config))


def count_params(config: BertConfig) -> int:
  """Number of encoder parameters (from shapes only)."""
  leaves = jax.tree_util.tree_leaves(nn.unbox(abstract_params(config)))
  return int(sum(math.prod(x.shape) for x in leaves))


def tensor_map(config: BertConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], Any]]:
  """HF ``BertModel`` tensor name -> (our param path, expected HF shape, HF->ours transform).

  PyTorch ``Linear`` stores ``[out, in]``; ours is ``[in, out]``, with heads split out.
  """
  c = config
  d, h, k, f = c.hidden_size, c.num_attention_heads, c.head_dim, c.intermediate_size
  ident = lambda w: w  # noqa: E731
  out: dict[str, Any] = {
      "embeddings.word_embeddings.weight": (("word_embeddings",), (c.vocab_size, d), ident),
      "embeddings.position_embeddings.weight": (
          ("position_embeddings",),
          (c.max_position_embeddings, d),
          ident,
      ),
      "embeddings.token_type_embeddings.weight": (
          ("token_type_embeddings",),
          (c.type_vocab_size, d),
          ident,
      ),
      "embeddings.LayerNorm.weight": (("embeddings_norm", "scale"), (d,), ident),
      "embeddings.LayerNorm.bias": (("embeddings_norm", "bias"), (d,), ident),
  }
  qkv = lambda w: w.T.reshape(d, h, k)  # noqa: E731  [h*k, d] -> [d, h, k]
  qkv_bias = lambda b: b.reshape(h, k)  # noqa: E731
  for i in range(c.num_hidden_layers):
    hf, ours = f"encoder.layer.{i}", f"layers_{i}"
    for name in ("query", "key", "value"):
      out[f"{hf}.attention.self.{name}.weight"] = ((ours, "attention", name), (d, d), qkv)
      out[f"{hf}.attention.self.{name}.bias"] = (
          (ours, "attention", f"{name}_bias"),
          (d,),
          qkv_bias,
      )
    out[f"{hf}.attention.output.dense.weight"] = (
        (ours, "attention", "out"),
        (d, d),
        lambda w: w.T.reshape(h, k, d),
    )
    out[f"{hf}.attention.output.dense.bias"] = ((ours, "attention", "out_bias"), (d,), ident)
    for hf_norm, our_norm in (("attention.output", "attention_norm"), ("output", "mlp_norm")):
      out[f"{hf}.{hf_norm}.LayerNorm.weight"] = ((ours, our_norm, "scale"), (d,), ident)
      out[f"{hf}.{hf_norm}.LayerNorm.bias"] = ((ours, our_norm, "bias"), (d,), ident)
    out[f"{hf}.intermediate.dense.weight"] = ((ours, "mlp", "wi"), (f, d), lambda w: w.T)
    out[f"{hf}.intermediate.dense.bias"] = ((ours, "mlp", "wi_bias"), (f,), ident)
    out[f"{hf}.output.dense.weight"] = ((ours, "mlp", "wo"), (d, f), lambda w: w.T)
    out[f"{hf}.output.dense.bias"] = ((ours, "mlp", "wo_bias"), (d,), ident)
  return out
