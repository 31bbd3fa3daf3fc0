"""Pretraining input throughput: host tf.data (decode + two crops) and on-device augmentation.

    python -m benchmarks.input_pipeline --root ../shared/data/imagenet-5-categories --num_images 300

Prints pairs/s (one pair = the two views of one image) at 96 and 224 px, without and with the
decoded in-memory cache (shorter side 128 px for outputs up to 128 px, else 256 px), on the first
``--num_images`` training images, spread over the classes.
"""

import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from configs import default
from simclr_jax import augment, cpu_kernels
from simclr_jax.data import image_folder, pipeline

_ROOT = flags.DEFINE_string("root", "../shared/data/imagenet-5-categories", "ImageFolder root.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 300, "Training images to use.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch size.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Epochs timed after one warm-up batch.")
_SIZES = flags.DEFINE_list("sizes", ["96", "224"], "Output sizes in pixels.")


def _subset(root: str, num_images: int, out: str) -> str:
  """Links ``num_images`` train images, taken round-robin over the classes, into ``out/train``."""
  paths, labels, names = image_folder.list_image_folder(root, "train")
  by_class = [[p for p, y in zip(paths, labels, strict=True) if y == c] for c in range(len(names))]
  picked = [p for group in zip(*by_class, strict=False) for p in group][:num_images]
  for p in picked:
    dst = os.path.join(out, "train", os.path.relpath(p, os.path.join(root, "train")))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.symlink(os.path.abspath(p), dst)
  return out


def _host_pairs_per_s(config, epochs: int) -> tuple[float, float]:
  """Returns (setup seconds, pairs/s) of iterating the host pipeline."""
  start = time.perf_counter()
  ds, source = pipeline.pretrain_dataset(config, seed=0)
  it = ds.as_numpy_iterator()
  next(it)
  setup = time.perf_counter() - start
  steps = epochs * (source.num_examples // config.batch_size)
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  return setup, steps * config.batch_size / (time.perf_counter() - start)


def _device_pairs_per_s(config, size: int, repeats: int = 5) -> float:
  loop = cpu_kernels.make_ops(config.runtime).sequential_augment
  views = jax.jit(lambda k, a, b: augment.augment_views(k, a, b, config.augment, loop=loop))
  rng = np.random.default_rng(0)
  batch = [rng.random((config.batch_size, size, size, 3), np.float32) for _ in range(2)]
  batch = jax.device_put(batch)
  jax.block_until_ready(views(jax.random.key(0), *batch))
  start = time.perf_counter()
  for step in range(repeats):
    out = views(jax.random.key(step), *batch)
  jax.block_until_ready(out)
  return repeats * config.batch_size / (time.perf_counter() - start)


def main(argv):
  del argv
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    root = _subset(_ROOT.value, _NUM_IMAGES.value, tmp)
    for size in map(int, _SIZES.value):
      config = default.get_config()
      config.batch_size = _BATCH.value
      config.data.root = root
      config.data.image_size = size
      config.data.cache_shorter_side = 128 if size <= 128 else 256
      for cache in (False, True):
        config.data.cache = cache
        setup, host = _host_pairs_per_s(config, _EPOCHS.value)
        label = f"{config.data.cache_shorter_side} px" if cache else "no"
        rows.append((size, label, f"{setup:.1f}", f"{host:.0f}", ""))
      rows.append((size, "-", "", "", f"{_device_pairs_per_s(config, size):.0f}"))
  print(
    f"{_NUM_IMAGES.value} images from {_ROOT.value}, batch {_BATCH.value}, "
    f"{os.cpu_count()} CPUs, JAX on {jax.devices()[0].platform}"
  )
  header = ("px", "cache", "setup s", "host pairs/s", "device aug pairs/s")
  widths = [max(len(str(v)) for v in column) for column in zip(header, *rows, strict=True)]
  for row in [header, *rows]:
    print(" | ".join(str(v).rjust(w) for v, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
  app.run(main)
