"""Guidance-weight sweeps: samples, metrics, resumable per-point cache, CSV / table / Pareto plot.

Imagen §4.2 and App. D (Figs. A.8, A.11) trade image-text alignment (CLIP score, x axis) against
fidelity (FID-10K/30K, y axis) by sweeping the classifier-free guidance weight w (§2.2) of one
stage, once per thresholding mode (§2.3: static vs dynamic) or noise-augmentation level (§2.4).
`run_sweep` does that for one stage or a cascade prefix:

* a point = (w, threshold mode, aug_level) of the swept stage; the other stages keep their
  settings. The threshold mode applies to every stage of the point (it is a sampler choice).
* every point samples the same N prompts with the same seed and `first_index=0`, so prompt i
  draws the same initial noise at every point (common random numbers: differences between
  points are due to the settings, not to the noise);
* each point's uint8 samples (`samples.npz`, one array per stage) and `metrics.json` live in
  `<outdir>/points/<key>/`, written into a temporary folder that is renamed into place, so an
  interrupted sweep resumes and never reads a half-written point. The key holds a hash of
  everything that determines the samples (checkpoint steps, settings, prompts, seed), so a
  changed setting never reuses stale samples.

Metrics per point (on the last stage's images `[N, S, S, 3]`):
* alignment: the exact shapes metric (`shapes_metric`; x axis = mean of colour and shape
  accuracy) when the prompts carry shapes attributes, and the CLIP score (100 * mean cosine)
  when a CLIP checkpoint is given (then it is the x axis, as in the paper);
* a Frechet distance against reference images: FID when Inception weights are given
  (`fid.FIDComputer`), otherwise the Frechet distance of `RandomConvFeatures` (labelled
  "FD (random-conv features; not FID)" everywhere; see that class for why);
* saturation: the fraction of pixel values with |x| >= 0.99 in [-1, 1] of the swept stage's and
  the last stage's float output (static thresholding clips x0_hat to [-1, 1] at every step and
  saturates at high w; dynamic thresholding avoids it, §2.3, Fig. A.31), and the same fraction
  of the reference images: on data with saturated colours (the shapes dataset: pure colours on
  black, most pixels at +-1) the target is the reference value, not 0. So the sweep also gives
  the upper-saturated fraction (x >= 0.99, values clipped at the top): over-saturated colours
  are what static thresholding produces at high w, while black backgrounds sit at the bottom.
  On the shapes data it is exactly 0 for real images (the palette's brightest channel is 240).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import cascade as cascade_lib
from imagen_jax.evals import batched, frechet, shapes_metric

# The paper's guidance grids (App. D: Fig. A.8 base 64x64; Fig. A.11 SR 64->256).
BASE_WEIGHTS = (1.0, 1.25, 1.5, 1.75, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0)
SR_WEIGHTS = (1.0, 3.0, 5.0, 7.0, 8.0, 10.0, 12.0, 15.0, 18.0)
SATURATION_LEVEL = 0.99
RANDOM_CONV_LABEL = "FD (random-conv features; not FID)"


class RandomConvFeatures:
  """Features of a fixed, seeded, random-weight conv net, for an offline Frechet distance.

  Why: FID needs the pretrained InceptionV3 (downloaded weights); the shapes demo must be
  scored offline. A randomly initialised conv net with a fixed seed is a deterministic
  embedding that needs no data or downloads, responds to colour, edges and layout at several
  scales, and has been found to rank generative models sensibly (Naeem et al. 2020, "Reliable
  Fidelity and Diversity Metrics for Generative Models", random embeddings). Its distances are
  only comparable with distances of the same extractor (name includes seed and size) and are
  never FID: stats carry `feature=self.name`, and `frechet.fid_from_statistics` refuses to mix.

  Network: images uint8 `[N, H, W, 3]` -> bilinear resize to `size` -> [-1, 1] -> three 3x3
  stride-2 convs (3->32->64->`dim`, He-normal, ReLU) -> global mean -> `[N, dim]`. A small dim
  (64) keeps the covariance estimable from the few hundred samples of a sweep point.
  """

  def __init__(self, *, seed: int = 0, size: int = 64, dim: int = 64, batch_size: int = 64):
    rng = np.random.default_rng(seed)
    chans = (3, 32, 64, dim)
    self.weights = [
        rng.standard_normal((3, 3, a, b)).astype(np.float32) * np.sqrt(2.0 / (9 * a))
        for a, b in zip(chans[:-1], chans[1:])
    ]
    self.size, self.dim = size, dim
    self.name = f"random-conv-{dim}d-seed{seed}@{size}px"
    self.mode = "random-conv"
    self.label = RANDOM_CONV_LABEL
    size_ = size

    def features(weights, images):
      x = images.astype(jnp.float32) / 127.5 - 1.0
      x = jax.image.resize(x, (x.shape[0], size_, size_, 3), "bilinear", antialias=True)
      for w in weights:
        x = jax.nn.relu(
            jax.lax.conv_general_dilated(
                x,
                w,
                (2, 2),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=jax.lax.Precision.HIGHEST,
            )
        )
      return jnp.mean(x, axis=(1, 2))

    self._runner = batched.BatchRunner(features, self.weights, batch_size)
    self.batch_size = batch_size

  def statistics(self, images: np.ndarray) -> frechet.FrechetStats:
    moments = frechet.StreamingMoments(self.dim)
    for batch in batched.rebatch(np.asarray(images, np.uint8), self.batch_size):
      moments.update(self._runner(batch))
    return frechet.FrechetStats.from_moments(moments, self.mode, self.name)


class InceptionFeatures:
  """FID features (`fid.FIDComputer`) behind the same interface as `RandomConvFeatures`."""

  def __init__(self, computer):
    self.computer = computer
    self.mode = computer.mode
    self.name = frechet.INCEPTION_FEATURE
    self.label = f"FID ({computer.mode} preprocessing; small-N FID is biased upwards)"

  def statistics(self, images: np.ndarray) -> frechet.FrechetStats:
    return self.computer.statistics(np.asarray(images, np.uint8))


def saturation_fraction(
    images: np.ndarray, level: float = SATURATION_LEVEL, *, upper_only: bool = False
) -> float:
  """Fraction of values with |x| >= level (or x >= level when `upper_only`) of float images in
  [-1, 1] (any shape)."""
  x = np.asarray(images, np.float32)
  return float(np.mean((x if upper_only else np.abs(x)) >= level))


@dataclasses.dataclass(frozen=True)
class SweepPoint:
  """One point of the sweep: the swept stage's guidance weight, threshold mode, aug level."""

  weight: float
  threshold: str
  aug_level: float | None = None  # None: keep the stage's own aug_level

  @property
  def setting(self) -> str:
    """The curve this point belongs to (everything but w)."""
    return self.threshold + ("" if self.aug_level is None else f", aug={self.aug_level:g}")


def make_points(
    weights: Sequence[float], thresholds: Sequence[str], aug_levels: Sequence[float] | None = None
) -> list[SweepPoint]:
  from imagen_jax.diffusion.guidance import THRESHOLD_MODES

  for t in thresholds:
    if t not in THRESHOLD_MODES:
      raise ValueError(f"threshold mode {t!r} is not one of {THRESHOLD_MODES}")
  for w in weights:
    if not w >= 1.0:  # w < 1 is allowed by the formula but not part of the paper's sweeps
      raise ValueError(f"guidance weight {w!r} must be >= 1 (1 = no guidance)")
  for a in aug_levels or ():
    if not 0.0 <= a <= 1.0:
      raise ValueError(f"aug_level {a!r} must be in [0, 1]")
  augs = list(aug_levels) if aug_levels else [None]
  return [
      SweepPoint(float(w), t, None if a is None else float(a))
      for t in thresholds
      for a in augs
      for w in weights
  ]


def default_weights(model: cascade_lib.Cascade, sweep_stage: int) -> tuple[float, ...]:
  """The paper's grid for the swept stage: base (Fig. A.8) or SR (Fig. A.11)."""
  return SR_WEIGHTS if model.stages[sweep_stage].is_sr else BASE_WEIGHTS


def point_settings(
    base: Sequence[cascade_lib.SamplingSettings], sweep_stage: int, point: SweepPoint
) -> list[cascade_lib.SamplingSettings]:
  """Per-stage settings of a point: the threshold mode on every stage, w (and aug) on one."""
  if not 0 <= sweep_stage < len(base):
    raise ValueError(f"sweep_stage {sweep_stage} is outside the {len(base)}-stage prefix")
  out = []
  for k, s in enumerate(base):
    s = dataclasses.replace(s, threshold=point.threshold)
    if k == sweep_stage:
      s = dataclasses.replace(s, guidance_weight=point.weight)
      if point.aug_level is not None:
        s = dataclasses.replace(s, aug_level=point.aug_level)
    out.append(s)
  return out


def point_key(point: SweepPoint, identity: dict) -> str:
  digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
  aug = "" if point.aug_level is None else f"_aug{point.aug_level:g}"
  return f"w{point.weight:g}_{point.threshold}{aug}_{digest}"


def _write_atomically(final_dir: str, files: dict[str, Any]) -> None:
  """Write `files` (name -> dict for json / dict of arrays for npz) into final_dir via a tmp
  folder and one rename: a crash leaves either the whole point or no point."""
  parent = os.path.dirname(final_dir)
  tmp = os.path.join(parent, f".tmp-{os.path.basename(final_dir)}-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for name, content in files.items():
    path = os.path.join(tmp, name)
    if name.endswith(".npz"):
      np.savez_compressed(path, **content)
    else:
      with open(path, "w") as f:
        json.dump(content, f, indent=2)
  if os.path.exists(final_dir):  # another process finished it first; keep theirs
    shutil.rmtree(tmp)
    return
  os.rename(tmp, final_dir)


@dataclasses.dataclass
class SweepResult:
  rows: list[dict]
  computed: int  # points sampled in this call
  cached: int  # points read from <outdir>/points
  fd_label: str
  x_metric: str
  reference_saturation: float | None = None  # the same fraction on the real images
  reference_saturation_upper: float | None = None  # x >= 0.99 only, on the real images


def _pad(prompts: list[str], batch_size: int) -> list[str]:
  # One static batch shape for the jitted samplers (the tail batch would recompile); the extra
  # prompts get their own sample indices, so they do not change the real samples.
  extra = (-len(prompts)) % batch_size
  return prompts + [""] * extra


def run_sweep(
    model: cascade_lib.Cascade,
    prompts: Sequence[str],
    base_settings: Sequence[cascade_lib.SamplingSettings],
    points: Sequence[SweepPoint],
    outdir: str,
    *,
    sweep_stage: int,
    attributes: Sequence[dict] | None = None,
    reference_images: np.ndarray | None = None,
    features=None,
    clip_scorer=None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> SweepResult:
  """Samples and scores every point (skipping finished ones); returns one row per point.

  Args:
    model: the loaded cascade; `base_settings` has one entry per stage of the prefix.
    prompts: N prompts (the same for every point).
    attributes: shapes attributes per prompt (for the shapes alignment metric), or None.
    reference_images: uint8 `[M, S, S, 3]` real images for the Frechet distance, or None.
    features: `RandomConvFeatures()` (default) or `InceptionFeatures(FIDComputer(...))`.
    clip_scorer: an `evals.clip.CLIPScorer`, or None.
  """
  from tqdm import tqdm

  prompts = list(prompts)
  if not prompts:
    raise ValueError("a sweep needs at least one prompt")
  if attributes is not None and len(attributes) != len(prompts):
    raise ValueError(f"{len(attributes)} attribute sets for {len(prompts)} prompts")
  if features is None and reference_images is not None:
    features = RandomConvFeatures()
  os.makedirs(os.path.join(outdir, "points"), exist_ok=True)
  ref_stats = None
  if reference_images is not None:
    ref_path = os.path.join(outdir, f"reference_{features.name.replace('/', '_')}.npz")
    if os.path.exists(ref_path):
      ref_stats = frechet.FrechetStats.load(ref_path, features.mode, features.name)
    else:
      ref_stats = features.statistics(reference_images)
      ref_stats.save(ref_path)
  identity_base = {
      "workdirs": [os.path.abspath(s.workdir) for s in model.stages[: len(base_settings)]],
      "steps": [s.step for s in model.stages[: len(base_settings)]],
      "prompts": hashlib.sha1("\n".join(prompts).encode()).hexdigest(),
      "seed": seed,
      "sweep_stage": sweep_stage,
      "features": None if features is None else features.name,
      "clip": None if clip_scorer is None else os.path.abspath(clip_scorer.path),
  }
  rows, computed, cached = [], 0, 0
  for point in tqdm(points, desc="sweep points", unit="point", disable=not progress):
    settings = point_settings(base_settings, sweep_stage, point)
    identity = {**identity_base, "settings": [dataclasses.asdict(s) for s in settings]}
    key = point_key(point, identity)
    pdir = os.path.join(outdir, "points", key)
    mpath = os.path.join(pdir, "metrics.json")
    if os.path.exists(mpath):
      with open(mpath) as f:
        rows.append(json.load(f))
      cached += 1
      continue
    t0 = time.time()
    outs = model.sample(
        _pad(prompts, batch_size),
        settings,
        seed=seed,
        batch_size=batch_size,
        first_index=0,
        progress=False,
    )
    outs = [o[: len(prompts)] for o in outs]
    final = cascade_lib.to_uint8(outs[-1])
    row = {
        "key": key,
        "weight": point.weight,
        "threshold": point.threshold,
        "aug_level": settings[sweep_stage].aug_level,
        "setting": point.setting,
        "num_samples": len(prompts),
        "sample_seconds": round(time.time() - t0, 2),
        "saturation_final": saturation_fraction(outs[-1]),
        "saturation_swept_stage": saturation_fraction(outs[sweep_stage]),
        "saturation_upper_final": saturation_fraction(outs[-1], upper_only=True),
    }
    if attributes is not None:
      s = shapes_metric.score_images(list(final), list(attributes))["mean"]
      row.update({f"shapes_{a}": s[a] for a in shapes_metric.ATTRIBUTES})
      row["alignment_color_shape"] = 0.5 * (s["color"] + s["shape"])
    if clip_scorer is not None:
      r = clip_scorer.score(final, prompts)
      row.update(clip_score=r.clip_score, clip_mean_cosine=r.mean_cosine)
    if ref_stats is not None:
      row["fd"] = frechet.fid_from_statistics(features.statistics(final), ref_stats)
      row["fd_feature"] = features.name
    row["settings"] = identity["settings"]
    _write_atomically(
        pdir,
        {
            "samples.npz": {f"stage{k + 1}": cascade_lib.to_uint8(o) for k, o in enumerate(outs)},
            "prompts.json": prompts,
            "metrics.json": row,
        },
    )
    rows.append(row)
    computed += 1
  ref_sat = ref_sat_upper = None
  if reference_images is not None:  # uint8 -> [-1, 1] exactly as to_uint8 inverts
    ref = np.asarray(reference_images, np.float32) / 127.5 - 1.0
    ref_sat = saturation_fraction(ref)
    ref_sat_upper = saturation_fraction(ref, upper_only=True)
  x_metric = (
      "clip_score"
      if clip_scorer is not None
      else "alignment_color_shape"
      if attributes is not None
      else ""
  )
  fd_label = "" if features is None else features.label
  return SweepResult(rows, computed, cached, fd_label, x_metric, ref_sat, ref_sat_upper)


TABLE_COLUMNS = (
    "setting",
    "weight",
    "alignment_color_shape",
    "shapes_color",
    "shapes_shape",
    "shapes_exact",
    "clip_score",
    "fd",
    "saturation_swept_stage",
    "saturation_final",
    "saturation_upper_final",
    "num_samples",
)


def write_outputs(
    result: SweepResult, outdir: str, title: str = "", grid_prompts: int = 6
) -> dict[str, str]:
  """`results.csv` (every column), `results.md` (the main columns), `pareto.png` and
  `samples.png` (the first `grid_prompts` prompts' final images at every point)."""
  rows = sorted(result.rows, key=lambda r: (r["setting"], r["weight"]))
  cols = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
  extra = sorted({k for r in rows for k in r} - set(cols) - {"settings"})
  paths = {
      "csv": os.path.join(outdir, "results.csv"),
      "md": os.path.join(outdir, "results.md"),
      "png": os.path.join(outdir, "pareto.png"),
      "grid": os.path.join(outdir, "samples.png"),
  }
  with open(paths["csv"] + ".tmp", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols + extra, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  os.replace(paths["csv"] + ".tmp", paths["csv"])
  names = {
      "alignment_color_shape": "align (colour+shape)/2",
      "fd": result.fd_label or "FD",
      "saturation_swept_stage": "sat. swept stage",
      "saturation_final": "sat. final",
      "saturation_upper_final": "upper sat. final",
      "shapes_color": "colour",
      "shapes_shape": "shape",
      "shapes_exact": "exact",
      "clip_score": "CLIP score",
      "num_samples": "N",
      "weight": "w",
  }
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
  lines = ([f"### {title}", ""] if title else []) + [
      "| " + " | ".join(names.get(c, c) for c in cols) + " |",
      "|" + "---|" * len(cols),
  ]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
  lines += [
      "",
      f"Saturation: fraction of pixel values with |x| >= {SATURATION_LEVEL} in [-1, 1]; "
      f"upper saturation: x >= {SATURATION_LEVEL} only (colours clipped at the top).",
  ]
  if result.reference_saturation is not None:
    # Read saturation against the data: shapes images are pure colours on black, so most real
    # pixels are "saturated"; lower is not better there, closer to the reference is.
    lines[-1] += (
        f" Real reference images: {result.reference_saturation:.4g} and "
        f"{result.reference_saturation_upper:.4g} (compare with these, not with 0: "
        "e.g. shapes images are pure colours on a black background)."
    )
  with open(paths["md"], "w") as f:
    f.write("\n".join(lines) + "\n")
  plot_pareto(rows, paths["png"], x_metric=result.x_metric, fd_label=result.fd_label, title=title)
  write_sample_grid(rows, outdir, paths["grid"], grid_prompts)
  return paths


def write_sample_grid(rows: Sequence[dict], outdir: str, path: str, num_prompts: int) -> None:
  """One row per prompt, one column per point (ordered by setting, then w): the final stage's
  images, read back from each point's cached `samples.npz`."""
  from imagen_jax import visualize

  images, prompts = [], None
  for r in rows:  # already sorted by (setting, weight)
    pdir = os.path.join(outdir, "points", r["key"])
    with np.load(os.path.join(pdir, "samples.npz")) as z:
      images.append(z[sorted(z.files)[-1]][:num_prompts])
    if prompts is None:
      with open(os.path.join(pdir, "prompts.json")) as f:
        prompts = json.load(f)[:num_prompts]
  cols = [f"{r['setting']} w={r['weight']:g}" for r in rows]
  grid = [[im[i] for im in images] for i in range(len(prompts))]
  visualize.labelled_grid(grid, prompts, cols, cell=96, label_width=200).save(path + ".tmp.png")
  os.replace(path + ".tmp.png", path)


def plot_pareto(
    rows: Sequence[dict], path: str, *, x_metric: str, fd_label: str, title: str = ""
) -> None:
  """Alignment (x) vs Frechet distance (y), one curve per setting, points labelled with w
  (the layout of Imagen Figs. A.8 / A.11). Falls back to saturation on y without an FD."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  y_metric = "fd" if any("fd" in r for r in rows) else "saturation_final"
  x_metric = x_metric or "weight"
  fig, ax = plt.subplots(figsize=(6.4, 4.8))
  for setting in sorted({r["setting"] for r in rows}):
    pts = sorted((r for r in rows if r["setting"] == setting), key=lambda r: r["weight"])
    xs, ys = [r.get(x_metric, np.nan) for r in pts], [r.get(y_metric, np.nan) for r in pts]
    ax.plot(xs, ys, "o-", label=setting)
    for r, x, y in zip(pts, xs, ys):
      ax.annotate(
          f"w={r['weight']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
      )
  xlabels = {
      "clip_score": "CLIP score",
      "weight": "guidance weight w",
      "alignment_color_shape": "shapes alignment ((colour + shape) / 2)",
  }
  ax.set_xlabel(xlabels.get(x_metric, x_metric))
  ax.set_ylabel(fd_label if y_metric == "fd" else "fraction of saturated pixels (final)")
  ax.set_title(title or "guidance sweep")
  ax.margins(0.12)  # room for the w labels at the edges
  ax.grid(alpha=0.3)
  ax.legend(title="thresholding")
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=120)
  plt.close(fig)
  os.replace(path + ".tmp.png", path)


def read_prompt_file(path: str) -> list[str]:
  """One prompt per line; blank lines and `#` comments skipped; `category<TAB>prompt` lines
  keep the prompt."""
  out = []
  with open(path) as f:
    for line in f:
      line = line.rstrip("\n")
      if not line.strip() or line.lstrip().startswith("#"):
        continue
      out.append(line.split("\t", 1)[-1].strip())
  if not out:
    raise ValueError(f"prompt file {path!r} holds no prompts")
  return out


def shapes_test_prompts(
    data_dir: str, resolution: int, *, num_train: int, num_test: int, seed: int, limit: int
) -> tuple[list[str], list[dict], np.ndarray]:
  """The shapes test split (built or reused in data_dir): prompts, attributes, real images."""
  from imagen_jax.data import shapes

  if limit > num_test:
    raise ValueError(f"num_prompts={limit} exceeds the shapes test split ({num_test})")
  builder = shapes.build_shapes(
      data_dir, resolution, num_train=num_train, num_test=num_test, seed=seed
  )
  test = shapes.read_examples(builder, "test")
  return (
      [ex["caption"] for ex in test[:limit]],
      [ex["attributes"] for ex in test[:limit]],
      np.stack([ex["image"] for ex in test]),
  )
