"""simclr-jax: SimCLR (Chen et al. 2020, arXiv 2002.05709) in JAX/Flax.

import simclr_jax
encoder = simclr_jax.load_encoder("runs/imagenet5")  # see simclr_jax.encoder
h = encoder.apply(images)  # float32 [N, S, S, 3] in [0, 1] -> float32 [N, feature_dim]
"""

__version__ = "0.1.0"

__all__ = ["Encoder", "__version__", "load_encoder"]

_LAZY = {"Encoder", "load_encoder"}


def __getattr__(name):
  # `import simclr_jax` stays light: JAX, Flax and Orbax load on first use, TensorFlow never.
  if name in _LAZY:
    from simclr_jax import encoder

    return getattr(encoder, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | _LAZY)
