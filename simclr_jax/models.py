"""SimCLR network: a ResNet v1 encoder f and a projection head g (SimCLR §2.1, §B.1).

The encoder maps an image to its representation h = f(x) (global-average-pooled ResNet output);
the head maps h to the projection z = g(h) fed to the contrastive loss. Linear evaluation reads h
(or any head layer, SimCLR §4.2, Fig. 8), so the model returns both.

    model = build_model(config.model, image_size=32, axis_name="batch")
    variables = model.init(key, images, train=False)  # {'params', 'batch_stats'}
    # train=True syncs BN over `axis_name`, so it runs inside jax.pmap(..., axis_name="batch")
    z, aux = model.apply(variables, images, train=True, mutable=["batch_stats"])[0]
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from simclr_jax import onednn

ModuleDef = Any
Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CONV_IMPLS = ("xla", "onednn", "auto")
"""model.conv_impl: XLA's convolutions, oneDNN's through FFI (`onednn.conv2d`), or "auto": oneDNN
where it can run (CPU backend, float32, the library builds), else XLA (`resolve_conv_impl`)."""


# Images per chunk of the convolutions' backward pass on CPU. Measured on a 2-core CPU
# (docs/benchmarks.md): XLA's kernel gradient of a 3x3x64x64 convolution over 256 maps of 16x16
# took 168 ms in one piece and 71 ms as eight chunks of 32, the ImageNet stem's 156 -> 97 ms;
# a backward pass in chunks of 32 was never slower than in one piece for any ResNet-18 layer at
# 64 or 96 px (chunking the forward pass did not help, so it stays whole).
CPU_GRAD_CHUNK = 32
# At most this many chunks per convolution: the chunk loop is unrolled in the compiled step, so
# very large per-device batches get bigger chunks rather than ever longer compiles.
MAX_GRAD_CHUNKS = 16


def default_grad_chunk() -> int:
  """`CPU_GRAD_CHUNK` on the CPU backend, else 0 (whole batch: accelerators want big kernels)."""
  return CPU_GRAD_CHUNK if jax.default_backend() == "cpu" else 0


_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(
    x, kernel, (stride, stride), ((padding, padding),) * 2, dimension_numbers=_CONV_DIMS
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: int, grad_chunk: int):
  """2-D convolution (cross-correlation, as in every deep-learning library) with a chunked backward.

  The forward pass is XLA's convolution. The backward pass is XLA's too (its transposes of the
  convolution), but run separately on consecutive chunks of images: the input gradient is their
  concatenation, the kernel gradient their sum (each chunk's part in the kernel's dtype, the sum
  in float32). Same mathematics as the unchunked gradient; only the summation order of the kernel
  gradient differs. On CPU, XLA's kernel gradient slows down more than linearly with the batch
  (cache), so chunks are up to 2.4x faster (`CPU_GRAD_CHUNK`; measurements in
  docs/benchmarks.md, "Session 3").

  Args:
    x: float [N, H, W, C_in].
    kernel: float [kh, kw, C_in, C_out], same dtype as x.
    stride: static int >= 1, the same in both spatial dimensions.
    padding: static int >= 0, zeros on each side of both spatial dimensions.
    grad_chunk: static int, images per chunk of the backward pass; <= 0 or >= N: the whole batch
      at once. Raised to ceil(N / `MAX_GRAD_CHUNKS`) if smaller.

  Returns:
    [N, (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1, C_out], dtype
    of x.
  """
  return _conv(x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding, grad_chunk):
  return _conv(x, kernel, stride, padding), (x, kernel)


def _conv_transposes(x, kernel, g, stride, padding):
  """(dL/dx, dL/dkernel) for cotangent g: the convolution is linear in each operand, so its
  gradients are its transposes (XLA's input- and kernel-gradient convolutions)."""
  (dx,) = jax.linear_transpose(lambda x_: _conv(x_, kernel, stride, padding), x)(g)
  (dkernel,) = jax.linear_transpose(lambda k_: _conv(x, k_, stride, padding), kernel)(g)
  return dx, dkernel


def _conv2d_bwd(stride, padding, grad_chunk, residuals, g):
  x, kernel = residuals
  n = x.shape[0]
  step = max(grad_chunk, -(-n // MAX_GRAD_CHUNKS)) if 0 < grad_chunk < n else max(n, 1)
  parts = [
    _conv_transposes(x[i : i + step], kernel, g[i : i + step], stride, padding)
    for i in range(0, n, step)
  ]
  dkernel = sum(dk.astype(jnp.float32) for _, dk in parts)
  return jnp.concatenate([dx for dx, _ in parts]), dkernel.astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def small_map_conv_matrix(
  kernel: jnp.ndarray, input_hw: tuple[int, int], stride: int, padding: int
) -> jnp.ndarray:
  """The dense matrix of a zero-padded 2-D convolution on maps of ``input_hw``.

  ``out[n, ho, wo, :] = sum_{hi, wi} x[n, hi, wi, :] @ kernel[hi - stride*ho + padding,
  wi - stride*wo + padding]`` over the taps inside the kernel (the rest read padding), so
  ``conv(x) = x.reshape(N, -1) @ matrix`` reshaped to ``[N, H_out, W_out, C_out]``. Built as one
  contraction of the kernel with 0/1 tap-selection matrices (no gather, so the kernel gradient is a
  contraction too). Worth it only for tiny maps: the matrix has ``(H*W*C_in) x (H_out*W_out*C_out)``
  entries (a 3x3x512x512 kernel on 2x2 maps: 2048 x 2048).

  Args:
    kernel: float [kh, kw, C_in, C_out].
    input_hw: static (H, W) of the input maps.
    stride, padding: static ints, as in `conv2d`.

  Returns:
    [H * W * C_in, H_out * W_out * C_out], dtype of kernel; rows ordered (h, w, c_in), columns
    (h_out, w_out, c_out), matching row-major reshapes of NHWC arrays.
  """
  kh, kw, c_in, c_out = kernel.shape
  h_in, w_in = input_hw
  out_h = (h_in + 2 * padding - kh) // stride + 1
  out_w = (w_in + 2 * padding - kw) // stride + 1
  # select[i, j, hi, wi, ho, wo] = 1 where input pixel (hi, wi) meets tap (i, j) of output (ho, wo).
  rows = np.arange(h_in)[:, None] - stride * np.arange(out_h)[None, :] + padding  # [H, H_out]
  cols = np.arange(w_in)[:, None] - stride * np.arange(out_w)[None, :] + padding  # [W, W_out]
  select_h = rows[None] == np.arange(kh)[:, None, None]  # [kh, H, H_out]
  select_w = cols[None] == np.arange(kw)[:, None, None]  # [kw, W, W_out]
  select = np.einsum("iab,jcd->ijacbd", select_h, select_w).astype(np.float32)
  matrix = jnp.einsum(
    "ijacbd,ijkl->ackbdl",
    jnp.asarray(select, kernel.dtype),
    kernel,
    precision=jax.lax.Precision.HIGHEST,
  )
  return matrix.reshape(h_in * w_in * c_in, out_h * out_w * c_out)


class Conv(nn.Module):
  """2-D convolution without bias, NHWC, symmetric zero padding; drop-in for `nn.Conv` here.

  Same parameter (`kernel`, [kh, kw, C_in, features], LeCun-normal init) and the same result as
  `nn.Conv(features, kernel_size, strides, padding, use_bias=False)`. When the output is at most
  2x2, XLA's CPU convolution takes ~90x longer (measured: 3x3x512 conv on 256 maps of 2x2, 2.2 s vs
  0.025 s), so the convolution is computed as matrix products instead: one product with the
  convolution's dense matrix (`small_map_conv_matrix`) when the input has fewer pixels than the
  kernel has taps (a 3x3 kernel on 2x2 maps: 16 input-output pixel pairs, not 36 tap products of
  which 20 read padding), else a sum of kh*kw shifted products. Otherwise the backward pass may
  run over chunks of `grad_chunk` images (see `conv2d`).
  """

  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: int = 0
  dtype: Dtype = jnp.float32
  use_bias: bool = False  # accepted for nn.Conv compatibility; must be False
  grad_chunk: int | None = None  # see `conv2d`; None: `default_grad_chunk()`
  impl: str = "xla"  # "onednn": `onednn.conv2d` where XLA's path is used (grad_chunk ignored);
  # anything else is XLA's ("auto" is decided by `build_model` before it gets here)

  @nn.compact
  def __call__(self, x):
    """x: float [N, H, W, C_in] -> [N, H', W', features] in the compute dtype."""
    assert not self.use_bias
    kh, kw = self.kernel_size
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features)
    )
    x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
    s, p = self.strides, self.padding
    out_h = (x.shape[1] + 2 * p - kh) // s + 1
    out_w = (x.shape[2] + 2 * p - kw) // s + 1
    if max(out_h, out_w) > 2 or kh * kw == 1:
      if self.impl == "onednn":
        return onednn.conv2d(x, kernel, s, p)
      chunk = default_grad_chunk() if self.grad_chunk is None else self.grad_chunk
      return conv2d(x, kernel, s, p, chunk)
    n, h_in, w_in, _ = x.shape
    if h_in * w_in < kh * kw:
      matrix = small_map_conv_matrix(kernel, (h_in, w_in), s, p)
      return (x.reshape(n, -1) @ matrix).reshape(n, out_h, out_w, self.features)
    x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    out = 0
    for i in range(kh):
      for j in range(kw):
        tap = x[:, i : i + s * (out_h - 1) + 1 : s, j : j + s * (out_w - 1) + 1 : s, :]
        out = out + tap @ kernel[i, j]
    return out


def _max_pool_taps(x: jnp.ndarray):
  """The nine stride-2 windows' taps of a 3x3/2 max-pool with padding 1 (padding never wins)."""
  out_h, out_w = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  for i in range(3):
    for j in range(3):
      yield i, j, xp[:, i : i + 2 * out_h - 1 : 2, j : j + 2 * out_w - 1 : 2]


def _max_pool_fwd(x: jnp.ndarray):
  out = index = None
  for i, j, tap in _max_pool_taps(x):
    if out is None:
      out, index = tap, jnp.zeros(tap.shape, jnp.int8)
    else:
      wins = tap > out  # strict: ties go to the first tap in row-major window order
      out, index = jnp.where(wins, tap, out), jnp.where(wins, jnp.int8(3 * i + j), index)
  return out, (index, x.shape)


def _max_pool_bwd(residuals, g):
  index, (_, h, w, _) = residuals
  zero = jnp.zeros((), g.dtype)
  grad = 0
  for i in range(3):
    for j in range(3):
      routed = jnp.where(index == 3 * i + j, g, zero)
      # Tap (i, j) of output (y, x) read padded input (2y + i, 2x + j): spread with stride 2.
      grad = grad + jax.lax.pad(
        routed,
        zero,
        ((0, 0, 0), (i, 2 - i, 1), (j, 2 - j, 1), (0, 0, 0)),
      )
  return (grad[:, 1 : h + 1, 1 : w + 1],)


@jax.custom_vjp
def max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
  """The ImageNet stem's 3x3 max-pool, stride 2, padding 1 (He et al. 2016, Table 1).

  Same result as `nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))`; the gradient goes to the
  (first) maximum of each window, as a subgradient of max should. The difference is speed: XLA
  lowers max-pool's gradient to select-and-scatter, which is slow on CPU (docs/benchmarks.md);
  here the backward pass is nine masked, stride-2 spreads that XLA fuses into one loop.

  Args:
    x: float [N, H, W, C].

  Returns:
    [N, ceil(H / 2), ceil(W / 2), C], dtype of x.
  """
  return _max_pool_fwd(x)[0]


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions plus shortcut (He et al. 2016, §3.3, Fig. 5 left).

  The shortcut is the identity when shapes match, else a strided 1x1 convolution with BN
  (projection shortcut, option B). The last BN's scale starts at zero, so at init the block is
  relu(shortcut(x)) (Goyal et al. 2017, §5.1).

  Attributes:
    filters: output channels.
    strides: spatial stride of the first convolution and of the shortcut (1 or 2).
    conv: `nn.Conv` partial (no bias, compute dtype set).
    norm: `nn.BatchNorm` partial (train/eval mode, momentum, axis name set).
  """

  expansion: ClassVar[int] = 1
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Maps [N, H, W, C_in] to [N, H/strides, W/strides, filters], compute dtype."""
    y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), 1, padding=1, name="conv2")(y)
    y = self.norm(scale_init=nn.initializers.zeros, name="bn2")(y)
    return nn.relu(_shortcut(x, y.shape[-1], self.strides, self.conv, self.norm) + y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand (x4) convolutions plus shortcut (He et al. 2016, Fig. 5 right).

  The stride sits on the 3x3 convolution, as in the SimCLR and torchvision ResNets. Shortcut and
  zero-initialised last BN scale as in `BasicBlock`.

  Attributes:
    filters: channels of the 1x1 and 3x3 convolutions; the block outputs 4 * filters.
    strides: spatial stride of the 3x3 convolution and of the shortcut (1 or 2).
    conv: `nn.Conv` partial (no bias, compute dtype set).
    norm: `nn.BatchNorm` partial (train/eval mode, momentum, axis name set).
  """

  expansion: ClassVar[int] = 4
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Maps [N, H, W, C_in] to [N, H/strides, W/strides, 4 * filters], compute dtype."""
    y = self.conv(self.filters, (1, 1), 1, padding=0, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(self.filters * self.expansion, (1, 1), 1, padding=0, name="conv3")(y)
    y = self.norm(scale_init=nn.initializers.zeros, name="bn3")(y)
    return nn.relu(_shortcut(x, y.shape[-1], self.strides, self.conv, self.norm) + y)


def _shortcut(x, features, strides, conv, norm):
  if x.shape[-1] == features and strides == 1:
    return x
  x = conv(features, (1, 1), strides, padding=0, name="shortcut_conv")(x)
  return norm(name="shortcut_bn")(x)


class ResNet(nn.Module):
  """ResNet v1 encoder without the classifier (He et al. 2016; SimCLR §B.1, §B.9).

  Stage i (1-based) has `stage_sizes[i-1]` blocks of `base * 2**(i-1)` filters, with
  base = max(1, int(num_filters * width_multiplier)); stages 2-4 halve the resolution in their
  first block. The ImageNet stem is a 7x7/2 convolution and a 3x3/2 max-pool (4x downsampling);
  the CIFAR stem is one 3x3/1 convolution without max-pool (SimCLR §B.9). Each stage's output is
  sown into the 'intermediates' collection as `stage{i}`.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block_cls: `BasicBlock` or `BottleneckBlock`.
    num_filters: first-stage filters before the width multiplier.
    width_multiplier: scales every layer's width (SimCLR §B.4, ResNet-50 (2x), (4x)); > 0.
    cifar_stem: use the CIFAR stem instead of the ImageNet stem.
    dtype: compute dtype; parameters and BN statistics stay float32.
    bn_momentum: running-average decay of BN statistics.
    bn_epsilon: added to the BN variance.
    axis_name: mapped axis over which BN batch statistics are averaged (cross-device BN,
      SimCLR §2.3), or None for per-device statistics.
    conv_grad_chunk: images per chunk of the convolutions' backward pass (`conv2d`); None:
      `default_grad_chunk()`; 0: the whole batch. Changes speed only.
    conv_impl: "xla" (XLA's convolutions) or "onednn" (`onednn.conv2d`, float32 on CPU: faster
      on CPU, docs/benchmarks.md "Session 9"). Changes speed only, up to float32 rounding.
      `build_model` decides "auto" (`resolve_conv_impl`) before it gets here.
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
  conv_grad_chunk: int | None = None
  conv_impl: str = "xla"

  @property
  def base_filters(self) -> int:
    """Filters of the stem and of the first stage."""
    return max(1, int(self.num_filters * self.width_multiplier))

  @property
  def feature_dim(self) -> int:
    """Width C of h: base_filters * 8 * block expansion (512 * wm basic, 2048 * wm bottleneck)."""
    return self.base_filters * 2 ** (len(self.stage_sizes) - 1) * self.block_cls.expansion

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """Encodes images into representations h.

    Args:
      x: float [N, H, W, 3] images (any value range; the input pipeline sets it).
      train: BN uses (and updates) batch statistics if True, running statistics if False.

    Returns:
      h: float32 [N, feature_dim], the global average pool of the last stage.
    """
    conv = functools.partial(
      Conv,
      use_bias=False,
      dtype=self.dtype,
      grad_chunk=self.conv_grad_chunk,
      impl=self.conv_impl,
    )
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      axis_name=self.axis_name,
    )
    x = jnp.asarray(x, self.dtype)
    if self.cifar_stem:
      x = conv(self.base_filters, (3, 3), 1, padding=1, name="stem_conv")(x)
    else:
      x = conv(self.base_filters, (7, 7), 2, padding=3, name="stem_conv")(x)
    x = nn.relu(norm(name="stem_bn")(x))
    if not self.cifar_stem:
      x = max_pool_3x3_s2(x)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = self.block_cls(
          self.base_filters * 2**i,
          conv=conv,
          norm=norm,
          strides=2 if i > 0 and j == 0 else 1,
          name=f"stage{i + 1}_block{j + 1}",
        )(x)
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

ResNet18 = functools.partial(ResNet, block_cls=BasicBlock, stage_sizes=RESNET_STAGES[18][1])
ResNet34 = functools.partial(ResNet, block_cls=BasicBlock, stage_sizes=RESNET_STAGES[34][1])
ResNet50 = functools.partial(ResNet, block_cls=BottleneckBlock, stage_sizes=RESNET_STAGES[50][1])
ResNet101 = functools.partial(ResNet, block_cls=BottleneckBlock, stage_sizes=RESNET_STAGES[101][1])
ResNet152 = functools.partial(ResNet, block_cls=BottleneckBlock, stage_sizes=RESNET_STAGES[152][1])
RESNETS = {18: ResNet18, 34: ResNet34, 50: ResNet50, 101: ResNet101, 152: ResNet152}


class ProjectionHead(nn.Module):
  """MLP projection head g (SimCLR §2.1, Fig. 8; tf2 code's nonlinear head).

  Layer l < L: Dense -> [BN] -> ReLU. Layer L: Dense -> [BN], no ReLU, giving z.

  Attributes:
    num_layers: L >= 1 Dense layers.
    hidden_dim: width of layers 1 .. L-1.
    output_dim: width of layer L (the projection z).
    batch_norm: BN after every Dense layer.
    use_bias: bias on the Dense layers (redundant, and off in the SimCLR preset, when BN follows).
    last_bn_center: learned BN shift on layer L (the tf2 code has none, SimCLR preset False);
      hidden BNs always have one.
    kernel_init: Dense kernel initialiser.
    dtype: compute dtype; parameters stay float32.
    bn_momentum, bn_epsilon, axis_name: as in `ResNet`.
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
    """Projects representations.

    Args:
      h: float [N, C] encoder features.
      train: BN uses (and updates) batch statistics if True, running statistics if False.

    Returns:
      Tuple of L float32 arrays, layer 1 .. L: [N, hidden_dim] after ReLU for hidden layers,
      then z: [N, output_dim].

    Raises:
      ValueError: if num_layers < 1.
    """
    if self.num_layers < 1:
      raise ValueError(f"ProjectionHead.num_layers must be >= 1, got {self.num_layers}")
    x = jnp.asarray(h, self.dtype)
    outputs = []
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(
        self.output_dim if last else self.hidden_dim,
        use_bias=self.use_bias,
        kernel_init=self.kernel_init,
        dtype=self.dtype,
        name=f"dense{i + 1}",
      )(x)
      if self.batch_norm:
        x = nn.BatchNorm(
          use_running_average=not train,
          momentum=self.bn_momentum,
          epsilon=self.bn_epsilon,
          use_bias=self.last_bn_center or not last,
          dtype=self.dtype,
          axis_name=self.axis_name,
          name=f"bn{i + 1}",
        )(x)
      if not last:
        x = nn.relu(x)
      outputs.append(x.astype(jnp.float32))
    return tuple(outputs)


HEAD_PRESETS: dict[str, dict[str, Any]] = {
  # tf2 code: Dense kernels ~ N(0, 0.01^2), no Dense bias, BN everywhere, no shift on z.
  "simclr": dict(
    batch_norm=True,
    use_bias=False,
    last_bn_center=False,
    kernel_init=nn.initializers.normal(0.01),
  ),
  # The project's seed: a plain MLP (512-100-100-100 on ResNet-18).
  "seed": dict(batch_norm=False, use_bias=True, kernel_init=nn.initializers.lecun_normal()),
}
"""`model.head.preset` -> `ProjectionHead` fields other than the sizes."""


class SimCLRModel(nn.Module):
  """Encoder f followed by projection head g (SimCLR §2.1).

  Parameters and BN statistics are split into 'encoder' and 'head' sub-trees.

  Attributes:
    encoder: module mapping (images, train=) to h float32 [N, C], e.g. `ResNet`.
    head: module mapping (h, train=) to a tuple of layer outputs, e.g. `ProjectionHead`.
  """

  encoder: nn.Module
  head: nn.Module

  def __call__(self, images: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, dict[str, Any]]:
    """Computes z = g(f(x)) and what a probe may read.

    Args:
      images: float [N, H, W, 3].
      train: BN in training mode (batch statistics; 'batch_stats' must be mutable) if True.

    Returns:
      projection: float32 [N, output_dim], z (== aux['head_layers'][-1]).
      aux: {'features': h float32 [N, C], 'head_layers': tuple of each head layer's float32
        output, layer 1 first}.
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
  """Width C of the encoder features h for a `config.model` section.

  Raises:
    ValueError: unknown `model.depth`.
  """
  _check_choice("model.depth", model_config.depth, RESNETS)
  block_cls, stage_sizes = RESNET_STAGES[model_config.depth]
  return ResNet(stage_sizes, block_cls, width_multiplier=model_config.width_multiplier).feature_dim


def resolve_conv_impl(model_config: ml_collections.ConfigDict) -> str:
  """The convolutions a `config.model` section asks for, with "auto" decided on this host.

  Args:
    model_config: fields conv_impl ('xla', 'onednn' or 'auto'; optional, 'xla') and dtype.

  Returns:
    'xla' or 'onednn'. For 'auto': 'onednn' on the CPU backend with dtype 'float32' when
    `onednn.register` succeeds (g++ and `libdnnl-dev` present); otherwise 'xla', with a logged
    warning saying why when the library cannot be built (the step is then ~1.3x slower on a CPU,
    docs/benchmarks.md "Session 9"; the results are the same up to float32 rounding). The
    choice is logged. Each host decides for itself; with several hosts only speed can differ.

  Raises:
    ValueError: naming the field, for an unknown conv_impl, or 'onednn' off the CPU backend or
      with a dtype other than float32.
  """
  conv_impl = model_config.get("conv_impl", "xla")
  _check_choice("model.conv_impl", conv_impl, CONV_IMPLS)
  if conv_impl == "xla":
    return conv_impl
  backend = jax.default_backend()
  if backend != "cpu":
    unsupported = f"model.conv_impl='onednn' runs on the CPU backend only; this is {backend!r}"
  elif model_config.dtype != "float32":
    unsupported = (
      f"model.conv_impl='onednn' computes in float32; model.dtype={model_config.dtype!r}"
    )
  else:
    unsupported = None
  if conv_impl == "onednn":
    if unsupported:
      raise ValueError(f"{unsupported} (use conv_impl='xla' or 'auto').")
    return conv_impl
  problem = None if unsupported else _onednn_problem()
  if problem:
    logging.warning(
      "model.conv_impl='auto': XLA's convolutions run instead of oneDNN's (same results, "
      "a slower step on a CPU): %s",
      problem,
    )
  resolved = "xla" if unsupported or problem else "onednn"
  logging.info("model.conv_impl='auto': %s convolutions (%s backend)", resolved, backend)
  return resolved


@functools.cache
def _onednn_problem() -> str | None:
  """Why oneDNN's convolutions cannot run here (`onednn.register`'s error), or None; asked once
  per process, so a host without them tries one build and warns once."""
  try:
    onednn.register()
  except RuntimeError as e:
    return str(e)
  return None


def build_model(
  model_config: ml_collections.ConfigDict, *, image_size: int, axis_name: str | None = None
) -> SimCLRModel:
  """Builds the SimCLR model described by a `config.model` section (configs/default.py).

  Args:
    model_config: fields depth (18, 34, 50, 101, 152), width_multiplier (> 0), cifar_stem (bool,
      or None: CIFAR stem iff image_size <= 32), dtype ('float32' or 'bfloat16'), bn_momentum,
      bn_epsilon, conv_grad_chunk (None, or >= 0; optional), conv_impl ('xla', 'onednn' or
      'auto'; optional, 'xla'; see `resolve_conv_impl`), head.preset ('simclr' or
      'seed'), head.num_layers (>= 1), head.hidden_dim (0: the feature width C), head.output_dim.
    image_size: side in px of the training images.
    axis_name: pmap/shard_map axis over which BN statistics are synchronised, or None.

  Returns:
    An unbound `SimCLRModel`.

  Raises:
    ValueError: naming the field, for an unknown depth, dtype or head preset, a non-positive
      width multiplier, fewer than one head layer or a negative conv_grad_chunk; from
      `resolve_conv_impl`, for conv_impl.
  """
  _check_choice("model.depth", model_config.depth, RESNETS)
  _check_choice("model.dtype", model_config.dtype, DTYPES)
  head_config = model_config.head
  _check_choice("model.head.preset", head_config.preset, HEAD_PRESETS)
  if not model_config.width_multiplier > 0:
    raise ValueError(f"model.width_multiplier={model_config.width_multiplier!r} must be > 0")
  if head_config.num_layers < 1:
    raise ValueError(f"model.head.num_layers={head_config.num_layers!r} must be >= 1")
  grad_chunk = model_config.get("conv_grad_chunk")
  if grad_chunk is not None and grad_chunk < 0:
    raise ValueError(f"model.conv_grad_chunk={grad_chunk!r} must be None or >= 0")
  conv_impl = resolve_conv_impl(model_config)
  cifar_stem = model_config.cifar_stem
  if cifar_stem is None:
    cifar_stem = image_size <= 32
  dtype = DTYPES[model_config.dtype]
  bn = dict(
    bn_momentum=model_config.bn_momentum,
    bn_epsilon=model_config.bn_epsilon,
    axis_name=axis_name,
    dtype=dtype,
  )
  encoder = RESNETS[model_config.depth](
    width_multiplier=model_config.width_multiplier,
    cifar_stem=bool(cifar_stem),
    conv_grad_chunk=grad_chunk,
    conv_impl=conv_impl,
    **bn,
  )
  head = ProjectionHead(
    num_layers=head_config.num_layers,
    hidden_dim=head_config.hidden_dim or encoder.feature_dim,
    output_dim=head_config.output_dim,
    **HEAD_PRESETS[head_config.preset],
    **bn,
  )
  return SimCLRModel(encoder=encoder, head=head)
