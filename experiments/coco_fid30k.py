"""COCO FID-30K of a cascade (Imagen §4.2, Table 1), from a local COCO 2014 copy.

  python experiments/coco_fid30k.py --workdirs=workdirs/base64,workdirs/sr256 \
      --config=configs/cascade.py:paper --config.num_stages=2 \
      --coco_dir=/data/coco2014 --inception=/data/inception_fid.safetensors \
      --protocol=paper --num_samples=30000 --outdir=coco_fid30k

`--coco_dir` holds `annotations/captions_val2014.json` and `val2014/` (or pass
`--captions_json` and `--images_dir`). Protocols, resize conventions and caveats:
`imagen_jax.evals.coco`. Samples are saved in chunks and reference statistics cached, so an
interrupted run resumes; both carry the key of what produced them (stages, settings, seed,
prompts, chunk size; features and reference set) and are reused only when it matches, so a
rerun into the same --outdir with other inputs recomputes instead of mixing in stale results.
The FID network shards its batches over all local devices; cascade sampling runs on a mesh of
the local devices (see experiments/README.md).

Multi-host: run the same command on every host with `--distributed` (coordinator, process count
and id auto-detected on TPU pods and SLURM; or give `--coordinator_address`, `--num_processes`,
`--process_id`): the prompts and Inception batches are split over all processes and gathered,
the FID is the one a single process computes, and process 0 writes (the outdir must be shared).
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from imagen_jax import atomic, cli, paths
from imagen_jax.evals import coco, fid
from imagen_jax.sampling import cascade, hosts

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/cascade.py:paper", "cascade sampling settings"
)
_WORKDIRS = flags.DEFINE_list("workdirs", None, "stage workdirs; default: the config's")
_COCO = coco.define_flags()  # --coco_dir, ..., --protocol, --inception, --fid_mode
_NUM = flags.DEFINE_integer("num_samples", 30000, "generated images (FID-30K: 30000)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the caption draw and of the sampler")
_BATCH = flags.DEFINE_integer(
    "batch_size", None, "sampling and FID batch size; default: the cascade config's batch_size"
)
_CHUNK = flags.DEFINE_integer("chunk", 1024, "prompts per saved sample chunk")
_OUTDIR = flags.DEFINE_string("outdir", "coco_fid30k", "output folder")
_NEGATIVE = cli.define_negative_prompt()  # as imagen_jax.sampling's
hosts.define_flags()


def main(argv):
  del argv
  hosts.initialize_from_flags()  # before anything touches the jax backend
  if not _COCO.inception.value:
    raise app.UsageError("--inception is required (FID needs the InceptionV3 weights)")
  cli.require_file("inception", _COCO.inception.value, "Inception weights file")
  try:
    captions, images_dir = _COCO.locate()
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  cfg = _CONFIG.value
  workdirs = _WORKDIRS.value or [cfg[f"stage{k + 1}"].workdir for k in range(int(cfg.num_stages))]
  settings = cascade.stage_settings(cfg, len(workdirs))
  if hosts.is_writer():
    paths.makedirs(_OUTDIR.value)

  anns, files = coco.load_captions(captions)
  prompts, ref_names = coco.draw(anns, files, _COCO.protocol.value, _NUM.value, _SEED.value)
  model = cascade.Cascade.from_workdirs(workdirs, deepfloyd=cfg.get("deepfloyd", None))
  try:  # the cascade config's batch_size unless --batch_size; refused unless it divides
    batch = hosts.application_batch_size(model, _BATCH.value, cfg)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  computer = fid.FIDComputer(_COCO.inception.value, mode=_COCO.fid_mode.value, batch_size=batch)
  ref_path = coco.reference_stats_path(
      _OUTDIR.value, _COCO.protocol.value, _COCO.fid_mode.value, len(ref_names), _SEED.value
  )
  ref = coco.reference_statistics(computer, images_dir, ref_names, ref_path)
  chunks = coco.sample_chunks(
      model,
      prompts,
      settings,
      _OUTDIR.value,
      seed=_SEED.value,
      chunk=_CHUNK.value,
      batch_size=batch,
      negative_prompt=_NEGATIVE.value,
  )
  score = computer.fid(coco.iter_chunks(chunks, total=len(prompts)), ref, total=len(prompts))
  report = {
      "fid": score,
      "protocol": _COCO.protocol.value,
      "num_samples": len(prompts),
      "num_reference": ref.n,
      "fid_mode": _COCO.fid_mode.value,
      "seed": _SEED.value,
      "negative_prompt": _NEGATIVE.value,
      "reference_size": coco.REFERENCE_SIZE,
      "workdirs": workdirs,
      "steps": [s.step for s in model.stages],
      "samples_dir": os.path.dirname(chunks[0]),
      "settings": [vars(s) for s in settings],
      "conventions": "reference: centre crop + PIL bicubic to 256; generated: PIL "
      "bicubic to 256 if needed; then FID preprocessing mode above",
  }
  if not hosts.is_writer():
    return
  atomic.write_json(os.path.join(_OUTDIR.value, "fid.json"), report)
  print(
      f"FID-{len(prompts)} ({_COCO.protocol.value} protocol, {_COCO.fid_mode.value} preprocessing, "
      f"{ref.n} reference images): {score:.3f}"
  )


if __name__ == "__main__":
  cli.run(main)
