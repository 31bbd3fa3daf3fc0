"""Image sizes: the progressive-resizing phase, its config errors, and the evaluation view."""

import image_trees
import pytest

from configs import tiny
from simclr_jax.data import resolution


def tiny_config(**overrides):
  """`configs/tiny.py` (32 px crops) with dotted-key overrides, e.g. ``{"data.image_size": 48}``."""
  config = tiny.get_config()
  config.num_epochs = 2
  return image_trees.override(config, overrides)


# The stem is built once; 32 -> 48 px crosses the automatic CIFAR-stem threshold, so it is fixed.
FINAL_PHASE = {"data.final_size_epochs": 1, "data.final_image_size": 48, "model.cifar_stem": True}


def test_config_for_epoch_switches_the_crop_size_for_the_last_epochs():
  config = tiny_config(num_epochs=5, **FINAL_PHASE, **{"data.final_cache_shorter_side": 64})
  config.data.final_size_epochs = 2
  assert resolution.final_phase_start(config) == 3
  for epoch in (0, 2):
    assert resolution.config_for_epoch(config, epoch) is config
  for epoch in (3, 4):
    later = resolution.config_for_epoch(config, epoch)
    assert (later.data.image_size, later.data.cache_shorter_side) == (48, 64)
    assert later.model.depth == config.model.depth and later.num_epochs == 5
  assert (config.data.image_size, config.data.cache_shorter_side) == (32, 256)  # not modified
  config.data.final_cache_shorter_side = 0
  assert resolution.config_for_epoch(config, 4).data.cache_shorter_side == 256
  assert resolution.final_phase_start(tiny_config()) is None


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"data.final_size_epochs": 3, "data.final_image_size": 48}, "final_size_epochs=3 must be"),
    ({"data.final_size_epochs": -1}, "final_size_epochs=-1 must be"),
    ({"data.final_size_epochs": 1}, "needs config.data.final_image_size > 0"),
    ({**FINAL_PHASE, "data.final_cache_shorter_side": -5}, "final_cache_shorter_side=-5"),
    ({"data.final_image_size": 48}, "final_size_epochs=0, so no epoch would use them"),
    ({"data.final_size_epochs": 1, "data.final_image_size": 48}, "cifar_stem=None picks"),
  ],
)
def test_bad_final_phase_is_a_clear_error(overrides, message):
  config = tiny_config(**overrides)
  with pytest.raises(ValueError, match=message):
    resolution.final_phase_start(config)
  with pytest.raises(ValueError, match=message):
    resolution.config_for_epoch(config, 0)


def test_eval_view_size_and_crop_fraction_follow_the_last_crops():
  config = tiny_config(**{"data.image_size": 8})
  assert resolution.last_crop_size(config.data) == 8
  assert resolution.eval_image_size(config.data) == 8  # 0: the training size
  config.data.final_image_size = 12
  assert resolution.last_crop_size(config.data) == 8
  assert resolution.eval_image_size(config.data) == 8  # no final phase: final size unused
  config.data.final_size_epochs = 1
  assert resolution.last_crop_size(config.data) == 12
  assert resolution.eval_image_size(config.data) == 12  # 0: the last training crops' size
  config.data.eval_crop_fraction = 0.875
  assert resolution.eval_crop_fraction(config.data) == 1.0  # last crops <= 32 px: whole image
  config.data.final_image_size = 64
  assert resolution.eval_crop_fraction(config.data) == 0.875
  config.data.eval_image_size = 24
  assert resolution.eval_image_size(config.data) == 24  # set: wins over the crop size
  config.data.eval_image_size = -1
  with pytest.raises(ValueError, match="eval_image_size=-1"):
    resolution.eval_image_size(config.data)
