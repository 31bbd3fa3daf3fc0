"""2-D convolutions on oneDNN, the library under PyTorch's CPU convolutions, via XLA FFI.

`conv2d` calls oneDNN's forward, backward-data and backward-weights primitives
(`onednn_conv.cc`) as XLA FFI custom calls under a `jax.custom_vjp`; jaxlib's CPU backend has no
oneDNN path of its own. The library is compiled with g++ on first use into `$SIMCLR_JAX_CACHE`
(default `~/.cache/simclr_jax`) and needs Debian's `libdnnl-dev` (oneDNN 2.x) and `g++`.
CPU only, float32 only. Chosen by `runtime.conv_impl = "onednn"`, or "auto" where it can run
(`cpu_kernels.make_ops`). Speed comparisons: docs/benchmarks.md.
"""

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_conv.cc")
_TARGETS = ("ConvFwd", "ConvBwdData", "ConvBwdWeights")


def _cache_dir() -> str:
  default = os.path.join(os.path.expanduser("~"), ".cache", "simclr_jax")
  return os.environ.get("SIMCLR_JAX_CACHE", default)


def _toolchain() -> bytes:
  """g++'s version and the installed oneDNN's version macros; a fixed marker when g++ or the
  headers are missing (the build then fails with the reason)."""
  try:
    compiler = subprocess.run(["g++", "-dumpfullversion"], check=True, capture_output=True).stdout
    macros = subprocess.run(
      ["g++", "-E", "-dM", "-x", "c++", "-"],
      input=b"#include <oneapi/dnnl/dnnl_version.h>\n",
      check=True,
      capture_output=True,
    ).stdout
  except (OSError, subprocess.CalledProcessError):
    return b"toolchain unknown"  # the build then fails and says what is missing
  versions = sorted(line for line in macros.splitlines() if b"DNNL_VERSION_" in line)
  return compiler + b"\n".join(versions)


def library_path() -> str:
  """Where the built library is cached, keyed so that a change of its inputs builds it again.

  Returns:
    `$SIMCLR_JAX_CACHE/onednn_conv_<hash>.so` (default directory `~/.cache/simclr_jax`), the
    hash covering SOURCE's bytes, jax's version, `g++ -dumpfullversion` and the `DNNL_VERSION_*`
    macros of the installed oneDNN headers (so g++ and `libdnnl-dev` are needed at every start,
    not only for the first build). Runs g++ twice; `register` calls it once per process.
  """
  with open(SOURCE, "rb") as f:
    parts = [f.read(), jax.__version__.encode(), _toolchain()]
  digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
  return os.path.join(_cache_dir(), f"onednn_conv_{digest}.so")


def _build(library: str) -> None:
  """Compiles SOURCE into `library`, atomically: never a half-written file under that name."""
  os.makedirs(_cache_dir(), exist_ok=True)
  fd, partial = tempfile.mkstemp(dir=_cache_dir(), suffix=".so.tmp")
  os.close(fd)
  command = ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
  command += ["-o", partial, SOURCE, "-ldnnl"]
  try:
    subprocess.run(command, check=True, capture_output=True, text=True)
    os.replace(partial, library)
  except FileNotFoundError as e:
    raise RuntimeError(
      "model.conv_impl='onednn' needs g++ (apt-get install g++ libdnnl-dev)."
    ) from e
  except subprocess.CalledProcessError as e:
    raise RuntimeError(
      f"Building {SOURCE} failed (it needs oneDNN 2.x: apt-get install libdnnl-dev):\n{e.stderr}"
    ) from e
  finally:
    if os.path.exists(partial):
      os.remove(partial)


@functools.cache
def register() -> str:
  """Builds the library (once per source, jax, g++ and oneDNN version), registers its FFI targets.

  Returns:
    The path of the shared library.

  Raises:
    RuntimeError: g++ is missing, the build failed (e.g. oneDNN's headers are not installed:
      `apt-get install libdnnl-dev g++`; the message holds the compiler's output), the cache
      directory cannot be written, or the library cannot be loaded or registered. Failures are
      not cached: the next call tries again (`cpu_kernels.make_ops` asks once per process).
  """
  library = library_path()
  try:
    if not os.path.exists(library):
      _build(library)
    handlers = ctypes.cdll.LoadLibrary(library)
    for name in _TARGETS:
      target = jax.ffi.pycapsule(getattr(handlers, name))
      jax.ffi.register_ffi_target(f"onednn_{name}", target, platform="cpu")
  except (OSError, AttributeError) as e:  # cache not writable, library not loadable
    raise RuntimeError(
      f"oneDNN's convolutions ({library}) are unavailable: {type(e).__name__}: {e} "
      "(apt-get install libdnnl-dev g++; the cache directory is $SIMCLR_JAX_CACHE)"
    ) from e
  return library


def _call(name, shape, a, b, stride, padding):
  result = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.ffi.ffi_call(f"onednn_{name}", result, vmap_method="sequential")(
    a, b, stride=np.int64(stride), pad=np.int64(padding)
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: int) -> jnp.ndarray:
  """2-D convolution (cross-correlation) on oneDNN; same contract as `cpu_kernels.conv.conv2d`.

  Args:
    x: float32 [N, H, W, C_in].
    kernel: float32 [kh, kw, C_in, C_out].
    stride: static int >= 1, the same in both spatial dimensions.
    padding: static int >= 0, zeros on each side of both spatial dimensions.

  Returns:
    float32 [N, (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1,
    C_out]. Gradients (both x and kernel) come from oneDNN's backward-data and backward-weights;
    they are not differentiable again (no second-order gradients). Under `jax.vmap` the calls run
    sequentially over the mapped axis.

  Raises:
    ValueError: x or kernel is not float32.
    RuntimeError: from `register` (the library cannot be built).
  """
  return _forward(x, kernel, stride, padding)


def _forward(x, kernel, stride, padding):
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    raise ValueError(
      f"runtime.conv_impl='onednn' computes in float32; got x {x.dtype}, kernel {kernel.dtype} "
      "(set model.dtype='float32' or runtime.conv_impl='xla')."
    )
  register()
  n, h, w, _ = x.shape
  kh, kw, _, c_out = kernel.shape
  shape = (n, (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1, c_out)
  return _call("ConvFwd", shape, x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding):
  return _forward(x, kernel, stride, padding), (x, kernel)


def _conv2d_bwd(stride, padding, residuals, g):
  x, kernel = residuals
  dx = _call("ConvBwdData", x.shape, g, kernel, stride, padding)
  dkernel = _call("ConvBwdWeights", kernel.shape, x, g, stride, padding)
  return dx, dkernel


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
