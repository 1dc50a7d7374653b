"""Base 64x64 text-to-image stage (Imagen App. F.1): U-Net, Adafactor, cosine schedule.

Usage: `python -m imagen_jax.train --config=configs/base64.py:VARIANT[,key=value,...]
--workdir=DIR [--config.section.field=value ...]`, or in Python
`from configs import base64; base64.get_config("paper,batch=256")`. Variants `paper`, `tiny` (CPU
tests, the default), `shapes` (offline demo); keys: the knobs of `common.KNOBS` (batch,
num_steps, lr, text_name, max_length, ...) or any field path (`optim.name=adam`). Every setting
is documented in configs/common.py; the config is locked, so a misspelt field is an error.
"""

from configs import common


def get_config(arg: str | None = None):
  """The locked base64 config; `arg`: "VARIANT[,key=value,...]", e.g. "paper,batch=256"."""
  return common.stage_config("base64", arg)
