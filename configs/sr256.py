"""64->256 super-resolution stage (Imagen App. F.2): Efficient U-Net, Adam, cosine schedule.

Usage: `python -m imagen_jax.train --config=configs/sr256.py:VARIANT[,key=value,...]
--workdir=DIR [--config.section.field=value ...]`, or in Python
`from configs import sr256; sr256.get_config("paper,batch=256")`. Variants `paper`, `tiny` (CPU
tests, the default), `shapes` (offline demo); keys: the knobs of `common.KNOBS` (batch,
num_steps, lr, text_name, max_length, ...) or any field path (`optim.name=adam`). Every setting
is documented in configs/common.py; the config is locked, so a misspelt field is an error.
"""

from configs import common


def get_config(arg: str | None = None):
  """The locked sr256 config; `arg`: "VARIANT[,key=value,...]", e.g. "paper,batch=256"."""
  return common.stage_config("sr256", arg)
