"""CLIP (Radford et al. 2021) in Flax Linen, numerically matching Hugging Face's `CLIPModel`.

Used for CLIP score (Imagen §4.2, Figs. A.8/A.11: CLIP score vs FID-10K; the paper does not name
the CLIP model, NeMo uses ViT-L/14). Shapes come from the checkpoint's `config.json`, so ViT-B/32
(hidden 768, 12 layers, patch 32, projection 512) and ViT-L/14 (1024, 24 layers, patch 14,
projection 768) and tiny random test configs are the same code.

Vision tower (pixels `[B, S, S, 3]` NHWC, normalised):
  x = [class_embedding; Conv_pxp/stride p(pixels) flattened row-major] + position_embedding
  x = pre_layrnorm(x); x = encoder(x); pooled = post_layernorm(x[:, 0])
  image_embeds = pooled @ W_visual                                   [B, projection_dim]
Text tower (token ids `[B, L]`, attention mask `[B, L]`):
  x = token_embedding(ids) + position_embedding[:L]; x = encoder(x, causal & padding mask)
  x = final_layer_norm(x); pooled = x[b, eos_position_b]; text_embeds = pooled @ W_text
  where eos_position is argmax(ids) for legacy configs with `eos_token_id == 2` (the OpenAI
  checkpoints: EOS has the largest id) and else the first position whose id == eos_token_id,
  exactly as HF does.
Encoder layer (pre-LN): x += out_proj(MHA(layer_norm1(x))); x += fc2(act(fc1(layer_norm2(x)))),
act = quick_gelu `x * sigmoid(1.702 x)` (OpenAI) or exact `gelu`; attention logits scaled by
head_dim^-0.5, softmax in float32. All matmuls run at `precision=HIGHEST`.

Parameter names mirror HF's module tree (`text_model/encoder/layers_3/self_attn/q_proj/kernel`),
so loading `model.safetensors` is a rename + transpose (`load_clip_params`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from imagen_jax.evals.inception import flax_flatten, flax_unflatten

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """One transformer tower (fields named as in HF's CLIP{Text,Vision}Config)."""

  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # text only
  vocab_size: int = 0
  max_position_embeddings: int = 77
  eos_token_id: int = 2
  # vision only
  image_size: int = 224
  patch_size: int = 32


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: TowerConfig
  vision: TowerConfig
  projection_dim: int

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
    """From a HF `config.json` dict; missing fields take HF's CLIP defaults."""
    fields = {f.name for f in dataclasses.fields(TowerConfig)}

    def tower(sub: dict[str, Any], defaults: dict[str, Any]) -> TowerConfig:
      merged = {**defaults, **{k: v for k, v in sub.items() if k in fields}}
      return TowerConfig(**merged)

    text = tower(
        d.get("text_config") or {},
        dict(
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=8,
            vocab_size=49408,
            eos_token_id=49407,
        ),
    )
    vision = tower(
        d.get("vision_config") or {},
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    )
    return cls(text, vision, int(d.get("projection_dim", 512)))

  @classmethod
  def from_pretrained(cls, path: str) -> "CLIPConfig":
    with open(os.path.join(path, "config.json")) as f:
      return cls.from_dict(json.load(f))


def _activation(name: str):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  raise ValueError(
      f"unsupported CLIP hidden_act {name!r}; allowed: quick_gelu, gelu, "
      "gelu_new, gelu_pytorch_tanh"
  )


def _dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, precision=_HI, name=name)


class CLIPAttention(nn.Module):
  cfg: TowerConfig

  def setup(self):
    d = self.cfg.hidden_size
    self.q_proj, self.k_proj = _dense(d, "q_proj"), _dense(d, "k_proj")
    self.v_proj, self.out_proj = _dense(d, "v_proj"), _dense(d, "out_proj")

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x [B, L, D]; mask bool [B, 1, L, L] (True = may attend) or None."""
    b, l, d = x.shape
    h = self.cfg.num_attention_heads
    split = lambda t: t.reshape(b, l, h, d // h)  # noqa: E731
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HI) * (d // h) ** -0.5
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_HI).reshape(b, l, d)
    return self.out_proj(out)


class CLIPMLP(nn.Module):
  cfg: TowerConfig

  def setup(self):
    self.fc1 = _dense(self.cfg.intermediate_size, "fc1")
    self.fc2 = _dense(self.cfg.hidden_size, "fc2")

  def __call__(self, x):
    return self.fc2(_activation(self.cfg.hidden_act)(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
  cfg: TowerConfig

  def setup(self):
    eps = self.cfg.layer_norm_eps
    self.layer_norm1 = nn.LayerNorm(epsilon=eps, name="layer_norm1")
    self.self_attn = CLIPAttention(self.cfg, name="self_attn")
    self.layer_norm2 = nn.LayerNorm(epsilon=eps, name="layer_norm2")
    self.mlp = CLIPMLP(self.cfg, name="mlp")

  def __call__(self, x, mask):
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
  cfg: TowerConfig

  def setup(self):
    self.layers = [CLIPEncoderLayer(self.cfg) for _ in range(self.cfg.num_hidden_layers)]

  def __call__(self, x, mask=None):
    for layer in self.layers:
      x = layer(x, mask)
    return x


class CLIPTextEmbeddings(nn.Module):
  cfg: TowerConfig

  def setup(self):
    self.token_embedding = nn.Embed(self.cfg.vocab_size, self.cfg.hidden_size)
    self.position_embedding = nn.Embed(self.cfg.max_position_embeddings, self.cfg.hidden_size)

  def __call__(self, ids):
    return self.token_embedding(ids) + self.position_embedding(jnp.arange(ids.shape[1]))[None]


class CLIPTextTransformer(nn.Module):
  cfg: TowerConfig

  def setup(self):
    self.embeddings = CLIPTextEmbeddings(self.cfg)
    self.encoder = CLIPEncoder(self.cfg)
    self.final_layer_norm = nn.LayerNorm(epsilon=self.cfg.layer_norm_eps)

  def __call__(self, ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """ids int [B, L], attention_mask [B, L] (1 = token) -> pooled [B, D]."""
    l = ids.shape[1]
    if l > self.cfg.max_position_embeddings:
      raise ValueError(
          f"text length {l} > max_position_embeddings " f"{self.cfg.max_position_embeddings}"
      )
    causal = jnp.tril(jnp.ones((l, l), bool))[None, None]
    mask = causal & attention_mask.astype(bool)[:, None, None, :]
    x = self.final_layer_norm(self.encoder(self.embeddings(ids), mask))
    if self.cfg.eos_token_id == 2:  # legacy HF configs: EOS is the largest id in the vocab
      eos = jnp.argmax(ids, axis=-1)
    else:  # first EOS (pad may equal EOS)
      eos = jnp.argmax(ids == self.cfg.eos_token_id, axis=-1)
    return jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]


class CLIPVisionEmbeddings(nn.Module):
  cfg: TowerConfig

  @nn.compact
  def __call__(self, pixels):
    c = self.cfg
    if pixels.shape[1:] != (c.image_size, c.image_size, 3):
      raise ValueError(
          f"CLIP vision input must be [B, {c.image_size}, {c.image_size}, 3], "
          f"got {pixels.shape}"
      )
    d, p = c.hidden_size, c.patch_size
    patches = nn.Conv(
        d,
        (p, p),
        strides=(p, p),
        padding="VALID",
        use_bias=False,
        precision=_HI,
        name="patch_embedding",
    )(pixels)
    b = patches.shape[0]
    patches = patches.reshape(b, -1, d)  # row-major over (h, w), as torch's flatten(2)
    cls = self.param("class_embedding", nn.initializers.normal(d**-0.5), (d,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), patches], axis=1)
    pos = nn.Embed(x.shape[1], d, name="position_embedding")(jnp.arange(x.shape[1]))
    return x + pos[None]


class CLIPVisionTransformer(nn.Module):
  cfg: TowerConfig

  def setup(self):
    eps = self.cfg.layer_norm_eps
    self.embeddings = CLIPVisionEmbeddings(self.cfg)
    self.pre_layrnorm = nn.LayerNorm(epsilon=eps)  # sic: HF's name
    self.encoder = CLIPEncoder(self.cfg)
    self.post_layernorm = nn.LayerNorm(epsilon=eps)

  def __call__(self, pixels):
    x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
    return self.post_layernorm(x[:, 0])


class CLIPModel(nn.Module):
  """`get_image_features(pixels) -> [B, P]`, `get_text_features(ids, mask) -> [B, P]`
  (unnormalised projections, like HF); `__call__` returns both (used for init)."""

  config: CLIPConfig

  def setup(self):
    c = self.config
    self.text_model = CLIPTextTransformer(c.text)
    self.vision_model = CLIPVisionTransformer(c.vision)
    self.visual_projection = _dense(c.projection_dim, "visual_projection", use_bias=False)
    self.text_projection = _dense(c.projection_dim, "text_projection", use_bias=False)
    # exp(logit_scale) is the softmax temperature of contrastive training; unused by CLIP
    # score but loaded so that checkpoint loading stays strict.
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(1 / 0.07)), ())

  def get_image_features(self, pixels):
    return self.visual_projection(self.vision_model(pixels))

  def get_text_features(self, ids, attention_mask):
    return self.text_projection(self.text_model(ids, attention_mask))

  def __call__(self, ids, attention_mask, pixels):
    return self.get_image_features(pixels), self.get_text_features(ids, attention_mask)


def param_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
  """Flat `{"text_model/encoder/layers_0/self_attn/q_proj/kernel": shape, ...}` (no compute)."""
  v = config.vision
  shapes = jax.eval_shape(
      CLIPModel(config).init,
      jax.random.PRNGKey(0),
      jnp.zeros((1, 4), jnp.int32),
      jnp.ones((1, 4), jnp.int32),
      jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32),
  )
  return {k: tuple(x.shape) for k, x in flax_flatten(shapes["params"]).items()}


def hf_key_to_flax(key: str, expected: dict[str, tuple[int, ...]]) -> str | None:
  """HF `text_model.encoder.layers.0.mlp.fc1.weight` -> `text_model/encoder/layers_0/mlp/fc1/
  kernel` (Linear/Conv weight -> kernel, LayerNorm weight -> scale, Embedding weight ->
  embedding, raw params kept); None for buffers (`position_ids`)."""
  parts = key.split(".")
  if parts[-1] == "position_ids":
    return None
  path: list[str] = []
  for p in parts[:-1]:
    if p.isdigit() and path and path[-1] == "layers":
      path[-1] = f"layers_{p}"
    else:
      path.append(p)
  leaf = parts[-1]
  if leaf == "weight":
    for cand in ("kernel", "scale", "embedding"):
      k = "/".join(path + [cand])
      if k in expected:
        return k
    return "/".join(path + ["weight"])  # unknown; reported by the caller
  return "/".join(path + [leaf])


def load_clip_params(path: str, config: CLIPConfig) -> dict[str, Any]:
  """HF `model.safetensors` -> Flax params (float32); strict about names and shapes."""
  tensors = load_file(path)
  expected = param_shapes(config)
  out: dict[str, np.ndarray] = {}
  unknown = []
  for name, value in tensors.items():
    key = hf_key_to_flax(name, expected)
    if key is None:
      continue
    if key not in expected:
      unknown.append(name)
      continue
    value = np.asarray(value, np.float32)
    if value.ndim == 4:  # Conv OIHW -> HWIO
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2 and key.endswith("/kernel"):  # Linear [out, in] -> [in, out]
      value = value.T
    if value.shape != expected[key]:
      raise ValueError(
          f"{path}: {name} has shape {tensors[name].shape}, which does not "
          f"fit {key} {expected[key]} of the config's model"
      )
    out[key] = np.array(value, order="C")  # not ascontiguousarray: it makes 0-d 1-d
  missing = sorted(set(expected) - set(out))
  if unknown or missing:
    raise ValueError(
        f"{path}: not a CLIPModel checkpoint for this config: unexpected "
        f"{unknown[:5]} ({len(unknown)}), missing {missing[:5]} ({len(missing)})"
    )
  return flax_unflatten(out)
