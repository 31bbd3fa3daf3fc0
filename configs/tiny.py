"""Tiny runs for tests and CI: ResNet-18 at 1/8 width on 32 px crops, batch 16, 2 epochs.

    python run_pretrain.py --config configs/tiny.py --workdir /tmp/tiny \
        --config.data.root=../shared/data/cifar10-jpg-mini

Any small image folder works as the root. Result: none to report; it checks that pretraining,
checkpoints and the probe run end to end.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.batch_size = 16
  config.num_epochs = 2
  config.temperature = 0.5
  config.checkpoint_every_epochs = 1
  config.log_every_steps = 1
  config.plot_every_steps = 5
  config.data.image_size = 32
  config.data.shuffle_buffer = 256
  config.model.depth = 18
  config.model.width_multiplier = 0.125  # 8 filters in the first stage
  config.model.head.hidden_dim = 32
  config.model.head.output_dim = 16
  config.optim.name = "adam"
  config.optim.base_lr = 1e-3
  config.optim.lr_scaling = "none"
  config.optim.warmup_epochs = 0
  config.augment.view1.blur_prob = 0.0
  config.augment.view2.blur_prob = 0.0
  config.augment.local_view.blur_prob = 0.0
  return config
