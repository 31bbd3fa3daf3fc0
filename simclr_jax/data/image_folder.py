"""Images on disk: ImageFolder listing, decoding by content, bad-file detection, the decoded cache.

Layout: ``root/<split>/<class>/<image>`` (files may sit in nested folders under their class).
Class names are the sorted visible sub-folders of the train split. Hidden files and folders
(names starting with ``.``) are ignored, and only files whose extension (case-insensitively) is in
`IMAGE_EXTENSIONS` are listed (other files are left out with a warning that names them); what a
file holds is then decided by its bytes, not its name.

Decoding yields RGB for every supported input: JPEG (also grayscale and CMYK), PNG (grayscale,
palette, 16-bit, with alpha), GIF (first frame), BMP and WebP. Grey is copied to the three channels.
Alpha rule: images with an alpha channel are composited over a white background,
``rgb * alpha + (1 - alpha)``, so transparent regions look as they do on a white page.
"""

import dataclasses
import os
import re

import numpy as np
import tensorflow as tf
from absl import logging

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})
_JPEG_RATIOS = (1, 2, 4, 8)  # the DCT scalings libjpeg offers
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _visible(name: str) -> bool:
  return not name.startswith(".")


def _split_dir(root: str, split: str) -> str:
  if not root or not os.path.isdir(root):
    raise ValueError(f"Image folder root {root!r} does not exist or is not a directory.")
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise ValueError(f"Split folder {split_dir!r} does not exist.")
  return split_dir


def folder_class_names(root: str, split: str) -> list[str]:
  """Sorted names of the visible class folders of ``root/split``.

  Raises:
    ValueError: if ``root`` or ``root/split`` is missing, or the split has no class folder.
  """
  split_dir = _split_dir(root, split)
  names = sorted(
    n for n in os.listdir(split_dir) if _visible(n) and os.path.isdir(os.path.join(split_dir, n))
  )
  if not names:
    raise ValueError(f"Split folder {split_dir!r} has no class folders.")
  return names


def list_image_folder(
  root: str, split: str, class_names: list[str] | None = None
) -> tuple[list[str], np.ndarray, list[str]]:
  """Lists the image files of ``root/split`` and their labels, in a sorted, deterministic order.

  Args:
    root: folder holding one folder per split.
    split: split folder name, e.g. ``"train"``.
    class_names: the label of class folder ``c`` is ``class_names.index(c)``; None uses this split's
      sorted class folders. Pass the train split's names for every other split.

  Returns:
    ``(paths, labels, class_names)``: paths as strings, labels int32 ``[len(paths)]`` in
    ``[0, len(class_names))``, and the class names used.

  Raises:
    ValueError: if the root or split is missing, the split has no images, or the split has a class
      folder that ``class_names`` lacks (naming the folder).
  """
  split_dir = _split_dir(root, split)
  present = folder_class_names(root, split)
  if class_names is None:
    class_names = present
  class_names = list(class_names)
  unknown = [c for c in present if c not in class_names]
  if unknown:
    raise ValueError(
      f"Class folder(s) {[os.path.join(split_dir, c) for c in unknown]} are not among the "
      f"{len(class_names)} training classes {class_names}."
    )
  paths, labels, left_out = [], [], []
  for label, name in enumerate(class_names):
    class_dir = os.path.join(split_dir, name)
    if not os.path.isdir(class_dir):
      continue
    for folder, dirs, files in os.walk(class_dir):
      dirs[:] = sorted(d for d in dirs if _visible(d))
      for f in sorted(files):
        if not _visible(f):
          continue
        if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
          paths.append(os.path.join(folder, f))
          labels.append(label)
        else:
          left_out.append(os.path.join(folder, f))
  if left_out:
    logging.warning(
      "Split folder %r: %d file(s) left out, their extension is not one of %s: %s%s",
      split_dir,
      len(left_out),
      sorted(IMAGE_EXTENSIONS),
      ", ".join(left_out[:5]),
      " ..." if len(left_out) > 5 else "",
    )
  if not paths:
    raise ValueError(
      f"Split folder {split_dir!r} has no image files (extensions {sorted(IMAGE_EXTENSIONS)})."
    )
  return paths, np.asarray(labels, np.int32), class_names


def _decode_jpeg(contents: tf.Tensor, min_shorter_side: int | None) -> tf.Tensor:
  if not min_shorter_side:
    return tf.io.decode_jpeg(contents, channels=3)
  # The largest DCT scaling that keeps the shorter side at least min_shorter_side: libjpeg then
  # skips most of the inverse DCT work, which is most of the decode.
  shorter = tf.reduce_min(tf.io.extract_jpeg_shape(contents)[:2])
  fits = [tf.cast(-(-shorter // r) >= min_shorter_side, tf.int32) for r in _JPEG_RATIOS[1:]]
  branch = tf.add_n(fits)
  return tf.switch_case(
    branch,
    [lambda r=r: tf.io.decode_jpeg(contents, channels=3, ratio=r) for r in _JPEG_RATIOS],
  )


def _decode_other(contents: tf.Tensor) -> tf.Tensor:
  # PNG may hold 16 bits per channel; the other decoders only give uint8.
  image = tf.cond(
    tf.strings.substr(contents, 0, len(_PNG_SIGNATURE)) == _PNG_SIGNATURE,
    lambda: tf.image.convert_image_dtype(tf.io.decode_png(contents, dtype=tf.uint16), tf.float32),
    lambda: tf.image.convert_image_dtype(
      tf.io.decode_image(contents, channels=0, expand_animations=False), tf.float32
    ),
  )
  channels = tf.shape(image)[-1]
  has_alpha = channels % 2 == 0  # grey+alpha or RGBA
  colour = image[..., : channels - tf.cast(has_alpha, tf.int32)]
  colour = tf.cond(
    tf.shape(colour)[-1] == 1, lambda: tf.tile(colour, [1, 1, 3]), lambda: colour[..., :3]
  )
  alpha = tf.cond(has_alpha, lambda: image[..., -1:], lambda: tf.ones_like(image[..., :1]))
  rgb = tf.ensure_shape(colour * alpha + (1.0 - alpha), [None, None, 3])
  return tf.image.convert_image_dtype(rgb, tf.uint8, saturate=True)


def decode_image_uint8(contents: tf.Tensor, *, min_shorter_side: int | None = None) -> tf.Tensor:
  """Decodes image bytes by content to uint8 ``[H, W, 3]`` (16-bit PNGs are rounded to 8 bits).

  Args:
    contents: scalar string tensor, the file's bytes.
    min_shorter_side: if set, JPEGs may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling)
      as long as the shorter side stays at least this many pixels. Other formats decode in full.

  Raises:
    tf.errors.InvalidArgumentError: when run on bytes that are not a decodable image.
  """
  return tf.cond(
    tf.io.is_jpeg(contents),
    lambda: _decode_jpeg(contents, min_shorter_side),
    lambda: _decode_other(contents),
  )


def decode_image(contents: tf.Tensor, *, min_shorter_side: int | None = None) -> tf.Tensor:
  """Decodes image bytes by content to float32 ``[H, W, 3]`` in [0, 1]; see `decode_image_uint8`."""
  image = decode_image_uint8(contents, min_shorter_side=min_shorter_side)
  return tf.image.convert_image_dtype(image, tf.float32)


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  """Shrinks ``image`` (uint8 ``[H, W, 3]``) so its shorter side is ``size``; never enlarges."""
  shape = tf.shape(image)[:2]
  shorter = tf.reduce_min(shape)

  def shrink():
    hw = tf.cast(
      tf.round(tf.cast(shape, tf.float32) * size / tf.cast(shorter, tf.float32)), tf.int32
    )
    out = tf.image.resize(image, tf.maximum(hw, 1), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

  return tf.cond(shorter > size, shrink, lambda: image)


def _decoded(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Drops the elements whose map raised: a bad file must never stop a whole pass."""
  return dataset.ignore_errors().prefetch(tf.data.AUTOTUNE)


def _report_skipped(paths: list[str], kept: np.ndarray, what: str) -> list[tuple[str, str]]:
  """Logs each undecodable file with the decoder's reason, and returns ``(path, reason)`` pairs."""
  skipped = []
  for i in np.flatnonzero(~kept):
    try:
      decode_image_uint8(tf.io.read_file(paths[i]))
      reason = "failed in the pipeline's decode"
    except (tf.errors.OpError, ValueError) as e:
      reason = re.sub(r"\{\{.*?\}\}\s*", "", str(e)).strip().splitlines()[-1][:200]
    skipped.append((paths[i], reason))
    logging.warning("Skipping undecodable image %s: %s", paths[i], reason)
  if skipped:
    logging.warning("Skipped %d of %d files of %s.", len(skipped), len(paths), what)
  return skipped


def find_undecodable(paths: list[str], *, what: str = "the image list") -> list[tuple[str, str]]:
  """Decodes every file once, as cheaply as possible, and reports the ones that fail.

  JPEGs are decoded at 1/8 scale, which still reads all the compressed data, so truncated files
  are caught. Each failure is logged (absl warning) with its path and the decoder's message.

  Returns:
    ``(path, reason)`` for each file that cannot be read or decoded, in ``paths`` order.
  """
  paths_t = tf.constant(paths)

  def probe(i):
    return i, tf.shape(decode_image_uint8(tf.io.read_file(paths_t[i]), min_shorter_side=1))[0]

  ds = tf.data.Dataset.range(len(paths)).map(
    probe, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False
  )
  kept = np.zeros(len(paths), bool)
  for i, _ in _decoded(ds).batch(256).as_numpy_iterator():
    kept[i] = True
  return _report_skipped(paths, kept, what)


@dataclasses.dataclass(frozen=True)
class ImageCache:
  """Decoded uint8 images of different sizes held in one flat buffer.

  Attributes:
    pixels: uint8 ``[total]``, the images' pixels one after another.
    offsets: int64 ``[N + 1]``; image ``i`` is ``pixels[offsets[i]:offsets[i + 1]]``.
    shapes: int32 ``[N, 3]``, each image's ``(H, W, 3)``.
    indices: int64 ``[N]``, each image's position in the list it was decoded from.
  """

  pixels: tf.Tensor
  offsets: tf.Tensor
  shapes: tf.Tensor
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def load(self, i: tf.Tensor) -> tf.Tensor:
    """Image ``i`` (int scalar tensor in ``[0, N)``), uint8 ``[H, W, 3]``; usable in tf.data."""
    image = tf.reshape(self.pixels[self.offsets[i] : self.offsets[i + 1]], self.shapes[i])
    return tf.ensure_shape(image, [None, None, 3])


def cache_images(dataset: tf.data.Dataset, num_examples: int, shorter_side: int) -> ImageCache:
  """Decodes a dataset of ``(index, uint8 image)`` once into memory, shrunk to ``shorter_side``.

  Elements whose decode raises are dropped; ``ImageCache.indices`` tells which survived.
  """
  ds = dataset.map(
    lambda i, image: (i, resize_shorter_side(image, shorter_side)),
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
  got = {int(i): image for i, image in _decoded(ds)}
  indices = np.asarray(sorted(got), np.int64)
  if indices.size and indices[-1] >= num_examples:
    raise ValueError(f"Index {indices[-1]} out of range for {num_examples} examples.")
  images = [got[i] for i in indices]
  sizes = np.asarray([int(tf.size(x)) for x in images], np.int64)
  return ImageCache(
    pixels=tf.concat([tf.reshape(x, [-1]) for x in images], 0)
    if images
    else tf.zeros([0], tf.uint8),
    offsets=tf.constant(np.concatenate([[0], np.cumsum(sizes)]), tf.int64),
    shapes=tf.constant(np.asarray([x.shape for x in images], np.int32).reshape(-1, 3)),
    indices=indices,
  )


def cache_image_files(
  paths: list[str], shorter_side: int
) -> tuple[ImageCache, list[tuple[str, str]]]:
  """Decodes image files into an `ImageCache`, using JPEG DCT scaling where it loses nothing.

  Returns:
    ``(cache, skipped)``: the decodable images in ``paths`` order (``cache.indices`` are positions
    in ``paths``) and ``(path, reason)`` for each file skipped (also logged with its reason).
  """
  paths_t = tf.constant(paths)
  ds = tf.data.Dataset.range(len(paths)).map(
    lambda i: (i, decode_image_uint8(tf.io.read_file(paths_t[i]), min_shorter_side=shorter_side)),
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
  cache = cache_images(ds, len(paths), shorter_side)
  kept = np.zeros(len(paths), bool)
  kept[cache.indices] = True
  return cache, _report_skipped(paths, kept, "the image cache")
