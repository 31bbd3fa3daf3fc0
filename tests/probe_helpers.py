"""Data for the probe tests: a toy folder of coloured images, a tiny pretrained run on it, and
feature arrays with known structure."""

import os

import jax
import numpy as np
from PIL import Image

from configs import tiny
from simclr_jax import train

# Learnable by any encoder: the class is the hue; brightness and pixel noise vary per image.
COLOURS = {"blue": (0.1, 0.2, 0.9), "green": (0.1, 0.8, 0.2), "red": (0.9, 0.1, 0.1)}
NUM_TRAIN, NUM_TEST = 16, 7  # per class; 21 test images never fill whole batches of 8
BATCH_SIZE = 8


def write_colour_folder(root, classes=COLOURS, *, num_train=NUM_TRAIN, num_test=NUM_TEST):
  """`root/{train,test}/<class>/<i>.png`, 32 x 32 px; `num_train`: per class, or {class: count}."""
  rng = np.random.default_rng(0)
  for split, n in (("train", num_train), ("test", num_test)):
    for name, rgb in classes.items():
      os.makedirs(root / split / name)
      for i in range(n[name] if isinstance(n, dict) else n):
        image = np.asarray(rgb) * rng.uniform(0.6, 1.0) + rng.normal(0, 0.05, (32, 32, 3))
        pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / name / f"{i}.png")
  return str(root)


def pretrain_colour_run(tmp_path_factory):
  """configs/tiny.py pretrained for 2 epochs (6 steps) on the colour folder: (root, workdir)."""
  root = write_colour_folder(tmp_path_factory.mktemp("colours"))
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny.get_config()
  config.data.root = root
  # unsafe_rbg keys compile far faster than threefry on CPU; the probe needs no stronger PRNG.
  with jax.default_prng_impl("unsafe_rbg"):
    train.pretrain(config, workdir)
  return root, workdir


def blobs(num_classes, per_class, *, seed, dim=16):
  """Gaussian clusters around fixed centres; `seed` draws the points: (float32 [N, dim], [N])."""
  centres = np.random.default_rng(0).normal(0, 3, (num_classes, dim))
  labels = np.repeat(np.arange(num_classes), per_class)
  noise = np.random.default_rng(seed).normal(0, 1, (len(labels), dim))
  return (centres[labels] + noise).astype(np.float32), labels


def copies(num, dim, views, seed=0):
  """Random features with random labels (nothing to learn), each row repeated `views` times."""
  rng = np.random.default_rng(seed)
  x, y = rng.normal(size=(num, dim)), rng.integers(0, 3, num)
  return x, y, np.repeat(x, views, axis=0), np.repeat(y, views)  # example-major copies
