"""Image folders: listing odd trees, decoding every format to RGB, finding the bad files."""

import logging
import os

import image_trees
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_jax.data import image_folder, sources


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
  return image_trees.odd_folder(tmp_path_factory.mktemp("odd"))


def test_listing_skips_hidden_and_foreign_files(odd_folder, caplog):
  root, good, bad = odd_folder
  with caplog.at_level(logging.WARNING):
    paths, labels, names = image_folder.list_image_folder(str(root), "train")
  # The foreign file is named in a warning; hidden files are left out silently.
  assert "1 file(s) left out" in caplog.text and f"{root}/train/cat/notes.txt" in caplog.text
  assert ".DS_Store" not in caplog.text and ".hidden.jpg" not in caplog.text
  assert names == ["cat", "dog"]
  expected = sorted(f"{root}/train/{n}" for n in [*good, *bad])
  assert sorted(paths) == expected
  assert labels.dtype == np.int32
  for p, y in zip(paths, labels, strict=True):
    assert names[y] == os.path.relpath(p, f"{root}/train").split(os.sep)[0]


def test_find_undecodable_reports_exactly_the_bad_files(odd_folder):
  root, _, bad = odd_folder
  paths, _, _ = image_folder.list_image_folder(str(root), "train")
  skipped = image_folder.find_undecodable(paths)
  assert sorted(p for p, _ in skipped) == sorted(f"{root}/train/{n}" for n in bad)
  assert all(reason for _, reason in skipped)


def _decode(path, **kwargs):
  with open(path, "rb") as f:
    return image_folder.decode_image(tf.constant(f.read()), **kwargs).numpy()


def test_decoding_formats_to_float_rgb(odd_folder):
  root, good, _ = odd_folder
  reference = _decode(f"{root}/train/cat/png_is_named.jpg")
  for name in good:
    image = _decode(f"{root}/train/{name}")
    assert image.shape == (10, 16, 3) and image.dtype == np.float32, name
    assert 0 <= image.min() and image.max() <= 1, name
    if "grey" in name or "sixteen" in name:
      np.testing.assert_allclose(image[..., 0], image[..., 2], err_msg=name)
    elif name.endswith(("jpg", "JPEG", "webp")):
      assert np.abs(image - reference).mean() < 0.05, name  # lossy but the same picture
    elif "anim" not in name and "palette" not in name:
      np.testing.assert_allclose(image, reference, atol=1 / 255, err_msg=name)
  sixteen = _decode(f"{root}/train/dog/sixteen.png")[..., 0]
  np.testing.assert_allclose(sixteen, np.arange(160).reshape(10, 16) * 400 / 65535, atol=1 / 255)
  np.testing.assert_allclose(_decode(f"{root}/train/dog/anim.gif")[0, 0], [1.0, 0.0, 0.0])


def test_alpha_is_composited_over_white(tmp_path):
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 0] = 255  # red
  rgba[:2, ..., 3] = 0  # top half fully transparent
  rgba[2:, ..., 3] = 255
  path = f"{tmp_path}/a.png"
  Image.fromarray(rgba, "RGBA").save(path)
  image = _decode(path)
  np.testing.assert_allclose(image[:2], 1.0)
  np.testing.assert_allclose(image[2:], np.broadcast_to([1.0, 0, 0], (2, 4, 3)))


def test_jpeg_dct_scaling_keeps_the_requested_side(tmp_path):
  path = f"{tmp_path}/big.jpg"
  Image.new("RGB", (400, 300), (10, 200, 30)).save(path)
  assert _decode(path, min_shorter_side=70).shape == (75, 100, 3)  # 1/4 scale
  assert _decode(path, min_shorter_side=80).shape == (150, 200, 3)  # 1/2 scale
  assert _decode(path, min_shorter_side=301).shape == (300, 400, 3)


def test_listing_errors_name_the_missing_or_unknown_folder(tmp_path):
  with pytest.raises(ValueError, match="nowhere"):
    image_folder.list_image_folder(f"{tmp_path}/nowhere", "train")
  image_trees.solid_folder(tmp_path, "train", {"a": 2, "b": 2})
  with pytest.raises(ValueError, match="test"):
    image_folder.list_image_folder(str(tmp_path), "test")
  os.makedirs(f"{tmp_path}/empty/x")
  with pytest.raises(ValueError, match="empty"):
    image_folder.list_image_folder(str(tmp_path), "empty")
  image_trees.solid_folder(tmp_path, "val", {"a": 1, "zebra": 1})
  with pytest.raises(ValueError, match="zebra"):
    image_folder.list_image_folder(str(tmp_path), "val", ["a", "b"])


def test_other_splits_use_the_train_mapping(tmp_path):
  image_trees.solid_folder(tmp_path, "train", {"a": 1, "b": 1, "c": 1})
  image_trees.solid_folder(tmp_path, "test", {"c": 2})
  paths, labels, names = image_folder.list_image_folder(str(tmp_path), "test", ["a", "b", "c"])
  assert names == ["a", "b", "c"] and labels.tolist() == [2, 2]
  assert sources.get_class_names(image_trees.config_for(tmp_path).data) == ["a", "b", "c"]
