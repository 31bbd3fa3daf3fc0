"""The main job: SimCLR on imagenet-5-categories (1250 unlabelled images), sized for a 2-core CPU.

    python run_pretrain.py --config configs/imagenet5.py --workdir runs/imagenet5
    python run_linear.py --workdir runs/imagenet5 --num_draws 20
    python run_linear.py --workdir runs/imagenet5 --num_draws 20 --label_fraction 0.2 \
        --output_dir runs/imagenet5/linear_250

ResNet-18 on 64 px random-resized crops covering 20-100% of the image, cut from images cached at
a shorter side of 128 px so that few crops are upsampled (blurrier than the probe's view); batch
128, LARS 0.075 x sqrt(B) (SimCLR Appendix B.1), temperature 0.5 and no blur, as the CIFAR recipe
for low resolution (§B.9); 500 epochs. The probe reads whole images at 128 px: random-resized
crops magnify objects, so a larger test view matches what the encoder saw (Touvron et al. 2019,
FixRes); the size was chosen by cross-validation on the labelled images, not on the test split.

Result: the README's results table (linear probe on h, 20 label draws; docs/experiments.md).

The data root defaults to ../shared/data/imagenet-5-categories beside the repository; pass
`--config.data.root=PATH` for another copy (README, Data).
"""

import os

from configs import default

DATA_ROOT = os.path.abspath(
  os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "imagenet-5-categories")
)


def get_config():
  config = default.get_config()
  config.data.root = DATA_ROOT
  config.data.image_size = 64
  config.data.cache = True
  config.data.cache_shorter_side = 128
  config.batch_size = 128
  config.data.eval_image_size = 128
  config.data.eval_crop_fraction = 1.0
  config.num_epochs = 500
  config.temperature = 0.5
  config.checkpoint_every_epochs = 20
  config.keep_checkpoints = 15
  config.log_every_steps = 9
  config.plot_every_steps = 90
  config.model.depth = 18
  config.runtime.conv_impl = "auto"  # oneDNN if installed ('.[cpu-kernels]'), else XLA
  config.optim.name = "lars"
  config.optim.lr_scaling = "sqrt"  # small batches: 0.075 x sqrt(B) (SimCLR Appendix B.1)
  config.optim.base_lr = 0.075
  config.optim.weight_decay = 1e-6
  config.optim.warmup_epochs = 10
  config.augment.crop_area = (0.2, 1.0)  # SimCLR's (0.08, 1) upsamples more crops of the cache
  for view in (config.augment.view1, config.augment.view2, config.augment.local_view):
    view.blur_prob = 0.0  # low resolution, as the CIFAR recipe
  return config
