"""`python -m imagen_jax.sample`: the sample CLI's earlier name, kept so that existing scripts run
unchanged; the CLI is `python -m imagen_jax.sampling` (sampling/main.py)."""

from imagen_jax import cli
from imagen_jax.sampling import main

if __name__ == "__main__":
  cli.run(main.main)
