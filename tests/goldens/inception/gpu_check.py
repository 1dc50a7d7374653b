"""One-off accelerator check (not a test): parity of FID Inception and CLIP on GPU, precision
effect, and FID feature throughput. Run: PYTHONPATH=. python3 tests/goldens/inception/gpu_check.py
"""

import time

import jax
import numpy as np

from imagen_jax.evals import clip, convert_weights, fid, inception

print("devices", jax.devices(), "jax", jax.__version__)
z = np.load("tests/goldens/inception/golden.npz")
sd = convert_weights.random_torch_state_dict(int(z["weights_seed"]))
variables = inception.flax_unflatten(convert_weights.convert_state_dict(sd))
rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
c = fid.FIDComputer(variables, mode="pytorch_fid", batch_size=2, progress=False)
print("inception HIGHEST rel err", rel(c.features(z["images"]), z["features"]))
orig = inception._PRECISION
inception._PRECISION = jax.lax.Precision.DEFAULT
c2 = fid.FIDComputer(variables, mode="pytorch_fid", batch_size=2, progress=False)
print("inception DEFAULT-precision rel err", rel(c2.features(z["images"]), z["features"]))
inception._PRECISION = orig
for bs in (100, 250):
  ct = fid.FIDComputer(variables, mode="tf", batch_size=bs, progress=False)
  imgs = np.random.default_rng(0).integers(0, 256, (bs * 6, 256, 256, 3), dtype=np.uint8)
  ct.features(imgs[:bs])
  t = time.time()
  st = ct.statistics(imgs)
  dt = time.time() - t
  print(f"tf mode 256px batch {bs}: {len(imgs) / dt:.0f} img/s incl host transfer + float64 stats")
zc = np.load("tests/goldens/clip/golden.npz")
s = clip.CLIPScorer("tests/goldens/clip/tiny_clip", batch_size=3, progress=False)
u, v = s.embeddings(zc["images"], list(zc["texts"]))
print("clip rel err image", rel(u, zc["image_embeds"]), "text", rel(v, zc["text_embeds"]))
