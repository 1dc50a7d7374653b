r"""Compiles a stage's train step for a TPU slice on this machine; per-chip memory and roofline.

    python aot/compile_stage.py --config=configs/base64.py:paper --topology=v4-512
    python aot/compile_stage.py --config=configs/sr256.py:paper --topology=v5p-256 \
        --config.mesh.shape.fsdp=32 --text=cache

No TPU is needed: libtpu (`pip install -e ".[tpu]"`) describes the slice
(`imagen_jax.parallel.aot`) and XLA compiles the trainer's own step (`train.program.build`:
the same jitted function, shardings and donation) for it. `--text=step` puts the frozen text
encoder (T5-XXL for `paper`) inside the step, as the trainer does without an embedding cache;
`--text=cache` compiles the cached-embedding variant. Config overrides as in
`imagen_jax.train` (`--config.section.field=value`, or `:VARIANT,key=value` after the path).

The attention layers compile to what the target runs (`nn.attention`: Pallas' flash kernel
on TPU); a program with a CPU-only attention path (`per_example`) is refused, and so is a
flash program whose compiled HLO lacks the kernel (`tpu_custom_call`).

Prints per chip: argument / output / alias / temporary bytes, XLA's peak memory and the HBM
XLA lets a program use (`aot.usable_hbm_bytes`), the generated code, XLA's FLOPs and bytes
accessed per step, the model FLOPs (`nn.flops`: the network's convs and matmuls, 3 x forward,
no remat, no frozen encoder), the FLOPs of the flash kernel's backward (which XLA's cost
analysis does not see; `nn.flops.kernel_train_flops`), the roofline step time
max((XLA FLOPs + kernel FLOPs) / peak, bytes / HBM bandwidth), MFU bound = model FLOPs /
(roofline x peak) and the compiled HLO's HBM traffic by kind (`parallel.hlo_breakdown`:
convs, attention, T5, optimizer, EMA, collectives, the rest); then one line for scripts:

    aot: stage=base64 topology=v4-512 chips=256 attn=flash peak_gib=.. usable_gib=.. fits=yes
    model_tflop=.. step_tflop=.. roofline_s=.. mfu_bound=..

Exit status: 0 fits, 1 does not fit the usable HBM (or `--hbm_gib`; says by how much), 2 bad
input (an unknown topology, a mesh that does not divide the chips, a batch that does not
divide the batch axes, a CPU-only attention path in a TPU program).
"""

from __future__ import annotations

import os
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from imagen_jax import cli
from imagen_jax.nn import attention, flops
from imagen_jax.parallel import aot, hlo_breakdown
from imagen_jax.text import registry
from imagen_jax.train import program as program_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "stage config", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v4-512, v5p-256, v5e-256")
_TEXT = flags.DEFINE_enum(
    "text",
    None,
    ["step", "cache"],
    "frozen encoder inside the step, or cached embeddings "
    "(default: cache when the config names text.embedding_cache)",
)
_HBM = flags.DEFINE_float(
    "hbm_gib", None, "judge `fits` against this many GiB per chip (default: XLA's usable HBM)"
)
_REPORT = flags.DEFINE_string("report_json", None, "also write the figures to this JSON file")
_MESSAGE_LINES = flags.DEFINE_integer(
    "message_lines", 40, "lines of XLA's out-of-memory message to print (its largest buffers)"
)
_HLO_OUT = flags.DEFINE_string(
    "hlo_out",
    None,
    "also write the compiled HLO text here, gzipped (for `python -m "
    "imagen_jax.parallel.hlo_breakdown FILE` without compiling again)",
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
  c = _CONFIG.value
  try:
    topology = aot.parse_topology(_TOPOLOGY.value)
  except ValueError as e:
    fail(str(e))
  devices = aot.topology_devices(topology)
  try:
    mesh = aot.make_mesh(dict(c.mesh.shape), devices)
  except ValueError as e:
    fail(f"--topology={topology.name} has {len(devices)} chips: {e}")
  use_cache = (_TEXT.value or ("cache" if c.text.get("embedding_cache") else "step")) == "cache"
  encoder = registry.abstract_text_encoder(c.text)
  try:
    program = program_lib.build(c, mesh, encoder, use_cache=use_cache)
  except ValueError as e:
    fail(str(e))
  n_params = sum(x.size for x in jax.tree.leaves(program.abstract.params))
  accum = int(c.train.get("grad_accum_steps", 1))
  accum_text = f" ({accum} microbatches of {program.global_batch // accum})" if accum > 1 else ""
  kept = str(c.model.get("remat_policy", "nothing"))
  text_desc = "cache" if use_cache else c.text.name + " in the step"
  print(
      f"stage {c.stage} ({c.variant}): {n_params / 1e9:.3f}B params, "
      f"{topology.chip.name} x {topology.num_chips} ({topology.libtpu_name}), mesh "
      f"{dict(mesh.shape)}, batch {program.global_batch}{accum_text}, compute {c.model.dtype}, "
      f"remat {c.model.remat} ({kept} kept), text {text_desc}"
  )
  t0 = time.time()
  with attention.recording() as seen:
    lowered = program.lower(*program.abstract_args())
  t1 = time.time()
  logging.info("lowered in %.1f s", t1 - t0)
  impls = sorted(set(seen))
  cpu_only = [i for i in impls if i in attention.CPU_ONLY_IMPLS]
  if cpu_only:
    fail(
        f"model.attn_impl={c.model.attn_impl!r} puts the CPU-only attention path "
        f"{cpu_only} into the TPU program; allowed on TPU: auto, flash, dense"
    )
  attn = "+".join(impls) or "none"
  # Model FLOPs per chip and step: 3 x forward per image x the global batch / chips.
  forward = flops.network_forward_flops(c.model, program.stage.model_inputs(1))
  per_chip = program.global_batch / topology.num_chips
  model_flops = forward.total * flops.TRAIN_FACTOR * per_chip
  # The flash kernel's backward, which XLA's cost analysis does not count.
  kernel_flops = flops.kernel_train_flops(forward) * per_chip if "flash" in impls else 0.0
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
      remat_policy=kept,
      text="cache" if use_cache else "step",
      params_b=n_params / 1e9,
      attn=attn,
      model_forward_gflop_per_image={k: v / 1e9 for k, v in forward.as_dict().items()},
  )
  try:
    compiled = aot.compile_or_explain(lowered)
  except aot.DoesNotFitError as e:
    need, have = e.needed_bytes, e.available_bytes
    summary.update(
        fits=False,
        needed_gib=need and need / aot.GIB,
        usable_gib=have and have / aot.GIB,
        hbm_gib=topology.chip.hbm_gib,
        model_tflop=model_flops / 1e12,
        xla_message=str(e),
    )
    aot.write_report(_REPORT.value, summary)
    print("\n".join(str(e).splitlines()[: _MESSAGE_LINES.value]))
    print(
        f"aot: stage={c.stage} topology={topology.name} chips={topology.num_chips} attn={attn} "
        f"peak_gib={need / aot.GIB if need else float('nan'):.2f} "
        f"usable_gib={have / aot.GIB if have else float('nan'):.2f} fits=no (XLA refused: "
        f"{(need - have) / aot.GIB if need and have else float('nan'):.2f} GiB over) "
        f"model_tflop={model_flops / 1e12:.2f}"
    )
    sys.exit(1)
  compile_s = time.time() - t1
  hlo = compiled.as_text()
  if _HLO_OUT.value:
    hlo_breakdown.write_hlo(_HLO_OUT.value, hlo)
  if "flash" in impls and "tpu_custom_call" not in hlo:
    fail("attention resolved to the flash kernel but the compiled program has no tpu_custom_call")
  r = aot.report(
      compiled, topology.chip, _HBM.value, model_flops=model_flops, kernel_flops=kernel_flops
  )
  d = r.as_dict()
  parts = hlo_breakdown.breakdown(hlo)
  summary.update(d, compile_s=compile_s, hlo_breakdown=parts)
  aot.write_report(_REPORT.value, summary)
  gib = lambda b: f"{b / aot.GIB:9.2f} GiB"  # noqa: E731
  rows = [
      ("arguments (state, batch, text params)", gib(r.argument_bytes)),
      ("outputs", gib(r.output_bytes)),
      ("aliased (donated state)", gib(r.alias_bytes)),
      ("temporaries", gib(r.temp_bytes)),
      ("args + outputs - aliased + temps", gib(r.buffer_bytes)),
      ("peak (XLA's peak_memory_in_bytes)", gib(r.peak_bytes)),
      (
          f"usable HBM{' (--hbm_gib)' if _HBM.value is not None else ' (XLA limit)'}",
          gib(r.hbm_bytes),
      ),
      (f"nominal HBM of a {topology.chip.name}", gib(topology.chip.hbm_gib * aot.GIB)),
      ("generated code", f"{r.generated_code_bytes / 2**20:9.2f} MiB"),
      (f"attention ({c.model.attn_impl})", f"{attn:>9}"),
      ("model FLOPs per step (3 x forward)", f"{model_flops / 1e12:9.2f} TFLOP"),
      ("XLA FLOPs per step (remat, T5 included)", f"{r.flops / 1e12:9.2f} TFLOP"),
      ("+ the flash kernel's backward (not in XLA's)", f"{r.kernel_flops / 1e12:9.2f} TFLOP"),
      ("XLA bytes accessed per step", f"{r.bytes_accessed / 1e9:9.2f} GB"),
      (f"compute time at {topology.chip.peak_tflops:g} TFLOP/s", f"{r.compute_s:9.3f} s"),
      (f"memory time at {topology.chip.hbm_tbps:g} TB/s", f"{r.memory_s:9.3f} s"),
      ("roofline step time", f"{r.roofline_s:9.3f} s"),
      (
          "XLA's optimal_seconds",
          "      n/a" if r.optimal_seconds is None else f"{r.optimal_seconds:9.3f} s",
      ),
      ("MFU bound (model FLOPs / roofline x peak)", f"{r.mfu_bound:9.1%}"),
      ("XLA FLOPs / (roofline x peak)", f"{r.xla_flops_bound:9.1%}"),
      ("compile time on this machine", f"{compile_s:9.1f} s"),
  ]
  print("per chip:")
  for k, v in rows:
    print(f"  {k:<44} {v}")
  print("compiled HLO by kind (instructions, HBM GB read + written, an estimate):")
  for kind in hlo_breakdown.KINDS:
    print(f"  {kind:<12} {parts[kind]['count']:7d} {parts[kind]['gb']:12.3f} GB")
  print(f"  {'HBM total':<12} {'':7} {parts['hbm_gb']:12.3f} GB")
  print(f"  on-chip buffers written (VMEM / CMEM prefetches) {parts['onchip_gb']:.3f} GB")
  print(f"  collective results (inter-chip estimate) {parts['collective_gb']:.3f} GB")
  over = (r.peak_bytes - r.hbm_bytes) / aot.GIB
  print(
      f"aot: stage={c.stage} topology={topology.name} chips={topology.num_chips} attn={attn} "
      f"batch={program.global_batch} grad_accum_steps={accum} "
      f"peak_gib={d['peak_gib']:.2f} usable_gib={d['usable_gib']:.2f} "
      f"fits={'yes' if r.fits else f'no ({over:.2f} GiB over)'} "
      f"model_tflop={d['model_tflop']:.3f} step_tflop={d['tflop']:.3f} "
      f"roofline_s={r.roofline_s:.4f} mfu_bound={r.mfu_bound:.3f}"
  )
  if not r.fits:
    sys.exit(1)


if __name__ == "__main__":
  # This machine's own backend is only used to trace; the TPU program comes from libtpu.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  cli.run(main)
