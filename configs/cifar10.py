"""The published CIFAR-10 recipe (SimCLR §B.9; official README): ResNet-18, CIFAR stem, 1000 epochs.

Batch 512, LARS 1.0 x B/256, temperature 0.5, colour jitter 0.5, no blur. The images: CIFAR-10 as
JPEG folders (unpack ../shared/data/cifar10-jpg.tar.gz outside the repository; README, Data):

    python run_pretrain.py --config configs/cifar10.py --workdir runs/cifar10 \
        --config.data.root=/tmp/cifar10-jpg
    python run_linear.py --workdir runs/cifar10 --label_fraction 1.0

or TFDS's cifar10 from a local data directory:
`--config.data.source=tfds --config.data.tfds_name=cifar10 --config.data.tfds_data_dir=DIR`.

Result: none yet.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.batch_size = 512
  config.num_epochs = 1000
  config.temperature = 0.5
  config.checkpoint_every_epochs = 50
  config.data.image_size = 32
  config.data.cache = True
  config.data.cache_shorter_side = 32
  config.model.depth = 18
  config.model.cifar_stem = True
  config.optim.name = "lars"
  config.optim.base_lr = 1.0  # x 512/256 = 2.0
  config.optim.weight_decay = 1e-4
  config.optim.warmup_epochs = 10
  for view in (config.augment.view1, config.augment.view2, config.augment.local_view):
    view.color_jitter_strength = 0.5
    view.blur_prob = 0.0
  return config
