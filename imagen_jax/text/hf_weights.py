"""Load a T5 encoder from a local Hugging Face checkpoint directory (safetensors only).

Layout: ``config.json`` plus ``model.safetensors`` or a sharded ``model.safetensors.index.json``
(T5-XXL ships sharded). Encoder-only (``T5EncoderModel``, e.g. DeepFloyd IF's t5-v1_1-xxl) and
full (``T5ForConditionalGeneration``, e.g. google/t5-v1_1-xxl) checkpoints both load: tensors
named ``decoder.*`` / ``lm_head.*`` are skipped by name and never read; shard files holding only
such tensors are never opened. A BERT checkpoint (``config.json`` model_type "bert", e.g.
sentence-transformers' all-MiniLM-L6-v2) loads the same way into ``bert.BertEncoder``
(``bert.tensor_map``; ``pooler.*`` / ``cls.*`` skipped, a ``bert.`` name prefix accepted).

Streaming: every tensor's name and shape is validated from the safetensors headers first
(missing / unknown / mis-shaped encoder tensors are errors naming them), then tensors are read
one at a time, converted (PyTorch ``Linear`` stores ``[out, in]``; ours is ``[in, out]``), cast to
``param_dtype`` and placed straight into its target sharding, so peak host memory is about one
tensor (the largest is T5-XXL's 32128 x 4096 embedding).
PyTorch ``.bin`` files are pickles and are refused (loading them can execute code).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from tqdm.auto import tqdm

from imagen_jax.text import bert
from imagen_jax.text.t5 import T5Config

CONVERT_HINT = (
    "Convert it once to safetensors with transformers + torch:\n"
    "    from transformers import T5EncoderModel\n"
    "    T5EncoderModel.from_pretrained(SRC).save_pretrained(DST, safe_serialization=True)\n"
    "(then copy the tokenizer files, e.g. spiece.model / tokenizer.json, into DST)"
)

# Prefixes of tensors that are not part of the encoder: skipped by name, never read.
SKIPPED_PREFIXES = ("decoder.", "lm_head.")
# T5 ties encoder.embed_tokens to shared; safetensors stores a tied tensor under one name only.
EMBED_ALIASES = ("shared.weight", "encoder.embed_tokens.weight")


class CheckpointError(ValueError):
  """The checkpoint directory does not hold a loadable T5 or BERT encoder."""


def read_config(path: str, **overrides) -> "T5Config | bert.BertConfig":
  """``T5Config`` (or ``bert.BertConfig`` for ``model_type`` "bert") from ``path/config.json``
  (``overrides``: e.g. dtype, param_dtype)."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise CheckpointError(f"no config.json in checkpoint directory {path!r}")
  with open(cfg_file) as f:
    hf = json.load(f)
  if hf.get("model_type") == "bert":
    return bert.BertConfig.from_hf_dict(hf, **overrides)
  return T5Config.from_hf_dict(hf, **overrides)


def _transpose(w):
  return w.T


def tensor_map(config: T5Config) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], Callable]]:
  """HF encoder tensor name -> (our param path, expected HF shape, HF->ours transform).

  The embedding is listed under ``shared.weight``; ``encoder.embed_tokens.weight`` is accepted
  in its place (see ``EMBED_ALIASES``).
  """
  c = config
  d, h, k, f = c.d_model, c.num_heads, c.d_kv, c.d_ff
  out: dict[str, Any] = {
      "shared.weight": (("token_embedding",), (c.vocab_size, d), lambda w: w),
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (
          ("relative_attention_bias",),
          (c.relative_attention_num_buckets, h),
          lambda w: w,
      ),
      "encoder.final_layer_norm.weight": (("final_layer_norm", "scale"), (d,), lambda w: w),
  }
  qkv = lambda w: w.T.reshape(d, h, k)  # noqa: E731  [h*k, d] -> [d, h, k]
  for i in range(c.num_layers):
    hf = f"encoder.block.{i}.layer"
    ours = f"layers_{i}"
    for name, our_name in (("q", "query"), ("k", "key"), ("v", "value")):
      out[f"{hf}.0.SelfAttention.{name}.weight"] = ((ours, "attention", our_name), (h * k, d), qkv)
    out[f"{hf}.0.SelfAttention.o.weight"] = (
        (ours, "attention", "out"),
        (d, h * k),
        lambda w: w.T.reshape(h, k, d),
    )
    out[f"{hf}.0.layer_norm.weight"] = (
        (ours, "pre_attention_layer_norm", "scale"),
        (d,),
        lambda w: w,
    )
    out[f"{hf}.1.layer_norm.weight"] = ((ours, "pre_mlp_layer_norm", "scale"), (d,), lambda w: w)
    wis = ("wi_0", "wi_1") if c.is_gated else ("wi",)
    for name in wis:
      out[f"{hf}.1.DenseReluDense.{name}.weight"] = ((ours, "mlp", name), (f, d), _transpose)
    out[f"{hf}.1.DenseReluDense.wo.weight"] = ((ours, "mlp", "wo"), (d, f), _transpose)
  return out


def checkpoint_files(path: str) -> dict[str, str]:
  """Tensor name -> safetensors file path, from ``model.safetensors`` or its sharded index."""
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint path {path!r} is not a directory")
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index} has no 'weight_map' dict")
    missing = sorted({v for v in weight_map.values() if not os.path.isfile(os.path.join(path, v))})
    if missing:
      raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
    return {key: os.path.join(path, v) for key, v in weight_map.items()}
  if os.path.isfile(single):
    with safe_open(single, framework="numpy") as f:
      return {key: single for key in f.keys()}
  if any(
      name.startswith("pytorch_model") and name.endswith((".bin", ".bin.index.json"))
      for name in os.listdir(path)
  ):
    raise CheckpointError(
        f"{path!r} holds only PyTorch .bin weights (pickle), which this project does not "
        f"load. {CONVERT_HINT}"
    )
  raise CheckpointError(
      f"no model.safetensors or model.safetensors.index.json in {path!r} "
      f"(found: {sorted(os.listdir(path))})"
  )


def _plan(config, files: dict[str, str]) -> list[tuple[str, str, tuple, Callable]]:
  """Validates names and shapes from headers; returns [(hf_key, file, our_path, transform)]."""
  if isinstance(config, bert.BertConfig):
    # A BertFor* checkpoint prefixes the encoder's tensors with "bert.": match bare names.
    names = {k.removeprefix(bert.KEY_PREFIX): k for k in files}
    expected, skipped, aliases = bert.tensor_map(config), bert.SKIPPED_PREFIXES, ()
    arch = f"a BERT encoder with num_hidden_layers={config.num_hidden_layers}"
  else:
    names = {k: k for k in files}
    expected, skipped, aliases = tensor_map(config), SKIPPED_PREFIXES, EMBED_ALIASES
    arch = (
        f"a T5 encoder with feed_forward_proj={config.feed_forward_proj!r} and "
        f"num_layers={config.num_layers}"
    )
  encoder_keys = [k for k in names if not k.startswith(skipped)]
  present = set(encoder_keys)
  embed_key = next((a for a in aliases if a in present), None)
  unknown = sorted(k for k in encoder_keys if k not in expected and k not in aliases)
  if unknown:
    raise CheckpointError(
        f"unknown encoder tensor(s) {unknown[:8]}{' ...' if len(unknown) > 8 else ''}: "
        f"not part of {arch} (does config.json match the weights?)"
    )
  wanted = dict(expected)
  if embed_key is not None:
    wanted[embed_key] = wanted.pop("shared.weight")
  missing = sorted(k for k in wanted if k not in present)
  if aliases and embed_key is None:
    missing = [" or ".join(aliases)] + [m for m in missing if m != "shared.weight"]
  if missing:
    raise CheckpointError(
        f"missing encoder tensor(s) {missing[:8]}"
        f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)"
    )
  plan = []
  by_file: dict[str, list[str]] = {}
  for key in wanted:
    by_file.setdefault(files[names[key]], []).append(key)
  for file, keys in by_file.items():
    with safe_open(file, framework="numpy") as f:
      for key in keys:
        our_path, shape, fn = wanted[key]
        got = tuple(f.get_slice(names[key]).get_shape())
        if got != shape:
          raise CheckpointError(
              f"shape mismatch for {names[key]!r} in {os.path.basename(file)}: checkpoint has "
              f"{got}, config.json implies {shape}"
          )
        plan.append((names[key], file, our_path, fn))
  return plan


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _place(array: np.ndarray, sharding) -> jax.Array:
  """Puts a host array into ``sharding``, copying only this process's addressable shards."""
  if sharding is None:
    return jnp.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def load_params(path: str, config, *, shardings=None, progress: bool = True):
  """Reads the encoder params of the checkpoint in ``path`` into our param tree.

  Args:
    path: local HF directory (``config.json`` + safetensors).
    config: the encoder config (normally ``read_config(path)``: a ``T5Config`` or a
      ``bert.BertConfig``); ``param_dtype`` sets storage.
    shardings: optional tree (same structure as the params) of ``jax.sharding.Sharding``;
      each tensor is placed straight into its sharding as it is read.
    progress: show a tqdm progress bar over tensors.
  Returns:
    the params dict (unboxed) for ``T5Encoder(config)`` / ``BertEncoder(config)``.
  """
  plan = _plan(config, checkpoint_files(path))
  params: dict = {}
  iterator = plan
  if progress:
    iterator = tqdm(
        plan, desc=f"text encoder <- {os.path.basename(os.path.normpath(path))}", unit="tensor"
    )
  handles: dict[str, Any] = {}
  try:
    for key, file, our_path, fn in iterator:
      if file not in handles:
        handles[file] = safe_open(file, framework="numpy").__enter__()
      host = np.asarray(fn(handles[file].get_tensor(key)))
      host = np.ascontiguousarray(host.astype(jnp.dtype(config.param_dtype), copy=False))
      sharding = None if shardings is None else _get(shardings, our_path)
      _set(params, our_path, _place(host, sharding))
      del host  # one tensor in host memory at a time
  finally:
    for h in handles.values():
      h.__exit__(None, None, None)
  return params
