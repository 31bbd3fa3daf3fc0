"""Every image-size rule in one place: the pretraining crop size per epoch and the test view.

Pretraining crops are ``data.image_size`` px, except the last ``data.final_size_epochs`` epochs,
which crop at ``data.final_image_size`` (progressive resizing). The evaluation view is
``data.eval_image_size`` px (0: the last crop size), a centre crop of ``data.eval_crop_fraction``
of the shorter side, or the whole image when the last crops are CIFAR-sized (at most 32 px).
All sizes are sides of square images in px; the functions read a config and touch no data.
"""

import ml_collections

CIFAR_SIZE = 32
"""Images of at most this many px are CIFAR-sized: the encoder gets the CIFAR stem (SimCLR §B.9,
unless ``model.cifar_stem`` says otherwise) and the test view is the whole image."""


def uses_cifar_stem(cifar_stem: bool | None, image_size: int) -> bool:
  """``model.cifar_stem``, or for None whether ``image_size`` (px) is at most `CIFAR_SIZE`."""
  return image_size <= CIFAR_SIZE if cifar_stem is None else bool(cifar_stem)


def final_phase_start(config: ml_collections.ConfigDict) -> int | None:
  """The first (0-based) epoch cropped at ``data.final_image_size``, or None without that phase.

  Progressive resizing (Tan & Le 2021, "EfficientNetV2", §4: small images early, larger late):
  most epochs run on small, cheap crops, the last ``data.final_size_epochs`` on larger ones, under
  one learning-rate schedule, so the encoder ends at the resolution that the probe's larger test
  view shows it (FixRes, Touvron et al. 2019, §3). The boundary is counted from ``num_epochs``:
  resuming with a larger ``num_epochs`` moves it.

  Args:
    config: full config (`configs/default.py`); reads ``num_epochs``, ``data.image_size``,
      ``data.final_*`` and ``model.cifar_stem``.

  Returns:
    An epoch in [0, num_epochs], or None when ``data.final_size_epochs`` is 0.

  Raises:
    ValueError: ``data.final_size_epochs`` outside [0, num_epochs]; > 0 with
      ``data.final_image_size`` <= 0; ``data.final_image_size`` or
      ``data.final_cache_shorter_side`` set while ``data.final_size_epochs`` is 0 (they would be
      ignored); a negative ``data.final_cache_shorter_side``; or ``model.cifar_stem`` left to
      the automatic choice (None) when ``data.image_size`` and ``data.final_image_size`` fall on
      different sides of 32 px (the stem is built once, from ``data.image_size``).
  """
  data = config.data
  epochs = int(data.get("final_size_epochs", 0) or 0)
  size = int(data.get("final_image_size", 0) or 0)
  cache_side = int(data.get("final_cache_shorter_side", 0) or 0)
  if not 0 <= epochs <= config.num_epochs:
    raise ValueError(
      f"config.data.final_size_epochs={epochs} must be in [0, num_epochs={config.num_epochs}]."
    )
  if cache_side < 0:
    raise ValueError(
      f"config.data.final_cache_shorter_side={cache_side} must be >= 0 (0: cache_shorter_side)."
    )
  if not epochs:
    if size or cache_side:
      raise ValueError(
        f"config.data.final_image_size={size} / final_cache_shorter_side={cache_side} are set "
        "but config.data.final_size_epochs=0, so no epoch would use them; set the number of "
        "final epochs, or 0 for both."
      )
    return None
  if size <= 0:
    raise ValueError(
      f"config.data.final_size_epochs={epochs} needs config.data.final_image_size > 0 (px), "
      f"got {size}."
    )
  stem = config.model.get("cifar_stem")
  if stem is None and uses_cifar_stem(None, data.image_size) != uses_cifar_stem(None, size):
    raise ValueError(
      f"config.model.cifar_stem=None picks the stem from data.image_size={data.image_size} "
      f"(CIFAR stem iff <= 32 px), which does not suit data.final_image_size={size}; set "
      "config.model.cifar_stem to True or False."
    )
  return config.num_epochs - epochs


def config_for_epoch(config: ml_collections.ConfigDict, epoch: int) -> ml_collections.ConfigDict:
  """`config` with the crop size (and cache side) that pretraining uses in 0-based `epoch`.

  Before `final_phase_start` (or without a final phase) this is `config` itself; from it on, a
  copy whose ``data.image_size`` is ``data.final_image_size`` and, if set,
  ``data.cache_shorter_side`` is ``data.final_cache_shorter_side``. `config` is never modified.

  Raises:
    ValueError: see `final_phase_start`.
  """
  start = final_phase_start(config)
  if start is None or epoch < start:
    return config
  phase = config.copy_and_resolve_references()
  phase.data.image_size = config.data.final_image_size
  if config.data.final_cache_shorter_side:
    phase.data.cache_shorter_side = config.data.final_cache_shorter_side
  return phase


def last_crop_size(data_config: ml_collections.ConfigDict) -> int:
  """Side in px of the last pretraining crops.

  ``data.final_image_size`` when the run ends with ``data.final_size_epochs`` > 0 epochs at that
  size (progressive resizing, `final_phase_start`), else ``data.image_size``.
  """
  final_size = int(data_config.get("final_image_size", 0) or 0)
  final_on = int(data_config.get("final_size_epochs", 0) or 0) > 0 and final_size > 0
  return final_size if final_on else data_config.image_size


def eval_crop_fraction(data_config: ml_collections.ConfigDict) -> float:
  """The centre-crop fraction of the evaluation view's shorter side, in (0, 1].

  ``data.eval_crop_fraction``, except 1 (the whole image) when the last training crops
  (`last_crop_size`) are at most 32 px, as SimCLR's reference code disables test cropping for
  CIFAR-sized images.
  """
  return 1.0 if last_crop_size(data_config) <= CIFAR_SIZE else data_config.eval_crop_fraction


def eval_image_size(data_config: ml_collections.ConfigDict) -> int:
  """Side in px of the evaluation view: ``data.eval_image_size``, or if 0 `last_crop_size`.

  A test view larger than the training crops undoes the apparent-object-size gap that random-
  resized crops open between training and test (Touvron et al. 2019, "FixRes", §3).

  Raises:
    ValueError: a negative ``data.eval_image_size``.
  """
  size = int(data_config.get("eval_image_size", 0) or 0)
  if size < 0:
    raise ValueError(
      f"config.data.eval_image_size={size} must be >= 0 (0: the last pretraining crop size)."
    )
  return size or last_crop_size(data_config)
