"""Conditioning shared by both U-Nets: logSNR/aug_level embeddings and the text pathway.

Imagen §2.5 and App. F.1: the text enters the network twice,
  (1) a pooled text vector (attention pooling over the T5 sequence), added to the timestep
      embedding, and
  (2) the full sequence, concatenated to the keys/values of the attention layers
      (`attention.Attention`).
"We find that LayerNorm for text embeddings in the attention and pooling layers further helps"
(§2.5): the raw encoder output is layer-normed here and again inside every attention layer.

Masking: tokens with mask False are zeroed on entry (`mask_text`) and excluded from every
softmax, so their values have exactly no effect. A dropped text (classifier-free guidance: all
zeros, all-False mask) pools to the learned null token only and stays finite.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.nn import attention, layers

Dtype = Any


def mask_text(text_emb: jax.Array, text_mask: jax.Array) -> jax.Array:
  """Zero the embeddings of masked tokens. [B,L,D], bool [B,L] -> [B,L,D]."""
  if text_emb.ndim != 3 or text_mask.shape != text_emb.shape[:2]:
    raise ValueError(
        f"text_emb must be [B, L, D] and text_mask [B, L]; got "
        f"{text_emb.shape} and {text_mask.shape}"
    )
  return jnp.where(text_mask.astype(bool)[:, :, None], text_emb, jnp.zeros((), text_emb.dtype))


def token_positions(length: int, width: int) -> jax.Array:
  """Fixed sinusoidal encoding of token positions 0..L-1 (Vaswani et al. 2017): [L, width].

  Row p = [cos(p f_k), sin(p f_k)] with f_k = 10000^(-k / (width/2)), as
  `layers.sinusoidal_embedding`; unit scale, like the layer-normed tokens it is added to.
  Parameter-free, so the network still accepts any text length L.
  """
  return layers.sinusoidal_embedding(jnp.arange(length, dtype=jnp.float32), width)


class AttentionPool(nn.Module):
  """Multi-head attention pooling of a token sequence to one vector (CLIP-style).

  query = Dense(masked mean of tokens)                    [B, 1, N, Dh]
  keys/values = [null ; Dense(tokens)], masked            [B, 1+L, N, Dh]
  pooled = Dense(softmax(q k^T / sqrt(Dh)) v)             [B, out_dim]
  with N = num_heads and N * Dh = out_dim.
  The paper names "attention pooling" without details (§2.5); this is our choice. The null
  token keeps the all-masked (dropped-text) case finite and gives it a learned value.
  """

  out_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    b, _, d = tokens.shape
    # Attention width = out_dim (not the text width D, which is 4096 for T5-XXL).
    heads, hd = attention.resolve_heads(self.out_dim, self.num_heads, None)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    count = jnp.maximum(mask.sum(axis=1, keepdims=True), 1).astype(jnp.float32)  # [B, 1]
    mean = tokens.astype(jnp.float32).sum(axis=1) / count  # [B, D]
    q = layers.DenseGeneral((heads, hd), ("text_embed", "heads", "kv"), name="q", **kw)(
        mean.astype(self.dtype)
    )
    kv = layers.DenseGeneral((2, heads, hd), ("text_embed", None, "heads", "kv"), name="kv", **kw)(
        tokens
    )
    k_null, v_null = attention.learned_null_kv(self, b, heads, hd)
    k = jnp.concatenate([k_null, kv[:, :, 0]], axis=1)
    v = jnp.concatenate([v_null, kv[:, :, 1]], axis=1)
    full_mask = jnp.concatenate([jnp.ones((b, 1), bool), mask.astype(bool)], axis=1)
    pooled = attention.masked_attention(q[:, None], k, v, full_mask, self.dtype)[:, 0]
    return layers.DenseGeneral(
        (self.out_dim,), ("heads", "kv", "embed"), in_axes=2, name="out", **kw
    )(pooled)


class Conditioning(nn.Module):
  """Builds the conditioning vector and the text sequence for the attention layers.

  emb = ScalarEmb(logsnr_to_unit(logsnr)) [+ ScalarEmb(aug_level)] + Dense(AttentionPool(text))
  Returns (emb [B, embed_dim], text [B, L, text_proj_dim or D] zero at masked tokens, mask).

  `text_positions` (ours, off for the paper's networks) adds `token_positions` to the projected
  sequence: attention pooling and cross-attention treat the tokens as a set, so word order
  reaches the U-Net only through the encoder's contextual features. A trained T5 provides them;
  a frozen *random* encoder (the offline demo's byt5-tiny-random) barely does, and then "a red
  square left of a blue circle" and "a blue square left of a red circle" look the same.

  With `text_proj_dim` set, the text is projected once (LayerNorm -> Dense(text_dim ->
  text_proj_dim)) and shared by all attention layers (saves ~130M parameters in the paper base
  model, which has 22 attention layers); with None, every attention layer and the pooling read
  the layer-normed encoder output directly, as a plain cross-attention with context_dim = 4096
  does. The paper is silent on this (ours). Each attention layer layer-norms the sequence again
  and projects it to its own keys/values.
  """

  embed_dim: int
  sinusoid_dim: int
  text_proj_dim: int | None
  pool_heads: int
  use_aug_level: bool = False
  text_positions: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, logsnr, text_emb, text_mask, aug_level=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b = logsnr.shape[0]
    if logsnr.shape != (b,):
      raise ValueError(f"logsnr must be [B], got shape {logsnr.shape}")
    if text_emb.shape[0] != b:
      raise ValueError(f"text_emb batch {text_emb.shape[0]} != logsnr batch {b}")
    emb = layers.ScalarEmbedding(self.embed_dim, self.sinusoid_dim, name="logsnr_emb", **kw)(
        layers.logsnr_to_unit(logsnr)
    )
    if self.use_aug_level:
      if aug_level is None or aug_level.shape != (b,):
        raise ValueError(
            "this super-resolution network needs aug_level of shape [B]; got "
            f"{None if aug_level is None else aug_level.shape}"
        )
      emb = emb + layers.ScalarEmbedding(
          self.embed_dim, self.sinusoid_dim, name="aug_level_emb", **kw
      )(aug_level)
    elif aug_level is not None:
      raise ValueError(
          "aug_level given to a network built without lowres conditioning " "(lowres_cond=False)"
      )

    mask = text_mask.astype(bool)
    text = mask_text(text_emb, mask)
    text = layers.constrain(text, layers.TEXT_AXES)
    text = layers.LayerNorm(self.param_dtype, name="text_norm")(text).astype(self.dtype)
    if self.text_proj_dim is not None:
      text = layers.dense(self.text_proj_dim, ("text_embed", "mlp"), name="text_proj", **kw)(text)
    if self.text_positions:
      text = text + token_positions(text.shape[1], text.shape[2]).astype(self.dtype)[None]
    # Re-zero masked tokens after the affine maps (LayerNorm bias, Dense bias) and the position
    # encoding, so that the sequence handed to attention is exactly zero there too.
    text = mask_text(text, mask)
    text = layers.constrain(text, layers.TEXT_AXES)
    pooled = AttentionPool(self.embed_dim, self.pool_heads, name="text_pool", **kw)(text, mask)
    emb = emb + pooled
    return layers.constrain(emb, layers.COND_AXES), text, mask
