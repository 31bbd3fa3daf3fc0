"""Speed-only replacements for flax's convolution and max-pool on XLA's CPU backend.

`make_ops(runtime)` is the one place that looks at the backend: it returns the ops that
`models.build_model` injects into the ResNet. Every choice computes the same function as flax's
ops (up to rounding in the compute dtype; tests/test_cpu_kernels.py), so a checkpoint trained
under one runtime resumes and is probed under any other.

    ops = cpu_kernels.make_ops(config.runtime, dtype=config.model.dtype)
    model = models.build_model(config.model, image_size=64, ops=ops)
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
from absl import logging

from simclr_jax import models
from simclr_jax.cpu_kernels import conv, max_pool, onednn

CONV_IMPLS = ("flax", "xla", "onednn", "auto")
"""`runtime.conv_impl`: "flax": flax's `nn.Conv` and `nn.max_pool` on every backend (the reference);
"xla": XLA's convolutions, on the CPU backend through `conv.Conv` (chunked backward, matrix
products on tiny maps) and `max_pool.max_pool_3x3_s2`; "onednn": as "xla" with oneDNN's
convolutions (CPU; float32 or bfloat16); "auto": "onednn" where it can run, else "xla"."""

CPU_GRAD_CHUNK = 32
"""Images per chunk of the convolutions' backward pass on the CPU when `runtime.conv_grad_chunk`
is None (docs/benchmarks.md: never slower than one piece for any ResNet-18 layer)."""


class Ops(NamedTuple):
  """What `models.build_model` injects, and how to map the augmentation over a batch.

  Attributes:
    conv: called like `nn.Conv(features, kernel_size, strides=, padding=, use_bias=False,
      dtype=, name=)`.
    max_pool: [N, H, W, C] -> [N, ceil(H / 2), ceil(W / 2), C], the stem's 3x3/2 pool.
    sequential_augment: `augment.augment_batch`'s `loop`: a sequential loop over the images runs
      only the random branches taken (faster on a CPU); `vmap` runs all of them in parallel.
    conv_impl: the resolved choice, "flax", "xla" or "onednn".
  """

  conv: Any
  max_pool: Callable[[jax.Array], jax.Array]
  sequential_augment: bool
  conv_impl: str


def _check(runtime: ml_collections.ConfigDict) -> tuple[str, int | None]:
  conv_impl = runtime.get("conv_impl", "xla")
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"runtime.conv_impl={conv_impl!r} is not one of {list(CONV_IMPLS)}")
  grad_chunk = runtime.get("conv_grad_chunk")
  if grad_chunk is not None and grad_chunk < 0:
    raise ValueError(f"runtime.conv_grad_chunk={grad_chunk!r} must be None or >= 0")
  return conv_impl, grad_chunk


@functools.cache
def onednn_problem() -> str | None:
  """Why oneDNN's convolutions cannot run here (`onednn.register`'s error: the extension or
  oneDNN's library is not installed), or None; asked once per process, so 'auto' warns once."""
  try:
    onednn.register()
  except RuntimeError as e:
    return str(e)
  return None


@functools.cache
def _warn_fallback(problem: str) -> None:
  """Once per process, however often `make_ops` is called."""
  logging.warning(
    "runtime.conv_impl='auto': XLA's convolutions run instead of oneDNN's (same results, "
    "a slower step on a CPU): %s",
    problem,
  )


def _resolve(conv_impl: str, dtype: str, backend: str) -> str:
  """ "auto" and "onednn" decided for this backend and compute dtype (see `make_ops`)."""
  if conv_impl in ("flax", "xla"):
    return conv_impl
  if backend != "cpu":
    unsupported = f"runtime.conv_impl='onednn' runs on the CPU backend only; this is {backend!r}"
  elif dtype not in onednn.DTYPES:
    unsupported = f"runtime.conv_impl='onednn' computes in {onednn.DTYPES}; model.dtype={dtype!r}"
  else:
    unsupported = None
  if conv_impl == "onednn":
    if unsupported:
      raise ValueError(f"{unsupported} (use runtime.conv_impl='xla' or 'auto').")
    return conv_impl
  problem = None if unsupported else onednn_problem()
  if problem:
    _warn_fallback(problem)
  resolved = "xla" if unsupported or problem else "onednn"
  what = f"{resolved} convolutions"
  if resolved == "onednn":
    what += f" ({onednn.register()})"
  logging.info("runtime.conv_impl='auto': %s, %s backend", what, backend)
  return resolved


def make_ops(runtime: ml_collections.ConfigDict, *, dtype: str = "float32") -> Ops:
  """The convolution and max-pool for a `config.runtime` section on this host's backend.

  Args:
    runtime: fields conv_impl (`CONV_IMPLS`; optional, "xla") and conv_grad_chunk (None: 32 on
      the CPU backend, else 0 (whole batch); or an int >= 0; optional).
    dtype: the model's compute dtype, "float32" or "bfloat16" (oneDNN runs both).

  Returns:
    `Ops`. Off the CPU backend, "xla" and "auto" give flax's ops. "auto" gives oneDNN on the
    CPU backend when `onednn.register` succeeds (the extension built by
    `pip install '.[cpu-kernels]'` is installed); otherwise XLA's convolutions, with a logged
    warning saying why oneDNN is unavailable. The choice (and oneDNN's version) is logged.

  Raises:
    ValueError: naming the field, for an unknown conv_impl, a negative conv_grad_chunk, or
      "onednn" off the CPU backend or with a dtype oneDNN does not run (`onednn.DTYPES`).
  """
  conv_impl, grad_chunk = _check(runtime)
  backend = jax.default_backend()
  resolved = _resolve(conv_impl, dtype, backend)
  if resolved == "flax" or backend != "cpu":
    return Ops(nn.Conv, models.stem_max_pool, backend == "cpu", resolved)
  chunk = CPU_GRAD_CHUNK if grad_chunk is None else grad_chunk
  cpu_conv = functools.partial(conv.Conv, grad_chunk=chunk, impl=resolved)
  return Ops(cpu_conv, max_pool.max_pool_3x3_s2, True, resolved)
