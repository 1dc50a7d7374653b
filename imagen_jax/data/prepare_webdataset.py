"""Prepares img2dataset webdataset shards for training (`webdataset.prepare`), one process of many.

    python -m imagen_jax.data.prepare_webdataset \
        --shards='gs://bucket/laion/{00000..00999}.tar' --out=gs://bucket/laion_records \
        --process_index=$HOST --process_count=$HOSTS   # or --distributed on a TPU pod / SLURM

Each process converts shards i with i mod process_count == process_index; rerun after a kill and
finished shards are kept. The manifest (`<out>/dataset.json`) appears once all are finished;
train with `--config.data.name=records --config.data.data_dir=<out>`. Prints one JSON line:
this process's shards and, once finished, the dataset's counts and skip reasons.
"""

import json
import logging

from absl import app, flags

from imagen_jax import cli
from imagen_jax.data import webdataset

_SHARDS = flags.DEFINE_string(
    "shards", None, "tar shards: comma-separated paths, globs or {00000..00099} ranges"
)
_OUT = flags.DEFINE_string("out", None, "the prepared dataset's folder (local or gs://)")
_PLACEMENT = cli.define_process_flags()  # --process_index, --process_count, --distributed
_MIN_SIZE = flags.DEFINE_integer("min_size", 64, "skip images whose shorter side is below this")


def main(argv):
  del argv
  if not _SHARDS.value or not _OUT.value:
    raise app.UsageError("--shards and --out are required")
  logging.getLogger().setLevel(logging.WARNING)
  index, count = _PLACEMENT()
  shards = webdataset.list_shards(_SHARDS.value)
  manifest = webdataset.prepare(
      shards, _OUT.value, process_index=index, process_count=count, min_size=_MIN_SIZE.value
  )
  mine = [s for i, s in enumerate(shards) if i % count == index]
  summary = {"process_index": index, "shards": len(mine), "finished": manifest is not None}
  if manifest is not None:
    summary.update(
        num_records=manifest["num_records"], skipped_by_reason=manifest["skipped_by_reason"]
    )
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  cli.run(main)
