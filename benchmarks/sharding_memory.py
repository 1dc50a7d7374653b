"""Per-device parameter + optimizer-state bytes of a stage on a big mesh, from shardings alone.

Imagen's base model (2B params, §4.1) trained on 256 TPU-v4 chips. This computes, without
allocating anything (`jax.eval_shape` + an `AbstractMesh`), what each device holds of the
params, their float32 EMA and the optimizer state under the config's logical axis rules, for
several (data, fsdp) splits of 256 devices: fsdp divides the per-device bytes (ZeRO-3).

  python benchmarks/sharding_memory.py --config=configs/base64.py:paper [--devices=256] \
      [--config.optim.name=adam ...]

The config is a stage config (`configs/<stage>.py:VARIANT[,key=value,...]`); any field can be
set with `--config.section.field=value`. The text input is `[1, text.max_length,
registry.text_dim(text)]`.
"""

from __future__ import annotations

import jax
from absl import app, flags
from ml_collections import config_flags

from imagen_jax import cli
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import sharding as sharding_lib
from imagen_jax.stage import Stage
from imagen_jax.train import optim
from imagen_jax.train import state as state_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/base64.py:paper", "stage config, e.g. configs/sr256.py:paper"
)
_DEVICES = flags.DEFINE_integer("devices", 256, "devices of the abstract mesh")


def gib(n: int) -> str:
  return f"{n / 2**30:8.3f} GiB"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  c, devices = _CONFIG.value, _DEVICES.value
  rules = sharding_lib.rules_from_config(c)
  stage = Stage.from_config(c)  # network + abstract params at the train sizes
  tx, _ = optim.make_optimizer(c.optim, c.train.num_steps)
  print(
      f"stage {c.stage} ({c.variant}), optimizer {c.optim.name}, "
      f"{devices} devices, rules {dict(rules)}"
  )
  first = True
  for fsdp in sorted({1, 4, 16, 64, devices}):
    if devices % fsdp:
      continue
    shape = {"data": devices // fsdp, "fsdp": fsdp, "tensor": 1}
    mesh = mesh_lib.abstract_mesh(shape, devices)
    abstract, specs = state_lib.state_specs(
        stage, tx, mesh, rules, fsdp_min_size=sharding_lib.fsdp_min_size_from_config(c)
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
  cli.run(main)
