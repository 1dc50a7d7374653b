"""Per-device parameter + optimizer-state bytes of a stage on a big mesh, from shardings alone.

Imagen's base model (2B params, §4.1) trained on 256 TPU-v4 chips. This computes, without
allocating anything (`jax.eval_shape` + an `AbstractMesh`), what each device holds of the
params, their float32 EMA and the optimizer state under the config's logical axis rules, for
several (data, fsdp) splits of 256 devices: fsdp divides the per-device bytes (ZeRO-3).

  python benchmarks/sharding_memory.py [--stage=base64] [--variant=paper] [--devices=256]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from imagen_jax.nn import unet  # noqa: E402
from imagen_jax.parallel import mesh as mesh_lib  # noqa: E402
from imagen_jax.parallel import sharding as sharding_lib  # noqa: E402
from imagen_jax.train import optim  # noqa: E402
from imagen_jax.train import state as state_lib  # noqa: E402


def load_config(stage: str, variant: str):
  spec = importlib.util.spec_from_file_location(
      f"cfg_{stage}", os.path.join(ROOT, "configs", f"{stage}.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def gib(n: int) -> str:
  return f"{n / 2**30:8.3f} GiB"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--stage", default="base64", choices=("base64", "sr256", "sr1024"))
  ap.add_argument("--variant", default="paper")
  ap.add_argument("--devices", type=int, default=256)
  ap.add_argument("--optimizer", default=None, help="override optim.name (adafactor|adam)")
  args = ap.parse_args()

  c = load_config(args.stage, args.variant)
  if args.optimizer:
    c.optim.name = args.optimizer
  rules = tuple(tuple(r) for r in c.mesh.logical_axis_rules)
  model = unet.build_model(c.model)
  tx, _ = optim.make_optimizer(c.optim, c.train.num_steps)
  crop = int(c.data.sr_crop_size or 0)
  size = crop or c.image_size
  lowres = (crop * c.lowres_size // c.image_size) if crop and c.lowres_size else c.lowres_size
  inputs = state_lib.model_inputs(
      batch=1,
      image_size=size,
      lowres_size=lowres,
      text_len=c.text.max_length,
      text_dim=c.model.text_dim,
  )
  print(
      f"stage {args.stage} ({args.variant}), optimizer {c.optim.name}, "
      f"{args.devices} devices, rules {dict(rules)}"
  )
  first = True
  for fsdp in (1, 4, 16, 64, args.devices):
    if args.devices % fsdp:
      continue
    shape = {"data": args.devices // fsdp, "fsdp": fsdp, "tensor": 1}
    mesh = mesh_lib.abstract_mesh(shape, args.devices)
    abstract, specs = state_lib.state_specs(
        model, tx, inputs, mesh, rules, fsdp_min_size=int(c.mesh.fsdp_min_size)
    )
    if first:
      n = state_lib.param_count(abstract.params)
      print(f"params: {n / 1e9:.3f} B ({n:,})")
      print(
          f"{'mesh (data x fsdp)':>20} {'params':>12} {'EMA':>12} {'optimizer':>12} "
          f"{'total':>12}"
      )
      first = False
    p = sharding_lib.per_device_bytes(abstract.params, specs.params, mesh)
    e = sharding_lib.per_device_bytes(abstract.ema_params, specs.ema_params, mesh)
    o = sharding_lib.per_device_bytes(abstract.opt_state, specs.opt_state, mesh)
    print(
        f"{shape['data']:>9} x {fsdp:<8} {gib(p):>12} {gib(e):>12} {gib(o):>12} "
        f"{gib(p + e + o):>12}"
    )


if __name__ == "__main__":
  jax.config.update("jax_platforms", "cpu")
  main()
