"""Crop sampling in tf.data: SimCLR's random-resized crop and the evaluation centre crop.

Both take a uint8 ``[H, W, 3]`` image of any size and return float32 ``[size, size, 3]`` in
[0, 1]. Randomness is stateless: the same ``[2]`` seed gives the same crop on every host.
"""

import math

import tensorflow as tf


def sample_crop_window(
  image_shape: tf.Tensor,
  seed: tf.Tensor,
  *,
  area_range: tuple[float, float] = (0.08, 1.0),
  aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
  attempts: int = 10,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
  """Samples a random-resized-crop window (SimCLR Appendix A; Szegedy et al. 2015).

  Up to ``attempts`` draws of an area fraction ~ U(area_range) and an aspect ratio (width/height)
  log-uniform in ``aspect_ratio_range``; the first window that fits is used. If none fits, a centre
  crop of the whole image, narrowed to the nearest allowed aspect ratio.

  Args:
    image_shape: int tensor ``[H, W, ...]``, any ``H, W >= 1``.
    seed: int32/int64 ``[2]`` stateless seed.
    area_range: fraction of the image area, within (0, 1].
    aspect_ratio_range: width/height, ``lo <= hi``.
    attempts: draws before the centre-crop fallback.

  Returns:
    ``(y, x, height, width)`` int32 scalars; the window lies inside the image and is at least 1x1.
  """
  height = tf.cast(image_shape[0], tf.float32)
  width = tf.cast(image_shape[1], tf.float32)
  seeds = tf.random.experimental.stateless_split(seed, 4)
  lo, hi = aspect_ratio_range
  areas = height * width * tf.random.stateless_uniform([attempts], seeds[0], *area_range)
  ratios = tf.exp(tf.random.stateless_uniform([attempts], seeds[1], math.log(lo), math.log(hi)))
  ws = tf.round(tf.sqrt(areas * ratios))
  hs = tf.round(tf.sqrt(areas / ratios))
  fits = (ws >= 1) & (hs >= 1) & (ws <= width) & (hs <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))
  found = tf.reduce_any(fits)

  ratio = width / height
  fallback_w = tf.where(ratio > hi, tf.round(height * hi), width)
  fallback_h = tf.where(ratio < lo, tf.round(width / lo), height)
  h = tf.cast(tf.maximum(tf.where(found, hs[first], fallback_h), 1.0), tf.int32)
  w = tf.cast(tf.maximum(tf.where(found, ws[first], fallback_w), 1.0), tf.int32)

  def offset(size, crop, s):
    drawn = tf.random.stateless_uniform([], s, minval=0, maxval=size - crop + 1, dtype=tf.int32)
    return tf.where(found, drawn, (size - crop) // 2)

  y = offset(tf.cast(image_shape[0], tf.int32), h, seeds[2])
  x = offset(tf.cast(image_shape[1], tf.int32), w, seeds[3])
  return y, x, h, w


def _resize_square(image: tf.Tensor, size: int) -> tf.Tensor:
  """uint8 ``[h, w, 3]`` -> float32 ``[size, size, 3]`` in [0, 1], bilinear.

  Shrinking by more than 2x would skip source pixels and alias, so it is antialiased; below that
  plain bilinear interpolation already weighs every source pixel, at a fraction of the cost.
  """

  def resize(antialias):
    return lambda: tf.image.resize(image, [size, size], method="bilinear", antialias=antialias)

  out = tf.cond(tf.reduce_max(tf.shape(image)[:2]) > 2 * size, resize(True), resize(False))
  return tf.clip_by_value(out / 255.0, 0.0, 1.0)


def random_resized_crop(
  image: tf.Tensor,
  seed: tf.Tensor,
  *,
  size: int,
  area_range: tuple[float, float] = (0.08, 1.0),
  aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
  """Crops a window from `sample_crop_window` and resizes it to ``size`` x ``size`` px.

  Args:
    image: uint8 ``[H, W, 3]``, any size.
    seed: int ``[2]`` stateless seed; the same seed gives the same crop.
    size: output side in px.
    area_range: see `sample_crop_window`.
    aspect_ratio_range: see `sample_crop_window`.

  Returns:
    float32 ``[size, size, 3]`` in [0, 1].
  """
  y, x, h, w = sample_crop_window(
    tf.shape(image), seed, area_range=area_range, aspect_ratio_range=aspect_ratio_range
  )
  return _resize_square(image[y : y + h, x : x + w], size)


def center_crop(image: tf.Tensor, *, size: int, crop_fraction: float = 0.875) -> tf.Tensor:
  """The evaluation view: a centred square of ``crop_fraction`` of the shorter side, resized.

  Args:
    image: uint8 ``[H, W, 3]``, any size.
    size: output side in px.
    crop_fraction: in (0, 1]; 1 keeps the whole shorter side.

  Returns:
    float32 ``[size, size, 3]`` in [0, 1].
  """
  shape = tf.shape(image)
  side = tf.cast(tf.round(tf.cast(tf.reduce_min(shape[:2]), tf.float32) * crop_fraction), tf.int32)
  side = tf.maximum(side, 1)
  y = (shape[0] - side) // 2
  x = (shape[1] - side) // 2
  return _resize_square(image[y : y + side, x : x + side], size)
