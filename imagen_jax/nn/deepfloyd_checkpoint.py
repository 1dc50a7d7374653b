"""Load a DeepFloyd IF U-Net from a diffusers-format folder into `deepfloyd.IFUNet` params.

The folder a user downloads is diffusers' `unet/` subfolder of an IF model (`IF-I-XL-v1.0/unet`,
`IF-II-L-v1.0/unet`): `config.json` plus either `diffusion_pytorch_model.safetensors` or shards
with `diffusion_pytorch_model.safetensors.index.json` (a `*.fp16.safetensors` variant is
read when it is the only one). Nothing of torch is needed: the tensors are read with
safetensors' numpy reader, one at a time, and put straight into their shardings.

Name rule: a param path `("down_blocks_0_resnets_1", "conv1", "kernel")` is the diffusers tensor
`down_blocks.0.resnets.1.conv1.weight` (containers `down_blocks, up_blocks, resnets, attentions,
downsamplers, upsamplers, to_out` take their index with a dot). Layouts: conv kernels are torch
`[out, in, kh, kw]` -> ours `[kh, kw, in, out]`; dense kernels `[out, in]` -> `[in, out]`; norm
`weight` -> `scale`. The expected names and shapes come from the network's abstract params, so a
missing tensor, an unexpected one and a shape mismatch are each named before anything is read.
A `gs://` folder is copied locally first (`paths.local_copy`, the rule T5 checkpoints follow).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from imagen_jax import paths
from imagen_jax.nn import deepfloyd
from imagen_jax.nn.deepfloyd_config import IFConfig, read_config

WEIGHTS = "diffusion_pytorch_model"
_CONTAINERS = re.compile(
    r"(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)_(\d+)(_?)"
)


def _dotted(m: re.Match) -> str:
  """`resnets_1_` -> `resnets.1.` (the trailing `_` joined the next module name)."""
  return f"{m[1]}.{m[2]}" + ("." if m[3] else "")


class IFCheckpointError(ValueError):
  """The folder's tensors do not fit the network its config.json describes."""


def torch_name(path: tuple[str, ...]) -> str:
  """Our param path -> the diffusers tensor name (module doc)."""
  *mods, leaf = path
  mods = [_CONTAINERS.sub(_dotted, m.replace("mid_block_", "mid_block.", 1)) for m in mods]
  leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
  return ".".join(mods + [leaf])


def torch_shape(our_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  """The torch tensor's shape for one of ours (conv [kh,kw,in,out] -> [out,in,kh,kw])."""
  if leaf == "kernel" and len(our_shape) == 4:
    kh, kw, cin, cout = our_shape
    return (cout, cin, kh, kw)
  if leaf == "kernel" and len(our_shape) == 2:
    return tuple(our_shape[::-1])
  return tuple(our_shape)


def to_ours(array: np.ndarray, leaf: str) -> np.ndarray:
  """A torch tensor -> our layout (inverse of `torch_shape`)."""
  if leaf == "kernel" and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  return array


def checkpoint_files(path: str) -> dict[str, str]:
  """Tensor name -> safetensors file, from the single file or the sharded index."""
  if not os.path.isdir(path):
    raise IFCheckpointError(f"IF U-Net path {path!r} is not a directory")
  names = sorted(os.listdir(path))
  for variant in ("", ".fp16"):
    index = os.path.join(path, f"{WEIGHTS}{variant}.safetensors.index.json")
    single = os.path.join(path, f"{WEIGHTS}{variant}.safetensors")
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise IFCheckpointError(f"{index} has no 'weight_map' dict")
      missing = sorted(
          {v for v in weight_map.values() if not os.path.isfile(os.path.join(path, v))}
      )
      if missing:
        raise IFCheckpointError(f"{index} names shard files that do not exist: {missing}")
      return {k: os.path.join(path, v) for k, v in weight_map.items()}
    if os.path.isfile(single):
      with safe_open(single, framework="numpy") as f:
        return {k: single for k in f.keys()}
  if any(n.endswith(".bin") for n in names):
    raise IFCheckpointError(
        f"{path!r} holds only PyTorch .bin weights (pickle), which this project does not load; "
        "download the safetensors files (diffusion_pytorch_model*.safetensors)"
    )
  raise IFCheckpointError(
      f"no {WEIGHTS}.safetensors or {WEIGHTS}.safetensors.index.json in {path!r} (found: {names})"
  )


def abstract_params(model: deepfloyd.IFUNet, image_size: int = 8, text_len: int = 4) -> Any:
  """The network's boxed abstract params (`jax.eval_shape` of its init; sizes do not matter)."""
  c = model.config
  x = jnp.zeros((1, image_size, image_size, c.in_channels))
  t = jnp.zeros((1,))
  text = jnp.zeros((1, text_len, c.text_dim))
  noise = jnp.zeros((1,)) if c.is_sr else None
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, text, None, noise)["params"])


def plan(model: deepfloyd.IFUNet, files: dict[str, str]) -> dict[tuple[str, ...], str]:
  """Our param path -> torch name, after checking names and shapes against the headers."""
  flat = traverse_util.flatten_dict(nn.unbox(abstract_params(model)))
  want = {torch_name(p): (p, torch_shape(v.shape, p[-1])) for p, v in flat.items()}
  missing = sorted(set(want) - set(files))
  unexpected = sorted(set(files) - set(want))
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(
          f"missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
          f"({len(missing)} in all)"
      )
    if unexpected:
      parts.append(
          f"unexpected tensor(s) {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
          f" ({len(unexpected)} in all)"
      )
    raise IFCheckpointError(
        "; ".join(parts) + " for the network config.json describes (do they belong together?)"
    )
  by_file: dict[str, list[str]] = {}
  for name in want:
    by_file.setdefault(files[name], []).append(name)
  for file, names in by_file.items():
    with safe_open(file, framework="numpy") as f:
      for name in names:
        got = tuple(f.get_slice(name).get_shape())
        if got != want[name][1]:
          raise IFCheckpointError(
              f"shape mismatch for {name!r} in {os.path.basename(file)}: the checkpoint has "
              f"{got}, config.json implies {want[name][1]}"
          )
  return {p: name for name, (p, _) in want.items()}


def _place(array: np.ndarray, sharding) -> jax.Array:
  if sharding is None:
    return jnp.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def load_params(
    path: str, model: deepfloyd.IFUNet, *, shardings=None, param_dtype=jnp.float32
) -> dict:
  """The params of the diffusers folder `path` (local or `gs://`) for `model`.

  shardings: optional tree like the params of `jax.sharding.Sharding`; each tensor goes straight
  into its shards as it is read (one tensor in host memory at a time).
  """
  local = paths.local_copy(path) if paths.is_remote(path) else path
  files = checkpoint_files(local)
  mapping = plan(model, files)
  flat_shard = traverse_util.flatten_dict(shardings) if shardings is not None else {}
  out = {}
  handles: dict[str, Any] = {}
  try:
    for p, name in mapping.items():
      file = files[name]
      if file not in handles:
        handles[file] = safe_open(file, framework="numpy").__enter__()
      host = to_ours(handles[file].get_tensor(name), p[-1])
      host = np.ascontiguousarray(host.astype(jnp.dtype(param_dtype)))
      out[p] = _place(host, flat_shard.get(p))
      del host
  finally:
    for h in handles.values():
      h.__exit__(None, None, None)
  return traverse_util.unflatten_dict(out)


def save_params(path: str, config: dict, params: dict) -> None:
  """Writes `params` (of `IFUNet(IFConfig.from_dict(config))`) as a diffusers folder: config.json
  and `diffusion_pytorch_model.safetensors` in torch layout (the inverse of `load_params`; for
  tests and for exporting fine-tuned weights). Files go to temporaries, then are renamed."""
  os.makedirs(path, exist_ok=True)
  flat = traverse_util.flatten_dict(nn.unbox(params))
  tensors = {}
  for p, v in flat.items():
    a = np.asarray(v, np.float32)
    if p[-1] == "kernel" and a.ndim == 4:
      a = a.transpose(3, 2, 0, 1)
    elif p[-1] == "kernel" and a.ndim == 2:
      a = a.T
    tensors[torch_name(p)] = np.ascontiguousarray(a)
  tmp = os.path.join(path, f".{WEIGHTS}.safetensors.tmp")
  save_file(tensors, tmp)
  os.replace(tmp, os.path.join(path, f"{WEIGHTS}.safetensors"))
  tmp = os.path.join(path, ".config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(dict(config, _class_name="UNet2DConditionModel"), f, indent=1)
  os.replace(tmp, os.path.join(path, "config.json"))


def load(path: str, **model_kw) -> tuple[deepfloyd.IFUNet, dict]:
  """`(IFUNet(read_config(path), **model_kw), params)` of a local or `gs://` folder."""
  local = paths.local_copy(path) if paths.is_remote(path) else path
  model = deepfloyd.IFUNet(read_config(local), **model_kw)
  return model, load_params(local, model)


__all__ = [
    "IFCheckpointError",
    "IFConfig",
    "checkpoint_files",
    "load",
    "load_params",
    "plan",
    "save_params",
]
