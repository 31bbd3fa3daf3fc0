"""Tiny image folders for the data tests, written into a test's ``tmp_path``."""

import io
import os

import numpy as np
from PIL import Image

from configs import default


def save(path, image, fmt, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, fmt, **kwargs)


def solid_folder(root, split, counts, size=(12, 16)):
  """``root/split/<class>/<i>.png``: every image one solid colour, distinct over the split."""
  k = 0
  for name, count in counts.items():
    for i in range(count):
      colour = (20 * k % 256, 255 - 15 * k % 256, 60 + 40 * (k % 5))
      save(f"{root}/{split}/{name}/{i}.png", Image.new("RGB", size[::-1], colour), "PNG")
      k += 1
  return root


def override(config, overrides):
  """`config` with dotted-key overrides applied in place, e.g. ``{"data.image_size": 48}``."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def config_for(root, image_size=8, batch_size=4, **data):
  """`configs/default.py` reading ``root`` at ``image_size`` px, with ``data`` overrides."""
  config = default.get_config()
  config.data.root = str(root)
  config.data.image_size = image_size
  config.data.prefetch = 1
  config.batch_size = batch_size
  for k, v in data.items():
    config.data[k] = v
  return config


def odd_folder(root):
  """A train split full of odd files: what decodes, what must be skipped, what must be ignored.

  Returns:
    ``(root, good, bad)``: the 16 x 10 px images that decode (names under ``root/train``, with
    their writers) and the bytes of the files that must be skipped.
  """
  gradient = np.stack(np.meshgrid(np.linspace(0, 255, 16), np.linspace(0, 255, 10)), -1)
  rgb = Image.fromarray(np.concatenate([gradient, gradient[..., :1]], -1).astype(np.uint8))
  jpeg = io.BytesIO()
  rgb.save(jpeg, "JPEG")
  animated = [Image.new("RGB", (16, 10), c).convert("P") for c in [(255, 0, 0), (0, 0, 255)]]
  good = {
    "cat/rgb.jpg": lambda p: save(p, rgb, "JPEG"),
    "cat/upper.JPEG": lambda p: save(p, rgb, "JPEG"),
    "cat/grey.jpeg": lambda p: save(p, rgb.convert("L"), "JPEG"),
    "cat/cmyk.jpg": lambda p: save(p, rgb.convert("CMYK"), "JPEG"),
    "cat/png_is_named.jpg": lambda p: save(p, rgb, "PNG"),
    "cat/nested/deep.png": lambda p: save(p, rgb, "PNG"),
    "dog/grey.png": lambda p: save(p, rgb.convert("L"), "PNG"),
    "dog/palette.png": lambda p: save(p, rgb.convert("P"), "PNG"),
    "dog/rgba.png": lambda p: save(p, rgb.convert("RGBA"), "PNG"),
    "dog/grey_alpha.png": lambda p: save(p, rgb.convert("LA"), "PNG"),
    "dog/sixteen.png": lambda p: save(
      p, Image.fromarray((np.arange(160).reshape(10, 16) * 400).astype(np.uint16)), "PNG"
    ),
    "dog/anim.gif": lambda p: save(p, animated[0], "GIF", save_all=True, append_images=animated),
    "dog/rgb.bmp": lambda p: save(p, rgb, "BMP"),
    "dog/rgb.webp": lambda p: save(p, rgb, "WEBP"),
  }
  bad = {
    "cat/truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
    "dog/empty.png": b"",
    "dog/text.jpg": b"not an image at all",
  }
  ignored = {
    "cat/.DS_Store": b"\0\0",
    "cat/.hidden.jpg": jpeg.getvalue(),
    "cat/notes.txt": b"notes",
    "cat/.ipynb_checkpoints/copy.jpg": jpeg.getvalue(),
    ".ipynb_checkpoints/copy.jpg": jpeg.getvalue(),  # a hidden folder, not a class
  }
  for name, write in good.items():
    write(f"{root}/train/{name}")
  for name, data in {**bad, **ignored}.items():
    os.makedirs(os.path.dirname(f"{root}/train/{name}"), exist_ok=True)
    with open(f"{root}/train/{name}", "wb") as f:
      f.write(data)
  return root, good, bad
