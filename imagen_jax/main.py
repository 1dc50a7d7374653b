"""`python -m imagen_jax.main`: the training CLI's earlier name, kept so that existing scripts
and launch commands run unchanged; the CLI is `python -m imagen_jax.train` (train/main.py)."""

from imagen_jax import cli
from imagen_jax.train import main

if __name__ == "__main__":
  cli.run(main.main)
