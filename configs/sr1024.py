"""256->1024 super-resolution stage (Imagen App. F.3): Efficient U-Net trained on 64->256 crops,
Adam, 1000-step linear-beta schedule in continuous time.

Usage: `python -m imagen_jax.main --config=configs/sr1024.py:tiny --workdir=DIR`; variants
`paper`, `tiny` (CPU tests), `shapes` (offline demo). Every setting is documented in
configs/common.py; override any with `--config.section.field=value` (the config is locked, so a
misspelt field is an error).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "imagen_configs_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py")
)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(variant: str = "tiny"):
  return common.stage_config("sr1024", variant or "tiny")
