"""Crops: random-resized-crop windows within their ranges, odd image shapes, seeds, centre crop."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_jax.data import crops


def _windows(shape, n, **kwargs):
  seeds = tf.data.Dataset.range(n).map(lambda i: tf.stack([i, tf.constant(7, tf.int64)]))
  ds = seeds.map(lambda s: tf.stack(crops.sample_crop_window(shape, s, **kwargs)))
  return np.concatenate(list(ds.batch(n).as_numpy_iterator()))


def test_crop_area_and_aspect_ranges_hold_over_many_draws():
  windows = _windows(tf.constant([300, 400, 3]), 2000)
  y, x, h, w = windows.T
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= 300).all() and (x + w <= 400).all()
  area = h * w / (300 * 400)
  aspect = w / h
  assert area.min() >= 0.08 * 0.97 and area.max() <= 1.0
  assert aspect.min() >= 0.75 * 0.97 and aspect.max() <= 4 / 3 * 1.03
  assert area.min() < 0.1 and area.max() > 0.9  # the whole range is used
  assert abs(np.median(np.log(aspect))) < 0.05  # log-uniform: symmetric about 1
  assert len({tuple(r) for r in windows}) > 1900


@pytest.mark.parametrize("shape", [(7, 10), (10, 7), (20, 3000), (3000, 20), (1, 1)])
def test_crops_of_small_and_extreme_images(shape):
  windows = _windows(tf.constant([*shape, 3]), 50)
  y, x, h, w = windows.T
  assert (h >= 1).all() and (w >= 1).all()
  assert (y + h <= shape[0]).all() and (x + w <= shape[1]).all()
  if max(shape) / min(shape) > 100:  # no window fits: centre crop at the nearest aspect
    assert len({tuple(r) for r in windows}) == 1
    assert max(w[0] / h[0], h[0] / w[0]) <= 4 / 3 + 0.05 and min(h[0], w[0]) == min(shape)
    assert abs(2 * y[0] + h[0] - shape[0]) <= 1 and abs(2 * x[0] + w[0] - shape[1]) <= 1
  image = tf.zeros([*shape, 3], tf.uint8)
  out = crops.random_resized_crop(image, tf.constant([1, 2]), size=8)
  assert out.shape == (8, 8, 3) and out.dtype == tf.float32


def test_same_seed_same_crop():
  image = tf.constant(np.random.default_rng(0).integers(0, 255, (30, 40, 3)), tf.uint8)
  a = crops.random_resized_crop(image, tf.constant([3, 4]), size=8)
  b = crops.random_resized_crop(image, tf.constant([3, 4]), size=8)
  c = crops.random_resized_crop(image, tf.constant([3, 5]), size=8)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_center_crop_fraction():
  image = np.zeros((64, 48, 3), np.uint8)
  image[8:-8, 8:-8] = 255  # white centre, black 8 px border
  out = crops.center_crop(tf.constant(image), size=16, crop_fraction=0.5)
  np.testing.assert_allclose(out, 1.0)
  whole = crops.center_crop(tf.constant(image), size=16, crop_fraction=1.0)
  assert whole.numpy()[:, 0].max() < 0.1  # the whole 48 px side, border included
