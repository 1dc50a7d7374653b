"""Train one cascade stage: `python -m imagen_jax.train --config=configs/base64.py:tiny
--workdir=DIR [--config.train.num_steps=5 ...]`.

`--config=configs/<stage>.py:VARIANT[,key=value,...]` calls that module's `get_config` with the
text after ':' (e.g. `configs/base64.py:paper,batch=256`; see configs/common.py), which gives a
locked ConfigDict; `--config.a.b=value` then overrides any field, and a misspelt field is an
error. The config package must be importable (installed with the repo, or run from its root).
With `--config.distributed.initialize=true` (+ coordinator_address / num_processes /
process_id, or auto-detection on TPU pods and SLURM) the process joins a multi-process job
first.

`--workdir`, `data.data_dir` and `text.embedding_cache` may be bucket paths (`gs://bucket/run`,
`imagen_jax.paths`). Before anything starts (the distributed job, the mesh, the encoder) each
bucket is probed once, and a workdir whose `config.json` records another run (another stage,
model, diffusion or text encoder: `run_meaning.MEANING_FIELDS`) is refused
(`train.workdir.check_workdir`): the error is one line and nothing in the workdir is touched.
Library INFO logging is off unless `--verbosity=0` (`imagen_jax.cli`); a bad flag, config
variant or field, or workdir ends in one line and exit status 2.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from imagen_jax import (
    cli,
    paths,  # first: it points the storage clients at an emulator, if any
)
from imagen_jax.data import pipeline
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.train import settings, trainer
from imagen_jax.train import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Stage config file and argument, e.g. configs/base64.py:paper,batch=256.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  try:  # a bad train.* value, or a paper variant naming no dataset: one line, nothing built
    settings.check(config)
    pipeline.check_named(config.data)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  source = config.train.get("init_from")
  if source and not paths.path(source).exists():
    raise cli.UserError(f"--config.train.init_from={source!r}: no such workdir or folder")
  workdir_lib.check_workdir(config, _WORKDIR.value)  # user errors: one line (imagen_jax.cli)
  # Must precede any use of the jax backend.
  mesh_lib.maybe_initialize_distributed(config.distributed)
  logging.info(
      "process %d/%d, %d local / %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )
  paths.makedirs(_WORKDIR.value)
  result = trainer.train_and_evaluate(config, _WORKDIR.value)
  logging.info(
      "finished at step %d%s", result["step"], " (preempted)" if result["preempted"] else ""
  )


if __name__ == "__main__":
  cli.run(main)
