"""On-device augmentations: shapes, determinism, each op's effect, rates, and key handling."""

import functools

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from simclr_jax import augment

SIZE = 16


def colourful(n=1, seed=0):
  """float32 [n, SIZE, SIZE, 3]: smooth colour gradients plus noise, far from grey."""
  y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
  base = np.stack([x, y, 1 - 0.5 * (x + y)], -1)
  noise = np.random.default_rng(seed).uniform(-0.1, 0.1, (n, SIZE, SIZE, 3))
  return jnp.asarray(np.clip(0.1 + 0.8 * base + noise, 0, 1), jnp.float32)


def view_config(**overrides):
  c = default.view_augment()
  for k, v in overrides.items():
    c[k] = v
  return c


def all_off():
  return view_config(
    flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0
  )


@functools.lru_cache
def _jitted(config_items, normalize=False):
  config = view_config(**dict(config_items))
  return jax.jit(lambda k, x: augment.augment_batch(k, x, config, normalize=normalize))


def run(key, images, normalize=False, **overrides):
  return _jitted(tuple(sorted(overrides.items())), normalize)(key, images)


def test_shapes_dtypes_and_range():
  images = colourful(4)
  out = run(jax.random.key(0), images)
  assert out.shape == images.shape and out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  assert not np.allclose(out, images)


def test_normalize_uses_imagenet_statistics():
  images = colourful(2)
  normed = augment.augment_batch(jax.random.key(1), images, all_off(), normalize=True)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(normed, (np.asarray(images) - mean) / std, rtol=1e-5, atol=1e-5)


def test_same_key_same_output_and_different_key_differs():
  images = colourful(4)
  a = run(jax.random.key(7), images)
  b = run(jax.random.key(7), images)
  c = run(jax.random.key(8), images)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_jit_eager_and_vmap_agree():
  images = colourful(4)
  config = view_config()
  key = jax.random.key(3)
  jitted = run(key, images)
  vmapped = augment.augment_batch(key, images, config)
  eager = augment.augment_image(jax.random.split(key, 4)[1], images[1], config)
  np.testing.assert_allclose(vmapped, jitted, atol=1e-5)
  np.testing.assert_allclose(eager, jitted[1], atol=1e-5)


def test_loop_and_vmap_give_the_same_views():
  """The CPU's sequential loop and vmap (accelerators) run the same per-image computation."""
  images = colourful(8, seed=1)
  config = view_config(solarize_prob=0.5)  # every op on, blur p=0.5, random colour order
  key = jax.random.key(5)
  ids = jnp.arange(8) + 3
  outs = [
    jax.jit(functools.partial(augment.augment_batch, view_config=config, loop=loop))(
      key, images, example_ids=ids
    )
    for loop in (True, False)
  ]
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
  assert float(jnp.abs(outs[0] - images).max()) > 0.1  # augmented, not passed through


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_each_colour_op_alone_changes_a_colourful_image(op):
  image = colourful()[0]
  for seed in range(3):  # a draw may be close to neutral; three in a row are not
    out = augment.color_jitter(jax.random.key(seed), image, **{op: 0.5})
    assert out.shape == image.shape
    assert float(jnp.abs(out - image).max()) > 0.02


def test_colour_jitter_at_strength_zero_is_the_identity():
  image = colourful()[0]
  out = augment.random_color_jitter(jax.random.key(0), image, probability=1.0, strength=0.0)
  np.testing.assert_array_equal(out, image)
  out = augment.color_jitter(jax.random.key(0), image)
  np.testing.assert_array_equal(out, image)


def test_order_is_random_and_uniform():
  fns = [lambda x: x * 2, lambda x: x + 1]  # 1 -> 3 in this order, 4 in the other
  keys = jax.random.split(jax.random.key(0), 400)
  out = jax.vmap(lambda k: augment.apply_in_random_order(k, jnp.float32(1), fns))(keys)
  assert set(np.asarray(out).tolist()) == {3.0, 4.0}
  assert abs(int((out == 3).sum()) - 200) <= 40  # 4 binomial standard deviations


def test_brightness_is_multiplicative():
  image = colourful()[0]
  out = augment.color_jitter(jax.random.key(0), image * 0.5, brightness=0.3)
  ratio = np.asarray(out / (image * 0.5))
  np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)  # one factor for the whole image
  assert 0.7 <= ratio.flat[0] <= 1.3 and ratio.flat[0] != 1.0


def test_constant_images_stay_finite_and_grey():
  images = jnp.asarray([0.0, 0.5, 1.0, 0.25], jnp.float32)[:, None, None, None]
  images = jnp.broadcast_to(images, (4, SIZE, SIZE, 3))
  out = np.asarray(run(jax.random.key(0), images))
  assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
  np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-6)
  np.testing.assert_allclose(out[..., 1], out[..., 2], atol=1e-6)


def test_grey_stays_grey_under_hue_jitter():
  grey = jnp.repeat(colourful()[0].mean(-1, keepdims=True), 3, axis=-1)
  for seed in range(5):
    out = np.asarray(augment.color_jitter(jax.random.key(seed), grey, hue=0.5))
    np.testing.assert_allclose(out, np.asarray(grey), atol=1e-6)


def test_blur_smooths_and_keeps_the_mean():
  image = colourful(seed=1)[0]
  out = augment.random_gaussian_blur(
    jax.random.key(0), image, probability=1.0, sigma_range=(1.0, 2.0), kernel_size=5
  )
  centre = (slice(3, -3), slice(3, -3))  # zero padding darkens only the border
  assert float(jnp.abs(jnp.diff(out, axis=0))[centre].mean()) < float(
    jnp.abs(jnp.diff(image, axis=0))[centre].mean()
  )
  np.testing.assert_allclose(out[centre].mean(), image[centre].mean(), atol=0.02)


def _numpy_blur(image, sigma, kernel_size):
  """Zero-padded separable Gaussian blur by its definition, in float64."""
  radius = int(kernel_size / 2)
  taps = np.arange(-radius, radius + 1)
  kernel = np.exp(-(taps**2) / (2 * sigma**2))
  kernel /= kernel.sum()
  h, w, _ = image.shape
  padded = np.pad(np.asarray(image, np.float64), ((radius, radius), (radius, radius), (0, 0)))
  out = np.zeros(image.shape)
  for a, ka in zip(taps, kernel, strict=True):
    for b, kb in zip(taps, kernel, strict=True):
      out += ka * kb * padded[radius + a : radius + a + h, radius + b : radius + b + w]
  return out


@pytest.mark.parametrize(
  "height,width,sigma,kernel_size",
  [(8, 8, 0.5, 3), (17, 12, 1.7, 5), (32, 32, 2.0, 3), (12, 9, 0.1, 4), (9, 14, 1.2, 30)]
  + [(64, 48, 2.0, 6), (20, 14, 1.5, 4)],  # even sizes (64 px: 6) with visible outer taps
)
def test_blur_matches_definition_and_dm_pix(height, width, sigma, kernel_size):
  image = jax.random.uniform(jax.random.key(height * width), (height, width, 3))
  out = augment.gaussian_blur(image, jnp.float32(sigma), kernel_size)
  assert out.shape == image.shape and out.dtype == image.dtype
  np.testing.assert_allclose(out, _numpy_blur(image, sigma, kernel_size), atol=2e-6)
  np.testing.assert_allclose(out, pix.gaussian_blur(image, sigma, kernel_size), atol=2e-6)


def test_blur_matrix_rows_are_the_clipped_kernel():
  m = np.asarray(augment.gaussian_blur_matrix(7, jnp.float32(1.0), 3))
  kernel = np.exp(-np.array([1.0, 0.0, 1.0]) / 2)
  kernel /= kernel.sum()
  np.testing.assert_allclose(m[3, 2:5], kernel, rtol=1e-6)
  np.testing.assert_allclose(m[0, :2], kernel[1:], rtol=1e-6)  # left border: zero padding
  assert np.count_nonzero(m) == 7 * 3 - 2


def test_solarize_inverts_above_threshold():
  image = colourful()[0]
  out = augment.random_solarize(jax.random.key(0), image, probability=1.0, threshold=0.5)
  np.testing.assert_allclose(out, jnp.where(image < 0.5, image, 1 - image))


def test_everything_off_is_the_identity():
  images = colourful(3)
  config = all_off()
  out = augment.augment_batch(jax.random.key(0), images, config)
  np.testing.assert_array_equal(out, images)


def _binomial_ok(count, n, p):
  return abs(count - n * p) <= 4 * np.sqrt(n * p * (1 - p))


def test_flip_rate_matches_probability():
  n = 400
  images = jnp.broadcast_to(colourful()[0], (n, SIZE, SIZE, 3))
  config = all_off()
  config.flip_prob = 0.5
  out = augment.augment_batch(jax.random.key(0), images, config)
  flipped = np.all(np.isclose(out, images[:, :, ::-1]), axis=(1, 2, 3))
  unchanged = np.all(np.isclose(out, images), axis=(1, 2, 3))
  assert np.all(flipped ^ unchanged)
  assert _binomial_ok(flipped.sum(), n, 0.5)


def test_grayscale_rate_matches_probability():
  n = 400
  images = jnp.broadcast_to(colourful()[0], (n, SIZE, SIZE, 3))
  config = all_off()
  config.grayscale_prob = 0.2
  out = np.asarray(augment.augment_batch(jax.random.key(1), images, config))
  grey = np.all(np.abs(out - out.mean(-1, keepdims=True)) < 1e-6, axis=(1, 2, 3))
  assert _binomial_ok(grey.sum(), n, 0.2)
  np.testing.assert_array_equal(out[~grey], np.asarray(images)[~grey])


def test_colour_jitter_rate_matches_probability():
  n = 400
  images = jnp.broadcast_to(colourful()[0], (n, SIZE, SIZE, 3))
  config = all_off()
  config.color_jitter_prob = 0.8
  out = np.asarray(augment.augment_batch(jax.random.key(2), images, config))
  changed = np.any(out != np.asarray(images), axis=(1, 2, 3))
  assert _binomial_ok(changed.sum(), n, 0.8)


def test_randomness_differs_per_example_view_device_and_step():
  devices = jax.local_device_count()
  assert devices == 4  # tests/conftest.py
  images = jnp.broadcast_to(colourful()[0], (devices, 2, SIZE, SIZE, 3))
  config = default.get_config().augment
  # Always jitter: otherwise two examples may both draw "leave unchanged" and coincide.
  config.view1.color_jitter_prob = config.view2.color_jitter_prob = 1.0

  def step(key, step, x):
    key = jax.random.fold_in(jax.random.fold_in(key, step), jax.lax.axis_index("batch"))
    return augment.augment_views(key, x, x, config)

  p_step = jax.pmap(step, axis_name="batch", in_axes=(None, None, 0))
  view1, view2 = map(np.asarray, p_step(jax.random.key(0), 0, images))
  again, _ = p_step(jax.random.key(0), 0, images)
  next_step, _ = p_step(jax.random.key(0), 1, images)
  np.testing.assert_array_equal(view1, again)
  assert len({x.tobytes() for x in view1.reshape(-1, SIZE, SIZE, 3)}) == 2 * devices
  assert not np.allclose(view1, view2)
  assert not np.allclose(view1, next_step)


def test_augment_off_returns_the_views_unchanged():
  images = colourful(2)
  config = default.get_config().augment
  config.enabled = False
  view1, view2 = augment.augment_views(jax.random.key(0), images, images, config)
  np.testing.assert_array_equal(view1, images)
  np.testing.assert_array_equal(view2, view1)
  config.normalize = True
  view1, _ = augment.augment_views(jax.random.key(0), images, images, config)
  np.testing.assert_allclose(view1, augment.normalize_images(images))


def test_views_follow_their_own_settings():
  images = colourful(8)
  config = default.get_config().augment
  config.view1 = all_off()
  config.view2 = all_off()
  config.view2.grayscale_prob = 1.0
  view1, view2 = augment.augment_views(jax.random.key(0), images, images, config)
  np.testing.assert_array_equal(view1, images)
  np.testing.assert_allclose(view2[..., 0], view2[..., 2], atol=1e-6)


def test_local_views_are_keyed_as_further_views_with_their_own_settings():
  """Local crop k of example `id` is `augment_image` under fold_in(fold_in(rng, 3 + k), id) with
  `augment.local_view` (views 1 and 2 take 1 and 2), by loop or vmap alike."""
  config = default.get_config().augment
  config.local_view = view_config(color_jitter_prob=1.0, blur_prob=0.0)
  local = colourful(6).reshape(3, 2, SIZE, SIZE, 3)  # B = 3 images, K = 2 local crops
  ids, key = jnp.array([5, 0, 9]), jax.random.key(4)
  out = np.asarray(augment.augment_local_views(key, local, config, example_ids=ids))
  assert out.shape == local.shape
  for b, example in enumerate(ids):
    for k in range(2):
      keyed = jax.random.fold_in(jax.random.fold_in(key, 3 + k), example)
      expected = augment.augment_image(keyed, local[b, k], config.local_view)
      np.testing.assert_allclose(out[b, k], expected, atol=1e-6)
  looped = augment.augment_local_views(key, local, config, example_ids=ids, loop=True)
  np.testing.assert_allclose(looped, out, atol=1e-6)
  config.local_view = all_off()
  config.local_view.grayscale_prob = 1.0
  grey = np.asarray(augment.augment_local_views(key, local, config, example_ids=ids))
  np.testing.assert_allclose(grey[..., 0], grey[..., 2], atol=1e-6)
