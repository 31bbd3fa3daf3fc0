"""Pipelines: batch shapes on the devices, epochs, determinism, eval padding, random views."""

import image_trees
import jax
import numpy as np
import pytest
from PIL import Image

from simclr_jax.data import pipeline


def _colour_ids(views):
  """Each solid image's colour as one number, to tell examples apart after resizing."""
  rgb = np.round(np.asarray(views).reshape(-1, *views.shape[-3:])[:, 0, 0] * 255).astype(int)
  return (rgb[:, 0] * 256 + rgb[:, 1]) * 256 + rgb[:, 2]


@pytest.fixture(scope="module")
def solid_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("solid")
  image_trees.solid_folder(root, "train", {"a": 5, "b": 5})
  image_trees.solid_folder(root, "test", {"a": 3, "b": 4})
  return root


def test_pretrain_batches_shapes_devices_and_epochs(solid_root):
  config = image_trees.config_for(solid_root, batch_size=8)
  config.augment.enabled = False
  it = pipeline.create_pretrain_iterator(config, seed=0)
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
  resumed = pipeline.create_pretrain_iterator(config, seed=0, start_epoch=2)
  np.testing.assert_array_equal(next(resumed)["view1"], batches[2]["view1"])


def test_pretrain_batch_size_errors(tmp_path):
  image_trees.solid_folder(tmp_path, "train", {"a": 2, "b": 2})
  with pytest.raises(ValueError, match="batch_size=6"):
    pipeline.create_pretrain_iterator(image_trees.config_for(tmp_path, batch_size=6), seed=0)
  with pytest.raises(ValueError, match="fewer than one batch"):
    pipeline.create_pretrain_iterator(image_trees.config_for(tmp_path, batch_size=8), seed=0)


@pytest.mark.parametrize("cache", [False, True])
def test_pretrain_views_are_random_crops_and_reproducible(tmp_path, cache):
  rng = np.random.default_rng(0)
  for i in range(4):
    noise = rng.integers(0, 255, (20 + 3 * i, 30, 3)).astype(np.uint8)
    image_trees.save(f"{tmp_path}/train/c{i % 2}/{i}.png", Image.fromarray(noise), "PNG")
  config = image_trees.config_for(tmp_path, batch_size=4, cache=cache, cache_shorter_side=16)
  b = next(pipeline.create_pretrain_iterator(config, seed=1))
  again = next(pipeline.create_pretrain_iterator(config, seed=1))
  other = next(pipeline.create_pretrain_iterator(config, seed=2))
  v1, v2 = np.asarray(b["view1"]), np.asarray(b["view2"])
  assert v1.shape == (4, 1, 8, 8, 3) and 0 <= v1.min() and v1.max() <= 1
  assert not np.allclose(v1, v2)
  np.testing.assert_array_equal(v1, again["view1"])
  assert not np.allclose(v1, other["view1"])


def test_local_crops_add_views_and_leave_the_global_ones_unchanged(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(4):
    noise = rng.integers(0, 255, (20 + 3 * i, 30, 3)).astype(np.uint8)
    image_trees.save(f"{tmp_path}/train/c{i % 2}/{i}.png", Image.fromarray(noise), "PNG")
  config = image_trees.config_for(tmp_path, batch_size=4)

  def first_batch(num, size=4, seed=1):
    config.augment.local_crops.num, config.augment.local_crops.size = num, size
    return jax.device_get(next(pipeline.create_pretrain_iterator(config, seed=seed)))

  two_views, multi = first_batch(0), first_batch(3)
  assert "local_views" not in two_views
  assert set(multi) == set(two_views) | {"local_views"}
  for key, value in two_views.items():
    np.testing.assert_array_equal(multi[key], value)  # the global crops, as before
  local = multi["local_views"]
  assert local.shape == (4, 1, 3, 4, 4, 3) and local.dtype == np.float32
  assert 0 <= local.min() and local.max() <= 1
  assert len({x.tobytes() for x in local.reshape(-1, 4, 4, 3)}) == 4 * 3  # each its own crop
  np.testing.assert_array_equal(first_batch(3)["local_views"], local)
  assert not np.allclose(first_batch(3, seed=2)["local_views"], local)
  # Local crop k is drawn from the example's seed and k alone, whatever the number of crops.
  np.testing.assert_array_equal(first_batch(1)["local_views"][:, :, 0], local[:, :, 0])
  with pytest.raises(ValueError, match="size=0"):
    first_batch(2, size=0)
  config.augment.enabled = False
  with pytest.raises(ValueError, match="augment.enabled"):
    first_batch(2)


def test_eval_pass_covers_every_example_once(solid_root):
  config = image_trees.config_for(solid_root)
  it = pipeline.create_eval_iterator(config, "test", batch_size=4)
  batches = [jax.device_get(b) for b in it]
  assert it.num_batches == len(batches) == 2
  assert batches[0]["image"].shape == (4, 1, 8, 8, 3) and batches[0]["mask"].dtype == bool
  mask = np.concatenate([b["mask"].ravel() for b in batches])
  assert mask.tolist() == [True] * 7 + [False]
  ids = np.concatenate([_colour_ids(b["image"]) for b in batches])[mask]
  assert len(set(ids)) == 7
  labels = np.concatenate([b["label"].ravel() for b in batches])[mask]
  assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
  again = [jax.device_get(b) for b in pipeline.create_eval_iterator(config, "test", batch_size=4)]
  np.testing.assert_array_equal(again[1]["image"], batches[1]["image"])


def test_eval_image_size_reads_real_pixels_through_the_cache(tmp_path):
  # Stripes 2 px wide on a 64 px image: a 32 px view keeps them; a view upsampled from an
  # 8 px cache (the pretraining cache side here) would have blurred them away.
  stripes = np.zeros((64, 64, 3), np.uint8)
  stripes[:, (np.arange(64) // 2) % 2 == 1] = 255
  image_trees.save(f"{tmp_path}/test/a/0.png", Image.fromarray(stripes), "PNG")
  image_trees.save(f"{tmp_path}/train/a/0.png", Image.fromarray(stripes), "PNG")
  views = {}
  for cache in (False, True):
    config = image_trees.config_for(
      tmp_path, image_size=8, cache=cache, cache_shorter_side=8, eval_crop_fraction=1.0
    )
    config.data.eval_image_size = 32
    batch = next(iter(pipeline.create_eval_iterator(config, "test", batch_size=4)))
    views[cache] = np.asarray(batch["image"]).reshape(-1, 32, 32, 3)[0]
  for view in views.values():  # (resampling filters differ between the two paths)
    assert view.shape == (32, 32, 3)
    assert view[0].max() - view[0].min() > 0.4  # the stripes survive


def test_random_views_are_consecutive_seeded_crops_and_flips(tmp_path):
  gradient = np.stack(np.meshgrid(np.linspace(0, 255, 40), np.linspace(0, 255, 30)), -1)
  pixels = np.concatenate([gradient, gradient[..., :1]], -1).astype(np.uint8)
  for name in ("a", "b"):
    for i in range(3):
      image = (pixels * (0.5 + 0.15 * i)).astype(np.uint8)  # brighter, same left-to-right ramp
      image_trees.save(f"{tmp_path}/train/{name}/{i}.png", Image.fromarray(image), "PNG")
  config = image_trees.config_for(tmp_path, image_size=16, eval_crop_fraction=1.0)

  def rows(**kwargs):
    it = pipeline.create_eval_iterator(config, "train", batch_size=8, **kwargs)
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
