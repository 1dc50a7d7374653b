r"""Compiles the paper cascade's sampling for a TPU slice on this machine: memory, s / image.

    python aot/compile_cascade.py --topology=v4-8
    python aot/compile_cascade.py --topology=v5e-8 --batch=16 --cascade=configs/cascade.py:paper
    python aot/compile_cascade.py --topology=v5e-8 --cascade.stage3.batch_size=16

The programs are the cascade's own (`imagen_jax.sampling.stage_sampler`, what `cascade.Cascade`
runs): the frozen T5 encode, then per stage one guided denoiser evaluation (§2.2: the network
on the conditional + null batch) and the whole sampler loop, each with params and T5 sharded
over the slice's mesh (`--mesh`, default `stage_sampler.DEFAULT_MESH_SHAPE`: every param
stored once, ZeRO-3 style) and the batch split over its batch axes. No TPU is needed
(`imagen_jax.parallel.aot`). Each stage compiles at its own batch (`--cascade.stageK.batch_size`,
0 = the cascade's `--batch`), as `Cascade` samples it; T5 encodes at the largest.

Per chip it prints each program's peak memory (XLA's `peak_memory_in_bytes`) and roofline time (max of FLOPs / peak and bytes / HBM bandwidth); a stage's seconds per image
are its denoiser roofline x network calls (`num_steps`; Heun's 2 x `num_steps` - 1) / batch
(XLA's cost analysis counts a loop body once, so the loop's own FLOPs are not the loop's), and a COCO FID-30K run (30,000 images, §4.1)
costs 30,000 x s / image x chips chip-seconds. `Cascade` keeps every stage's params and T5
resident while any one program runs, so the cascade's peak per chip is the largest program
peak plus the params of the programs not running (each program's own params are among its
arguments), judged against XLA's usable HBM (`aot.usable_hbm_bytes`). The report's `stages`
list gives each stage's batch, peak and fit (`parallel.cascade_report`): a cascade config naming
the report (`aot_report`) has its batches checked against it. One line for scripts:

    compile_cascade: topology=v4-8 chips=4 peak_gib=.. usable_gib=.. fits=.. s_per_image=..
    fid30k_chip_hours=..

Stage networks: `--stages` (default the three paper stage configs); sampler settings:
`--cascade` (steps, guidance weight, sampler per stage). Exit status 1 when a program does not
fit the usable HBM, 2 on bad input.

DeepFloyd IF (`--cascade=configs/cascade.py:if_xl`): the stages are the cascade's IF U-Net
folders (`stageK.workdir`; only their `config.json` is read, no weights), T5 is the `deepfloyd`
block's encoder at 77 tokens, and each stage's loop is IF's sampler (`discrete.sample` for
`ddpm`) reading the unconditional text as `Cascade` does (the "" or negative prompt embedding):

    python aot/compile_cascade.py --topology=v4-8 --cascade=configs/cascade.py:if_xl
"""

from __future__ import annotations

import importlib
import os
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from imagen_jax import cli
from imagen_jax.parallel import aot
from imagen_jax.parallel import sharding as sharding_lib
from imagen_jax.sampling import cascade_report, deepfloyd_stage, hosts
from imagen_jax.sampling import stage_sampler as ss
from imagen_jax.stage import SamplingSettings, Stage
from imagen_jax.text import registry

_CASCADE = config_flags.DEFINE_config_file(
    "cascade", "configs/cascade.py:paper", "sampler settings per stage"
)
_PAPER_STAGES = "base64:paper;sr256:paper;sr1024:paper"
_STAGES = flags.DEFINE_string(
    "stages",
    None,
    "the cascade's stage configs, ';'-separated STAGE:ARG (configs/<STAGE>.py get_config(ARG), "
    "e.g. sr256:paper,text_name=t5-v1_1-xl) or if:FOLDER (an IF U-Net folder's config.json); "
    f"default: the IF cascade's folders for a cascade with a `deepfloyd` block, else {_PAPER_STAGES}",
)
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "compute dtype of the stage networks")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v4-8, v5e-8")
_MESH = flags.DEFINE_string("mesh", None, "mesh shape, e.g. data=1,fsdp=-1,tensor=1")
_BATCH = flags.DEFINE_integer(
    "batch",
    None,
    "the cascade's images per call (a multiple of the batch shards); default: the cascade "
    "config's batch_size; a stage's own --cascade.stageK.batch_size (0 = this) divides it",
)
_HBM = flags.DEFINE_float("hbm_gib", None, "judge `fits` against this many GiB per chip")
_REPORT = flags.DEFINE_string("report_json", None, "also write the figures to this JSON file")

FID_IMAGES = 30_000


def fail(message: str):
  """A user error: one line, exit status 2 (`imagen_jax.cli`)."""
  cli.fail(message)


def parse_mesh(text: str | None) -> dict[str, int] | None:
  if not text:
    return None
  out = {}
  for part in text.split(","):
    name, eq, value = part.partition("=")
    if not eq or not value.strip().lstrip("-").isdigit():
      fail(f"--mesh={text!r}: {part!r} is not axis=size; allowed: data=1,fsdp=-1,tensor=1")
    out[name.strip()] = int(value)
  return out


def build_stages(text: str | None, dtype: str, cascade) -> list:
  """`(stage config, Stage)` of each `--stages` entry (see its help); IF folders with the
  cascade's `deepfloyd` block, compute dtype `dtype`."""
  block = cascade.get("deepfloyd", None)
  if text is None:
    n = int(cascade.num_stages)
    folders = [cascade[f"stage{k + 1}"].workdir for k in range(n)]
    text = ";".join(f"if:{f}" for f in folders) if block is not None else _PAPER_STAGES
  out = []
  for entry in text.split(";"):
    name, _, arg = entry.strip().partition(":")
    if name == "if":
      if block is None:
        fail(f"--stages entry {entry!r}: IF stages need a cascade config with a deepfloyd block")
      b = ml_collections.ConfigDict(block.to_dict())
      b.dtype = dtype
      try:
        out.append(deepfloyd_stage.build_stage(arg, b))
      except (OSError, ValueError) as e:
        fail(f"--stages entry {entry!r}: {e}")
      continue
    if name not in ("base64", "sr256", "sr1024"):
      fail(f"--stages entry {entry!r}: unknown stage {name!r}; allowed: base64, sr256, sr1024, if")
    try:
      config = importlib.import_module(f"configs.{name}").get_config(arg or "paper")
    except ValueError as e:
      fail(f"--stages entry {entry!r}: {e}")
    config.model.dtype = dtype
    out.append((config, Stage.from_config(config)))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _TOPOLOGY.value is None:
    raise app.UsageError("--topology is required")
  try:
    topology = aot.parse_topology(_TOPOLOGY.value)
  except ValueError as e:
    fail(str(e))
  cascade = _CASCADE.value
  configs, stages = zip(*build_stages(_STAGES.value, _DTYPE.value, cascade))
  blocks = [cascade[f"stage{k + 1}"] for k in range(len(configs))]
  devices = aot.topology_devices(topology)
  try:
    mesh = aot.make_mesh(parse_mesh(_MESH.value) or dict(ss.DEFAULT_MESH_SHAPE), devices)
  except ValueError as e:
    fail(f"--topology={topology.name} has {len(devices)} chips: {e}")
  rules = sharding_lib.rules_from_config(configs[0])
  batch = cascade.batch_size if _BATCH.value is None else _BATCH.value
  multiple = ss.batch_size_multiple(mesh, sharding_lib.rules_for_mesh(rules, mesh))
  if batch < 1 or batch % multiple:
    fail(
        f"--batch={batch} does not divide over the mesh's batch axes; allowed: a multiple of {multiple}"
    )
  batches = []
  for k, block in enumerate(blocks, start=1):
    try:
      batches.append(
          hosts.stage_batch(
              f"--cascade.stage{k}.batch_size",
              block.get("batch_size", 0),
              "--cascade.batch_size" if _BATCH.value is None else "--batch",
              batch,
              multiple,
          )
      )
    except ValueError as e:
      fail(str(e))
  usable = aot.usable_hbm_bytes(devices[0]) if _HBM.value is None else _HBM.value * aot.GIB
  print(
      f"cascade on {topology.chip.name} x {topology.num_chips} ({topology.libtpu_name}), mesh "
      f"{dict(mesh.shape)}, batch {batch} (per stage {batches}), compute {_DTYPE.value}"
  )
  rows, result = [], dict(topology=topology.name, chips=topology.num_chips, batch=batch)
  result["stage_batches"] = {c.stage: b for c, b in zip(configs, batches)}
  resident = {}  # params per chip of each params owner (T5, each stage), kept by `Cascade`
  program_peaks = []  # (program, its peak, its params owner)

  def compile_one(name, lowered, owner):
    try:
      compiled = aot.compile_or_explain(lowered)
    except aot.DoesNotFitError as e:
      print(f"{name}: does not fit: {str(e).splitlines()[0][:300]}")
      result[name] = dict(fits=False, needed_gib=(e.needed_bytes or 0) / aot.GIB)
      aot.write_report(_REPORT.value, result)
      sys.exit(1)
    r = aot.report(compiled, topology.chip, usable / aot.GIB)
    result[name] = r.as_dict()
    program_peaks.append((name, r.peak_bytes, owner))
    print(
        f"  compiled {name}: peak {r.peak_bytes / aot.GIB:.2f} GiB, {r.flops / 1e12:.3f} TFLOP, "
        f"roofline {r.roofline_s:.4f} s",
        flush=True,
    )
    aot.write_report(_REPORT.value, result)
    return r

  text = configs[0].text.copy_and_resolve_references()
  encoder = registry.abstract_text_encoder(text)
  enc = ss.make_encode(encoder.config, mesh, rules)
  enc_batch = max(batches)  # Cascade encodes once per distinct stage batch
  enc_inputs = ss.abstract_encode_inputs(encoder.config, enc_batch, encoder.max_length, mesh, rules)
  resident["encode"] = aot.per_chip_bytes(enc_inputs[0])
  r = compile_one("encode", enc.lower(*enc_inputs), "encode")
  encode_s = r.roofline_s / enc_batch * len(set(batches))
  rows.append(("T5 encode", r, encode_s))
  total_s = encode_s
  for config, stage, block, stage_batch in zip(configs, stages, blocks, batches):
    settings = SamplingSettings.from_config(block)
    guided = settings.guidance_weight != 1.0
    # `Cascade` always gives IF stages the unconditional text ("" or a negative prompt).
    negative = stage.is_deepfloyd
    m = sharding_lib.fsdp_min_size_from_config(config)
    step = ss.make_denoise_step(stage, mesh, rules, guided=guided, fsdp_min_size=m)
    step_inputs = ss.abstract_denoise_inputs(stage, stage_batch, mesh, rules, fsdp_min_size=m)
    resident[config.stage] = aot.per_chip_bytes(step_inputs[0])
    r_step = compile_one(f"{config.stage}_step", step.lower(*step_inputs), config.stage)
    loop = ss.make_stage_sampler(
        stage, settings, mesh, rules, guided=guided, fsdp_min_size=m, negative=negative
    )
    loop_inputs = ss.abstract_sampler_inputs(stage, stage_batch, mesh, rules, fsdp_min_size=m)
    if negative:  # uncond_emb, uncond_mask: shaped and sharded as the prompts' text
      loop_inputs += loop_inputs[1:3]
    r_loop = compile_one(f"{config.stage}_loop", loop.lower(*loop_inputs), config.stage)
    calls = settings.sampler_settings().network_calls  # Heun: 2N - 1
    per_image = r_step.roofline_s * calls / stage_batch
    result[f"{config.stage}_s_per_image"] = per_image
    result[f"{config.stage}_settings"] = dict(
        sampler=settings.sampler,
        num_steps=settings.num_steps,
        network_calls=calls,
        w=settings.guidance_weight,
    )
    rows.append(
        (
            f"{config.stage} {stage.image_size}px, batch {stage_batch}, {settings.sampler} x "
            f"{settings.num_steps}, w={settings.guidance_weight:g}",
            r_loop,
            per_image,
        )
    )
    rows.append((f"  one denoiser step ({'guided, 2B' if guided else 'B'})", r_step, None))
    total_s += per_image
  all_resident = sum(resident.values())
  # A program's own params are among its arguments; the others' stay resident beside it.
  peak, peak_program = max(
      (p + all_resident - resident[owner], name) for name, p, owner in program_peaks
  )
  print(
      f"  {'program':<44} {'peak GiB':>9} {'TFLOP':>9} {'GB moved':>9} {'roofline s':>11} "
      f"{'s / image':>10}"
  )
  for name, r, per_image in rows:
    per = "" if per_image is None else f"{per_image:10.3f}"
    print(
        f"  {name:<44} {r.peak_bytes / aot.GIB:9.2f} {r.flops / 1e12:9.2f} "
        f"{r.bytes_accessed / 1e9:9.2f} {r.roofline_s:11.4f} {per}"
    )
  for owner, b in resident.items():
    print(
        f"  resident params per chip: {'T5' if owner == 'encode' else owner:<24} {b / aot.GIB:9.2f} GiB"
    )
  print(
      f"  cascade peak per chip (during {peak_program}, all params resident): {peak / aot.GIB:.2f} GiB"
  )
  chip_hours = FID_IMAGES * total_s * topology.num_chips / 3600
  fits = peak <= usable
  result.update(
      peak_gib=peak / aot.GIB,
      peak_program=peak_program,
      program_peak_gib=max(p for _, p, _ in program_peaks) / aot.GIB,
      resident_gib={k: v / aot.GIB for k, v in resident.items()},
      usable_gib=usable / aot.GIB,
      hbm_gib=topology.chip.hbm_gib,
      fits=fits,
      s_per_image=total_s,
      fid30k_chip_hours=chip_hours,
      mesh=dict(mesh.shape),
  )
  result["stages"] = cascade_report.stage_figures(result)
  for f in result["stages"]:
    print(f"  {f['name']} at batch {f['batch']}: {f['figure']}")
  aot.write_report(_REPORT.value, result)
  print(
      f"compile_cascade: topology={topology.name} chips={topology.num_chips} "
      f"peak_gib={peak / aot.GIB:.2f} usable_gib={usable / aot.GIB:.2f} "
      f"fits={'yes' if fits else 'no'} "
      f"s_per_image={total_s:.3f} fid30k_chip_hours={chip_hours:.1f}"
  )
  if not fits:
    sys.exit(1)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  cli.run(main)
