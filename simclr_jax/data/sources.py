"""Where the examples of a split come from: an ImageFolder tree or a TFDS dataset.

``config.data.source`` is ``"folder"``, a tree read by `image_folder`, or ``"tfds"``, a prepared
TFDS dataset by name under ``config.data.tfds_data_dir`` (never downloaded at run time). With
``config.data.cache`` every image is decoded once, shrunk so its shorter side is at most
``config.data.cache_shorter_side`` px and kept in memory as uint8.

Undecodable files are found before the first epoch (``config.data.check_files``, or while filling
the cache), logged by path and left out. The check and the cache are made once per process for
each folder split (or TFDS split) and then reused.
"""

import dataclasses
import functools
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax.data import image_folder


@dataclasses.dataclass(frozen=True)
class Source:
  """The examples of one split, as the pipelines read them.

  Attributes:
    num_examples: examples over all hosts, skipped files excluded.
    host_examples: this host's share of them.
    examples: ``examples(seed)`` is a dataset of this host's ``(key, label int32)`` pairs, shuffled
      by the stateless ``seed`` (int64 ``[2]``) or, with None, in a fixed order.
    load: ``load(key, min_shorter_side)`` turns a key into a uint8 ``[H, W, 3]`` image. An
      uncached folder source may decode a JPEG at a reduced scale whose shorter side is still at
      least ``min_shorter_side`` px (None: full scale); the other sources ignore it.
    skipped: ``(path, reason)`` of each undecodable file left out.
  """

  num_examples: int
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
  paths, labels, _ = image_folder.list_image_folder(root, split, list(class_names))
  skipped = image_folder.find_undecodable(paths, what=f"{root}/{split}") if check else []
  bad = {p for p, _ in skipped}
  keep = np.asarray([p not in bad for p in paths], bool)
  return [p for p, k in zip(paths, keep, strict=True) if k], labels[keep], tuple(skipped)


@functools.lru_cache(maxsize=4)
def _cached_folder(root, split, class_names, shorter_side):
  paths, labels, _ = image_folder.list_image_folder(root, split, list(class_names))
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

  return ds.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE)


def create_source(data_config: ml_collections.ConfigDict, split: str) -> Source:
  """The examples of ``split`` as ``data_config`` describes them (folder or TFDS, cached or not).

  Raises:
    ValueError: a missing root, split or class folder, a split without images, or an unknown
      ``data_config.source`` (as `get_class_names` and `image_folder.list_image_folder`).
  """
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
    ValueError: see `create_source`.
  """
  return create_source(data_config, split).num_examples
