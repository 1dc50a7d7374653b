"""256->1024 super-resolution stage (Imagen App. F.3): Efficient U-Net trained on 64->256 crops,
Adam, 1000-step linear-beta schedule in continuous time.

Usage: `python -m imagen_jax.train --config=configs/sr1024.py:VARIANT[,key=value,...]
--workdir=DIR [--config.section.field=value ...]`, or in Python
`from configs import sr1024; sr1024.get_config("paper,batch=256")`. Variants `paper`, `tiny` (CPU
tests, the default), `shapes` (offline demo); keys: the knobs of `common.KNOBS` (batch,
num_steps, lr, text_name, max_length, ...) or any field path (`optim.name=adam`). Every setting
is documented in configs/common.py; the config is locked, so a misspelt field is an error.
"""

from configs import common


def get_config(arg: str | None = None):
  """The locked sr1024 config; `arg`: "VARIANT[,key=value,...]", e.g. "paper,batch=256"."""
  return common.stage_config("sr1024", arg)
