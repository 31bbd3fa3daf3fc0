"""Frozen features from a pretraining checkpoint: every example once, independent of the batch,
equal to a plain inference-mode apply, the checkpoint left unchanged; averages over mirror images
and sizes; layer names and depths."""

import jax
import ml_collections
import numpy as np
import probe_helpers
import pytest
from probe_helpers import BATCH_SIZE, COLOURS, NUM_TEST

from simclr_jax import checkpoint, models
from simclr_jax.data import image_folder, pipeline
from simclr_jax.probe import features


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
  return probe_helpers.pretrain_colour_run(tmp_path_factory)


def _tree_copy(tree):
  return jax.tree_util.tree_map(np.array, tree)


def test_features_independent_of_batch_size_and_repeats(pretrained_run):
  root, workdir = pretrained_run
  pretrained = checkpoint.load_pretrained(workdir)
  config = pretrained.config
  num_layers = config.model.head.num_layers
  model = models.build_model(config.model, image_size=config.data.image_size)
  variables = {"params": pretrained.params, "batch_stats": pretrained.batch_stats}
  before = _tree_copy(variables)
  depths = tuple(range(num_layers + 1))

  def extract(batch_size):
    return features.extract_features(
      model, variables, config, "test", batch_size=batch_size, depths=depths
    )

  (one, labels), (eight, labels8), (again, _) = extract(1), extract(BATCH_SIZE), extract(BATCH_SIZE)
  _, expected_labels, _ = image_folder.list_image_folder(root, "test", list(COLOURS))
  np.testing.assert_array_equal(labels, expected_labels)  # each example once, in order
  np.testing.assert_array_equal(labels8, expected_labels)
  for d in depths:
    assert one[d].shape[0] == len(COLOURS) * NUM_TEST and one[d].dtype == np.float32
    np.testing.assert_array_equal(eight[d], again[d])
    # XLA picks kernels by shape, so 1 and 2 rows per device may round differently (~1e-7).
    np.testing.assert_allclose(one[d], eight[d], rtol=0, atol=1e-6 * np.abs(eight[d]).max())

  # Against one plain inference-mode apply on one device over the unpadded images.
  ds, _, _ = pipeline.eval_dataset(config, "test", batch_size=BATCH_SIZE)
  images = np.concatenate(
    [b["image"].reshape(-1, 32, 32, 3)[b["mask"].reshape(-1)] for b in ds.as_numpy_iterator()]
  )
  _, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  expected = (aux["features"], *aux["head_layers"])
  for d in depths:
    np.testing.assert_allclose(eight[d], expected[d], rtol=0, atol=1e-6 * np.abs(eight[d]).max())
  assert eight[0].shape[1] == models.feature_dim(config.model)
  assert eight[num_layers].shape[1] == config.model.head.output_dim

  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, before)
  reloaded = checkpoint.load_pretrained(workdir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded.params, before["params"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded.batch_stats, before["batch_stats"])


def test_layer_names_and_depths():
  assert [features.layer_name(d, 3) for d in range(4)] == ["h", "head layer 1", "head layer 2", "z"]
  assert features.probe_depth(3, None) == 0  # h
  assert [features.probe_depth(3, k) for k in range(4)] == [3, 2, 1, 0]  # K dropped: L - K kept
  for k in (-1, 4):
    with pytest.raises(ValueError, match=rf"remove_top_layers={k} must be in \[0, 3\]"):
      features.probe_depth(3, k)


def test_test_time_views_average_mirrors_and_sizes(pretrained_run):
  _, workdir = pretrained_run
  pretrained = checkpoint.load_pretrained(workdir)
  config = pretrained.config
  model = models.build_model(config.model, image_size=config.data.image_size)
  variables = {"params": pretrained.params, "batch_stats": pretrained.batch_stats}
  depths = (0, config.model.head.num_layers)

  def extract(cfg, **kwargs):
    return features.extract_features(
      model, variables, cfg, "test", batch_size=BATCH_SIZE, depths=depths, **kwargs
    )

  plain, labels = extract(config)
  mirrored, mirror_labels = extract(config, mirror=True)
  np.testing.assert_array_equal(mirror_labels, labels)
  averaged, averaged_labels = features.extract_averaged_features(
    model, variables, config, "test", batch_size=BATCH_SIZE, depths=depths, flip=True
  )
  np.testing.assert_array_equal(averaged_labels, labels)
  for d in depths:
    assert not np.allclose(plain[d], mirrored[d], atol=1e-4)  # the mirror is another view
    np.testing.assert_allclose(averaged[d], (plain[d] + mirrored[d]) / 2, rtol=1e-6, atol=1e-6)

  # The mirror is the image flipped left-right: one plain apply on flipped pixels.
  ds, _, _ = pipeline.eval_dataset(config, "test", batch_size=BATCH_SIZE)
  images = np.concatenate(
    [b["image"].reshape(-1, 32, 32, 3)[b["mask"].reshape(-1)] for b in ds.as_numpy_iterator()]
  )
  _, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images[:, :, ::-1])
  np.testing.assert_allclose(
    mirrored[0], aux["features"], atol=1e-6 * np.abs(aux["features"]).max()
  )

  sized = []
  for size in (24, 40):
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.data.eval_image_size = size
    sized.append(extract(cfg)[0])
  both, _ = features.extract_averaged_features(
    model, variables, config, "test", batch_size=BATCH_SIZE, depths=depths, sizes=(24, 40)
  )
  for d in depths:
    assert not np.allclose(sized[0][d], sized[1][d], atol=1e-4)
    np.testing.assert_allclose(both[d], (sized[0][d] + sized[1][d]) / 2, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="sizes=\\(0,\\)"):
    features.extract_averaged_features(
      model, variables, config, "test", batch_size=BATCH_SIZE, sizes=(0,)
    )
