"""One process of tests/test_multiprocess.py's views-and-features check (and its one-process twin).

    python tests/multiprocess_worker.py OUT_DIR DATA_ROOT COORDINATOR NUM_PROCESSES PROCESS_ID

Each process, with 2 CPU devices, writes `OUT_DIR/views<PROCESS_ID>.npz`: the first pretraining
batch of `configs/tiny.py` on DATA_ROOT as this process reads it (each example's index in the
global batch, its two crops) and the two views `train.augment_step_views` makes of them on the
devices; process 0 also writes `OUT_DIR/features.npz`, the probe's features of the train split
(`features.extract_features`, a freshly initialised model) gathered from all processes. The test
computes the same in one process (`first_batch_views`, `train_features`) and compares.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import tiny  # noqa: E402
from simclr_jax import models, parallel, train  # noqa: E402
from simclr_jax.data import pipeline  # noqa: E402
from simclr_jax.probe import features  # noqa: E402

STEP = 3  # any step: its index is folded into every key


def config_for(data_root: str):
  config = tiny.get_config()
  config.data.root = data_root
  return config


def first_batch_views(config, devices=None) -> dict[str, np.ndarray]:
  """The first batch's example ids, crops and augmented views on `devices` (default: all).

  In one process, `devices` may be fewer than the local devices: the batch is regrouped over
  them, as a run on that many devices would hold it. Returns host arrays with the local examples
  along the first axis: `example_id` int32 [n], `crop1`, `crop2`, `view1`, `view2` float32
  [n, S, S, 3].
  """
  batch = jax.device_get(next(pipeline.create_pretrain_iterator(config, seed=config.seed)))
  if devices is not None:
    batch = {k: v.reshape(len(devices), -1, *v.shape[2:]) for k, v in batch.items()}
  rng = jax.random.PRNGKey(1)
  views = jax.pmap(
    lambda b: train.augment_step_views(config, rng, STEP, b),
    axis_name=parallel.AXIS_NAME,
    devices=devices,
  )(batch)
  flat = {k: np.reshape(v, (-1, *np.shape(v)[2:])) for k, v in batch.items()}
  view1, view2 = (np.reshape(jax.device_get(v), (-1, *v.shape[2:])) for v in views)
  return {
    "example_id": flat["example_id"],
    "crop1": flat["view1"],
    "crop2": flat["view2"],
    "view1": view1,
    "view2": view2,
  }


def train_features(config) -> tuple[np.ndarray, np.ndarray]:
  """h of every train image, float32 [N, D], and the labels int32 [N], on every host's devices."""
  size = config.data.image_size
  model = models.build_model(config.model, image_size=size)
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((2, size, size, 3)), train=False))(
    jax.random.PRNGKey(0)
  )
  layers, labels = features.extract_features(model, variables, config, "train", batch_size=8)
  return layers[0], labels


def main(out_dir, data_root, coordinator, num_processes, process_id):
  jax.config.update("jax_num_cpu_devices", 2)
  jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
  config = config_for(data_root)
  np.savez(os.path.join(out_dir, f"views{process_id}.npz"), **first_batch_views(config))
  h, labels = train_features(config)
  if jax.process_index() == 0:
    np.savez(os.path.join(out_dir, "features.npz"), h=h, labels=labels)


if __name__ == "__main__":
  main(*sys.argv[1:])
