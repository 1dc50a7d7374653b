"""imagen-jax: Imagen text-to-image cascaded diffusion in JAX/Flax."""

__version__ = "0.1.0"
