"""A drop-in for `nn.Conv` (no bias, symmetric padding) that runs fast on XLA's CPU backend.

Same parameter and the same values as flax's convolution; only how it is computed differs:
- the backward pass runs over chunks of images (`conv2d`): XLA's CPU kernel gradient slows down
  more than linearly with the batch;
- outputs of at most 2x2 are matrix products (`small_map_conv_matrix`): XLA's CPU convolution on
  such tiny maps is far slower than the equivalent GEMM;
- `impl="onednn"` sends the other convolutions to oneDNN (`onednn.conv2d`).
Speed figures: docs/benchmarks.md.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.cpu_kernels import onednn

# At most this many chunks per convolution: the chunk loop is unrolled in the compiled step, so
# very large per-device batches get bigger chunks rather than ever longer compiles.
MAX_GRAD_CHUNKS = 16

_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(
    x, kernel, (stride, stride), ((padding, padding),) * 2, dimension_numbers=_CONV_DIMS
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: int, grad_chunk: int):
  """2-D convolution (cross-correlation) whose backward pass runs over chunks of images.

  Forward and backward are XLA's (the backward as the convolution's transposes), the backward
  run separately on consecutive chunks of images: the input gradient is their concatenation, the
  kernel gradient their sum (each chunk's part in the kernel's dtype, the sum in float32). Same
  mathematics as the unchunked gradient; only the kernel gradient's summation order differs.

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


def _symmetric(value: Any, what: str) -> int:
  """One int from an int or a sequence of equal values (per dimension, or (low, high) pairs)."""
  if isinstance(value, int):
    return value
  if isinstance(value, str):
    raise ValueError(f"cpu_kernels.Conv needs explicit {what}, not {value!r}")
  flat = np.ravel(np.asarray(value, dtype=object)).tolist()
  if len(set(flat)) != 1:
    raise ValueError(f"cpu_kernels.Conv needs the same {what} everywhere, got {value!r}")
  return int(flat[0])


class Conv(nn.Module):
  """2-D convolution without bias, NHWC, symmetric zero padding, called like `nn.Conv`.

  Same parameter (`kernel`, [kh, kw, C_in, features], LeCun-normal init) and the same values as
  `nn.Conv(features, kernel_size, strides, padding, use_bias=False)`. Outputs of at most 2x2 are
  computed as matrix products: one with the dense matrix (`small_map_conv_matrix`) when the input
  has fewer pixels than the kernel has taps, else a sum of kh*kw shifted products. Otherwise
  `impl="onednn"` calls `onednn.conv2d`, anything else `conv2d` with `grad_chunk`.

  Attributes:
    features: C_out.
    kernel_size: (kh, kw).
    strides: int or (s, s).
    padding: int, (p, p) or ((p, p), (p, p)); the same zeros on every side.
    use_bias: must be False (accepted for `nn.Conv` compatibility).
    dtype: compute dtype; the kernel is stored in float32.
    grad_chunk: images per chunk of the backward pass (see `conv2d`); 0: the whole batch.
    impl: "onednn" for oneDNN's convolutions, "xla" for XLA's.

  Raises:
    ValueError: use_bias, an unknown impl, or padding or strides that are strings or differ
      between sides or dimensions.
  """

  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Any = 0
  use_bias: bool = False
  dtype: Any = jnp.float32
  grad_chunk: int = 0
  impl: str = "xla"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: float [N, H, W, C_in] -> [N, H', W', features] in the compute dtype."""
    if self.use_bias:
      raise ValueError("cpu_kernels.Conv has no bias; use nn.Conv for use_bias=True")
    if self.impl not in ("xla", "onednn"):
      raise ValueError(f"cpu_kernels.Conv impl={self.impl!r} is not 'xla' or 'onednn'")
    kh, kw = self.kernel_size
    s, p = _symmetric(self.strides, "strides"), _symmetric(self.padding, "padding")
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features)
    )
    x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
    out_h = (x.shape[1] + 2 * p - kh) // s + 1
    out_w = (x.shape[2] + 2 * p - kw) // s + 1
    if max(out_h, out_w) > 2 or kh * kw == 1:
      if self.impl == "onednn":
        return onednn.conv2d(x, kernel, s, p)
      return conv2d(x, kernel, s, p, self.grad_chunk)
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
