"""COCO FID-30K (Imagen §4.2, Table 1): prompts, reference images and a resumable sampling loop.

Two protocols, both from a local COCO 2014 copy (`annotations/captions_val2014.json` and the
`val2014/` image folder; https://cocodataset.org/#download):

* `paper` (Imagen §4.2, following DALL-E 2 / GLIDE / Make-A-Scene): `num_samples` (30,000)
  captions drawn at random, seeded, without replacement, from all val2014 captions (~202K, ~5
  per image); the reference statistics come from the full validation set, 40,504 images.
* `pairs` (the common variant): `num_samples` distinct val2014 images drawn at random, seeded,
  each with one of its captions drawn at random; the reference statistics come from exactly
  those images (sample i and reference i share a caption).

Resize conventions (state them next to every number):
* reference images: decoded to RGB, centre-cropped to a square (the shorter side), resized to
  256x256 with PIL bicubic (antialiased) -> uint8 `[256, 256, 3]`;
* generated images: the cascade's last stage in [-1, 1] -> uint8 (`images.to_uint8`), resized
  to 256x256 with PIL bicubic only when the stage's size differs (e.g. 64 or 1024);
* both then go through the same FID preprocessing (`fid_preprocess` mode: `tf` by default,
  which resizes 256 -> 299 with the TF1 legacy bilinear resize) and the FID InceptionV3.
FID-30K is biased upwards for small N: a `--num_samples=1000` smoke run is not comparable.

Resuming: sample chunks and reference statistics carry the provenance key of what produced them
(`provenance`: stages, settings, seed, prompts, chunk size; features, reference set) and are
reused only when it matches, so a rerun into the same folder with another model, seed, chunk
size or reference set never mixes in stale results.

Multi-host (`parallel.hosts`): every process runs the same calls; each samples its block of a
chunk and computes its block of each Inception batch, the images and features are gathered, and
process 0 writes, so the outdir must be shared (a bucket or a shared file system).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Sequence

import numpy as np
import PIL.Image
from absl import flags
from tqdm import tqdm

from imagen_jax import images
from imagen_jax import paths as paths_lib
from imagen_jax.evals import frechet, provenance
from imagen_jax.sampling import hosts

PROTOCOLS = ("paper", "pairs")
REFERENCE_SIZE = 256
VAL2014_IMAGES = 40_504


def locate(
    coco_dir: str | None, captions_json: str | None = None, images_dir: str | None = None
) -> tuple[str, str]:
  """(captions JSON, image folder): the explicit paths, else `<coco_dir>/annotations/
  captions_val2014.json` and `<coco_dir>/val2014`; bucket paths (`gs://`) give their local
  copies (`paths.local_file`, `paths.local_copy`: downloaded once per machine)."""
  captions = captions_json or (
      coco_dir and os.path.join(coco_dir, "annotations", "captions_val2014.json")
  )
  images_dir = images_dir or (coco_dir and os.path.join(coco_dir, "val2014"))
  if not captions or not images_dir:
    raise ValueError("give coco_dir, or captions_json and images_dir")
  return paths_lib.local_file(captions), paths_lib.local_copy(images_dir)


@dataclasses.dataclass(frozen=True)
class InputFlags:
  """The COCO experiments' input flags (`define_flags`), read after absl parsed them."""

  coco_dir: flags.FlagHolder
  captions_json: flags.FlagHolder
  images_dir: flags.FlagHolder
  protocol: flags.FlagHolder
  inception: flags.FlagHolder
  fid_mode: flags.FlagHolder

  def locate(self) -> tuple[str, str]:
    """`locate` from the flags."""
    return locate(self.coco_dir.value, self.captions_json.value, self.images_dir.value)


def define_flags() -> InputFlags:
  """Adds the flags every COCO experiment reads (`experiments/coco_fid30k.py`,
  `coco_guidance_sweep.py`): where COCO is, the caption protocol and the FID network."""
  return InputFlags(
      coco_dir=flags.DEFINE_string("coco_dir", None, "folder with annotations/ and val2014/"),
      captions_json=flags.DEFINE_string("captions_json", None, "captions_val2014.json"),
      images_dir=flags.DEFINE_string("images_dir", None, "the val2014/ image folder"),
      protocol=flags.DEFINE_enum("protocol", "paper", ["paper", "pairs"], "see evals/coco.py"),
      inception=flags.DEFINE_string(
          "inception",
          None,
          "FID InceptionV3 safetensors (made by python -m imagen_jax.evals.convert_weights)",
      ),
      fid_mode=flags.DEFINE_string("fid_mode", "tf", "FID preprocessing: tf | pytorch_fid | clean"),
  )


def reference_stats_path(outdir: str, protocol: str, mode: str, num: int, seed: int) -> str:
  """Where a run caches the reference statistics (any name would do: the file's provenance
  key decides whether it is reused)."""
  return os.path.join(outdir, f"reference_{protocol}_{mode}_{num}_seed{seed}.npz")


def load_captions(captions_json: str) -> tuple[list[dict], dict[int, str]]:
  """(annotations [{'image_id', 'caption'}] sorted by id, image_id -> file_name)."""
  if not os.path.exists(captions_json):
    raise ValueError(
        f"COCO captions file {captions_json!r} does not exist (expected "
        "annotations/captions_val2014.json from cocodataset.org)"
    )
  with open(captions_json) as f:
    data = json.load(f)
  files = {int(im["id"]): im["file_name"] for im in data["images"]}
  anns = sorted(
      (
          {
              "id": int(a["id"]),
              "image_id": int(a["image_id"]),
              "caption": " ".join(a["caption"].split()),
          }
          for a in data["annotations"]
      ),
      key=lambda a: a["id"],
  )  # a fixed order, so the seeded draw is reproducible
  return anns, files


def draw(
    anns: Sequence[dict], files: dict[int, str], protocol: str, num_samples: int, seed: int
) -> tuple[list[str], list[str]]:
  """(prompts [num_samples], reference file names) for `protocol` (see the module doc)."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
  rng = np.random.default_rng(seed)
  if protocol == "paper":
    if num_samples > len(anns):
      raise ValueError(f"num_samples={num_samples} exceeds the {len(anns)} captions")
    pick = rng.choice(len(anns), num_samples, replace=False)
    return [anns[i]["caption"] for i in pick], sorted(files.values())
  by_image: dict[int, list[str]] = {}
  for a in anns:
    by_image.setdefault(a["image_id"], []).append(a["caption"])
  ids = sorted(by_image)
  if num_samples > len(ids):
    raise ValueError(f"num_samples={num_samples} exceeds the {len(ids)} captioned images")
  pick = [ids[i] for i in rng.choice(len(ids), num_samples, replace=False)]
  prompts = [by_image[i][rng.integers(len(by_image[i]))] for i in pick]
  return prompts, [files[i] for i in pick]


def load_reference_image(path: str, size: int = REFERENCE_SIZE) -> np.ndarray:
  """RGB, centre crop to the shorter side, PIL bicubic resize to `size` -> uint8 [size, size, 3]."""
  with PIL.Image.open(path) as im:
    im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s)).resize((size, size), PIL.Image.BICUBIC)
    return np.asarray(im, np.uint8)


def resize_generated(images: np.ndarray, size: int = REFERENCE_SIZE) -> np.ndarray:
  """uint8 [N, S, S, 3] -> [N, size, size, 3] with PIL bicubic (identity when S == size)."""
  images = np.asarray(images, np.uint8)
  if images.shape[1:3] == (size, size):
    return images
  return np.stack(
      [np.asarray(PIL.Image.fromarray(x).resize((size, size), PIL.Image.BICUBIC)) for x in images]
  )


def iter_reference(
    images_dir: str, names: Sequence[str], batch: int = 256, size: int = REFERENCE_SIZE
) -> Iterator[np.ndarray]:
  """Batches of reference images (the full set never sits in memory)."""
  missing = [n for n in names[:5] if not os.path.exists(os.path.join(images_dir, n))]
  if missing:
    raise ValueError(f"reference images missing from {images_dir!r}, e.g. {missing}")
  for a in range(0, len(names), batch):
    yield np.stack(
        [load_reference_image(os.path.join(images_dir, n), size) for n in names[a : a + batch]]
    )


def reference_identity(computer, images_dir: str, names: Sequence[str], size: int) -> dict:
  """What reference statistics depend on: the FID features (mode, weights), the resize and the
  reference set (its files' names, sizes and mtimes)."""
  return {
      "artefact": "coco_reference_statistics",
      "features": computer.identity,
      "reference_size": size,
      "reference": provenance.file_set_identity(images_dir, names),
  }


def reference_statistics(
    computer, images_dir: str, names: Sequence[str], path: str, size: int = REFERENCE_SIZE
):
  """FID statistics of the reference images, cached in `path` (npz with mode, feature and the
  provenance key of `reference_identity`); a file of other features or another reference set
  is recomputed, never reused."""
  return frechet.FrechetStats.cached(
      path,
      reference_identity(computer, images_dir, names, size),
      lambda: computer.statistics(iter_reference(images_dir, names, size=size), total=len(names)),
  )


def samples_identity(
    model,
    prompts: Sequence[str],
    settings,
    *,
    seed: int,
    chunk: int,
    size: int,
    negative_prompt: str | None = None,
) -> dict:
  """What a run's sample chunks depend on: each stage (workdir, checkpoint step, config and
  params digests), the per-stage settings, the seed, the prompts, the chunk size, the size, and
  the negative prompt when there is one."""
  return {
      "artefact": "coco_samples",
      "stages": [provenance.stage_identity(s) for s in model.stages[: len(settings)]],
      "settings": [dataclasses.asdict(s) for s in settings],
      "seed": int(seed),
      "prompts_sha256": provenance.digest(list(prompts)),
      "num_prompts": len(prompts),
      "chunk": int(chunk),
      "size": int(size),
      # Only when given, so the chunks of a run without one keep their keys.
      **({"negative_prompt": negative_prompt} if negative_prompt is not None else {}),
  }


def sample_chunks(
    model,
    prompts: Sequence[str],
    settings,
    outdir: str,
    *,
    seed: int,
    chunk: int,
    batch_size: int,
    size: int = REFERENCE_SIZE,
    progress: bool = True,
    negative_prompt: str | None = None,
) -> list[str]:
  """Samples the prompts in chunks saved as `<outdir>/samples/<run>/chunk_<start>.npz` (uint8
  `images [n, size, size, 3]` + prompts + provenance key), written atomically; returns the
  paths, which together hold exactly `len(prompts)` images in prompt order.

  `<run>` is the head of the key of `samples_identity` (model, settings, seed, prompts, chunk
  size): a rerun with the same inputs resumes from its finished chunks, a run with other
  inputs writes its own chunks. Each chunk stores its full key (run + start + count) and is
  reused only when it matches; otherwise it is recomputed. Sample i uses the global index i
  (per-sample seeds). `negative_prompt`: the unconditional half of guidance's text for every
  prompt (None: the null text; `Cascade.sample`).
  """
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  prompts = list(prompts)
  run = samples_identity(
      model, prompts, settings, seed=seed, chunk=chunk, size=size, negative_prompt=negative_prompt
  )
  sdir = os.path.join(outdir, "samples", provenance.artefact_key(run)[:16])
  if hosts.is_writer():
    paths_lib.makedirs(sdir)
  paths = []
  for start in tqdm(
      range(0, len(prompts), chunk), desc="COCO samples", unit="chunk", disable=not progress
  ):
    path = os.path.join(sdir, f"chunk_{start:06d}.npz")
    paths.append(path)
    part = prompts[start : start + chunk]
    identity = {**run, "start": start, "count": len(part)}
    stored = provenance.load_if_matches(path, identity)
    if hosts.agree(stored is not None and len(stored["images"]) == len(part), path):
      continue
    # Multi-host: each process samples its block of the chunk; the 256px uint8 images are
    # gathered (one static batch shape for the jitted sampler: hosts.sample pads).
    (u8,) = hosts.sample(
        model,
        part,
        settings,
        seed=seed,
        batch_size=batch_size,
        first_index=start,
        progress=False,
        transform=lambda outs: [resize_generated(images.to_uint8(outs[-1]), size)],
        negative_prompts=None if negative_prompt is None else [negative_prompt] * len(part),
    )
    if hosts.is_writer():
      provenance.save_npz(path, identity, images=u8, prompts=np.array(part))
  hosts.barrier("coco_sample_chunks_written")  # every process reads the chunks next
  return paths


def iter_chunks(paths: Sequence[str], total: int | None = None) -> Iterator[np.ndarray]:
  """The chunks' images in order; with `total`, a different number of images is an error."""
  n = 0
  for p in paths:
    chunk_images = paths_lib.load_npz(p)["images"]
    n += len(chunk_images)
    yield chunk_images
  if total is not None and n != total:
    raise ValueError(f"the sample chunks hold {n} images, expected {total} (one per prompt)")
