"""editing_jax: instruction-based image editing research in JAX/Flax."""

__version__ = "0.1.0"
