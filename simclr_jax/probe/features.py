"""Frozen features of a pretrained model: the encoder output h or any projection-head layer.

The encoder is frozen: BN runs in inference mode on its running statistics and images get the
deterministic evaluation transform, so each image's features do not depend on the batch size or
the device count (beyond float32 rounding: XLA picks its kernels by shape, ~1e-7 relative).
"Depth" is the number of projection-head layers kept: 0 is h, L (the head's layer count) is z;
SimCLR §4.2 (Fig. 8) probes both, and the PyTorch original names a depth by the layers it
removes (`remove_top_layers`, L - depth). `extract_averaged_features` averages each layer over
test-time views of the whole image: its left-right mirror and several sizes.

    layers, labels = features.extract_features(
      model, variables, config, "test", batch_size=256, depths=(0, 2)
    )  # layers[0]: h, float32 [N, D]; layers[2]: the second head layer's outputs
"""

import functools
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from simclr_jax import augment, models, parallel
from simclr_jax.data import pipeline


def layer_name(depth: int, num_head_layers: int) -> str:
  """'h' for depth 0, 'z' for the full head (depth L), else 'head layer <depth>'."""
  if depth == 0:
    return "h"
  return "z" if depth == num_head_layers else f"head layer {depth}"


def probe_depth(num_head_layers: int, remove_top_layers: int | None) -> int:
  """Head layers kept for the PyTorch original's `remove_top_layers` K: L - K; None means h (0).

  Raises:
    ValueError: K outside [0, L].
  """
  if remove_top_layers is None:
    return 0
  if not 0 <= remove_top_layers <= num_head_layers:
    raise ValueError(
      f"remove_top_layers={remove_top_layers} must be in [0, {num_head_layers}] (the head has "
      f"{num_head_layers} layers; 0 keeps the full head, {num_head_layers} leaves h)."
    )
  return num_head_layers - remove_top_layers


@functools.lru_cache(maxsize=8)
def _layers_fn(
  model: models.SimCLRModel, depths: tuple[int, ...], normalize: bool, mirror: bool = False
):
  """Pmapped frozen forward pass returning the layers at `depths`; cached so it compiles once.

  `normalize`: the pretraining inputs were mean/std normalised (`config.augment.normalize`),
  so the probe's inputs must be too. `mirror`: flip the images left-right first.
  """

  def layers(variables, images):
    if mirror:
      images = images[..., ::-1, :]  # [per_device, H, W, 3]: W reversed
    if normalize:
      images = augment.normalize_images(images)
    _, aux = model.apply(variables, images, train=False)
    every = (aux["features"], *aux["head_layers"])
    return tuple(every[d] for d in depths)

  return jax.pmap(layers)


def extract_features(
  model: models.SimCLRModel,
  variables: dict[str, Any],
  config: ml_collections.ConfigDict,
  split: str,
  *,
  batch_size: int,
  depths: tuple[int, ...] = (0,),
  random_views: int = 0,
  seed: int = 0,
  mirror: bool = False,
) -> tuple[dict[int, np.ndarray], np.ndarray]:
  """Frozen features of every example of `split`, each exactly once (padding dropped by mask).

  Args:
    model: from `models.build_model` (any `axis_name`; BN runs on running statistics).
    variables: {'params', 'batch_stats'} host or device arrays, unreplicated; left unchanged.
    config: full config; reads `config.data` (see `pipeline.eval_dataset`) and
      `config.augment.normalize`.
    split: split name, e.g. `config.data.eval_split`.
    batch_size: global batch; rounded up to a multiple of the device count. Does not change the
      features.
    depths: head layers kept for each wanted layer, each in [0, L].
    random_views: 0 for the centre view; K >= 1 for K random views per example (see
      `pipeline.eval_dataset`), example i's at rows i*K .. i*K+K-1.
    seed: random seed of the random views.
    mirror: features of the views flipped left-right.

  Returns:
    ({depth: float32 [N * max(1, K), D_depth]}, labels int32 [N * max(1, K)]), N the split's
    decodable examples over all hosts, in the split's fixed order whatever the host count
    (`pipeline.eval_dataset`'s ``index``).

  Raises:
    ValueError: the errors of `pipeline.create_eval_iterator` (missing root or split, ...).
  """
  devices = jax.device_count()
  batch_size = math.ceil(batch_size / devices) * devices
  batches = pipeline.create_eval_iterator(
    config, split, batch_size=batch_size, random_views=random_views, seed=seed
  )
  normalize = bool(config.augment.get("normalize", False))
  apply = _layers_fn(model, tuple(depths), normalize, mirror)
  replicated = parallel.replicate(variables)
  # Fetched per batch so device memory holds one batch of features, not the split's.
  outputs = [
    jax.device_get(
      (apply(replicated, batch["image"]), batch["label"], batch["mask"], batch["index"])
    )
    for batch in batches
  ]

  def rows(arrays):
    return np.concatenate([np.reshape(a, (-1, *np.shape(a)[2:])) for a in arrays])

  mask = rows([m for _, _, m, _ in outputs])
  labels = rows([y for _, y, _, _ in outputs])
  index = rows([i for _, _, _, i in outputs])
  layers = [rows([o[i] for o, _, _, _ in outputs]) for i in range(len(depths))]
  if jax.process_count() > 1:
    mask, labels, index, *layers = multihost_utils.process_allgather(
      (mask, labels, index, *layers), tiled=True
    )
  views = max(1, random_views)
  if mask.sum() < batches.num_examples * views:
    logging.warning(
      "%s: %d of %d rows could be read (%d examples x %d views)",
      split,
      int(mask.sum()),
      batches.num_examples * views,
      batches.num_examples,
      views,
    )
  # The one-host order on any number of hosts, so a seeded label subset picks the same images.
  order = np.argsort(index[mask], kind="stable")
  features = {
    d: np.asarray(x[mask][order], np.float32) for d, x in zip(depths, layers, strict=True)
  }
  return features, np.asarray(labels[mask][order], np.int32)


def extract_averaged_features(
  model: models.SimCLRModel,
  variables: dict[str, Any],
  config: ml_collections.ConfigDict,
  split: str,
  *,
  batch_size: int,
  depths: tuple[int, ...] = (0,),
  sizes: tuple[int, ...] = (),
  flip: bool = False,
) -> tuple[dict[int, np.ndarray], np.ndarray]:
  """Frozen features averaged over test-time views of each example: sizes and mirror images.

  Each view is `extract_features`' centre view (`config.data.eval_crop_fraction` of the shorter
  side) resized to one of `sizes`, and with `flip` also its left-right mirror; each layer's
  outputs are averaged over the views, at every depth alike (not h averaged, then the head).
  The encoder's global pooling makes every size give a vector of the same width.

  Args:
    model, variables, config, split, batch_size, depths: as `extract_features`'.
    sizes: test-view sides in px, each >= 1; empty: the config's (`data.eval_image_size`).
    flip: also average over the left-right mirror of every view.

  Returns:
    ({depth: float32 [N, D_depth]}, labels int32 [N]), as `extract_features`' centre views.

  Raises:
    ValueError: a size < 1; views that read different examples (a file that failed to decode in
      one pass only); and `extract_features`' errors.
  """
  if any(size < 1 for size in sizes):
    raise ValueError(f"sizes={sizes}: every test-view size must be >= 1 px.")
  total, labels, views = None, None, 0
  for size in sizes or (None,):
    sized = config
    if size is not None:
      sized = ml_collections.ConfigDict(config.to_dict())
      sized.data.eval_image_size = size
    for mirror in (False, True) if flip else (False,):
      layers, view_labels = extract_features(
        model, variables, sized, split, batch_size=batch_size, depths=depths, mirror=mirror
      )
      if labels is None:
        total, labels = {d: x.astype(np.float64) for d, x in layers.items()}, view_labels
      elif not np.array_equal(labels, view_labels):
        raise ValueError(
          f"{split}: the view at size {size}, mirror {mirror} read other examples than the first "
          "view (a file failed to decode in one pass); cannot average the views."
        )
      else:
        total = {d: total[d] + x for d, x in layers.items()}
      views += 1
  return {d: (x / views).astype(np.float32) for d, x in total.items()}, labels
