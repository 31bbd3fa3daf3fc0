"""Orbax checkpoints: round trip, metadata, incomplete saves never taken as the latest."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default, tiny
from simclr_jax import checkpoint, parallel
from simclr_jax.data import pipeline


def toy_state(value: float):
  params = {"dense": {"kernel": jnp.full((3, 2), value), "bias": jnp.zeros((2,))}}
  tx = optax.lars(0.1)
  return {
    "step": jnp.asarray(7, jnp.int32),
    "params": params,
    "batch_stats": {"bn": {"mean": jnp.arange(4.0)}},
    "opt_state": tx.init(params),
  }


def test_round_trip_and_metadata(tmp_path, monkeypatch):
  config = tiny.get_config()
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  config.data.root = "~/data"  # as a shell leaves `--config.data.root=~/data`
  manager = checkpoint.create_manager(str(tmp_path), max_to_keep=2)
  for step, value in [(1, 1.0), (2, 2.0), (3, 3.0)]:
    checkpoint.save(manager, step, toy_state(value), config=config, class_names=["a", "b"])
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 3]  # max_to_keep

  restored = checkpoint.restore_state(manager, toy_state(0.0))
  np.testing.assert_array_equal(restored["params"]["dense"]["kernel"], np.full((3, 2), 3.0))
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(toy_state(0.0))
  older = checkpoint.restore_state(manager, toy_state(0.0), step=2)
  np.testing.assert_array_equal(older["params"]["dense"]["kernel"], np.full((3, 2), 2.0))
  manager.close()

  pretrained = checkpoint.load_pretrained(str(tmp_path))
  assert pretrained.step == 3
  assert pretrained.class_names == ["a", "b"]
  assert pretrained.config.model.depth == config.model.depth
  assert pretrained.config.data.image_size == 32
  assert pretrained.config.data.root == str(tmp_path / "home" / "data")  # absolute, ~ expanded
  assert not checkpoint.config_changes(pretrained.config.to_dict(), config)
  np.testing.assert_array_equal(pretrained.batch_stats["bn"]["mean"], np.arange(4.0))
  with pytest.raises(FileNotFoundError, match="step 1"):
    checkpoint.load_pretrained(str(tmp_path), step=1)


def test_replicated_save_restores_on_one_device(tmp_path):
  """A state replicated over 4 devices, saved unreplicated, restores on a single device."""
  assert jax.local_device_count() == 4
  replicated = parallel.replicate(toy_state(5.0))
  assert len(replicated["params"]["dense"]["kernel"].sharding.device_set) == 4
  host = jax.device_get(jax.tree_util.tree_map(lambda x: x[0], replicated))
  manager = checkpoint.create_manager(str(tmp_path))
  checkpoint.save(manager, 10, host, config=tiny.get_config(), class_names=["x"])
  manager.wait_until_finished()
  restored = checkpoint.restore_state(manager, toy_state(0.0))
  kernel = restored["params"]["dense"]["kernel"]
  np.testing.assert_array_equal(kernel, np.full((3, 2), 5.0))
  assert isinstance(kernel, np.ndarray)  # host memory: no device layout to match
  manager.close()


def test_incomplete_save_is_not_the_latest(tmp_path):
  """A crash mid-save leaves only a temporary directory, which is never taken as a step."""
  manager = checkpoint.create_manager(str(tmp_path))
  checkpoint.save(manager, 4, toy_state(4.0), config=tiny.get_config(), class_names=["x"])
  manager.wait_until_finished()
  manager.close()
  ckpt_dir = checkpoint.checkpoint_dir(str(tmp_path))
  # What an interrupted Orbax save leaves behind: a step directory under a temporary name.
  partial = os.path.join(ckpt_dir, "8.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "garbage"), "w") as f:
    f.write("half-written")
  manager = checkpoint.create_manager(str(tmp_path))
  assert manager.latest_step() == 4
  restored = checkpoint.restore_state(manager, toy_state(0.0))
  np.testing.assert_array_equal(restored["params"]["dense"]["kernel"], np.full((3, 2), 4.0))
  manager.close()
  assert checkpoint.load_pretrained(str(tmp_path)).step == 4


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    checkpoint.load_pretrained(str(tmp_path))
  os.makedirs(checkpoint.checkpoint_dir(str(tmp_path)))
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    checkpoint.load_pretrained(str(tmp_path))


def test_config_changes_names_changed_added_and_dropped_fields():
  config = ml_collections.ConfigDict(
    {"num_epochs": 2, "model": {"depth": 18, "width_multiplier": 1.0}, "data": {"root": ""}}
  )
  saved = {"num_epochs": 1, "model": {"depth": 18, "old_field": None}, "data": {"root": ""}}
  assert checkpoint.config_changes(saved, config) == [
    "model.old_field: None -> absent from this config",
    "model.width_multiplier: absent from the checkpoint -> 1.0",
    "num_epochs: 1 -> 2",
  ]
  saved["num_epochs"], saved["model"] = 2, {"depth": 18, "width_multiplier": 1.0}
  assert checkpoint.config_changes(saved, config) == []


def test_config_changes_leave_out_the_runtime_old_or_new():
  """Speed settings are not the model: neither today's `runtime` section nor the fields it
  replaced (model.conv_impl, model.conv_grad_chunk, num_cpu_devices) count as changes."""
  config = ml_collections.ConfigDict(
    {"model": {"depth": 18}, "runtime": {"conv_impl": "auto", "num_cpu_devices": 0}}
  )
  old = {"model": {"depth": 18, "conv_impl": "onednn", "conv_grad_chunk": 8}, "num_cpu_devices": 4}
  assert checkpoint.config_changes(old, config) == []
  new = {"model": {"depth": 18}, "runtime": {"conv_impl": "flax", "num_cpu_devices": 2}}
  assert checkpoint.config_changes(new, config) == []
  assert checkpoint.config_changes({"model": {"depth": 50}}, config) == ["model.depth: 50 -> 18"]


def test_config_saved_before_multi_crop_loads_with_its_defaults(tmp_path):
  """A checkpoint's config without augment.local_crops / local_view (saved before multi-crop)
  loads with no local crops and local_view = its view2, and resumes without a listed change."""
  config = tiny.get_config()
  old = json.loads(config.to_json())
  del old["augment"]["local_crops"], old["augment"]["local_view"]
  upgraded = checkpoint.upgrade_config(old)
  assert "local_crops" not in old["augment"]  # the input is not modified
  assert upgraded["augment"]["local_crops"] == json.loads(
    default.get_config().augment.local_crops.to_json()
  )
  assert upgraded["augment"]["local_view"] == old["augment"]["view2"]
  assert checkpoint.config_changes(old, config) == []
  assert pipeline.num_local_crops(ml_collections.ConfigDict(old)) == 0

  manager = checkpoint.create_manager(str(tmp_path))
  checkpoint.save(
    manager, 1, toy_state(1.0), config=ml_collections.ConfigDict(old), class_names=["x"]
  )
  manager.wait_until_finished()
  manager.close()
  loaded = checkpoint.load_pretrained(str(tmp_path)).config
  assert loaded.augment.local_crops.num == 0 and pipeline.num_local_crops(loaded) == 0
  assert json.loads(loaded.augment.local_view.to_json()) == old["augment"]["view2"]
