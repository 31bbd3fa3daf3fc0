"""SimCLR network: ResNet encoder f (He et al. 2016), projection head g (SimCLR §2.1, §B.1).

h = f(x) is the pooled ResNet output, z = g(h) feeds the contrastive loss; the probe reads h or
any head layer (§4.2, Fig. 8). Convolution and max-pool are injected: flax's by default, or
`cpu_kernels.make_ops`'s faster CPU ops with the same values.

    model = build_model(config.model, image_size=32, axis_name="batch")
    variables = model.init(key, images, train=False)  # {'params', 'batch_stats'}
    z, aux = model.apply(variables, images, train=True, mutable=["batch_stats"])[0]  # in pmap
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from simclr_jax.data import resolution

ModuleDef = Any
Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def stem_max_pool(x: jnp.ndarray) -> jnp.ndarray:
  """Stem 3x3/2 max-pool, pad 1 (He et al. 2016): [N, H, W, C] -> [N, ceil(H/2), ceil(W/2), C]."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _batch_norm(module: nn.Module, train: bool) -> ModuleDef:
  """BN with `module`'s momentum, epsilon, dtype and axis name; batch statistics iff `train`."""
  stats = dict(momentum=module.bn_momentum, epsilon=module.bn_epsilon, axis_name=module.axis_name)
  return functools.partial(nn.BatchNorm, use_running_average=not train, dtype=module.dtype, **stats)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions plus shortcut (He et al. 2016, §3.3, Fig. 5 left).

  Shortcut: identity when shapes match, else a strided 1x1 convolution with BN (option B). The
  last BN's scale starts at zero: at init the block is relu(shortcut(x)) (Goyal et al. 2017, §5.1).
  `conv` and `norm` are partials (no bias, dtype, BN mode set); `strides` is 1 or 2.
  """

  expansion: ClassVar[int] = 1
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Maps [N, H, W, C_in] to [N, H/strides, W/strides, filters], compute dtype."""
    y = self.conv(self.filters, (3, 3), strides=self.strides, padding=1, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), strides=1, padding=1, name="conv2")(y)
    y = self.norm(scale_init=nn.initializers.zeros, name="bn2")(y)
    return nn.relu(_shortcut(x, y.shape[-1], self.strides, self.conv, self.norm) + y)


class BottleneckBlock(BasicBlock):
  """1x1, 3x3 (strided, as in SimCLR's and torchvision's), 1x1 x4 convolutions plus shortcut
  (He et al. 2016, Fig. 5 right); shortcut and last BN as in `BasicBlock`."""

  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Maps [N, H, W, C_in] to [N, H/strides, W/strides, 4 * filters], compute dtype."""
    y = self.conv(self.filters, (1, 1), strides=1, padding=0, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), strides=self.strides, padding=1, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(self.filters * self.expansion, (1, 1), strides=1, padding=0, name="conv3")(y)
    y = self.norm(scale_init=nn.initializers.zeros, name="bn3")(y)
    return nn.relu(_shortcut(x, y.shape[-1], self.strides, self.conv, self.norm) + y)


def _shortcut(x, features, strides, conv, norm):
  if x.shape[-1] == features and strides == 1:
    return x
  x = conv(features, (1, 1), strides=strides, padding=0, name="shortcut_conv")(x)
  return norm(name="shortcut_bn")(x)


class ResNet(nn.Module):
  """ResNet encoder, post-activation blocks, no classifier (He et al. 2016; SimCLR §B.1, §B.9).

  Stage i (1-based) has `stage_sizes[i-1]` blocks of `base_filters * 2**(i-1)` filters; stages
  2-4 halve the resolution in their first block. The ImageNet stem is a 7x7/2 convolution and a
  3x3/2 max-pool (4x downsampling); the CIFAR stem one 3x3/1 convolution, no pool (SimCLR §B.9).
  Each stage's output is sown into the 'intermediates' collection as `stage{i}`.

  Attributes:
    stage_sizes, block_cls: blocks per stage (ResNet-18: (2, 2, 2, 2)) and their class.
    num_filters: first-stage filters before the width multiplier.
    width_multiplier: scales every layer's width (SimCLR §B.4, ResNet-50 (2x), (4x)); > 0.
    cifar_stem: use the CIFAR stem instead of the ImageNet stem.
    dtype: compute dtype; parameters and BN statistics stay float32.
    bn_momentum, bn_epsilon: BN's running-average decay and variance offset.
    axis_name: mapped axis over which BN statistics are averaged (SimCLR §2.3), or None.
    conv: called like `nn.Conv(features, kernel_size, strides=, padding=, use_bias=False,
      dtype=, name=)`; max_pool: as `stem_max_pool`. Injected for speed only.
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_filters: int = 64
  width_multiplier: float = 1.0
  cifar_stem: bool = False
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = None
  conv: ModuleDef = nn.Conv
  max_pool: Callable[[jnp.ndarray], jnp.ndarray] = stem_max_pool

  @property
  def base_filters(self) -> int:
    """Filters of the stem and of the first stage: max(1, int(num_filters * width_multiplier))."""
    return max(1, int(self.num_filters * self.width_multiplier))

  @property
  def feature_dim(self) -> int:
    """Width C of h: base_filters * 8 * block expansion (512 * wm basic, 2048 * wm bottleneck)."""
    return self.base_filters * 2 ** (len(self.stage_sizes) - 1) * self.block_cls.expansion

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """Images float [N, H, W, 3] -> h float32 [N, feature_dim]; `train`: BN on batch statistics."""
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
    norm = _batch_norm(self, train)
    k, s = (3, 1) if self.cifar_stem else (7, 2)
    x = conv(self.base_filters, (k, k), strides=s, padding=k // 2, name="stem_conv")(x)
    x = nn.relu(norm(name="stem_bn")(x))
    if not self.cifar_stem:
      x = self.max_pool(x)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        name = f"stage{i + 1}_block{j + 1}"
        x = self.block_cls(self.base_filters * 2**i, conv, norm, strides, name=name)(x)
      self.sow("intermediates", f"stage{i + 1}", x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


RESNET_STAGES: dict[int, tuple[ModuleDef, tuple[int, ...]]] = {
  18: (BasicBlock, (2, 2, 2, 2)),
  34: (BasicBlock, (3, 4, 6, 3)),
  50: (BottleneckBlock, (3, 4, 6, 3)),
  101: (BottleneckBlock, (3, 4, 23, 3)),
  152: (BottleneckBlock, (3, 8, 36, 3)),
}
"""Depth -> (block class, blocks per stage), He et al. 2016, Table 1."""

RESNETS = {
  depth: functools.partial(ResNet, block_cls=block, stage_sizes=sizes)
  for depth, (block, sizes) in RESNET_STAGES.items()
}


class ProjectionHead(nn.Module):
  """MLP projection head g (SimCLR §2.1, Fig. 8): Dense -> [BN] -> ReLU, the last without ReLU.

  Attributes:
    num_layers: L >= 1 Dense layers.
    hidden_dim, output_dim: width of layers 1 .. L-1, and of layer L (the projection z).
    batch_norm: BN after every Dense layer.
    use_bias: bias on the Dense layers (redundant, and off in the SimCLR preset, when BN follows).
    last_bn_center: learned BN shift on layer L (the tf2 code has none); hidden BNs have one.
    kernel_init: Dense kernel initialiser.
    dtype, bn_momentum, bn_epsilon, axis_name: as in `ResNet`.
  """

  num_layers: int = 2
  hidden_dim: int = 2048
  output_dim: int = 128
  batch_norm: bool = True
  use_bias: bool = False
  last_bn_center: bool = False
  kernel_init: Callable = nn.initializers.normal(0.01)
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = None

  @nn.compact
  def __call__(self, h: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, ...]:
    """Maps h, float [N, C], to L >= 1 float32 outputs: [N, hidden_dim] per hidden layer, then z."""
    dense = functools.partial(
      nn.Dense, use_bias=self.use_bias, kernel_init=self.kernel_init, dtype=self.dtype
    )
    x, outputs = jnp.asarray(h, self.dtype), []
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = dense(self.output_dim if last else self.hidden_dim, name=f"dense{i + 1}")(x)
      if self.batch_norm:
        center = self.last_bn_center or not last
        x = _batch_norm(self, train)(use_bias=center, name=f"bn{i + 1}")(x)
      if not last:
        x = nn.relu(x)
      outputs.append(x.astype(jnp.float32))
    return tuple(outputs)


HEAD_PRESETS: dict[str, dict[str, Any]] = {
  # tf2 code: Dense kernels ~ N(0, 0.01^2), no Dense bias, BN everywhere, no shift on z.
  "simclr": dict(batch_norm=True, use_bias=False, kernel_init=nn.initializers.normal(0.01)),
  # The PyTorch original's head: a plain MLP (512-100-100-100 on ResNet-18).
  "pytorch_original": dict(
    batch_norm=False, use_bias=True, kernel_init=nn.initializers.lecun_normal()
  ),
}
"""`model.head.preset` -> `ProjectionHead` fields other than the sizes."""


class SimCLRModel(nn.Module):
  """Encoder f (h float32 [N, C]) then projection head g (SimCLR §2.1), as sub-trees 'encoder'
  and 'head'; `ResNet` and `ProjectionHead` here, any modules taking (x, train=) in general."""

  encoder: nn.Module
  head: nn.Module

  def __call__(self, images: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, dict[str, Any]]:
    """Images float [N, H, W, 3] -> (z float32 [N, output_dim], aux); `train`: BN mode.

    aux: {'features': h float32 [N, C], 'head_layers': every head layer's float32 output, z last}.
    """
    h = self.encoder(images, train=train).astype(jnp.float32)
    layers = tuple(y.astype(jnp.float32) for y in self.head(h, train=train))
    return layers[-1], {"features": h, "head_layers": layers}

  def encode(self, images: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Encoder only: h float32 [N, C]. Use with `apply(..., method=SimCLRModel.encode)`."""
    return self.encoder(images, train=train).astype(jnp.float32)


def _check_choice(field: str, value: Any, choices) -> None:
  if value not in choices:
    raise ValueError(f"{field}={value!r} is not one of {sorted(choices)}")


def feature_dim(model_config: ml_collections.ConfigDict) -> int:
  """Width C of the encoder features h for a `config.model` section; ValueError: bad depth."""
  _check_choice("model.depth", model_config.depth, RESNETS)
  block_cls, stage_sizes = RESNET_STAGES[model_config.depth]
  return ResNet(stage_sizes, block_cls, width_multiplier=model_config.width_multiplier).feature_dim


def build_model(
  model_config: ml_collections.ConfigDict,
  *,
  image_size: int,
  axis_name: str | None = None,
  ops: Any = None,
) -> SimCLRModel:
  """Builds the SimCLR model described by a `config.model` section (configs/default.py).

  Args:
    model_config: fields depth (18, 34, 50, 101, 152), width_multiplier (> 0), cifar_stem (bool,
      or None: `resolution.uses_cifar_stem`), dtype ('float32' or 'bfloat16'), bn_momentum,
      bn_epsilon, head.preset ('simclr' or 'pytorch_original'), head.num_layers (>= 1),
      head.hidden_dim (0: the feature width C), head.output_dim. Other fields are ignored.
    image_size: side in px of the training images.
    axis_name: pmap/shard_map axis over which BN statistics are synchronised, or None.
    ops: `conv` and `max_pool` to inject (`cpu_kernels.make_ops`); None: flax's. Speed only.

  Returns an unbound `SimCLRModel`.

  Raises:
    ValueError: naming the field, for an unknown depth, dtype or head preset, a non-positive
      width multiplier or fewer than one head layer.
  """
  _check_choice("model.depth", model_config.depth, RESNETS)
  _check_choice("model.dtype", model_config.dtype, DTYPES)
  head_config = model_config.head
  _check_choice("model.head.preset", head_config.preset, HEAD_PRESETS)
  if not model_config.width_multiplier > 0:
    raise ValueError(f"model.width_multiplier={model_config.width_multiplier!r} must be > 0")
  if head_config.num_layers < 1:
    raise ValueError(f"model.head.num_layers={head_config.num_layers!r} must be >= 1")
  m = model_config
  cifar_stem = resolution.uses_cifar_stem(m.cifar_stem, image_size)
  bn = dict(
    bn_momentum=m.bn_momentum, bn_epsilon=m.bn_epsilon, dtype=DTYPES[m.dtype], axis_name=axis_name
  )
  injected = {} if ops is None else dict(conv=ops.conv, max_pool=ops.max_pool)
  encoder = RESNETS[m.depth](
    width_multiplier=m.width_multiplier, cifar_stem=cifar_stem, **injected, **bn
  )
  head = ProjectionHead(
    num_layers=head_config.num_layers,
    hidden_dim=head_config.hidden_dim or encoder.feature_dim,
    output_dim=head_config.output_dim,
    **HEAD_PRESETS[head_config.preset],
    **bn,
  )
  return SimCLRModel(encoder=encoder, head=head)
