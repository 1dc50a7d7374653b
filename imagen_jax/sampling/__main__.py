"""`python -m imagen_jax.sampling --config=configs/cascade.py:shapes --prompt=...` (main.py)."""

from imagen_jax import cli
from imagen_jax.sampling import main

cli.run(main.main)
