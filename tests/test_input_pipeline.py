"""Input pipeline: reading odd folders, crops, batching, determinism, eval padding, TFDS."""

import io
import logging
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import default
from simclr_jax import image_folder, input_pipeline

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _save(path, image, fmt, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, fmt, **kwargs)


def solid_folder(root, split, counts, size=(12, 16)):
  """``root/split/<class>/<i>.png``: every image one solid colour, distinct over the split."""
  k = 0
  for name, count in counts.items():
    for i in range(count):
      colour = (20 * k % 256, 255 - 15 * k % 256, 60 + 40 * (k % 5))
      _save(f"{root}/{split}/{name}/{i}.png", Image.new("RGB", size[::-1], colour), "PNG")
      k += 1
  return root


def config_for(root, image_size=8, batch_size=4, **data):
  config = default.get_config()
  config.data.root = str(root)
  config.data.image_size = image_size
  config.data.prefetch = 1
  config.batch_size = batch_size
  for k, v in data.items():
    config.data[k] = v
  return config


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
  """A train split full of odd files: what decodes, what must be skipped, what must be ignored."""
  root = tmp_path_factory.mktemp("odd")
  gradient = np.stack(np.meshgrid(np.linspace(0, 255, 16), np.linspace(0, 255, 10)), -1)
  rgb = Image.fromarray(np.concatenate([gradient, gradient[..., :1]], -1).astype(np.uint8))
  jpeg = io.BytesIO()
  rgb.save(jpeg, "JPEG")
  animated = [Image.new("RGB", (16, 10), c).convert("P") for c in [(255, 0, 0), (0, 0, 255)]]
  good = {
    "cat/rgb.jpg": lambda p: _save(p, rgb, "JPEG"),
    "cat/upper.JPEG": lambda p: _save(p, rgb, "JPEG"),
    "cat/grey.jpeg": lambda p: _save(p, rgb.convert("L"), "JPEG"),
    "cat/cmyk.jpg": lambda p: _save(p, rgb.convert("CMYK"), "JPEG"),
    "cat/png_is_named.jpg": lambda p: _save(p, rgb, "PNG"),
    "cat/nested/deep.png": lambda p: _save(p, rgb, "PNG"),
    "dog/grey.png": lambda p: _save(p, rgb.convert("L"), "PNG"),
    "dog/palette.png": lambda p: _save(p, rgb.convert("P"), "PNG"),
    "dog/rgba.png": lambda p: _save(p, rgb.convert("RGBA"), "PNG"),
    "dog/grey_alpha.png": lambda p: _save(p, rgb.convert("LA"), "PNG"),
    "dog/sixteen.png": lambda p: _save(
      p, Image.fromarray((np.arange(160).reshape(10, 16) * 400).astype(np.uint16)), "PNG"
    ),
    "dog/anim.gif": lambda p: _save(p, animated[0], "GIF", save_all=True, append_images=animated),
    "dog/rgb.bmp": lambda p: _save(p, rgb, "BMP"),
    "dog/rgb.webp": lambda p: _save(p, rgb, "WEBP"),
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


def test_listing_skips_hidden_and_foreign_files(odd_folder, caplog):
  root, good, bad = odd_folder
  with caplog.at_level(logging.WARNING):
    paths, labels, names = input_pipeline.list_image_folder(str(root), "train")
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
  paths, _, _ = input_pipeline.list_image_folder(str(root), "train")
  skipped = image_folder.find_undecodable(paths)
  assert sorted(p for p, _ in skipped) == sorted(f"{root}/train/{n}" for n in bad)
  assert all(reason for _, reason in skipped)


@pytest.mark.parametrize("cache", [False, True])
def test_pipeline_yields_exactly_the_decodable_images(odd_folder, cache):
  root, good, bad = odd_folder
  config = config_for(root, cache=cache, train_split="train")
  it = input_pipeline.create_eval_iterator(config, "train", batch_size=8)
  batches = [jax.device_get(b) for b in it]
  mask = np.concatenate([b["mask"].ravel() for b in batches])
  labels = np.concatenate([b["label"].ravel() for b in batches])[mask]
  images = np.concatenate([b["image"].reshape(-1, 8, 8, 3) for b in batches])[mask]
  assert it.num_examples == len(good) == mask.sum()
  assert sorted(p for p, _ in it.skipped) == sorted(f"{root}/train/{n}" for n in bad)
  expected = sorted(0 if n.startswith("cat/") else 1 for n in good)
  assert sorted(labels.tolist()) == expected
  assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 1
  assert input_pipeline.num_examples(config.data, "train") == len(good)


def test_home_relative_root_is_expanded(odd_folder, monkeypatch):
  # Shells leave `--config.data.root=~/x` unexpanded; the pipeline expands it.
  root, good, _ = odd_folder
  monkeypatch.setenv("HOME", os.path.dirname(root))
  config = config_for(f"~/{os.path.basename(root)}", train_split="train")
  assert input_pipeline.get_class_names(config.data) == ["cat", "dog"]
  assert input_pipeline.num_examples(config.data, "train") == len(good)


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


def test_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="nowhere"):
    input_pipeline.list_image_folder(f"{tmp_path}/nowhere", "train")
  solid_folder(tmp_path, "train", {"a": 2, "b": 2})
  with pytest.raises(ValueError, match="test"):
    input_pipeline.list_image_folder(str(tmp_path), "test")
  os.makedirs(f"{tmp_path}/empty/x")
  with pytest.raises(ValueError, match="empty"):
    input_pipeline.list_image_folder(str(tmp_path), "empty")
  solid_folder(tmp_path, "val", {"a": 1, "zebra": 1})
  with pytest.raises(ValueError, match="zebra"):
    input_pipeline.list_image_folder(str(tmp_path), "val", ["a", "b"])
  with pytest.raises(ValueError, match="batch_size=6"):
    input_pipeline.create_pretrain_iterator(config_for(tmp_path, batch_size=6), seed=0)
  with pytest.raises(ValueError, match="fewer than one batch"):
    input_pipeline.create_pretrain_iterator(config_for(tmp_path, batch_size=8), seed=0)


def test_other_splits_use_the_train_mapping(tmp_path):
  solid_folder(tmp_path, "train", {"a": 1, "b": 1, "c": 1})
  solid_folder(tmp_path, "test", {"c": 2})
  paths, labels, names = input_pipeline.list_image_folder(str(tmp_path), "test", ["a", "b", "c"])
  assert names == ["a", "b", "c"] and labels.tolist() == [2, 2]
  assert input_pipeline.get_class_names(config_for(tmp_path).data) == ["a", "b", "c"]


def _windows(shape, n, **kwargs):
  seeds = tf.data.Dataset.range(n).map(lambda i: tf.stack([i, tf.constant(7, tf.int64)]))
  ds = seeds.map(lambda s: tf.stack(input_pipeline.sample_crop_window(shape, s, **kwargs)))
  return np.concatenate(list(ds.batch(n).as_numpy_iterator()))


def test_crop_area_and_aspect_ranges_hold_over_many_draws():
  windows = _windows(tf.constant([300, 400, 3]), 2000)
  y, x, h, w = windows.T
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= 300).all() and (x + w <= 400).all()
  area = h * w / (300 * 400)
  aspect = w / h
  assert area.min() >= 0.08 * 0.97 and area.max() <= 1.0
  assert aspect.min() >= 0.75 * 0.97 and aspect.max() <= 4 / 3 * 1.03
  assert area.min() < 0.1 and area.max() > 0.9  # the whole range is used
  assert abs(np.median(np.log(aspect))) < 0.05  # log-uniform: symmetric about 1
  assert len({tuple(r) for r in windows}) > 1900


@pytest.mark.parametrize("shape", [(7, 10), (10, 7), (20, 3000), (3000, 20), (1, 1)])
def test_crops_of_small_and_extreme_images(shape):
  windows = _windows(tf.constant([*shape, 3]), 50)
  y, x, h, w = windows.T
  assert (h >= 1).all() and (w >= 1).all()
  assert (y + h <= shape[0]).all() and (x + w <= shape[1]).all()
  if max(shape) / min(shape) > 100:  # no window fits: centre crop at the nearest aspect
    assert len({tuple(r) for r in windows}) == 1
    assert max(w[0] / h[0], h[0] / w[0]) <= 4 / 3 + 0.05 and min(h[0], w[0]) == min(shape)
    assert abs(2 * y[0] + h[0] - shape[0]) <= 1 and abs(2 * x[0] + w[0] - shape[1]) <= 1
  image = tf.zeros([*shape, 3], tf.uint8)
  out = input_pipeline.random_resized_crop(image, tf.constant([1, 2]), size=8)
  assert out.shape == (8, 8, 3) and out.dtype == tf.float32


def test_same_seed_same_crop():
  image = tf.constant(np.random.default_rng(0).integers(0, 255, (30, 40, 3)), tf.uint8)
  a = input_pipeline.random_resized_crop(image, tf.constant([3, 4]), size=8)
  b = input_pipeline.random_resized_crop(image, tf.constant([3, 4]), size=8)
  c = input_pipeline.random_resized_crop(image, tf.constant([3, 5]), size=8)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_center_crop_fraction():
  image = np.zeros((64, 48, 3), np.uint8)
  image[8:-8, 8:-8] = 255  # white centre, black 8 px border
  out = input_pipeline.center_crop(tf.constant(image), size=16, crop_fraction=0.5)
  np.testing.assert_allclose(out, 1.0)
  whole = input_pipeline.center_crop(tf.constant(image), size=16, crop_fraction=1.0)
  assert whole.numpy()[:, 0].max() < 0.1  # the whole 48 px side, border included


def _colour_ids(views):
  """Each solid image's colour as one number, to tell examples apart after resizing."""
  rgb = np.round(np.asarray(views).reshape(-1, *views.shape[-3:])[:, 0, 0] * 255).astype(int)
  return (rgb[:, 0] * 256 + rgb[:, 1]) * 256 + rgb[:, 2]


@pytest.fixture(scope="module")
def solid_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("solid")
  solid_folder(root, "train", {"a": 5, "b": 5})
  solid_folder(root, "test", {"a": 3, "b": 4})
  return root


def test_pretrain_batches_shapes_devices_and_epochs(solid_root):
  config = config_for(solid_root, batch_size=8)
  config.augment.enabled = False
  it = input_pipeline.create_pretrain_iterator(config, seed=0)
  assert it.num_batches == 1 and it.num_examples == 10
  batches = [next(it) for _ in range(3)]
  b = batches[0]
  assert b["view1"].shape == (4, 2, 8, 8, 3) and b["view1"].dtype == np.float32
  assert b["label"].shape == (4, 2) and b["label"].dtype == np.int32
  assert isinstance(b["view1"], jax.Array) and len(b["view1"].sharding.device_set) == 4
  np.testing.assert_array_equal(b["view1"], b["view2"])  # augmentation off: identical views
  ids = [_colour_ids(x["view1"]) for x in batches]
  assert all(len(set(i)) == 8 for i in ids)  # no example twice in an epoch
  assert not np.array_equal(ids[0], ids[1])  # reshuffled every epoch
  # Resuming at epoch 2 reproduces epoch 2.
  resumed = input_pipeline.create_pretrain_iterator(config, seed=0, start_epoch=2)
  np.testing.assert_array_equal(next(resumed)["view1"], batches[2]["view1"])


@pytest.mark.parametrize("cache", [False, True])
def test_pretrain_views_are_random_crops_and_reproducible(tmp_path, cache):
  rng = np.random.default_rng(0)
  for i in range(4):
    noise = rng.integers(0, 255, (20 + 3 * i, 30, 3)).astype(np.uint8)
    _save(f"{tmp_path}/train/c{i % 2}/{i}.png", Image.fromarray(noise), "PNG")
  config = config_for(tmp_path, batch_size=4, cache=cache, cache_shorter_side=16)
  b = next(input_pipeline.create_pretrain_iterator(config, seed=1))
  again = next(input_pipeline.create_pretrain_iterator(config, seed=1))
  other = next(input_pipeline.create_pretrain_iterator(config, seed=2))
  v1, v2 = np.asarray(b["view1"]), np.asarray(b["view2"])
  assert v1.shape == (4, 1, 8, 8, 3) and 0 <= v1.min() and v1.max() <= 1
  assert not np.allclose(v1, v2)
  np.testing.assert_array_equal(v1, again["view1"])
  assert not np.allclose(v1, other["view1"])


def test_eval_pass_covers_every_example_once(solid_root):
  config = config_for(solid_root)
  it = input_pipeline.create_eval_iterator(config, "test", batch_size=4)
  batches = [jax.device_get(b) for b in it]
  assert it.num_batches == len(batches) == 2
  assert batches[0]["image"].shape == (4, 1, 8, 8, 3) and batches[0]["mask"].dtype == bool
  mask = np.concatenate([b["mask"].ravel() for b in batches])
  assert mask.tolist() == [True] * 7 + [False]
  ids = np.concatenate([_colour_ids(b["image"]) for b in batches])[mask]
  assert len(set(ids)) == 7
  labels = np.concatenate([b["label"].ravel() for b in batches])[mask]
  assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
  again = [
    jax.device_get(b) for b in input_pipeline.create_eval_iterator(config, "test", batch_size=4)
  ]
  np.testing.assert_array_equal(again[1]["image"], batches[1]["image"])


def test_eval_image_size_reads_real_pixels_through_the_cache(tmp_path):
  # Stripes 2 px wide on a 64 px image: a 32 px view keeps them; a view upsampled from an
  # 8 px cache (the pretraining cache side here) would have blurred them away.
  stripes = np.zeros((64, 64, 3), np.uint8)
  stripes[:, (np.arange(64) // 2) % 2 == 1] = 255
  _save(f"{tmp_path}/test/a/0.png", Image.fromarray(stripes), "PNG")
  _save(f"{tmp_path}/train/a/0.png", Image.fromarray(stripes), "PNG")
  views = {}
  for cache in (False, True):
    config = config_for(
      tmp_path, image_size=8, cache=cache, cache_shorter_side=8, eval_crop_fraction=1.0
    )
    config.data.eval_image_size = 32
    batch = next(iter(input_pipeline.create_eval_iterator(config, "test", batch_size=4)))
    views[cache] = np.asarray(batch["image"]).reshape(-1, 32, 32, 3)[0]
  for view in views.values():  # (resampling filters differ between the two paths)
    assert view.shape == (32, 32, 3)
    assert view[0].max() - view[0].min() > 0.4  # the stripes survive
  config = config_for(tmp_path)
  assert input_pipeline.eval_image_size(config.data) == 8  # 0: the training size
  config.data.final_image_size = 12
  assert input_pipeline.eval_image_size(config.data) == 8  # no final phase: final size unused
  config.data.final_size_epochs = 1
  assert input_pipeline.eval_image_size(config.data) == 12  # 0: the last training crops' size
  config.data.eval_crop_fraction = 0.875
  assert input_pipeline.eval_crop_fraction(config.data) == 1.0  # last crops <= 32 px: whole image
  config.data.final_image_size = 64
  assert input_pipeline.eval_crop_fraction(config.data) == 0.875
  config.data.eval_image_size = -1
  with pytest.raises(ValueError, match="eval_image_size=-1"):
    input_pipeline.eval_image_size(config.data)


def test_random_views_are_consecutive_seeded_crops_and_flips(tmp_path):
  gradient = np.stack(np.meshgrid(np.linspace(0, 255, 40), np.linspace(0, 255, 30)), -1)
  pixels = np.concatenate([gradient, gradient[..., :1]], -1).astype(np.uint8)
  for name in ("a", "b"):
    for i in range(3):
      image = (pixels * (0.5 + 0.15 * i)).astype(np.uint8)  # brighter, same left-to-right ramp
      _save(f"{tmp_path}/train/{name}/{i}.png", Image.fromarray(image), "PNG")
  config = config_for(tmp_path, image_size=16, eval_crop_fraction=1.0)

  def rows(**kwargs):
    it = input_pipeline.create_eval_iterator(config, "train", batch_size=8, **kwargs)
    batches = [jax.device_get(b) for b in it]
    mask = np.concatenate([b["mask"].ravel() for b in batches])
    images = np.concatenate([b["image"].reshape(-1, 16, 16, 3) for b in batches])[mask]
    return images, np.concatenate([b["label"].ravel() for b in batches])[mask]

  centre, centre_labels = rows()
  views, labels = rows(random_views=3, seed=1)
  assert views.shape == (6 * 3, 16, 16, 3) and 0 <= views.min() and views.max() <= 1
  np.testing.assert_array_equal(labels, np.repeat(centre_labels, 3))
  assert len({v.tobytes() for v in views}) == len(views)  # every view its own crop
  np.testing.assert_array_equal(rows(random_views=3, seed=1)[0], views)
  assert not np.array_equal(rows(random_views=3, seed=2)[0], views)
  # A view's left-right gradient runs with or without a flip: both directions occur.
  slopes = np.sign(views[:, 8, -1, 0] - views[:, 8, 0, 0])
  assert {-1.0, 1.0} <= set(slopes.tolist())
  with pytest.raises(ValueError, match="random_views=-1"):
    rows(random_views=-1)


@pytest.mark.parametrize("cache", [False, True])
def test_tfds_source(cache):
  config = config_for("", image_size=8, batch_size=4, source="tfds", tfds_name="cifar10")
  config.data.cache = cache
  config.data.tfds_data_dir = "/nonexistent-tfds-dir"
  with tfds.testing.mock_data(num_examples=10):
    assert len(input_pipeline.get_class_names(config.data)) == 10
    assert input_pipeline.num_examples(config.data, "train") == 10
    b = next(input_pipeline.create_pretrain_iterator(config, seed=0))
    assert b["view1"].shape == (4, 1, 8, 8, 3) and b["label"].dtype == np.int32
    assert not np.allclose(b["view1"], b["view2"])
    it = input_pipeline.create_eval_iterator(config, "test", batch_size=4)
    masks = [np.asarray(x["mask"]) for x in it]
  assert len(masks) == 3 and sum(m.sum() for m in masks) == 10
  if cache:  # the split is decoded once per process, then reused
    assert input_pipeline._cached_tfds.cache_info().hits >= 1
