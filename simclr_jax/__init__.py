"""simclr-jax: SimCLR (Chen et al. 2020, arXiv 2002.05709) in JAX/Flax."""

__version__ = "0.1.0"
