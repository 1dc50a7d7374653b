"""Write `golden.npz`: pytorch-fid's outputs that tests/test_evals_fid.py compares against.

    python tests/goldens/inception/make_golden.py      # needs torch, torchvision, pytorch-fid

Contents (all small; the ~95 MB of network weights are NOT stored: both this script and the test
regenerate them with `convert_weights.random_torch_state_dict(WEIGHTS_SEED)`, numpy only):
  images      uint8 [2, 64, 80, 3]   random input (non-square, so H/W mix-ups show)
  features    float32 [2, 2048]      pytorch-fid InceptionV3 pool3 of `images` (its own resize
                                     to 299 and 2x-1, i.e. our `pytorch_fid` mode)
  fd_*        random Gaussian statistics (full-rank and rank-deficient covariances) and
              pytorch-fid's `calculate_frechet_distance` on them
The script also round-trips the weights through `torch.save` -> `convert_weights.convert_pth`
(the converter's real `torch.load(weights_only=True)` path) and checks the result.
"""

import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

WEIGHTS_SEED = 0
INPUT_SEED = 1
FD_SEED = 2


def random_stats(rng, dim, n):
  x = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) * 0.3 + rng.normal(size=dim)
  return x.mean(0), np.cov(x, rowvar=False)


def main():
  import pytorch_fid_reference as ref
  import torch

  from imagen_jax.evals import convert_weights, inception

  sd = convert_weights.random_torch_state_dict(WEIGHTS_SEED)
  with tempfile.TemporaryDirectory() as tmp:
    pth, out = os.path.join(tmp, "w.pth"), os.path.join(tmp, "w.safetensors")
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, pth)
    convert_weights.convert_pth(pth, out)
    loaded = inception.flax_flatten(inception.load_inception_variables(out))
    direct = convert_weights.convert_state_dict(sd)
    assert all(np.array_equal(loaded[k], direct[k]) for k in direct), "converter mismatch"

  model = ref.build_pytorch_fid_model(sd)
  images = np.random.default_rng(INPUT_SEED).integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
  features = ref.pytorch_fid_features(model, images)

  rng = np.random.default_rng(FD_SEED)
  fd = {}
  for name, (dim, n) in {"full": (32, 200), "lowrank": (32, 20)}.items():
    mu1, s1 = random_stats(rng, dim, n)
    mu2, s2 = random_stats(rng, dim, n)
    fd.update(
        {
            f"fd_{name}_mu1": mu1,
            f"fd_{name}_sigma1": s1,
            f"fd_{name}_mu2": mu2,
            f"fd_{name}_sigma2": s2,
            f"fd_{name}_value": np.float64(ref.calculate_frechet_distance(mu1, s1, mu2, s2)),
        }
    )
  np.savez_compressed(
      os.path.join(HERE, "golden.npz"),
      images=images,
      features=features.astype(np.float32),
      weights_seed=WEIGHTS_SEED,
      **fd,
  )
  print(
      "features",
      features.shape,
      "mean",
      features.mean(),
      "FD",
      fd["fd_full_value"],
      fd["fd_lowrank_value"],
  )


if __name__ == "__main__":
  main()
