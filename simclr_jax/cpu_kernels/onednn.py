"""2-D convolutions on oneDNN, the library under PyTorch's CPU convolutions, via XLA FFI.

`conv2d` calls oneDNN's forward, backward-data and backward-weights primitives as XLA FFI custom
calls under a `jax.custom_vjp`; jaxlib's CPU backend has no oneDNN path of its own. The handlers
(`cpu_kernels_ext/onednn_conv.cc`) are compiled when the project is installed,
`pip install '.[cpu-kernels]'`, into the top-level package `simclr_jax_onednn`, against oneDNN
3.x from PyPI, whose shared library that extra installs; nothing is compiled at run time. CPU
only; float32 or bfloat16 (`model.dtype`). Chosen by `runtime.conv_impl = "onednn"`, or "auto"
where it can run (`cpu_kernels.make_ops`). Speed comparisons: docs/benchmarks.md.
"""

import ctypes
import functools
import importlib
import importlib.metadata
import os

import jax
import jax.numpy as jnp
import numpy as np

EXTENSION = "simclr_jax_onednn"
"""The compiled package: `LIBRARY` (the handlers' shared library) and `ONEDNN_DISTRIBUTION` (the
PyPI package whose `libdnnl.so.3` it was linked against)."""

DTYPES = ("float32", "bfloat16")
"""Compute dtypes (`model.dtype`) oneDNN's convolutions run in; bfloat16 accumulates in float32."""

INSTALL = "pip install '.[cpu-kernels]' in a clone of simclr-jax (a C++ compiler at install time)"
_TARGETS = ("ConvFwd", "ConvBwdData", "ConvBwdWeights")


def _onednn_library(distribution: str) -> str:
  """The path of `libdnnl.so.3` in the installed PyPI package `distribution`."""
  try:
    files = importlib.metadata.files(distribution) or []
  except importlib.metadata.PackageNotFoundError:
    files = []
  for file in files:
    if file.name == "libdnnl.so.3":
      return os.path.abspath(file.locate())
  raise RuntimeError(f"oneDNN's shared library ({distribution}) is not installed: {INSTALL}")


@functools.cache
def register() -> str:
  """Loads the compiled handlers and oneDNN's library, registers the FFI targets, once.

  Returns:
    A description of what runs: the oneDNN version and the handlers' library path.

  Raises:
    RuntimeError: the extension is not installed (installed without the `cpu-kernels` extra's
      build, or without a C++ compiler), oneDNN's shared library is missing, or either cannot be
      loaded; the message says how to install. Failures are not cached: the next call tries
      again (`cpu_kernels.make_ops` asks once per process).
  """
  try:
    extension = importlib.import_module(EXTENSION)
  except ImportError as e:
    raise RuntimeError(f"oneDNN's convolutions are not installed ({e}): {INSTALL}") from e
  onednn = _onednn_library(extension.ONEDNN_DISTRIBUTION)
  try:
    ctypes.CDLL(onednn)  # the handlers' DT_NEEDED libdnnl.so.3 resolves to this copy
    handlers = ctypes.CDLL(extension.LIBRARY)
    for name in _TARGETS:
      target = jax.ffi.pycapsule(getattr(handlers, name))
      jax.ffi.register_ffi_target(f"onednn_{name}", target, platform="cpu")
    version = handlers.SimclrOnednnVersion()
  except (OSError, AttributeError) as e:
    raise RuntimeError(
      f"oneDNN's convolutions ({extension.LIBRARY}) cannot be loaded: {type(e).__name__}: {e} "
      f"(reinstall: {INSTALL})"
    ) from e
  major, minor, patch = version // 10000, version // 100 % 100, version % 100
  return f"oneDNN {major}.{minor}.{patch} ({extension.LIBRARY})"


def _call(name, shape, dtype, a, b, stride, padding):
  result = jax.ShapeDtypeStruct(shape, dtype)
  return jax.ffi.ffi_call(f"onednn_{name}", result, vmap_method="sequential")(
    a, b, stride=np.int64(stride), pad=np.int64(padding)
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: int) -> jnp.ndarray:
  """2-D convolution (cross-correlation) on oneDNN; same contract as `cpu_kernels.conv.conv2d`.

  Args:
    x: float32 or bfloat16 [N, H, W, C_in].
    kernel: [kh, kw, C_in, C_out], x's dtype.
    stride: static int >= 1, the same in both spatial dimensions.
    padding: static int >= 0, zeros on each side of both spatial dimensions.

  Returns:
    [N, (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1, C_out] in
    x's dtype (oneDNN accumulates bfloat16 products in float32). Gradients (both x and kernel,
    in x's dtype) come from oneDNN's backward-data and backward-weights; they are not
    differentiable again (no second-order gradients). Under `jax.vmap` the calls run
    sequentially over the mapped axis.

  Raises:
    ValueError: x and kernel differ in dtype, or it is neither float32 nor bfloat16.
    RuntimeError: from `register` (the extension is not installed).
  """
  return _forward(x, kernel, stride, padding)


def _forward(x, kernel, stride, padding):
  if x.dtype != kernel.dtype or x.dtype.name not in DTYPES:
    raise ValueError(
      f"runtime.conv_impl='onednn' computes in {' or '.join(DTYPES)} (x and kernel alike); got "
      f"x {x.dtype}, kernel {kernel.dtype} (set runtime.conv_impl='xla')."
    )
  register()
  n, h, w, _ = x.shape
  kh, kw, _, c_out = kernel.shape
  shape = (n, (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1, c_out)
  return _call("ConvFwd", shape, x.dtype, x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding):
  return _forward(x, kernel, stride, padding), (x, kernel)


def _conv2d_bwd(stride, padding, residuals, g):
  x, kernel = residuals
  dx = _call("ConvBwdData", x.shape, x.dtype, g, kernel, stride, padding)
  dkernel = _call("ConvBwdWeights", kernel.shape, kernel.dtype, x, g, stride, padding)
  return dx, dkernel


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
