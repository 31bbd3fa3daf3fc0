"""SimCLR's on-device augmentations (Chen et al. 2020, §3 and Appendix A), pure JAX on dm-pix.

Per view, in this order: horizontal flip, colour jitter (its four ops in a random order), grayscale,
Gaussian blur, solarize (BYOL's addition, off by default), clip to [0, 1], then optionally ImageNet
mean/std normalisation. The random-resized crop runs earlier, on the host, in tf.data
(`simclr_jax.data.crops.random_resized_crop`).

Every op takes a key first and one float32 ``[H, W, 3]`` image in [0, 1] (dm-pix's convention);
`augment_batch` splits its key per example and ``vmap``s. Probabilities and strengths are Python
numbers from the config: an op whose probability or strength is 0 is left out of the computation.
The two global views take ``augment.view1`` / ``view2`` (`augment_views`); multi-crop's small local
crops (SwAV §3.2) take ``augment.local_view`` (`augment_local_views`).
"""

from collections.abc import Callable

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_KERNEL_FRACTION = 0.1  # kernel size as a fraction of the image height (Appendix A)


def _random_apply(
  key: jax.Array, image: jax.Array, probability: float, fn: Callable[[jax.Array], jax.Array]
) -> jax.Array:
  """``fn(image)`` with probability ``probability``, else ``image``."""
  if isinstance(probability, int | float):
    if probability <= 0:
      return image
    if probability >= 1:
      return fn(image)
  return jax.lax.cond(jax.random.uniform(key) < probability, fn, lambda x: x, image)


def color_jitter(
  key: jax.Array,
  image: jax.Array,
  *,
  brightness: float = 0.0,
  contrast: float = 0.0,
  saturation: float = 0.0,
  hue: float = 0.0,
) -> jax.Array:
  """Random brightness, contrast, saturation and hue, in a random order (SimCLR Appendix A).

  Brightness multiplies the image by a factor in ``[max(0, 1 - brightness), 1 + brightness]``
  (dm-pix's own brightness is additive); contrast and saturation factors are drawn from
  ``[max(0, 1 - x), 1 + x]``; the hue shift from ``[-hue, hue]`` (turns, at most 0.5). The image is
  clipped to [0, 1] after each op, as in the reference implementation.

  Args:
    key: PRNG key.
    image: float32 ``[H, W, 3]`` in [0, 1].
    brightness, contrast, saturation, hue: strengths, >= 0; an op at 0 is skipped.

  Returns:
    float32 ``[H, W, 3]`` in [0, 1].
  """
  ops = []
  if brightness > 0:
    ops.append((lambda x, f: x * f, max(0.0, 1 - brightness), 1 + brightness))
  if contrast > 0:
    ops.append((pix.adjust_contrast, max(0.0, 1 - contrast), 1 + contrast))
  if saturation > 0:
    ops.append((pix.adjust_saturation, max(0.0, 1 - saturation), 1 + saturation))
  if hue > 0:
    ops.append((pix.adjust_hue, -min(hue, 0.5), min(hue, 0.5)))
  if not ops:
    return image
  order_key, *op_keys = jax.random.split(key, len(ops) + 1)
  branches = []
  for op_key, (op, lo, hi) in zip(op_keys, ops, strict=True):
    factor = jax.random.uniform(op_key, minval=lo, maxval=hi)
    branches.append(lambda x, op=op, f=factor: jnp.clip(op(x, f), 0.0, 1.0))
  return apply_in_random_order(order_key, image, branches)


def apply_in_random_order(
  key: jax.Array, image: jax.Array, fns: list[Callable[[jax.Array], jax.Array]]
) -> jax.Array:
  """Applies every function in ``fns`` once, in a uniformly random order drawn from ``key``.

  ``image``: float32 ``[H, W, 3]``; each function maps it to the same shape and dtype (e.g. the
  four colour-jitter operations, SimCLR Appendix A). Returns float32 ``[H, W, 3]``.
  """
  order = jax.random.permutation(key, len(fns))
  for position in range(len(fns)):
    image = jax.lax.switch(order[position], fns, image)
  return image


def random_color_jitter(
  key: jax.Array, image: jax.Array, *, probability: float, strength: float
) -> jax.Array:
  """With probability ``probability``, `color_jitter` of strength ``s``: brightness, contrast and
  saturation ``0.8 s``, hue ``0.2 s`` (SimCLR Appendix A). Shapes as `color_jitter`."""
  apply_key, jitter_key = jax.random.split(key)
  jitter = dict(brightness=0.8 * strength, contrast=0.8 * strength, saturation=0.8 * strength)

  def fn(x):
    return color_jitter(jitter_key, x, hue=0.2 * strength, **jitter)

  return _random_apply(apply_key, image, probability if strength > 0 else 0.0, fn)


def random_grayscale(key: jax.Array, image: jax.Array, *, probability: float) -> jax.Array:
  """With probability ``probability`` in [0, 1], the image's luma (Rec. 601) in all three channels.

  ``image``: float32 ``[H, W, 3]`` in [0, 1]; returns the same shape, dtype and range (SimCLR
  Appendix A: colour drop, p = 0.2).
  """
  return _random_apply(key, image, probability, lambda x: pix.rgb_to_grayscale(x, keep_dims=True))


def gaussian_blur_matrix(size: int, sigma: jax.Array, kernel_size: int) -> jax.Array:
  """The ``[size, size]`` matrix of a 1-D Gaussian blur with zero padding ("SAME" borders).

  Row ``i`` holds the weights of output pixel ``i``: ``exp(-(i - j)^2 / (2 sigma^2))`` for
  ``|i - j| <= r``, with ``r = int(kernel_size / 2)`` (dm-pix's rounding to the odd size
  ``2r + 1``), divided by the sum of the whole ``2r + 1`` kernel. Pixels outside the image count
  as zeros, so border rows sum to less than 1, exactly as a zero-padded convolution.

  Args:
    size: number of pixels along the blurred axis.
    sigma: float scalar > 0, standard deviation in pixels.
    kernel_size: kernel width in pixels before rounding to odd.

  Returns:
    float32 ``[size, size]``.
  """
  radius = int(kernel_size / 2)
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  norm = jnp.sum(jnp.exp(-(taps**2) / (2.0 * sigma**2)))
  offset = jnp.arange(size, dtype=jnp.float32)[:, None] - jnp.arange(size, dtype=jnp.float32)
  weights = jnp.exp(-(offset**2) / (2.0 * sigma**2)) / norm
  return jnp.where(jnp.abs(offset) <= radius, weights, 0.0)


def gaussian_blur(image: jax.Array, sigma: jax.Array, kernel_size: int) -> jax.Array:
  """Separable Gaussian blur of one ``[H, W, C]`` image as two matrix products.

  ``K_H @ image @ K_W^T`` per channel, with `gaussian_blur_matrix` for each axis: the same values
  as dm-pix's two zero-padded depthwise convolutions (``pix.gaussian_blur``, tested), computed as
  dense products, which XLA's CPU backend runs much faster than per-image depthwise convolutions
  (docs/benchmarks.md, "Blur as two matrix products"; `python -m benchmarks.blur`).

  Args:
    image: float ``[H, W, C]``.
    sigma: float scalar > 0, pixels.
    kernel_size: kernel width in pixels (rounded to odd as in dm-pix).

  Returns:
    ``[H, W, C]``, dtype of ``image``.
  """
  k_h = gaussian_blur_matrix(image.shape[0], sigma, kernel_size).astype(image.dtype)
  k_w = gaussian_blur_matrix(image.shape[1], sigma, kernel_size).astype(image.dtype)
  precision = jax.lax.Precision.HIGHEST
  rows = jnp.einsum("ip,pqc->iqc", k_h, image, precision=precision)
  return jnp.einsum("jq,iqc->ijc", k_w, rows, precision=precision)


def random_gaussian_blur(
  key: jax.Array,
  image: jax.Array,
  *,
  probability: float,
  sigma_range: tuple[float, float] = (0.1, 2.0),
  kernel_size: int | None = None,
) -> jax.Array:
  """With probability ``probability``, a Gaussian blur with sigma ~ U(sigma_range) pixels.

  ``kernel_size`` (pixels) defaults to 10% of ``H`` (made odd as in dm-pix), as in SimCLR
  Appendix A; borders are zero-padded as in the reference implementation (`gaussian_blur`).

  Args:
    key: PRNG key (whether to blur, and sigma).
    image: float32 ``[H, W, 3]`` in [0, 1].
    probability: in [0, 1].
    sigma_range: (low, high) of the uniform sigma, in pixels.
    kernel_size: kernel side in pixels; None for 10% of ``H``.

  Returns:
    float32 ``[H, W, 3]``; values stay in [0, 1] (the weights are non-negative and sum to at most
    1 at each pixel).
  """
  apply_key, sigma_key = jax.random.split(key)
  if kernel_size is None:
    kernel_size = int(image.shape[0] * BLUR_KERNEL_FRACTION)

  def fn(x):
    sigma = jax.random.uniform(sigma_key, minval=sigma_range[0], maxval=sigma_range[1])
    return gaussian_blur(x, sigma, kernel_size)

  return _random_apply(apply_key, image, probability, fn)


def random_solarize(
  key: jax.Array, image: jax.Array, *, probability: float, threshold: float = 0.5
) -> jax.Array:
  """With probability ``probability``, inverts (1 - x) the values at or above ``threshold`` (BYOL).

  ``image``: float32 ``[H, W, 3]`` in [0, 1]; returns the same shape, dtype and range.
  """
  return _random_apply(key, image, probability, lambda x: pix.solarize(x, threshold))


def normalize_images(images: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
  """``(images - mean) / std`` per channel; images float ``[..., 3]`` in [0, 1]."""
  return (images - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)


def augment_image(
  key: jax.Array, image: jax.Array, view_config: ml_collections.ConfigDict
) -> jax.Array:
  """One view of one image: flip, colour jitter, grayscale, blur, solarize, clip.

  Args:
    key: PRNG key.
    image: float32 ``[H, W, 3]`` in [0, 1], already cropped.
    view_config: ``config.augment.view1``-style settings (`configs.default.view_augment`).

  Returns:
    float32 ``[H, W, 3]`` in [0, 1].
  """
  keys = jax.random.split(key, 5)
  c = view_config
  image = pix.random_flip_left_right(keys[0], image, probability=c.flip_prob)
  image = random_color_jitter(
    keys[1], image, probability=c.color_jitter_prob, strength=c.color_jitter_strength
  )
  image = random_grayscale(keys[2], image, probability=c.grayscale_prob)
  image = random_gaussian_blur(
    keys[3], image, probability=c.blur_prob, sigma_range=tuple(c.blur_sigma)
  )
  image = random_solarize(
    keys[4], image, probability=c.solarize_prob, threshold=c.solarize_threshold
  )
  return jnp.clip(image, 0.0, 1.0)


def augment_batch(
  rng: jax.Array,
  images: jax.Array,
  view_config: ml_collections.ConfigDict,
  *,
  normalize: bool = False,
  example_ids: jax.Array | None = None,
  loop: bool = False,
) -> jax.Array:
  """`augment_image` on each image with its own key; jittable.

  The per-image random choices (apply or not, the colour ops' order) are branches: under `vmap`
  every branch runs for every image and the results are selected, while a sequential loop
  (`lax.map`) runs only the branches taken, which is faster on a CPU (docs/benchmarks.md); on
  accelerators `vmap`'s parallelism wins. Same values either way (tested).

  Args:
    rng: PRNG key; fold the step (and, without `example_ids`, the device index) into it first.
    images: float32 ``[B, H, W, 3]`` in [0, 1].
    view_config: ``config.augment.view1``-style settings.
    normalize: subtract the ImageNet mean and divide by its std afterwards.
    example_ids: optional int ``[B]``, each image's index in the global batch; its key is then
      ``fold_in(rng, id)``, so the draws do not depend on how the batch is split over devices.
      Without it the keys are ``split(rng, B)``.
    loop: True for a sequential loop over the images, False for `vmap`
      (`cpu_kernels.Ops.sequential_augment` says which suits the backend).

  Returns:
    float32 ``[B, H, W, 3]``, in [0, 1] unless normalised.
  """
  out = _augment_images(_example_keys(rng, images.shape[0], example_ids), images, view_config, loop)
  return normalize_images(out) if normalize else out


def _example_keys(rng: jax.Array, batch: int, example_ids: jax.Array | None) -> jax.Array:
  """``[batch]`` keys: ``fold_in(rng, id)`` per example id, or ``split(rng, batch)`` without."""
  if example_ids is None:
    return jax.random.split(rng, batch)
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(example_ids)


def _augment_images(keys, images, view_config, loop):
  """`augment_image` of each ``images[i]`` under ``keys[i]``, by `lax.map` or `vmap`."""
  if loop:
    return jax.lax.map(lambda args: augment_image(args[0], args[1], view_config), (keys, images))
  return jax.vmap(lambda k, x: augment_image(k, x, view_config))(keys, images)


def augment_views(
  rng: jax.Array,
  view1: jax.Array,
  view2: jax.Array,
  augment_config: ml_collections.ConfigDict,
  *,
  example_ids: jax.Array | None = None,
  loop: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Augments the two crops with ``augment_config.view1`` / ``view2`` and independent keys.

  Args:
    rng: PRNG key with the step (and, without `example_ids`, the device index) folded in.
    view1, view2: float32 ``[B, H, W, 3]`` in [0, 1], two crops of the same B images.
    augment_config: ``config.augment``; reads ``enabled``, ``normalize``, ``view1``, ``view2``.
    example_ids: optional int ``[B]`` global-batch indices of the images (see `augment_batch`).
    loop: sequential loop or `vmap` over the images (see `augment_batch`).

  Returns:
    ``(view1, view2)``, float32 ``[B, H, W, 3]``. With ``enabled`` False the inputs come back
    unchanged (only normalised, if ``normalize`` is set).
  """
  normalize = bool(augment_config.get("normalize", False))
  if not augment_config.enabled:
    return tuple(normalize_images(v) if normalize else v for v in (view1, view2))
  views = ((view1, augment_config.view1), (view2, augment_config.view2))
  return tuple(
    augment_batch(
      jax.random.fold_in(rng, i),
      images,
      settings,
      normalize=normalize,
      example_ids=example_ids,
      loop=loop,
    )
    for i, (images, settings) in enumerate(views, start=1)
  )


def augment_local_views(
  rng: jax.Array,
  local_views: jax.Array,
  augment_config: ml_collections.ConfigDict,
  *,
  example_ids: jax.Array | None = None,
  loop: bool = False,
) -> jax.Array:
  """Augments the K local crops of each image with ``augment_config.local_view`` (multi-crop).

  Local crop k (0-based) is keyed as a third, fourth, ... view: its images' keys are those of
  `augment_batch` under ``fold_in(rng, 3 + k)``, as `augment_views` keys view1 and view2 under
  ``fold_in(rng, 1)`` and ``fold_in(rng, 2)``. All K*B images run through one loop or `vmap`.

  Args:
    rng: PRNG key with the step (and, without `example_ids`, the device index) folded in, the
      one given to `augment_views`.
    local_views: float32 ``[B, K, h, w, 3]`` in [0, 1], K small crops of each of B images
      (SwAV §3.2).
    augment_config: ``config.augment``; reads ``enabled``, ``normalize``, ``local_view``.
    example_ids: optional int ``[B]`` global-batch indices of the images (see `augment_batch`).
    loop: sequential loop or `vmap` over the images (see `augment_batch`).

  Returns:
    float32 ``[B, K, h, w, 3]``, in [0, 1] unless normalised. With ``enabled`` False the input
    comes back unchanged (only normalised, if ``normalize`` is set).
  """
  normalize = bool(augment_config.get("normalize", False))
  if not augment_config.enabled:
    return normalize_images(local_views) if normalize else local_views
  b, k = local_views.shape[:2]
  # [B, K] keys, then one pass over the B*K images in that (example-major) order.
  keys = jnp.stack(
    [_example_keys(jax.random.fold_in(rng, 3 + i), b, example_ids) for i in range(k)], axis=1
  )
  out = _augment_images(
    keys.reshape(b * k, *keys.shape[2:]),
    local_views.reshape(b * k, *local_views.shape[2:]),
    augment_config.local_view,
    loop,
  )
  out = out.reshape(local_views.shape)
  return normalize_images(out) if normalize else out
