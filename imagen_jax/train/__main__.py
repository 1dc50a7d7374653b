"""`python -m imagen_jax.train --config=configs/base64.py:tiny --workdir=DIR` (train/main.py)."""

from imagen_jax import cli
from imagen_jax.train import main

cli.run(main.main)
