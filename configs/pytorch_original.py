"""The PyTorch original's settings (thunderInfy/simclr): ResNet-18 at 224 px, batch 250, Adam.

Temperature 0.05, Adam 1e-3 (weight decay 1e-4, constant rate), head 512-100-100-100 with ReLU
and no batch norm, no flip, no blur, 1000 epochs on imagenet-5-categories: to compare with the
project this grew from on its own terms.

    python run_pretrain.py --config configs/pytorch_original.py --workdir runs/pytorch_original
    python run_linear.py --workdir runs/pytorch_original --label_fraction 0.2 --probe_c 1.0

Result: not run to the end here (a GPU-sized job); the original reports 72.80% with 250 labels
(docs/experiments.md).
"""

from configs import default, imagenet5


def get_config():
  config = default.get_config()
  config.data.root = imagenet5.DATA_ROOT
  config.data.image_size = 224
  config.data.cache = True
  config.data.cache_shorter_side = 256
  config.batch_size = 250
  config.num_epochs = 1000
  config.temperature = 0.05
  config.checkpoint_every_epochs = 10
  config.log_every_steps = 1
  config.model.depth = 18
  config.model.head.preset = "pytorch_original"
  config.model.head.num_layers = 3
  config.model.head.hidden_dim = 100
  config.model.head.output_dim = 100
  config.optim.name = "adam"
  config.optim.base_lr = 1e-3
  config.optim.lr_scaling = "none"
  config.optim.schedule = "constant"
  config.optim.weight_decay = 1e-4
  config.optim.warmup_epochs = 0
  for view in (config.augment.view1, config.augment.view2, config.augment.local_view):
    view.flip_prob = 0.0
    view.blur_prob = 0.0
  return config
