"""A pretraining run's frozen encoder f as a function of images, for downstream use.

`load_encoder` rebuilds the encoder from a checkpoint alone (model and preprocessing come from
the config saved with it) and returns an `Encoder` whose `apply` maps images to the features h
the linear probe reads (`probe.features`, depth 0): BN on running statistics, ImageNet mean/std
normalisation iff the run trained with `augment.normalize`. The probe's test view is the
caller's to make: a centre square of `crop_fraction` of the shorter side, resized to
`image_size` px (see `Encoder`).

    encoder = simclr_jax.load_encoder("runs/imagenet5")
    h = encoder.apply(images)  # float32 [N, S, S, 3] in [0, 1] -> float32 [N, feature_dim]
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simclr_jax import augment, checkpoint, cpu_kernels, models
from simclr_jax.data import resolution


@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
  """The frozen encoder of a checkpoint; `apply` gives its features h (SimCLR §2.1, §2.3).

  To get the probe's features for an image, make its test view first: take the centred square
  of side `round(min(H, W) * crop_fraction)` px (at least 1; offsets `(H - side) // 2`,
  `(W - side) // 2`), resize it bilinearly to `image_size` x `image_size` px (antialiased when
  shrinking by more than 2x, as `data.crops.center_crop` does with `tf.image.resize`), scale
  to [0, 1] (uint8 / 255). Do not normalise: `apply` does it when the run did. Other sizes are
  accepted (the encoder ends in global average pooling) but are not what the probe measured.

  Attributes:
    module: the unbound flax `models.ResNet` (with the chosen convolutions), for use in your own
      programs: `module.apply({'params': params, 'batch_stats': batch_stats}, x, train=False)`
      (normalise x first when `normalize`).
    params: the encoder's parameters (the checkpoint's `params['encoder']`), jax.Arrays on the
      default device.
    batch_stats: its BN running statistics (`batch_stats['encoder']`), likewise.
    config: the pretraining config saved with the checkpoint (today's field names).
    step: the checkpoint's step.
    feature_dim: C, the width of h (512 x width for ResNet-18/34, 2048 x width for 50-152).
    image_size: S, side in px of the probe's test view (`resolution.eval_image_size`).
    crop_fraction: the probe's centre-crop fraction of the shorter side, in (0, 1]
      (`resolution.eval_crop_fraction`: 1 when the run's last crops were <= 32 px).
    normalize: whether `apply` subtracts the ImageNet mean and divides by its std first.
    conv_impl: the convolutions running, 'flax', 'xla' or 'onednn' (`cpu_kernels.make_ops`);
      speed only, the features are the same up to float32 rounding.
  """

  module: nn.Module = dataclasses.field(repr=False)
  params: Any = dataclasses.field(repr=False)
  batch_stats: Any = dataclasses.field(repr=False)
  config: ml_collections.ConfigDict = dataclasses.field(repr=False)
  step: int
  feature_dim: int
  image_size: int
  crop_fraction: float
  normalize: bool
  conv_impl: str

  def apply(self, images: Any, *, batch_size: int | None = None) -> jax.Array:
    """Features h of `images` with the frozen encoder (BN in inference mode).

    Each row depends on its own image only. `apply` is jitted: it compiles once per input
    shape, so feed equal batches, or pass `batch_size`.

    Args:
      images: float32 [N, H, W, 3] in [0, 1] (other float dtypes are cast to float32), RGB,
        H = W = `image_size` for the probe's features; a NumPy or JAX array. N may be 0.
      batch_size: None runs all N images as one batch; B >= 1 runs batches of B (the last one
        padded), so any N compiles once. The features do not depend on it (up to float32
        rounding, ~1e-7 relative: XLA picks kernels by shape).

    Returns:
      h: float32 [N, feature_dim] jax.Array on the default device.

    Raises:
      TypeError: integer or non-numeric images (uint8 pixels must be divided by 255 first).
      ValueError: images not of shape [N, H, W, 3], or batch_size < 1.
    """
    if not hasattr(images, "dtype"):
      images = np.asarray(images)
    dtype = np.dtype(images.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"images must be floats in [0, 1], got dtype {dtype}"
        + (" (divide uint8 pixels by 255)" if jnp.issubdtype(dtype, jnp.integer) else "")
      )
    if len(images.shape) != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [N, H, W, 3] (RGB), got shape {tuple(images.shape)}")
    if batch_size is not None and batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1 (None: one batch).")
    forward = _forward_fn(self.module, self.normalize)
    variables = {"params": self.params, "batch_stats": self.batch_stats}
    n = images.shape[0]
    if n == 0:
      return jnp.zeros((0, self.feature_dim), jnp.float32)
    if batch_size is None:
      return forward(variables, jnp.asarray(images, jnp.float32))
    chunks = []
    for start in range(0, n, batch_size):  # host images go to the device one batch at a time
      chunk = jnp.asarray(images[start : start + batch_size], jnp.float32)
      rows = chunk.shape[0]
      if rows < batch_size:  # pad, so the last batch reuses the compiled program
        chunk = jnp.pad(chunk, ((0, batch_size - rows), (0, 0), (0, 0), (0, 0)))
      chunks.append(forward(variables, chunk)[:rows])
    return jnp.concatenate(chunks)

  __call__ = apply


@functools.lru_cache(maxsize=8)
def _forward_fn(module: nn.Module, normalize: bool):
  """The jitted frozen encoder, as the probe applies it (`probe.features._layers_fn`, depth 0)."""

  def forward(variables, images):
    if normalize:
      images = augment.normalize_images(images)
    return module.apply(variables, images, train=False).astype(jnp.float32)

  return jax.jit(forward)


def load_encoder(workdir: str, step: int | None = None, *, conv_impl: str = "auto") -> Encoder:
  """The frozen encoder of a pretraining run, rebuilt from its checkpoint alone.

  Needs nothing but the workdir: the model (depth, width, stem, BN settings) and the
  preprocessing (`augment.normalize`, the test-view size and crop) come from the config saved
  with the checkpoint, as `run_linear.py` does. Works from any process and device count; the
  encoder runs on the default device. Imports no TensorFlow.

  Args:
    workdir: the pretraining `--workdir` (its `checkpoints/<step>/`).
    step: a saved step; None for the latest complete one.
    conv_impl: `runtime.conv_impl` to run the convolutions with (`cpu_kernels.CONV_IMPLS`):
      'auto' (oneDNN's on a CPU where it builds, else XLA's, with a logged warning), 'xla',
      'flax' or 'onednn'; speed only, whatever the run was trained with.

  Returns:
    An `Encoder`.

  Raises:
    FileNotFoundError: `workdir` has no checkpoints directory, no complete checkpoint, or not
      `step` (the message lists the saved steps).
    ValueError: an unknown `conv_impl`, or 'onednn' off the CPU backend
      (`cpu_kernels.make_ops`).
  """
  pretrained = checkpoint.load_pretrained(workdir, step)
  config = pretrained.config
  ops = cpu_kernels.make_ops(
    ml_collections.ConfigDict(dict(conv_impl=conv_impl)), dtype=config.model.dtype
  )
  model = models.build_model(config.model, image_size=config.data.image_size, ops=ops)
  normalize = bool(config.augment.get("normalize", False))
  return Encoder(
    module=model.encoder,
    params=jax.device_put(pretrained.params["encoder"]),
    batch_stats=jax.device_put(pretrained.batch_stats["encoder"]),
    config=config,
    step=pretrained.step,
    feature_dim=models.feature_dim(config.model),
    image_size=resolution.eval_image_size(config.data),
    crop_fraction=resolution.eval_crop_fraction(config.data),
    normalize=normalize,
    conv_impl=ops.conv_impl,
  )
