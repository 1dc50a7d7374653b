"""The COCO guidance sweep in one command: CLIP score vs FID per guidance weight (Imagen Figs.
A.8 base, A.11 SR; §4.2, App. D), from a local COCO 2014 copy.

  python experiments/coco_guidance_sweep.py --workdirs=workdirs/base64,workdirs/sr256 \
      --config=configs/cascade.py:paper --config.num_stages=2 --coco_dir=/data/coco2014 \
      --inception=/data/inception_fid.safetensors --clip_path=/models/clip-vit-large-patch14 \
      --weights=1,3,5,7 --thresholds=dynamic,static --num_prompts=10000 --outdir=coco_sweep

Steps: draw `--num_prompts` val2014 captions (`evals.coco`, `--protocol`; the paper's curves use
FID-10K); build the reference statistics of the val2014 images once (cached in --outdir with the
key of the features and the reference files, written atomically, reused by every point and every
rerun); for each point (w x threshold mode x aug level of `--sweep_stage`) sample the same
prompts with the same seed, resize the last stage's images to 256 (PIL bicubic, like the
reference), and score FID (`--fid_mode` preprocessing) and CLIP score; write `results.csv`,
`results.md`, `pareto.png` (FID vs CLIP score, one curve per setting) and `samples.png`.

Multi-host: the same command on every host with `--distributed` (auto-detected on TPU pods and
SLURM; `parallel.hosts`): each process samples its block of the prompts of every point (sample i
is the same whichever host draws it), the Inception and CLIP features are gathered, process 0
writes; the numbers equal one process's. The output folder must be shared (a bucket).

Interrupt and rerun freely: a finished point lives in `<outdir>/points/<key>/`, published by one
folder rename (`evals.sweep`), so a rerun reads it back and never mistakes a half-written point
for a whole one; a point of other inputs (model, settings, prompts, seed, features, reference,
CLIP weights) has another key and is recomputed.
"""

from __future__ import annotations

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from imagen_jax import cli
from imagen_jax.evals import clip as clip_lib
from imagen_jax.evals import coco, features, fid, sweep, sweep_report
from imagen_jax.sampling import cascade, hosts

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/cascade.py:paper", "cascade sampling settings (the non-swept stages')"
)
_WORKDIRS = flags.DEFINE_list("workdirs", None, "stage workdirs; default: the config's")
_COCO = coco.define_flags()  # --coco_dir, ..., --protocol, --inception, --fid_mode
_NUM = flags.DEFINE_integer("num_prompts", 10_000, "captions (samples) per point; paper: FID-10K")
_SWEEP_STAGE = flags.DEFINE_integer("sweep_stage", 1, "which stage's w is swept (1-based)")
_WEIGHTS = flags.DEFINE_list(
    "weights", None, "guidance weights; default: the paper's grid (base: A.8, SR: A.11)"
)
_THRESHOLDS = flags.DEFINE_list("thresholds", ["dynamic", "static"], "thresholding modes")
_AUG_LEVELS = flags.DEFINE_list(
    "aug_levels", None, "aug levels of the swept SR stage (one curve each); default: the config's"
)
_SEED = flags.DEFINE_integer("seed", 0, "seed of the caption draw and of the sampler")
_CLIP = flags.DEFINE_string("clip_path", None, "local Hugging Face CLIP folder (CLIP score)")
_BATCH = flags.DEFINE_integer(
    "batch_size",
    None,
    "sampling, FID and CLIP batch size; default: the cascade config's batch_size",
)
_OUTDIR = flags.DEFINE_string("outdir", "coco_guidance_sweep", "output folder")
_NEGATIVE = cli.define_negative_prompt()  # as imagen_jax.sampling's
hosts.define_flags()


def main(argv):
  del argv
  hosts.initialize_from_flags()  # before anything touches the jax backend
  if not _COCO.inception.value or not _CLIP.value:
    raise app.UsageError("--inception and --clip_path are required (FID and CLIP score)")
  cli.require_file("inception", _COCO.inception.value, "Inception weights file")
  cli.require_file("clip_path", _CLIP.value, "CLIP folder")
  try:
    captions, images_dir = _COCO.locate()
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  cfg = _CONFIG.value
  workdirs = _WORKDIRS.value or [cfg[f"stage{k + 1}"].workdir for k in range(int(cfg.num_stages))]
  outdir = epath.Path(_OUTDIR.value)
  if hosts.is_writer():
    outdir.mkdir(parents=True, exist_ok=True)

  anns, files = coco.load_captions(captions)
  prompts, ref_names = coco.draw(anns, files, _COCO.protocol.value, _NUM.value, _SEED.value)
  model = cascade.Cascade.from_workdirs(workdirs, deepfloyd=cfg.get("deepfloyd", None))
  try:  # the cascade config's batch_size unless --batch_size; refused unless it divides
    batch = hosts.application_batch_size(model, _BATCH.value, cfg)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  computer = fid.FIDComputer(_COCO.inception.value, mode=_COCO.fid_mode.value, batch_size=batch)
  ref_path = coco.reference_stats_path(
      str(outdir), _COCO.protocol.value, _COCO.fid_mode.value, len(ref_names), _SEED.value
  )
  reference = sweep.ReferenceStats(
      coco.reference_statistics(computer, images_dir, ref_names, ref_path),
      coco.reference_identity(computer, images_dir, ref_names, coco.REFERENCE_SIZE),
      image_size=coco.REFERENCE_SIZE,
  )

  base, stage, points = sweep.plan(
      model,
      cfg,
      sweep_stage=_SWEEP_STAGE.value,
      weights=_WEIGHTS.value,
      thresholds=_THRESHOLDS.value,
      aug_levels=_AUG_LEVELS.value,
  )
  result = sweep.run_sweep(
      model,
      prompts,
      base,
      points,
      str(outdir),
      sweep_stage=stage,
      reference_stats=reference,
      features=features.InceptionFeatures(computer),
      clip_scorer=clip_lib.CLIPScorer(_CLIP.value, batch_size=batch),
      seed=_SEED.value,
      batch_size=batch,
      negative_prompt=_NEGATIVE.value,
  )
  sizes = " -> ".join(str(s.image_size) for s in model.stages)
  title = (
      f"COCO val2014 ({_COCO.protocol.value} protocol): stage {stage + 1} guidance sweep, "
      f"FID-{len(prompts)} vs {reference.stats.n} reference images, {sizes}px"
  )
  if not hosts.is_writer():
    return
  paths = sweep_report.write_outputs(result, str(outdir), title)
  print(f"{result.computed} points sampled, {result.cached} read from cache")
  print(epath.Path(paths["md"]).read_text())
  print("wrote " + ", ".join(paths.values()) + f"; reference statistics {ref_path}")


if __name__ == "__main__":
  cli.run(main)
