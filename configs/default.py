"""The paper's recipe: ResNet-50, 224 px, batch 4096, LARS, temperature 0.1 (SimCLR §B.1, tf2 code).

    python run_pretrain.py --config configs/default.py --workdir /tmp/simclr \
        --config.data.root=/path/to/imagefolder

Result: none yet in this project (it needs accelerators); every other config starts from it.
"""

import ml_collections


def view_augment(blur_prob: float = 0.5, solarize_prob: float = 0.0) -> ml_collections.ConfigDict:
  """Per-view augmentation settings (SimCLR Appendix A); BYOL-style asymmetry by differing views."""
  return ml_collections.ConfigDict(
    dict(
      flip_prob=0.5,
      color_jitter_prob=0.8,
      color_jitter_strength=1.0,
      grayscale_prob=0.2,
      blur_prob=blur_prob,
      blur_sigma=(0.1, 2.0),
      solarize_prob=solarize_prob,
      solarize_threshold=0.5,
    )
  )


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 4096  # global, both views of one image count once
  config.num_epochs = 100
  config.temperature = 0.1
  config.checkpoint_every_epochs = 10
  config.keep_checkpoints = 3
  config.log_every_steps = 50
  config.plot_every_steps = 200

  config.data = ml_collections.ConfigDict()
  config.data.source = "folder"  # "folder": root/{train,test}/<class>/<image>; "tfds": by name
  config.data.root = ""
  config.data.tfds_name = ""
  config.data.tfds_data_dir = ""
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.image_size = 224
  config.data.cache = False  # decode once into memory
  config.data.cache_shorter_side = 256  # px; cached images are shrunk to this shorter side
  config.data.shuffle_buffer = 10_000  # TFDS streams only; image lists are permuted in full
  config.data.check_files = True  # decode every file once at start; report and skip bad ones
  config.data.eval_crop_fraction = 0.875
  config.data.eval_image_size = 0  # px of the probe's test view; 0: the last crop size (see FixRes)
  # Progressive resizing: the last `final_size_epochs` epochs crop at `final_image_size` px, cut
  # from images cached at `final_cache_shorter_side` (0: cache_shorter_side). One run: the same
  # schedule, model (its stem follows image_size) and checkpoints; resuming in either phase picks
  # the right size; a second cache side keeps both caches in host memory. 0 epochs: off.
  config.data.final_size_epochs = 0
  config.data.final_image_size = 0
  config.data.final_cache_shorter_side = 0
  config.data.prefetch = 2

  config.augment = ml_collections.ConfigDict()
  config.augment.enabled = True
  config.augment.crop_area = (0.08, 1.0)
  config.augment.crop_aspect_ratio = (3 / 4, 4 / 3)
  config.augment.normalize = False  # ImageNet mean/std after the colour ops
  config.augment.view1 = view_augment()
  config.augment.view2 = view_augment()
  # Multi-crop (SwAV §3.2): besides the two global crops, each image gets `num` small local
  # random-resized crops (aspect ratio from crop_aspect_ratio), every view a positive of the
  # others (losses.nt_xent_multi).
  config.augment.local_crops = ml_collections.ConfigDict()
  config.augment.local_crops.num = 0  # local crops per image; 0: off, the two views alone
  config.augment.local_crops.size = 32  # px, side of each local crop
  config.augment.local_crops.crop_area = (0.05, 0.2)  # area range, fraction of the image
  config.augment.local_view = view_augment()  # the local crops' flip, colour, grayscale, blur

  config.model = ml_collections.ConfigDict()
  config.model.depth = 50  # 18, 34, 50, 101, 152
  config.model.width_multiplier = 1.0
  config.model.cifar_stem = ml_collections.FieldReference(None, field_type=bool)  # None: auto
  config.model.dtype = "float32"  # compute dtype; parameters stay float32
  config.model.bn_momentum = 0.9
  config.model.bn_epsilon = 1e-5
  config.model.head = ml_collections.ConfigDict()
  config.model.head.preset = "simclr"  # "simclr": Dense+BN layers, last 128-d, no bias/ReLU
  config.model.head.num_layers = 2
  config.model.head.hidden_dim = 0  # 0: the encoder's feature width
  config.model.head.output_dim = 128

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "lars"  # "lars", "sgd", "adam", "adamw"
  config.optim.base_lr = 0.3
  config.optim.lr_scaling = "linear"  # "linear": base*B/256; "sqrt": base*sqrt(B); "none"
  config.optim.weight_decay = 1e-6
  config.optim.momentum = 0.9
  config.optim.trust_coefficient = 1e-3
  config.optim.warmup_epochs = 10
  config.optim.schedule = "warmup_cosine"  # or "constant"

  # How to run, not what is learned: not part of the model's identity, so a checkpoint resumes
  # and is probed under any runtime (simclr_jax/cpu_kernels).
  config.runtime = ml_collections.ConfigDict()
  # "xla": XLA's convolutions (on the CPU through cpu_kernels' faster equivalents); "onednn":
  # oneDNN's (CPU; installed by pip install '.[cpu-kernels]'); "auto": oneDNN where it can run,
  # else XLA; "flax": flax's own nn.Conv and nn.max_pool.
  config.runtime.conv_impl = "xla"
  # Images per chunk of the convolutions' backward pass; None: 32 on the CPU, else the batch.
  config.runtime.conv_grad_chunk = ml_collections.FieldReference(None, field_type=int)
  # JAX devices to split a CPU-only host into (jax_num_cpu_devices; set before JAX starts): the
  # step is pmapped over them as over GPUs. 0: JAX's default. Accelerators ignore it.
  config.runtime.num_cpu_devices = 0
  return config
