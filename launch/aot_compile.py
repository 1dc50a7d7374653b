r"""Compiles a stage's train step for a TPU slice on this machine; per-chip memory and roofline.

    python launch/aot_compile.py --config=configs/base64.py:paper --topology=v4-512
    python launch/aot_compile.py --config=configs/sr256.py:paper --topology=v5p-256 \
        --config.mesh.shape.fsdp=32 --text=cache

No TPU is needed: libtpu (`pip install -e ".[tpu]"`) describes the slice
(`imagen_jax.parallel.aot`) and XLA compiles the trainer's own step (`train.program.build`:
the same jitted function, shardings and donation) for it. `--text=step` puts the frozen text
encoder (T5-XXL for `paper`) inside the step, as the trainer does without an embedding cache;
`--text=cache` compiles the cached-embedding variant. Config overrides as in
`imagen_jax.main` (`--config.section.field=value`, or `:VARIANT,key=value` after the path).

Prints per chip: argument / output / alias / temporary bytes and the peak they imply, the
chip's HBM, XLA's FLOPs and bytes accessed per step, and the roofline step time
max(FLOPs / peak, bytes / HBM bandwidth) with the MFU bound it implies; then one line for
scripts:

    aot: stage=base64 topology=v4-512 chips=256 peak_gib=.. hbm_gib=.. fits=yes step_tflop=..
    roofline_s=.. mfu_bound=..

Exit status: 0 fits, 1 does not fit the chip's HBM (or `--hbm_gib`; says by how much), 2 bad
input (an unknown topology, a mesh that does not divide the chips, a batch that does not
divide the batch axes).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from imagen_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "stage config", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v4-512, v5p-256, v5e-256")
_TEXT = flags.DEFINE_enum(
    "text",
    None,
    ["step", "cache"],
    "frozen encoder inside the step, or cached embeddings "
    "(default: cache when the config names text.embedding_cache)",
)
_HBM = flags.DEFINE_float("hbm_gib", None, "judge `fits` against this many GiB per chip")
_REPORT = flags.DEFINE_string("report_json", None, "also write the figures to this JSON file")
_MESSAGE_LINES = flags.DEFINE_integer(
    "message_lines", 40, "lines of XLA's out-of-memory message to print (its largest buffers)"
)
_DUMP = flags.DEFINE_string(
    "dump_dir", None, "XLA dump directory (the buffer assignment shows where memory goes)"
)


def fail(message: str):
  """A user error: one line, exit status 2 (`imagen_jax.cli`)."""
  cli.fail(message)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _TOPOLOGY.value is None:
    raise app.UsageError("--config and --topology are required")
  if _DUMP.value:  # before the TPU compiler loads
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={_DUMP.value}"
    ).strip()
  from imagen_jax.parallel import aot

  c = _CONFIG.value
  try:
    topology = aot.parse_topology(_TOPOLOGY.value)
  except ValueError as e:
    fail(str(e))
  import jax

  from imagen_jax.train import program as program_lib

  devices = aot.topology_devices(topology)
  try:
    mesh = aot.make_mesh(dict(c.mesh.shape), devices)
  except ValueError as e:
    fail(f"--topology={topology.name} has {len(devices)} chips: {e}")
  use_cache = (_TEXT.value or ("cache" if c.text.get("embedding_cache") else "step")) == "cache"
  encoder = aot.abstract_text_encoder(c.text)
  try:
    program = program_lib.build(c, mesh, encoder, use_cache=use_cache)
  except ValueError as e:
    fail(str(e))
  n_params = sum(x.size for x in jax.tree.leaves(program.abstract.params))
  accum = int(c.train.get("grad_accum_steps", 1))
  accum_text = f" ({accum} microbatches of {program.global_batch // accum})" if accum > 1 else ""
  print(
      f"stage {c.stage} ({c.variant}): {n_params / 1e9:.3f}B params, "
      f"{topology.chip.name} x {topology.num_chips} ({topology.libtpu_name}), mesh "
      f"{dict(mesh.shape)}, batch {program.global_batch}{accum_text}, compute {c.model.dtype}, "
      f"remat {c.model.remat}, text {'cache' if use_cache else c.text.name + ' in the step'}"
  )
  t0 = time.time()
  lowered = program.lower(*program.abstract_args())
  t1 = time.time()
  logging.info("lowered in %.1f s", t1 - t0)
  hbm = topology.chip.hbm_gib if _HBM.value is None else _HBM.value
  summary = dict(
      stage=c.stage,
      variant=c.variant,
      topology=topology.name,
      chips=topology.num_chips,
      chip=topology.chip.name,
      mesh=dict(mesh.shape),
      batch=program.global_batch,
      grad_accum_steps=accum,
      microbatch=program.global_batch // accum,
      dtype=str(c.model.dtype),
      remat=bool(c.model.remat),
      text="cache" if use_cache else "step",
      params_b=n_params / 1e9,
  )
  try:
    compiled = aot.compile_or_explain(lowered)
  except aot.DoesNotFitError as e:
    need, have = e.needed_bytes, e.available_bytes
    summary.update(
        fits=False,
        needed_gib=need and need / aot.GIB,
        hbm_gib=have and have / aot.GIB,
        xla_message=str(e),
    )
    aot.write_report(_REPORT.value, summary)
    print("\n".join(str(e).splitlines()[: _MESSAGE_LINES.value]))
    print(
        f"aot: stage={c.stage} topology={topology.name} chips={topology.num_chips} "
        f"peak_gib={need / aot.GIB if need else float('nan'):.2f} "
        f"hbm_gib={have / aot.GIB if have else hbm:.2f} fits=no (XLA refused: "
        f"{(need - have) / aot.GIB if need and have else float('nan'):.2f} GiB over)"
    )
    sys.exit(1)
  compile_s = time.time() - t1
  r = aot.report(compiled, topology.chip, hbm)
  d = r.as_dict()
  summary.update(d, compile_s=compile_s)
  aot.write_report(_REPORT.value, summary)
  gib = lambda b: f"{b / aot.GIB:9.2f} GiB"  # noqa: E731
  rows = [
      ("arguments (state, batch, text params)", gib(r.argument_bytes)),
      ("outputs", gib(r.output_bytes)),
      ("aliased (donated state)", gib(r.alias_bytes)),
      ("temporaries", gib(r.temp_bytes)),
      ("peak = args + outputs - aliased + temps", gib(r.peak_bytes)),
      (f"HBM per chip{' (--hbm_gib)' if _HBM.value is not None else ''}", gib(r.hbm_bytes)),
      ("XLA FLOPs per step", f"{r.flops / 1e12:9.2f} TFLOP"),
      ("XLA bytes accessed per step", f"{r.bytes_accessed / 1e9:9.2f} GB"),
      (f"compute time at {topology.chip.peak_tflops:g} TFLOP/s", f"{r.compute_s:9.3f} s"),
      (f"memory time at {topology.chip.hbm_tbps:g} TB/s", f"{r.memory_s:9.3f} s"),
      ("roofline step time", f"{r.roofline_s:9.3f} s"),
      ("MFU bound (XLA FLOPs, remat included)", f"{r.mfu_bound:9.1%}"),
      ("compile time on this machine", f"{compile_s:9.1f} s"),
  ]
  print("per chip:")
  for k, v in rows:
    print(f"  {k:<44} {v}")
  over = (r.peak_bytes - r.hbm_bytes) / aot.GIB
  print(
      f"aot: stage={c.stage} topology={topology.name} chips={topology.num_chips} "
      f"batch={program.global_batch} grad_accum_steps={accum} peak_gib={d['peak_gib']:.2f} hbm_gib={d['hbm_gib']:.2f} "
      f"fits={'yes' if r.fits else f'no ({over:.2f} GiB over)'} step_tflop={d['tflop']:.2f} "
      f"roofline_s={r.roofline_s:.3f} mfu_bound={r.mfu_bound:.3f}"
  )
  if not r.fits:
    sys.exit(1)


if __name__ == "__main__":
  # This machine's own backend is only used to trace; the TPU program comes from libtpu.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  cli.run(main)
