"""pytorch-fid's FID InceptionV3 built with given weights, without any download.

Shared by `make_golden.py` (writes the golden) and the live parity test. Needs torch,
torchvision and pytorch-fid; nothing in `imagen_jax` imports this file.
"""

import sys
import types

import numpy as np


def import_pytorch_fid_inception():
  """Import `pytorch_fid.inception`, tolerating a torchvision whose C ops do not load.

  pytorch-fid imports torchvision only for the pure-Python InceptionV3 blocks. Where the
  installed torchvision binary does not match torch (e.g. a CUDA build of torchvision next to a
  CPU-only torch), `torchvision._meta_registrations` fails at import; it only registers fake
  kernels of detection ops (nms, roi_align), which no Inception code uses, so it is skipped.
  """
  try:
    import torchvision  # noqa: F401
  except RuntimeError:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations"
    )
    import torchvision  # noqa: F401
  from pytorch_fid import inception

  return inception


def calculate_frechet_distance(*args, **kwargs):
  """pytorch-fid's `fid_score.calculate_frechet_distance` (its scipy `sqrtm` route)."""
  import_pytorch_fid_inception()  # fid_score imports torchvision too
  from pytorch_fid import fid_score

  return fid_score.calculate_frechet_distance(*args, **kwargs)


def build_pytorch_fid_model(state_dict_np):
  """pytorch-fid's `InceptionV3([3])` (pool3 output, resize to 299, 2x-1) with our weights.

  pytorch-fid's own `fid_inception_v3()` builds the graph and calls `load_state_dict` (strict);
  only its download (`load_state_dict_from_url`) is replaced by handing over `state_dict_np`.
  """
  import torch

  inception = import_pytorch_fid_inception()
  sd = {k: torch.from_numpy(np.array(v)) for k, v in state_dict_np.items()}
  original = inception.load_state_dict_from_url
  inception.load_state_dict_from_url = lambda *args, **kwargs: sd
  try:
    model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
  finally:
    inception.load_state_dict_from_url = original
  return model.eval()


def pytorch_fid_features(model, images_uint8):
  """uint8 [N, H, W, 3] -> pool3 features [N, 2048] exactly as pytorch-fid's fid_score does
  (ToTensor: /255, NCHW; the model resizes to 299 bilinearly and maps to [-1, 1])."""
  import torch

  x = torch.from_numpy(np.asarray(images_uint8)).permute(0, 3, 1, 2).float() / 255.0
  with torch.no_grad():
    return model(x)[0][:, :, 0, 0].numpy()
