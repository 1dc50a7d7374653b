"""Guidance-weight sweeps: the runner (points, samples, metrics, a resumable per-point cache).

Imagen §4.2 and App. D (Figs. A.8, A.11) trade image-text alignment (CLIP score, x axis) against
fidelity (FID-10K/30K, y axis) by sweeping the classifier-free guidance weight w (§2.2) of one
stage, once per thresholding mode (§2.3: static vs dynamic) or noise-augmentation level (§2.4).
`run_sweep` does that for one stage or a cascade prefix:

* a point = (w, threshold mode, aug_level) of the swept stage; the other stages keep their
  settings. The threshold mode applies to every stage of the point (it is a sampler choice).
* `negative_prompt` (optional, one text for every prompt) replaces the null text in the
  unconditional half of guidance (§2.2) at every point and stage; it is part of each point's
  key and row. At w = 1 that half has weight 1 - w = 0, so it changes nothing there;
* every point samples the same N prompts with the same seed and `first_index=0`, so prompt i
  draws the same initial noise at every point (common random numbers: differences between
  points are due to the settings, not to the noise);
* each point's uint8 samples (`samples.npz`, one array per stage) and `metrics.json` live in
  `<outdir>/points/<key>/`, written into a temporary folder that is renamed into place, so an
  interrupted sweep resumes and never reads a half-written point. The folder name holds the
  head of the point's provenance key (`provenance`: each stage's workdir, step, config and
  params digests, the settings, prompts, attributes, seed, feature extractor, reference images
  and CLIP weights), and `metrics.json` / `samples.npz` store the full key, checked on load:
  a point produced by anything else is recomputed, never reused. The reference statistics are
  keyed the same way (feature extractor + reference images).

Metrics per point (on the last stage's images `[N, S, S, 3]`):
* alignment: the exact shapes metric (`shapes_metric`; x axis = mean of colour and shape
  accuracy) when the prompts carry shapes attributes, and the CLIP score (100 * mean cosine)
  when a CLIP checkpoint is given (then it is the x axis, as in the paper);
* a Frechet distance against reference images (an array, or precomputed `ReferenceStats` such
  as COCO val2014's, `coco.reference_statistics`, with the generated images resized to the
  reference's size first): FID when Inception weights are given
  (`features.InceptionFeatures`), otherwise the Frechet distance of
  `features.RandomConvFeatures` (labelled "FD (random-conv features; not FID)" everywhere; see
  that class for why);
* saturation: the fraction of pixel values with |x| >= 0.99 in [-1, 1] of the swept stage's and
  the last stage's float output (static thresholding clips x0_hat to [-1, 1] at every step and
  saturates at high w; dynamic thresholding avoids it, §2.3, Fig. A.31), and the same fraction
  of the reference images: on data with saturated colours (the shapes dataset: pure colours on
  black, most pixels at +-1) the target is the reference value, not 0. So the sweep also gives
  the upper-saturated fraction (x >= 0.99, values clipped at the top): over-saturated colours
  are what static thresholding produces at high w, while black backgrounds sit at the bottom.
  On the shapes data it is exactly 0 for real images (the palette's brightest channel is 240).

Multi-host (`parallel.hosts`): every process runs the sweep; each samples its block of the
prompts and computes its block of every feature batch (`evals.batched`), the rows are gathered,
every process gets the same rows, and process 0 writes the points.

Reporting (CSV, markdown table, Pareto plot, sample sheet) is `sweep_report`; prompt files and
the shapes test prompts are `prompts`; the feature extractors are `features`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

import numpy as np
from tqdm import tqdm

from imagen_jax import atomic, images, paths
from imagen_jax.diffusion.guidance import THRESHOLD_MODES
from imagen_jax.evals import coco, frechet, provenance, shapes_metric
from imagen_jax.evals import features as features_lib
from imagen_jax.sampling import cascade as cascade_lib
from imagen_jax.sampling import hosts

# The paper's guidance grids (App. D: Fig. A.8 base 64x64; Fig. A.11 SR 64->256).
BASE_WEIGHTS = (1.0, 1.25, 1.5, 1.75, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0)
SR_WEIGHTS = (1.0, 3.0, 5.0, 7.0, 8.0, 10.0, 12.0, 15.0, 18.0)
SATURATION_LEVEL = 0.99


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


def plan(
    model: cascade_lib.Cascade,
    cascade_config,
    *,
    sweep_stage: int,
    weights: Sequence[float] | None = None,
    thresholds: Sequence[str] = ("dynamic", "static"),
    aug_levels: Sequence[float] | None = None,
) -> tuple[list[cascade_lib.SamplingSettings], int, list[SweepPoint]]:
  """(per-stage base settings of the model's stages from `cascade_config` (configs/cascade.py),
  the 0-based swept stage, the points) from a script's flags; `sweep_stage` is 1-based and
  `weights` default to the paper's grid for that stage."""
  n = len(model.stages)
  if not 1 <= sweep_stage <= n:
    raise ValueError(f"sweep_stage={sweep_stage} is not one of the stages 1..{n}")
  stage = sweep_stage - 1
  base = cascade_lib.stage_settings(cascade_config, n)
  weights = [float(w) for w in weights] if weights else default_weights(model, stage)
  augs = [float(a) for a in aug_levels] if aug_levels else None
  if augs and not model.stages[stage].is_sr:
    raise ValueError(
        f"aug_levels {augs} apply to a super-resolution stage; stage {sweep_stage} is a base stage"
    )
  return base, stage, make_points(weights, thresholds, augs)


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
  """The point's folder name: its settings, readable, and the head of its provenance key."""
  aug = "" if point.aug_level is None else f"_aug{point.aug_level:g}"
  return f"w{point.weight:g}_{point.threshold}{aug}_{provenance.artefact_key(identity)[:16]}"


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
  """Precomputed Frechet statistics of a reference set too large to hold (COCO val2014: 40,504
  images; `coco.reference_statistics`), with `identity` (what produced them, `provenance`) and
  `image_size`: the generated images are resized to it (PIL bicubic, `coco.resize_generated`)
  before the features, as the reference images were (None: as sampled)."""

  stats: frechet.FrechetStats
  identity: dict
  image_size: int | None = None


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
    reference_stats: ReferenceStats | None = None,
    features=None,
    clip_scorer=None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    negative_prompt: str | None = None,
    metric_background: shapes_metric.Background = None,
) -> SweepResult:
  """Samples and scores every point (skipping finished ones); returns one row per point.

  Args:
    model: the loaded cascade; `base_settings` has one entry per stage of the prefix.
    prompts: N prompts (the same for every point).
    attributes: shapes attributes per prompt (for the shapes alignment metric), or None.
    reference_images: uint8 `[M, S, S, 3]` real images for the Frechet distance, or None.
    reference_stats: instead of `reference_images`, their precomputed statistics (of
      `features`' extractor and mode).
    features: `features.RandomConvFeatures()` (default) or
      `features.InceptionFeatures(FIDComputer(...))`.
    clip_scorer: an `evals.clip.CLIPScorer`, or None.
    negative_prompt: the text the unconditional half of guidance reads for every prompt
      (`Cascade.sample`'s `negative_prompts`), or None (the null text). Part of every point's
      key and row.
    metric_background: the shapes metric's background (`shapes_metric.background_color`):
      None (black, the default data) or "border" (grey or textured shapes data). Part of every
      point's key when given.
  """
  prompts = list(prompts)
  if not prompts:
    raise ValueError("a sweep needs at least one prompt")
  if attributes is not None and len(attributes) != len(prompts):
    raise ValueError(f"{len(attributes)} attribute sets for {len(prompts)} prompts")
  if features is None and reference_images is not None:
    features = features_lib.RandomConvFeatures()
  if reference_stats is not None:
    if reference_images is not None:
      raise ValueError("give reference_images or reference_stats, not both")
    if features is None:
      raise ValueError("reference_stats need the features they were computed with")
    reference_stats.stats.check("reference_stats", features.mode, features.name)
  if hosts.is_writer():
    paths.makedirs(paths.join(outdir, "points"))
  ref_stats, ref_digest = None, None
  if reference_images is not None:
    ref_digest = provenance.array_digest(np.asarray(reference_images, np.uint8))
    ref_path = os.path.join(outdir, f"reference_{features.name.replace('/', '_')}.npz")
    ref_stats = frechet.FrechetStats.cached(
        ref_path,
        {
            "artefact": "sweep_reference_statistics",
            "features": features.identity,
            "reference_sha256": ref_digest,
        },
        lambda: features.statistics(reference_images),
    )
  elif reference_stats is not None:
    ref_stats = reference_stats.stats
    ref_digest = provenance.artefact_key(reference_stats.identity)
  fd_size = None if reference_stats is None else reference_stats.image_size
  n_stages = len(base_settings)
  identity_base = {
      "artefact": "sweep_point",
      "stages": [provenance.stage_identity(s) for s in model.stages[:n_stages]],
      "prompts_sha256": provenance.digest(prompts),
      "attributes_sha256": None if attributes is None else provenance.digest(list(attributes)),
      "seed": seed,
      "sweep_stage": sweep_stage,
      "features": None if features is None else features.identity,
      "reference_sha256": ref_digest,
      **({"fd_image_size": fd_size} if fd_size else {}),
      # Only when given, so the points of a sweep without one keep their keys.
      **({"negative_prompt": negative_prompt} if negative_prompt is not None else {}),
      **({"metric_background": metric_background} if metric_background is not None else {}),
      "clip": None if clip_scorer is None else provenance.file_identity(clip_scorer.path),
  }
  padded = _pad(prompts, batch_size)
  negatives = None if negative_prompt is None else [negative_prompt] * len(padded)
  rows, computed, cached = [], 0, 0
  for point in tqdm(points, desc="sweep points", unit="point", disable=not progress):
    settings = point_settings(base_settings, sweep_stage, point)
    identity = {**identity_base, "settings": [dataclasses.asdict(s) for s in settings]}
    key = point_key(point, identity)
    pdir = os.path.join(outdir, "points", key)
    stored = provenance.load_if_matches(os.path.join(pdir, "metrics.json"), identity)
    # bucket: all files uploaded; every host decides the same
    if hosts.agree(stored is not None and atomic.is_complete(pdir), f"sweep point {pdir}"):
      rows.append(stored)
      cached += 1
      continue
    t0 = time.time()
    outs = hosts.sample(  # multi-host: each process samples its block of the prompts
        model,
        padded,
        settings,
        seed=seed,
        batch_size=batch_size,
        first_index=0,
        progress=progress and len(prompts) > batch_size,  # a bar per point when it has batches
        negative_prompts=negatives,
    )
    outs = [o[: len(prompts)] for o in outs]
    final = images.to_uint8(outs[-1])
    row = {
        "key": key,
        "artefact_key": provenance.artefact_key(identity),
        "weight": point.weight,
        "threshold": point.threshold,
        "aug_level": settings[sweep_stage].aug_level,
        "setting": point.setting,
        "negative_prompt": negative_prompt,
        "num_samples": len(prompts),
        "sample_seconds": round(time.time() - t0, 2),
        "saturation_final": saturation_fraction(outs[-1]),
        "saturation_swept_stage": saturation_fraction(outs[sweep_stage]),
        "saturation_upper_final": saturation_fraction(outs[-1], upper_only=True),
    }
    if attributes is not None:
      s = shapes_metric.score_images(list(final), list(attributes), background=metric_background)[
          "mean"
      ]
      row.update({f"shapes_{a}": s[a] for a in shapes_metric.ATTRIBUTES})
      row["alignment_color_shape"] = 0.5 * (s["color"] + s["shape"])
    if clip_scorer is not None:
      r = clip_scorer.score(final, prompts)
      row.update(clip_score=r.clip_score, clip_mean_cosine=r.mean_cosine)
    if ref_stats is not None:
      fd_images = final if fd_size is None else coco.resize_generated(final, fd_size)
      row["fd"] = frechet.fid_from_statistics(features.statistics(fd_images), ref_stats)
      row["fd_feature"] = features.name
    row["settings"] = identity["settings"]
    # One folder rename publishes the point: a crash leaves the whole point or none; a stale
    # point in the same folder (a mismatched or edited key) is replaced.
    if hosts.is_writer():
      with atomic.publish_dir(pdir, overwrite=True) as tmp:
        provenance.save_npz(
            os.path.join(tmp, "samples.npz"),
            identity,
            compressed=True,
            **{f"stage{k + 1}": images.to_uint8(o) for k, o in enumerate(outs)},
        )
        atomic.write_json(os.path.join(tmp, "prompts.json"), prompts)
        provenance.write_json(os.path.join(tmp, "metrics.json"), identity, row)
    rows.append(row)
    computed += 1
  ref_sat = ref_sat_upper = None
  if reference_images is not None:
    ref = images.from_uint8(reference_images)
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
