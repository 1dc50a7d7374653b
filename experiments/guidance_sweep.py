"""Guidance-weight sweep of one stage of a cascade prefix: CSV, markdown table, Pareto PNG.

Imagen §4.2, App. D (Figs. A.8 base, A.11 SR): alignment (CLIP score) against fidelity (FID)
as the guidance weight w grows, one curve per thresholding mode / aug level. On the shapes
demo the alignment is the exact shapes metric and, without Inception weights, the distance is
a Frechet distance on fixed random-conv features, labelled "not FID" (see
`imagen_jax.evals.features.RandomConvFeatures`). Logic lives in `imagen_jax.evals.sweep`
(runner) and `imagen_jax.evals.sweep_report` (outputs).

  python experiments/guidance_sweep.py --workdirs=demo_out/base,demo_out/sr \
      --weights=1,2,3,5,8 --thresholds=dynamic,static --num_prompts=64 \
      --outdir=demo_out/guidance_sweep

Interrupt and rerun freely: finished points are read from <outdir>/points/.

Multi-host: the same command on every host with `--distributed` (auto-detected on TPU pods and
SLURM, or `--coordinator_address`, `--num_processes`, `--process_id`) splits the prompts and
feature batches over all processes; process 0 writes (the outdir must be shared).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from imagen_jax import cli
from imagen_jax import paths as paths_lib
from imagen_jax.evals import clip as clip_lib
from imagen_jax.evals import features as features_lib
from imagen_jax.evals import fid, shapes_metric, sweep, sweep_report
from imagen_jax.evals import prompts as prompts_lib
from imagen_jax.sampling import cascade, hosts

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    "configs/cascade.py:shapes",
    "cascade sampling settings (steps, sampler, the non-swept stages' w, aug levels)",
)
_WORKDIRS = flags.DEFINE_list(
    "workdirs", None, "stage workdirs (a cascade prefix); default: " "the config's stage workdirs"
)
_SWEEP_STAGE = flags.DEFINE_integer("sweep_stage", 1, "which stage's w is swept (1-based)")
_WEIGHTS = flags.DEFINE_list(
    "weights",
    None,
    "guidance weights; default: the paper's grid " "(base: Fig. A.8, SR: Fig. A.11)",
)
_THRESHOLDS = flags.DEFINE_list("thresholds", ["dynamic", "static"], "thresholding modes")
_AUG_LEVELS = flags.DEFINE_list(
    "aug_levels",
    None,
    "aug levels of the swept SR stage " "(one curve each); default: the config's",
)
_PROMPTS_FROM = flags.DEFINE_string(
    "prompts_from",
    "shapes",
    "`shapes` (the shapes test split " "of the last stage's data config) or a prompt file",
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "shapes data dir (default: the last stage's " "config.data.data_dir)"
)
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 64, "prompts (samples) per point")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed (sample i uses fold_in(seed, i))")
_BATCH = flags.DEFINE_integer(
    "batch_size", None, "sampling batch size; default: the cascade config's batch_size"
)
_CLIP = flags.DEFINE_string("clip_path", None, "local HF CLIP folder: CLIP score on x")
_INCEPTION = flags.DEFINE_string("inception", None, "FID Inception safetensors: FID on y")
_FID_MODE = flags.DEFINE_string("fid_mode", "tf", "FID preprocessing mode")
_REFERENCE = flags.DEFINE_string(
    "reference_npz",
    None,
    "uint8 reference images (key " "`images`) for the distance when prompts come from a file",
)
_OUTDIR = flags.DEFINE_string("outdir", "guidance_sweep", "output folder")
_NEGATIVE = cli.define_negative_prompt()  # as imagen_jax.sampling's
hosts.define_flags()


def main(argv):
  del argv
  hosts.initialize_from_flags()  # before anything touches the jax backend

  for flag, value, what in [
      (_CLIP, _CLIP.value, "CLIP folder"),
      (_INCEPTION, _INCEPTION.value, "file"),
  ]:
    if value:
      cli.require_file(flag.name, value, what)
  cfg = _CONFIG.value
  workdirs = _WORKDIRS.value or [cfg[f"stage{k + 1}"].workdir for k in range(int(cfg.num_stages))]
  model = cascade.Cascade.from_workdirs(workdirs, deepfloyd=cfg.get("deepfloyd", None))
  try:  # the cascade config's batch_size unless --batch_size; refused unless it divides
    batch = hosts.application_batch_size(model, _BATCH.value, cfg)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  base, stage, points = sweep.plan(
      model,
      cfg,
      sweep_stage=_SWEEP_STAGE.value,
      weights=_WEIGHTS.value,
      thresholds=_THRESHOLDS.value,
      aug_levels=_AUG_LEVELS.value,
  )

  reference, attributes, metric_background = None, None, None
  last = model.stages[len(workdirs) - 1].config
  if _PROMPTS_FROM.value == "shapes":
    d = last.data
    prompts, attributes, reference = prompts_lib.shapes_test_prompts(
        _DATA_DIR.value or d.data_dir,
        int(model.stages[len(workdirs) - 1].image_size),
        num_train=int(d.num_train),
        num_test=int(d.num_test),
        seed=int(d.shapes_seed),
        limit=_NUM_PROMPTS.value,
        background=d.get("shapes_background", "black"),  # configs saved before it: black
    )
    if d.get("shapes_background", "black") != "black":  # the metric reads it off the border
      metric_background = "border"
  else:
    prompts = prompts_lib.read_texts(_PROMPTS_FROM.value)[: _NUM_PROMPTS.value]
    try:  # shapes captions in a file still get the exact alignment metric
      attributes = [shapes_metric.parse_caption(p) for p in prompts]
    except ValueError:
      attributes = None
    if _REFERENCE.value:
      reference = paths_lib.load_npz(_REFERENCE.value)["images"]
  features = None
  if _INCEPTION.value:
    features = features_lib.InceptionFeatures(
        fid.FIDComputer(_INCEPTION.value, mode=_FID_MODE.value)
    )
  clip = None
  if _CLIP.value:
    clip = clip_lib.CLIPScorer(_CLIP.value)

  result = sweep.run_sweep(
      model,
      prompts,
      base,
      points,
      _OUTDIR.value,
      sweep_stage=stage,
      attributes=attributes,
      reference_images=reference,
      features=features,
      clip_scorer=clip,
      seed=_SEED.value,
      batch_size=batch,
      negative_prompt=_NEGATIVE.value,
      metric_background=metric_background,
  )
  title = (
      f"stage {stage + 1} guidance sweep, {len(prompts)} prompts, "
      f"{' -> '.join(str(s.image_size) for s in model.stages[:len(workdirs)])}px"
  )
  if not hosts.is_writer():
    return
  paths = sweep_report.write_outputs(result, _OUTDIR.value, title)
  print(f"{result.computed} points sampled, {result.cached} read from cache")
  print(paths_lib.path(paths["md"]).read_text())
  print("wrote " + ", ".join(paths.values()))


if __name__ == "__main__":
  cli.run(main)
