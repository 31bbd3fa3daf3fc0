"""tf.data input for SimCLR: two random-resized crops per image to pretrain, a centre crop to eval.

Sources (``config.data.source``): ``"folder"``, an ImageFolder tree read by `image_folder`, or
``"tfds"``, a TFDS dataset by name read from ``config.data.tfds_data_dir``. With
``config.data.cache`` every image is decoded once, shrunk so its shorter side is at most
``config.data.cache_shorter_side`` and kept in memory as uint8.

Randomness is stateless: epoch ``e`` is shuffled with a seed derived from ``(seed, e)`` and every
crop from that and the example's position, so a run resumed at ``start_epoch`` sees the same stream.
Undecodable files are found before the first epoch (``config.data.check_files``, or while filling
the cache), logged by path and left out; a file that fails later is dropped, not fatal. The check
and the cache are made once per process for each folder split (or TFDS split) and then reused.
Flip, colour and blur run on device afterwards (`simclr_jax.augment`).
"""

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from flax import jax_utils

from simclr_jax import image_folder, parallel
from simclr_jax.image_folder import list_image_folder

__all__ = [
  "InputIterator",
  "Source",
  "center_crop",
  "create_eval_iterator",
  "create_pretrain_iterator",
  "eval_crop_fraction",
  "eval_dataset",
  "eval_image_size",
  "get_class_names",
  "list_image_folder",
  "num_examples",
  "pretrain_dataset",
  "random_resized_crop",
  "sample_crop_window",
]

_AUTOTUNE = tf.data.AUTOTUNE


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
  """Crops a window from `sample_crop_window` and resizes it to ``size`` x ``size``.

  Args:
    image: uint8 ``[H, W, 3]``, any size.
    seed: int ``[2]`` stateless seed; the same seed gives the same crop.

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


def last_crop_size(data_config: ml_collections.ConfigDict) -> int:
  """Side in px of the last pretraining crops: ``data.final_image_size`` when the run ends with
  ``data.final_size_epochs`` > 0 epochs at that size (progressive resizing), else
  ``data.image_size``."""
  final_size = int(data_config.get("final_image_size", 0) or 0)
  final_on = int(data_config.get("final_size_epochs", 0) or 0) > 0 and final_size > 0
  return final_size if final_on else data_config.image_size


def eval_crop_fraction(data_config: ml_collections.ConfigDict) -> float:
  """The centre-crop fraction the evaluation view uses: ``data.eval_crop_fraction``, except 1
  (the whole image) when the last training crops (`last_crop_size`) are at most 32 px
  (CIFAR-sized data)."""
  return 1.0 if last_crop_size(data_config) <= 32 else data_config.eval_crop_fraction


def eval_image_size(data_config: ml_collections.ConfigDict) -> int:
  """Side in px of the evaluation view: ``data.eval_image_size``, or if 0 `last_crop_size`.

  A test view larger than the training crops undoes the apparent-object-size gap that random-
  resized crops open between training and test (Touvron et al. 2019, "FixRes", §3).

  Raises:
    ValueError: a negative ``data.eval_image_size``.
  """
  size = int(data_config.get("eval_image_size", 0) or 0)
  if size < 0:
    raise ValueError(
      f"config.data.eval_image_size={size} must be >= 0 (0: the last pretraining crop size)."
    )
  return size or last_crop_size(data_config)


@dataclasses.dataclass(frozen=True)
class Source:
  """The examples of one split, as the pipelines read them.

  Attributes:
    num_examples: examples over all hosts, skipped files excluded.
    host_examples: this host's share of them.
    examples: ``examples(seed)`` is a dataset of this host's ``(key, label int32)`` pairs, shuffled
      by the stateless ``seed`` (int64 ``[2]``) or, with None, in a fixed order.
    load: ``load(key, min_shorter_side)`` turns a key into a uint8 ``[H, W, 3]`` image.
    skipped: ``(path, reason)`` of each undecodable file left out.
  """

  num_examples: int  # over all hosts
  host_examples: int
  examples: Callable[[tf.Tensor | None], tf.data.Dataset]
  load: Callable[[tf.Tensor, int | None], tf.Tensor]
  skipped: tuple[tuple[str, str], ...] = ()


def _indexed_source(labels: np.ndarray, load, skipped=()) -> Source:
  """A source with random access: shuffles by permuting indices, host ``h`` takes every P-th."""
  n, hosts, host = len(labels), jax.process_count(), jax.process_index()
  labels_t = tf.constant(labels, tf.int32)

  def examples(seed):
    order = tf.range(n, dtype=tf.int64)
    if seed is not None:
      order = tf.random.experimental.stateless_shuffle(order, seed)
    ds = tf.data.Dataset.from_tensor_slices(order[host::hosts])
    return ds.map(lambda i: (i, labels_t[i]))

  return Source(n, len(range(host, n, hosts)), examples, load, tuple(skipped))


@functools.lru_cache(maxsize=8)
def _checked_folder(root, split, class_names, check):
  paths, labels, _ = list_image_folder(root, split, list(class_names))
  skipped = image_folder.find_undecodable(paths, what=f"{root}/{split}") if check else []
  bad = {p for p, _ in skipped}
  keep = np.asarray([p not in bad for p in paths], bool)
  return [p for p, k in zip(paths, keep, strict=True) if k], labels[keep], tuple(skipped)


@functools.lru_cache(maxsize=4)
def _cached_folder(root, split, class_names, shorter_side):
  paths, labels, _ = list_image_folder(root, split, list(class_names))
  cache, skipped = image_folder.cache_image_files(paths, shorter_side)
  return cache, labels[cache.indices], tuple(skipped)


def _expand(path: str | None) -> str | None:
  """A user-given path with ``~`` expanded (shells leave ``--flag=~/x`` alone); None if empty."""
  return os.path.expanduser(path) if path else None


@functools.lru_cache(maxsize=4)
def _cached_tfds(name, split, data_dir, shorter_side):
  ds = _load_tfds(name, split, data_dir)
  cache = image_folder.cache_images(
    ds.enumerate().map(lambda i, ex: (i, ex[0])), int(ds.cardinality()), shorter_side
  )
  undecoded = tfds.load(
    name,
    split=split,
    data_dir=data_dir or None,
    shuffle_files=False,
    download=False,
    decoders={"image": tfds.decode.SkipDecoding()},
  )
  labels = np.concatenate(
    list(undecoded.map(lambda ex: ex["label"]).batch(4096).as_numpy_iterator())
  )
  return cache, labels[cache.indices].astype(np.int32)


def _load_tfds(name, split, data_dir) -> tf.data.Dataset:
  # download=False: read a prepared local copy; never fetch data at run time.
  ds = tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False, download=False)

  def to_pair(ex):
    image = ex["image"]
    if image.shape[-1] == 1:
      image = tf.tile(image, [1, 1, 3])
    return image, tf.cast(ex["label"], tf.int32)

  return ds.map(to_pair, num_parallel_calls=_AUTOTUNE)


def _source(data_config: ml_collections.ConfigDict, split: str) -> Source:
  if data_config.source == "folder":
    root, names = os.path.expanduser(data_config.root), tuple(get_class_names(data_config))
    if data_config.cache:
      cache, labels, skipped = _cached_folder(root, split, names, data_config.cache_shorter_side)
      return _indexed_source(labels, lambda i, _: cache.load(i), skipped)
    paths, labels, skipped = _checked_folder(root, split, names, data_config.check_files)
    paths_t = tf.constant(paths)

    def load(i, min_side):
      contents = tf.io.read_file(paths_t[i])
      return image_folder.decode_image_uint8(contents, min_shorter_side=min_side)

    return _indexed_source(labels, load, skipped)

  if data_config.source == "tfds":
    name, data_dir = data_config.tfds_name, _expand(data_config.tfds_data_dir)
    if data_config.cache:
      cache, labels = _cached_tfds(name, split, data_dir, data_config.cache_shorter_side)
      return _indexed_source(labels, lambda i, _: cache.load(i))
    total = int(_load_tfds(name, split, data_dir).cardinality())
    host_ds = _load_tfds(name, tfds.split_for_jax_process(split), data_dir)
    buffer = data_config.shuffle_buffer

    def examples(seed):
      if seed is None:
        return host_ds
      shuffle_seed = tf.random.stateless_uniform([], seed, None, None, dtype=tf.int64)
      return host_ds.shuffle(buffer, seed=shuffle_seed)

    return Source(total, int(host_ds.cardinality()), examples, lambda image, _: image)

  raise ValueError(f"config.data.source={data_config.source!r}; expected 'folder' or 'tfds'.")


def get_class_names(data_config: ml_collections.ConfigDict) -> list[str]:
  """Class names: the train split's sorted class folders, or the TFDS label names.

  Raises:
    ValueError: for a missing root or train split, or an unknown ``data_config.source``.
  """
  if data_config.source == "folder":
    return image_folder.folder_class_names(
      os.path.expanduser(data_config.root), data_config.train_split
    )
  if data_config.source == "tfds":
    builder = tfds.builder(data_config.tfds_name, data_dir=_expand(data_config.tfds_data_dir))
    return list(builder.info.features["label"].names)
  raise ValueError(f"config.data.source={data_config.source!r}; expected 'folder' or 'tfds'.")


def num_examples(data_config: ml_collections.ConfigDict, split: str) -> int:
  """Examples in ``split`` over all hosts, undecodable files excluded (when they are checked).

  Raises:
    ValueError: a missing root, split or class folder, a split without images, or an unknown
      ``data_config.source`` (as `get_class_names` and `list_image_folder`).
  """
  return _source(data_config, split).num_examples


def _shard_for_devices(tree: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  devices = jax.local_device_count()
  return {k: tf.reshape(v, [devices, -1, *v.shape[1:]]) for k, v in tree.items()}


def pretrain_dataset(config: ml_collections.ConfigDict, *, seed: int, start_epoch: int = 0):
  """This host's pretraining batches, endless over epochs, as a tf.data pipeline on the host.

  Args:
    config: full config (`configs/default.py`); reads ``data``, ``augment.enabled``,
      ``augment.crop_area``, ``augment.crop_aspect_ratio`` and ``batch_size`` (global).
    seed: seed of the shuffles and crops.
    start_epoch: the first epoch; epoch ``e`` is the same whatever epoch the stream started at.

  Returns:
    ``(dataset, source)``; the dataset yields ``{'view1', 'view2'}`` float32
    ``[local_devices, per_device, S, S, 3]`` in [0, 1] with ``S = config.data.image_size``, and
    ``'label'`` int32 ``[local_devices, per_device]``. Each epoch is ``n // batch_size`` batches
    (the remainder is dropped). With ``augment.enabled`` False both views are the eval crop.

  Raises:
    ValueError: for a bad batch size, a split with fewer examples than one batch, and the errors of
      `list_image_folder`.
  """
  data = config.data
  local_batch = parallel.local_batch_size(config.batch_size)
  source = _source(data, data.train_split)
  steps = source.num_examples // config.batch_size
  if steps == 0:
    raise ValueError(
      f"Split {data.train_split!r} has {source.num_examples} examples, fewer than one batch "
      f"(batch_size={config.batch_size})."
    )
  size, augment = data.image_size, config.augment
  if augment.enabled:
    area, aspect = tuple(augment.crop_area), tuple(augment.crop_aspect_ratio)
    # The smallest crop still has about `size` pixels across at this shorter side.
    min_side = math.ceil(size / math.sqrt(area[0] * min(aspect[0], 1 / aspect[1])))
  else:
    crop_fraction = eval_crop_fraction(data)
    min_side = math.ceil(size / crop_fraction)
  hosts, host = jax.process_count(), jax.process_index()

  def epoch(e):
    epoch_seed = tf.stack([tf.constant(seed, tf.int64), e])
    ds = source.examples(epoch_seed).take(steps * local_batch).enumerate()
    return ds.map(
      lambda j, ex: (
        *ex,
        tf.random.experimental.stateless_fold_in(epoch_seed, j * hosts + host),
      )
    )

  def views(key, label, example_seed):
    image = source.load(key, min_side)
    if augment.enabled:
      seeds = tf.random.experimental.stateless_split(example_seed, 2)
      view1, view2 = (
        random_resized_crop(image, s, size=size, area_range=area, aspect_ratio_range=aspect)
        for s in (seeds[0], seeds[1])
      )
    else:
      view1 = view2 = center_crop(image, size=size, crop_fraction=crop_fraction)
    return {"view1": view1, "view2": view2, "label": label}

  ds = tf.data.Dataset.counter(start_epoch).flat_map(epoch)
  ds = ds.map(views, num_parallel_calls=_AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(local_batch, drop_remainder=True).map(_shard_for_devices)
  return ds.prefetch(_AUTOTUNE), source


def eval_dataset(
  config: ml_collections.ConfigDict,
  split: str,
  *,
  batch_size: int,
  random_views: int = 0,
  seed: int = 0,
):
  """One deterministic pass over ``split``, every example exactly once over all hosts.

  Args:
    config: full config; reads ``config.data`` and, with ``random_views``, ``augment.crop_area``
      and ``augment.crop_aspect_ratio``.
    split: split name, e.g. ``config.data.eval_split``.
    batch_size: global batch size, a multiple of the device count.
    random_views: 0 for the centre view; K >= 1 for K random views of each example instead,
      consecutive: random-resized crop and left-right flip, no colour distortion, as SimCLR's
      reference code augments the training images of its linear classifier.
    seed: seed of the random views, drawn per (seed, example position).

  Returns:
    ``(dataset, source, num_batches)``; the dataset yields ``'image'`` float32
    ``[local_devices, per_device, S, S, 3]`` in [0, 1], ``S = eval_image_size(data)`` (resize and
    centre crop of ``data.eval_crop_fraction``; no crop when the last pretraining crops are at most
    32 px, `last_crop_size`; with
    ``data.cache``, images are cached at a shorter side of at least ``S / crop_fraction``, so a
    larger test view reads real pixels, not an upsampled training cache), ``'label'`` int32 and
    ``'mask'`` bool ``[local_devices, per_device]``. With ``random_views`` K, example i's views
    are rows i*K .. i*K+K-1 of the host's stream. Padding examples (zeros, label 0, mask False)
    fill the last batches, so every host yields ``num_batches`` batches.

  Raises:
    ValueError: a crop fraction outside (0, 1], a negative ``random_views``, and the errors of
      the sources (missing root or split, ...).
  """
  data = config.data
  local_batch = parallel.local_batch_size(batch_size)
  size, crop_fraction = eval_image_size(data), eval_crop_fraction(data)
  if not 0 < crop_fraction <= 1:
    raise ValueError(f"config.data.eval_crop_fraction={crop_fraction} must be in (0, 1].")
  min_side = math.ceil(size / crop_fraction)
  if data.cache and data.cache_shorter_side < min_side:
    data = ml_collections.ConfigDict(data.to_dict())
    data.cache_shorter_side = min_side
  if random_views < 0:
    raise ValueError(f"random_views={random_views} must be >= 0 (0: the centre view).")
  source = _source(data, split)
  per_example = max(1, random_views)
  most_per_host = math.ceil(source.num_examples / jax.process_count())
  num_batches = math.ceil(most_per_host * per_example / local_batch)
  area = tuple(config.augment.crop_area)
  aspect = tuple(config.augment.crop_aspect_ratio)

  def transform(position, example):
    key, label = example
    image = source.load(key, min_side)
    if not random_views:
      view = center_crop(image, size=size, crop_fraction=crop_fraction)
      return {"image": view[None], "label": label[None], "mask": tf.constant([True])}
    example_seed = tf.random.experimental.stateless_fold_in(
      tf.constant([seed, jax.process_index()], tf.int64), position
    )
    views = []
    for v in range(random_views):
      crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(
          tf.random.experimental.stateless_fold_in(example_seed, v), 2
        )
      )
      view = random_resized_crop(
        image, crop_seed, size=size, area_range=area, aspect_ratio_range=aspect
      )
      views.append(tf.image.stateless_random_flip_left_right(view, flip_seed))
    return {
      "image": tf.stack(views),
      "label": tf.fill([random_views], label),
      "mask": tf.ones([random_views], tf.bool),
    }

  pad = {
    "image": tf.zeros([size, size, 3], tf.float32),
    "label": tf.constant(0, tf.int32),
    "mask": tf.constant(False),
  }
  ds = source.examples(None).enumerate()
  ds = ds.map(transform, num_parallel_calls=_AUTOTUNE, deterministic=True)
  # A file that fails now is dropped; the generous padding keeps the batch count fixed anyway.
  padding = num_batches * local_batch - source.host_examples * per_example + local_batch
  ds = ds.ignore_errors(log_warning=True).unbatch()
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(padding))
  ds = ds.batch(local_batch, drop_remainder=True).take(num_batches).map(_shard_for_devices)
  return ds.prefetch(_AUTOTUNE), source, num_batches


class InputIterator(Iterator[dict[str, Any]]):
  """Batches placed on the local devices, plus what the pipeline knows about its input.

  Attributes:
    num_examples: examples in the split over all hosts, skipped files excluded.
    skipped: ``(path, reason)`` of each file left out because it could not be decoded.
    num_batches: batches in one pass (eval), or batches per epoch (pretraining).
  """

  def __init__(self, dataset: tf.data.Dataset, source: Source, num_batches: int, prefetch: int):
    self._batches = jax_utils.prefetch_to_device(dataset.as_numpy_iterator(), max(1, prefetch))
    self.num_examples = source.num_examples
    self.skipped = list(source.skipped)
    self.num_batches = num_batches

  def __next__(self) -> dict[str, Any]:
    return next(self._batches)


def create_pretrain_iterator(
  config: ml_collections.ConfigDict, *, seed: int, start_epoch: int = 0
) -> InputIterator:
  """Endless pretraining batches on the local devices; see `pretrain_dataset` for the contents."""
  ds, source = pretrain_dataset(config, seed=seed, start_epoch=start_epoch)
  steps = source.num_examples // config.batch_size
  return InputIterator(ds, source, steps, config.data.prefetch)


def create_eval_iterator(
  config: ml_collections.ConfigDict,
  split: str,
  *,
  batch_size: int,
  random_views: int = 0,
  seed: int = 0,
) -> InputIterator:
  """One padded, masked evaluation pass on the local devices; see `eval_dataset`."""
  ds, source, num_batches = eval_dataset(
    config, split, batch_size=batch_size, random_views=random_views, seed=seed
  )
  return InputIterator(ds, source, num_batches, config.data.prefetch)
