"""Encodes a prepared dataset's captions once with the configured text encoder (`text.shards`).

    python -m imagen_jax.text.precompute --config=configs/base64.py:paper \
        --config.text.path=gs://bucket/weights/t5-v1_1-xxl \
        --data=gs://bucket/laion_records --out=gs://bucket/laion_t5xxl \
        --process_index=$HOST --process_count=$HOSTS   # or --distributed on a TPU pod / SLURM

Each process encodes data shards i with i mod process_count == process_index, the encoder's
params sharded over this host's devices (fsdp); rerun after a preemption and finished shards are
kept; a shard written by another encoder is refused with the reason. The manifest appears once
all shards are finished; train with `--config.text.embedding_cache=<out>
--config.data.embedding_id_key=index`. Prints one JSON line.
"""

import json

import jax
from absl import app, flags
from ml_collections import config_flags

from imagen_jax import (
    cli,
    paths,  # first: it points the storage clients at an emulator, if any
)
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import sharding as sharding_lib
from imagen_jax.text import registry, shards

_CONFIG = config_flags.DEFINE_config_file("config", None, "the stage config (its text block)")
_DATA = flags.DEFINE_string("data", None, "the prepared dataset (prepare_webdataset --out)")
_OUT = flags.DEFINE_string("out", None, "the embeddings folder (local or gs://)")
_PLACEMENT = cli.define_process_flags()  # --process_index, --process_count, --distributed
_BATCH = flags.DEFINE_integer("batch_size", 64, "captions per encoder call (x local devices)")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "storage dtype")
flags.mark_flags_as_required(["config", "data", "out"])


def main(argv):
  del argv
  config = _CONFIG.value
  index, count = _PLACEMENT()
  paths.check_access(_DATA.value)
  paths.check_access(_OUT.value)
  n = jax.local_device_count()
  if _BATCH.value % n:
    raise app.UsageError(f"--batch_size={_BATCH.value} must divide over the {n} local devices")
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": n, "tensor": 1}, jax.local_devices())
  rules = sharding_lib.rules_from_config(config)
  encoder = registry.get_text_encoder(config.text, mesh=mesh, rules=rules, progress=False)
  manifest = shards.precompute(
      encoder,
      _DATA.value,
      _OUT.value,
      process_index=index,
      process_count=count,
      batch_size=_BATCH.value,
      dtype=_DTYPE.value,
  )
  summary = {"process_index": index, "finished": manifest is not None}
  if manifest is not None:
    summary.update(
        shards=len(manifest["shards"]),
        records=sum(s["num_records"] for s in manifest["shards"]),
        fingerprint=manifest["fingerprint"],
    )
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  cli.run(main)
