"""tf.data input for SimCLR: two random-resized crops per image to pretrain, a centre crop to eval.

With multi-crop (``augment.local_crops.num`` K > 0; Caron et al. 2020, SwAV §3.2) each pretraining
image also gets K small local random-resized crops, every one a positive of the other views.

Both pipelines run on the host and yield batches shaped ``[local_devices, per_device, ...]``;
`InputIterator` prefetches them onto the local devices. Flip, colour and blur run on device
afterwards (`simclr_jax.augment`). Where the examples come from is `sources`, how they are cropped
`crops`, and at what size `resolution`.

Randomness is stateless: epoch ``e`` is shuffled with a seed derived from ``(seed, e)`` and every
crop from that and the example's position in the epoch's global stream, so a run resumed at
``start_epoch``, or run on any number of hosts, sees the same crops; turning local crops on leaves
the two global crops as they were. Each pretraining batch carries its examples' indices in the
global batch (``example_id``), from which the on-device augmentation keys its draws. A file that
fails to decode mid-pass is dropped, not fatal.
"""

import math
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import tensorflow as tf
from flax import jax_utils

from simclr_jax import parallel
from simclr_jax.data import crops, resolution, sources


def _shard_for_devices(tree: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  devices = jax.local_device_count()
  return {k: tf.reshape(v, [devices, -1, *v.shape[1:]]) for k, v in tree.items()}


def num_local_crops(config: ml_collections.ConfigDict) -> int:
  """Local crops per image, ``augment.local_crops.num`` (SwAV §3.2); 0 for configs without it."""
  local = config.augment.get("local_crops")
  return 0 if local is None else int(local.num)


def pretrain_dataset(config: ml_collections.ConfigDict, *, seed: int, start_epoch: int = 0):
  """This host's pretraining batches, endless over epochs, as a tf.data pipeline on the host.

  Args:
    config: full config (`configs/default.py`); reads ``data``, ``augment.enabled``,
      ``augment.crop_area``, ``augment.crop_aspect_ratio``, ``augment.local_crops`` and
      ``batch_size`` (global).
    seed: random seed of the shuffles and crops.
    start_epoch: the first epoch; epoch ``e`` is the same whatever epoch the stream started at.

  Returns:
    ``(dataset, source)``; the dataset yields ``{'view1', 'view2'}`` float32
    ``[local_devices, per_device, S, S, 3]`` in [0, 1] with ``S = config.data.image_size``,
    ``'label'`` int32 and ``'example_id'`` int32 ``[local_devices, per_device]``, each example's
    index in the global batch (`parallel.example_ids`). Each epoch is ``n // batch_size``
    batches (the remainder is dropped). With ``augment.enabled`` False both views are the eval
    crop. With ``augment.local_crops.num`` K > 0 it also yields ``'local_views'`` float32
    ``[local_devices, per_device, K, s, s, 3]`` in [0, 1], ``s = augment.local_crops.size``:
    random-resized crops of area ``augment.local_crops.crop_area`` and aspect
    ``augment.crop_aspect_ratio`` (SwAV §3.2).

  Raises:
    ValueError: a batch size that is not a positive multiple of the device count, a split with
      fewer examples than one batch, local crops that are negative in number, have a size
      below 1 px, or are asked for with ``augment.enabled`` False, and the errors of
      `sources.create_source`.
  """
  data = config.data
  local_batch = parallel.local_batch_size(config.batch_size)
  source = sources.create_source(data, data.train_split)
  steps = source.num_examples // config.batch_size
  if steps == 0:
    raise ValueError(
      f"Split {data.train_split!r} has {source.num_examples} examples, fewer than one batch "
      f"(batch_size={config.batch_size})."
    )
  size, augment = data.image_size, config.augment
  num_local = num_local_crops(config)
  if num_local:
    local_size = int(augment.local_crops.size)
    local_area = tuple(augment.local_crops.crop_area)
    if num_local < 0 or local_size < 1 or not augment.enabled:
      raise ValueError(
        f"config.augment.local_crops (num={num_local}, size={local_size}) needs num >= 0, "
        f"size >= 1 px and augment.enabled (it is {augment.enabled})."
      )
  if augment.enabled:
    area, aspect = tuple(augment.crop_area), tuple(augment.crop_aspect_ratio)
    # The smallest crop still has about `size` pixels across at this shorter side. Local crops
    # are cut from the same decoded image: the global crops set its size, so that turning local
    # crops on leaves the global crops unchanged.
    min_side = math.ceil(size / math.sqrt(area[0] * min(aspect[0], 1 / aspect[1])))
  else:
    crop_fraction = resolution.eval_crop_fraction(data)
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
        crops.random_resized_crop(image, s, size=size, area_range=area, aspect_ratio_range=aspect)
        for s in (seeds[0], seeds[1])
      )
    else:
      view1 = view2 = crops.center_crop(image, size=size, crop_fraction=crop_fraction)
    out = {"view1": view1, "view2": view2, "label": label}
    if num_local:
      # Seeds 2, 3, ... of the example: folded in apart from the global crops' 2-way split.
      out["local_views"] = tf.stack(
        [
          crops.random_resized_crop(
            image,
            tf.random.experimental.stateless_fold_in(example_seed, tf.constant(2 + k, tf.int64)),
            size=local_size,
            area_range=local_area,
            aspect_ratio_range=aspect,
          )
          for k in range(num_local)
        ]
      )
    return out

  ds = tf.data.Dataset.counter(start_epoch).flat_map(epoch)
  ds = ds.map(views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors(log_warning=True)
  ids = tf.constant(parallel.example_ids(config.batch_size).reshape(-1))
  ds = ds.batch(local_batch, drop_remainder=True).map(lambda b: dict(b, example_id=ids))
  return ds.map(_shard_for_devices).prefetch(tf.data.AUTOTUNE), source


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
    seed: random seed of the random views, drawn per (seed, ``index``): the same on any number
      of hosts for folders and cached splits.

  Returns:
    ``(dataset, source, num_batches)``; the dataset yields ``'image'`` float32
    ``[local_devices, per_device, S, S, 3]`` in [0, 1] with ``S = resolution.eval_image_size``,
    ``'label'`` int32, ``'mask'`` bool and ``'index'`` int64 ``[local_devices, per_device]``:
    sorting the rows of all hosts by ``index`` (stably) gives the one-host order (the split's
    fixed order; -1 on padding). The centre view is a crop of
    `resolution.eval_crop_fraction` of the shorter side, resized. With ``data.cache``,
    images are cached at a shorter side of at least ``S / crop_fraction`` px, so a test view
    larger than the training crops reads real pixels, not an upsampled training cache. With
    ``random_views`` K, example i's views are rows i*K .. i*K+K-1 of the host's stream. Padding
    examples (zeros, label 0, mask False) fill the last batches, so every host yields
    ``num_batches`` batches.

  Raises:
    ValueError: a batch size that is not a positive multiple of the device count, a crop
      fraction outside (0, 1], a negative ``random_views``, and the errors of
      `resolution.eval_image_size` and `sources.create_source`.
  """
  data = config.data
  local_batch = parallel.local_batch_size(batch_size)
  size, crop_fraction = resolution.eval_image_size(data), resolution.eval_crop_fraction(data)
  if not 0 < crop_fraction <= 1:
    raise ValueError(f"config.data.eval_crop_fraction={crop_fraction} must be in (0, 1].")
  min_side = math.ceil(size / crop_fraction)
  if data.cache and data.cache_shorter_side < min_side:
    data = ml_collections.ConfigDict(data.to_dict())
    data.cache_shorter_side = min_side
  if random_views < 0:
    raise ValueError(f"random_views={random_views} must be >= 0 (0: the centre view).")
  source = sources.create_source(data, split)
  per_example = max(1, random_views)
  most_per_host = math.ceil(source.num_examples / jax.process_count())
  num_batches = math.ceil(most_per_host * per_example / local_batch)
  area = tuple(config.augment.crop_area)
  aspect = tuple(config.augment.crop_aspect_ratio)

  def transform(position, example):
    key, label = example
    if key.dtype.is_integer and key.shape.rank == 0:
      index = key  # folders and caches: hosts take every P-th of the split's indices
    else:
      # A TFDS stream: hosts read consecutive blocks of the split (tfds.split_for_jax_process).
      index = jax.process_index() * source.num_examples + position
    index = tf.cast(index, tf.int64)
    image = source.load(key, min_side)
    if not random_views:
      view = crops.center_crop(image, size=size, crop_fraction=crop_fraction)
      return {
        "image": view[None],
        "label": label[None],
        "mask": tf.constant([True]),
        "index": index[None],
      }
    example_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), index)
    views = []
    for v in range(random_views):
      crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(
          tf.random.experimental.stateless_fold_in(example_seed, v), 2
        )
      )
      view = crops.random_resized_crop(
        image, crop_seed, size=size, area_range=area, aspect_ratio_range=aspect
      )
      views.append(tf.image.stateless_random_flip_left_right(view, flip_seed))
    return {
      "image": tf.stack(views),
      "label": tf.fill([random_views], label),
      "mask": tf.ones([random_views], tf.bool),
      "index": tf.fill([random_views], index),
    }

  pad = {
    "image": tf.zeros([size, size, 3], tf.float32),
    "label": tf.constant(0, tf.int32),
    "mask": tf.constant(False),
    "index": tf.constant(-1, tf.int64),
  }
  ds = source.examples(None).enumerate()
  ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # A file that fails now is dropped; the generous padding keeps the batch count fixed anyway.
  padding = num_batches * local_batch - source.host_examples * per_example + local_batch
  ds = ds.ignore_errors(log_warning=True).unbatch()
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(padding))
  ds = ds.batch(local_batch, drop_remainder=True).take(num_batches).map(_shard_for_devices)
  return ds.prefetch(tf.data.AUTOTUNE), source, num_batches


class InputIterator(Iterator[dict[str, Any]]):
  """Batches placed on the local devices, plus what the pipeline knows about its input.

  Attributes:
    num_examples: examples in the split over all hosts, skipped files excluded.
    skipped: ``(path, reason)`` of each file left out because it could not be decoded.
    num_batches: batches in one pass (eval), or batches per epoch (pretraining).
  """

  def __init__(
    self, dataset: tf.data.Dataset, source: sources.Source, num_batches: int, prefetch: int
  ):
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
