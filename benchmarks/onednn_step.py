"""The train step with its convolutions in oneDNN through XLA FFI custom calls: a prototype.

    apt-get install libdnnl-dev g++          # Debian 12: oneDNN 2.6.3
    python -m benchmarks.onednn_step --cases r18:64:128 --steps 5 --noaugment

Builds `benchmarks/onednn_ffi.cc` with g++ into a temporary directory, registers its three
handlers (convolution forward, backward-data, backward-weights) as XLA FFI targets, checks them
against `lax.conv_general_dilated` (values and both gradients, printed as max abs errors), then
replaces `models.conv2d` (every convolution of `models.Conv` whose output is larger than 2x2)
with a `jax.custom_vjp` over those calls and runs `benchmarks.train_step` with the given flags.
XLA's cost analysis cannot see inside custom calls, so the GFLOP columns it prints are not
comparable with `benchmarks.train_step`'s. Not used by the library or the tests (session 9:
docs/benchmarks.md).
"""

import ctypes
import functools
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402

from benchmarks import train_step  # noqa: E402
from simclr_jax import models  # noqa: E402

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_ffi.cc")


def build_and_register() -> None:
  """Compiles the handlers; registers them as onednn_ConvFwd, _ConvBwdData, _ConvBwdWeights.

  Raises:
    subprocess.CalledProcessError: g++ failed (e.g. libdnnl-dev is not installed).
  """
  library = os.path.join(tempfile.mkdtemp(prefix="onednn_ffi_"), "libonednn_ffi.so")
  command = ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
  subprocess.run([*command, "-o", library, SOURCE, "-ldnnl"], check=True)
  handlers = ctypes.cdll.LoadLibrary(library)
  for name in ("ConvFwd", "ConvBwdData", "ConvBwdWeights"):
    target = jax.ffi.pycapsule(getattr(handlers, name))
    jax.ffi.register_ffi_target(f"onednn_{name}", target, platform="cpu")


def _call(name, shape, a, b, stride, padding):
  result = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.ffi.ffi_call(f"onednn_{name}", result)(
    a, b, stride=np.int64(stride), pad=np.int64(padding)
  )


def _output_shape(x, kernel, stride, padding):
  n, h, w, _ = x.shape
  kh, kw, _, c_out = kernel.shape
  return (n, (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1, c_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x, kernel, stride, padding, grad_chunk=0):
  """`models.conv2d`'s contract (float32 only; `grad_chunk` ignored), computed by oneDNN."""
  del grad_chunk
  return _call("ConvFwd", _output_shape(x, kernel, stride, padding), x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding, grad_chunk):
  return conv2d(x, kernel, stride, padding, grad_chunk), (x, kernel)


def _conv2d_bwd(stride, padding, grad_chunk, residuals, g):
  del grad_chunk
  x, kernel = residuals
  dx = _call("ConvBwdData", x.shape, g, kernel, stride, padding)
  dkernel = _call("ConvBwdWeights", kernel.shape, x, g, stride, padding)
  return dx, dkernel


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def check_against_xla() -> None:
  """Prints max abs differences to XLA's convolution: output, input and kernel gradients."""
  rng = np.random.default_rng(0)
  for n, side, c_in, c_out, k, stride in (
    (4, 9, 3, 8, 7, 2),
    (3, 8, 16, 32, 3, 1),
    (2, 8, 16, 32, 1, 2),
  ):
    padding = k // 2
    x = jnp.asarray(rng.normal(size=(n, side, side, c_in)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)), jnp.float32)
    ours = jax.vjp(lambda x, w, s=stride, p=padding: conv2d(x, w, s, p), x, kernel)
    xla = jax.vjp(lambda x, w, s=stride, p=padding: models._conv(x, w, s, p), x, kernel)
    g = jnp.asarray(rng.normal(size=xla[0].shape), jnp.float32)
    errors = [
      float(jnp.abs(a - b).max())
      for a, b in zip((ours[0], *ours[1](g)), (xla[0], *xla[1](g)), strict=True)
    ]
    print(f"{k}x{k}/{stride} {c_in}->{c_out}: max |oneDNN - XLA| output / dx / dkernel: {errors}")


def main(argv):
  build_and_register()
  check_against_xla()
  models.conv2d = conv2d
  print("models.conv2d now runs on oneDNN (FFI custom calls)", flush=True)
  train_step.main(argv)


if __name__ == "__main__":
  app.run(main, argv=sys.argv)
