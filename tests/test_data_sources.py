"""Sources: bad files left out (cached or not), ``~`` in the root, TFDS splits (mocked)."""

import os

import image_trees
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from simclr_jax.data import pipeline, sources


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
  return image_trees.odd_folder(tmp_path_factory.mktemp("odd"))


@pytest.mark.parametrize("cache", [False, True])
def test_pipeline_yields_exactly_the_decodable_images(odd_folder, cache):
  root, good, bad = odd_folder
  config = image_trees.config_for(root, cache=cache, train_split="train")
  it = pipeline.create_eval_iterator(config, "train", batch_size=8)
  batches = [jax.device_get(b) for b in it]
  mask = np.concatenate([b["mask"].ravel() for b in batches])
  labels = np.concatenate([b["label"].ravel() for b in batches])[mask]
  images = np.concatenate([b["image"].reshape(-1, 8, 8, 3) for b in batches])[mask]
  assert it.num_examples == len(good) == mask.sum()
  assert sorted(p for p, _ in it.skipped) == sorted(f"{root}/train/{n}" for n in bad)
  expected = sorted(0 if n.startswith("cat/") else 1 for n in good)
  assert sorted(labels.tolist()) == expected
  assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 1
  assert sources.num_examples(config.data, "train") == len(good)


def test_home_relative_root_is_expanded(odd_folder, monkeypatch):
  # Shells leave `--config.data.root=~/x` unexpanded; the sources expand it.
  root, good, _ = odd_folder
  monkeypatch.setenv("HOME", os.path.dirname(root))
  config = image_trees.config_for(f"~/{os.path.basename(root)}", train_split="train")
  assert sources.get_class_names(config.data) == ["cat", "dog"]
  assert sources.num_examples(config.data, "train") == len(good)


@pytest.mark.parametrize("cache", [False, True])
def test_tfds_source(cache):
  config = image_trees.config_for(
    "", image_size=8, batch_size=4, source="tfds", tfds_name="cifar10"
  )
  config.data.cache = cache
  config.data.tfds_data_dir = "/nonexistent-tfds-dir"
  with tfds.testing.mock_data(num_examples=10):
    assert len(sources.get_class_names(config.data)) == 10
    assert sources.num_examples(config.data, "train") == 10
    b = next(pipeline.create_pretrain_iterator(config, seed=0))
    assert b["view1"].shape == (4, 1, 8, 8, 3) and b["label"].dtype == np.int32
    assert not np.allclose(b["view1"], b["view2"])
    it = pipeline.create_eval_iterator(config, "test", batch_size=4)
    masks = [np.asarray(x["mask"]) for x in it]
  assert len(masks) == 3 and sum(m.sum() for m in masks) == 10
  if cache:  # the split is decoded once per process, then reused
    assert sources._cached_tfds.cache_info().hits >= 1
