"""T5 encoder memory plan: param count and per-device param bytes on an fsdp mesh.

    python benchmarks/t5_memory.py [--name t5-v1_1-xxl] [--fsdp 16]

Imagen's text encoder is the frozen T5-XXL encoder, 4.6B params (Saharia et al. 2022, §2.1/§4.4).
Everything is computed with ``jax.eval_shape`` and PartitionSpecs: nothing is allocated and no
devices are needed. Rules: every ``embed`` axis is split over ``fsdp`` (d_model 4096 / 16 = 256),
the rest replicated (the relative-position table is the only param without an ``embed`` axis).
"""

import jax.numpy as jnp

from imagen_jax import cli
from imagen_jax.text import t5

FSDP_RULES = (("embed", "fsdp"), ("vocab", None), ("heads", None), ("kv", None), ("mlp", None))


def main():
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--name", default="t5-v1_1-xxl", choices=sorted(t5.PRESETS))
  parser.add_argument("--fsdp", type=int, default=16)
  args = parser.parse_args()
  n = t5.count_params(t5.preset_config(args.name))
  print(f"{args.name} encoder params: {n:,} ({n / 1e9:.3f}B; paper: 4.6B for T5-XXL)")
  for dtype in (jnp.float32, jnp.bfloat16):
    config = t5.preset_config(args.name, param_dtype=dtype)
    total = n * jnp.dtype(dtype).itemsize
    per = t5.per_device_param_bytes(config, FSDP_RULES, {"fsdp": args.fsdp})
    print(
        f"  {jnp.dtype(dtype).name:>8}: {total / 2**30:6.2f} GiB total, "
        f"{per / 2**30:6.3f} GiB ({per:,} bytes) per device on a {args.fsdp}-way fsdp mesh"
    )


if __name__ == "__main__":
  main()
