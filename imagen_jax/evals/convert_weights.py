"""Convert pytorch-fid's InceptionV3 weights (.pth) into the safetensors file the project loads.

    python -m imagen_jax.evals.convert_weights \
        --inception_pth=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.safetensors

The .pth is pytorch-fid's port of TF's `inception-2015-12-05` graph (the FID network of Heusel
et al. 2017); get it from pytorch-fid's GitHub release "fid_weights" on a machine with network
access. This script is the only place torch is used, and it reads the file with
`torch.load(weights_only=True)` (no arbitrary unpickling). The project itself loads only the
safetensors output (`inception.load_inception_variables`).

Name and layout mapping (PyTorch NCHW/OIHW -> Flax NHWC/HWIO):
  `X.conv.weight [O, I, kh, kw]`  -> `params/X/conv/kernel [kh, kw, I, O]`
  `X.bn.weight / X.bn.bias`       -> `params/X/bn/scale`, `params/X/bn/bias`
  `X.bn.running_mean / _var`      -> `batch_stats/X/bn/mean`, `batch_stats/X/bn/var`
  `X.bn.num_batches_tracked`      -> dropped (training counter)
  `fc.weight [1008, 2048]`        -> `params/fc/kernel [2048, 1008]`, `fc.bias` -> `params/fc/bias`
with `.` in module paths becoming `/`. The conversion is strict: every tensor of the network must
be present with its shape and nothing else (AuxLogits of torchvision's InceptionV3 is rejected).

CLIP needs no converter: Hugging Face checkpoints are already safetensors (see `clip_model.py`).
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
from safetensors.numpy import save_file

from imagen_jax import atomic, cli
from imagen_jax.evals import inception


def torch_name_to_flax(name: str) -> str | None:
  """pytorch-fid state-dict key -> our flat Flax key; None for keys that are deliberately dropped."""
  *path, leaf = name.split(".")
  mod = "/".join(path)
  kind = path[-1] if path else ""
  if leaf == "num_batches_tracked":
    return None
  if kind == "conv" and leaf == "weight":
    return f"params/{mod}/kernel"
  if kind == "bn":
    table = {
        "weight": "params/{}/scale",
        "bias": "params/{}/bias",
        "running_mean": "batch_stats/{}/mean",
        "running_var": "batch_stats/{}/var",
    }
    if leaf in table:
      return table[leaf].format(mod)
  if mod == "fc" and leaf in ("weight", "bias"):
    return f"params/fc/{'kernel' if leaf == 'weight' else 'bias'}"
  raise ValueError(
      f"unexpected tensor {name!r} in an FID InceptionV3 state dict (allowed: "
      "<module>.conv.weight, <module>.bn.{weight,bias,running_mean,running_var,"
      "num_batches_tracked}, fc.weight, fc.bias)"
  )


def flax_name_to_torch(key: str) -> str:
  """Inverse of `torch_name_to_flax` for the keys the network has."""
  coll, *path, leaf = key.split("/")
  mod = ".".join(path)
  if path == ["fc"]:
    return f"fc.{'weight' if leaf == 'kernel' else 'bias'}"
  table = {
      ("params", "kernel"): "weight",
      ("params", "scale"): "weight",
      ("params", "bias"): "bias",
      ("batch_stats", "mean"): "running_mean",
      ("batch_stats", "var"): "running_var",
  }
  return f"{mod}.{table[(coll, leaf)]}"


def _to_flax_layout(key: str, value: np.ndarray) -> np.ndarray:
  if key.endswith("/conv/kernel"):
    return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
  if key == "params/fc/kernel":
    return value.T  # [out, in] -> [in, out]
  return value


def torch_shapes() -> dict[str, tuple[int, ...]]:
  """`{torch_name: shape}` of every float tensor of pytorch-fid's FID InceptionV3 (94 conv+BN
  units and fc), derived from the Flax network so the two can never drift apart."""
  out = {}
  for key, shape in inception.variable_shapes().items():
    if key.endswith("/conv/kernel"):
      kh, kw, cin, cout = shape
      shape = (cout, cin, kh, kw)
    elif key == "params/fc/kernel":
      shape = shape[::-1]
    out[flax_name_to_torch(key)] = shape
  return out


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid state dict (numpy arrays, torch names/layout) -> flat Flax float32 arrays."""
  expected = inception.variable_shapes()
  want_torch = torch_shapes()
  keys: dict[str, str] = {}
  # Validate every name and shape before converting anything (cheap, and fails fast).
  for name, value in state_dict.items():
    key = torch_name_to_flax(name)
    if key is None:
      continue
    if key not in expected:
      raise ValueError(f"tensor {name!r} (-> {key!r}) is not part of the FID InceptionV3")
    if tuple(np.shape(value)) != want_torch[name]:
      raise ValueError(
          f"tensor {name!r}: shape {np.shape(value)} does not convert to "
          f"{expected[key]} of {key!r} (expected {want_torch[name]})"
      )
    keys[name] = key
  missing = sorted(set(expected) - set(keys.values()))
  if missing:
    raise ValueError(
        f"state dict lacks {len(missing)} tensors of the FID InceptionV3, e.g. "
        f"{[flax_name_to_torch(k) for k in missing[:5]]}"
    )
  return {
      key: np.ascontiguousarray(_to_flax_layout(key, np.asarray(state_dict[name], np.float32)))
      for name, key in keys.items()
  }


def random_torch_state_dict(seed: int) -> dict[str, np.ndarray]:
  """Deterministic random weights in pytorch-fid's names and layout, from numpy only.

  For parity tests and goldens: the full network's weights (~95 MB) are too big to commit,
  so the golden script and the test both regenerate them from `seed`. Scales keep activations
  O(1) through 94 layers: He-normal convs (std sqrt(2 / fan_in)), BN scale ~ U(0.8, 1.2),
  bias/mean ~ 0.1 N(0, 1), running var ~ U(0.5, 1.5). Includes `num_batches_tracked` so
  that torch's strict `load_state_dict` accepts the dict.
  """
  rng = np.random.default_rng(seed)
  out: dict[str, np.ndarray] = {}
  for name, shape in sorted(torch_shapes().items()):
    if name.endswith("conv.weight"):
      fan_in = int(np.prod(shape[1:]))
      v = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    elif name.endswith("bn.weight"):
      v = rng.uniform(0.8, 1.2, shape).astype(np.float32)
    elif name.endswith("running_var"):
      v = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif name == "fc.weight":
      v = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(1.0 / shape[1]))
    else:  # bn.bias, running_mean, fc.bias
      v = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
    out[name] = v
    if name.endswith("bn.weight"):
      out[name[: -len("weight")] + "num_batches_tracked"] = np.zeros((), np.int64)
  return out


def save_flax_weights(flat: Mapping[str, np.ndarray], path: str) -> None:
  metadata = {"format": "imagen_jax.evals.inception", "graph": "inception-2015-12-05 (pytorch-fid)"}
  atomic.write_with(path, lambda tmp: save_file(dict(flat), tmp, metadata=metadata))


def convert_pth(pth_path: str, out_path: str) -> None:
  """Read a pytorch-fid .pth with `torch.load(weights_only=True)` and write safetensors."""
  try:
    import torch  # optional dependency: only converting the .pth needs it
  except ImportError as e:  # torch is optional for the project; only this step needs it
    raise ImportError(
        "converting a .pth needs torch (pip install torch); loading the "
        "resulting safetensors does not"
    ) from e
  sd = torch.load(pth_path, map_location="cpu", weights_only=True)
  if not isinstance(sd, Mapping):
    raise ValueError(f"{pth_path}: expected a state dict, got {type(sd).__name__}")
  flat = convert_state_dict({k: v.detach().cpu().numpy() for k, v in sd.items()})
  save_flax_weights(flat, out_path)


def main(argv: list[str] | None = None) -> None:
  parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
      "--inception_pth",
      required=True,
      help="pytorch-fid weights, e.g. pt_inception-2015-12-05-6726825d.pth",
  )
  parser.add_argument("--out", required=True, help="output .safetensors path")
  args = parser.parse_args(argv)
  if not os.path.isfile(args.inception_pth):
    parser.error(f"--inception_pth={args.inception_pth!r}: no such file (pytorch-fid's .pth)")
  convert_pth(args.inception_pth, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
