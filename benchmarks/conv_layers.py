"""Per-layer convolution times of the CPU kernels' convolution with XLA's convolutions and with
oneDNN's (`runtime.conv_impl`: 'xla' or 'onednn', the library PyTorch's CPU convolutions run on).

    python -m benchmarks.conv_layers

For ResNet-18's 3x3 stages and its 7x7/2 stem at 64 px crops, batch 256 (128 pairs, both views)
in NHWC float32: forward, and backward (gradients of input and kernel together, as the train
step needs them), each the best of 5 timed calls after 2 warm-up calls, in ms, for both
implementations. Run on a quiet machine; compile time is excluded. 'onednn' needs the extension
that `pip install '.[cpu-kernels]'` builds (`simclr_jax/cpu_kernels/onednn.py`).
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from simclr_jax import cpu_kernels  # noqa: E402

# (batch, input channels, output channels, input side in px, kernel side, stride)
SHAPES = (
  (256, 64, 64, 16, 3, 1),
  (256, 128, 128, 8, 3, 1),
  (256, 256, 256, 4, 3, 1),
  (256, 512, 512, 2, 3, 1),
  (256, 3, 64, 64, 7, 2),
)


def best_ms(fn, *args, repeats=5):
  """Best wall time in ms of `fn(*args)` over `repeats` calls, after 2 warm-up calls."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def main():
  print(f"jax {jax.__version__}, {jax.device_count()} device(s): {jax.devices()[0].device_kind}")
  print("| layer | forward ms, xla / onednn | backward (input + kernel) ms, xla / onednn |")
  print("| --- | ---: | ---: |")
  for n, c_in, c_out, side, k, stride in SHAPES:
    x = jax.random.normal(jax.random.key(0), (n, side, side, c_in), jnp.float32)
    times = []
    for impl in ("xla", "onednn"):
      ops = cpu_kernels.make_ops(ml_collections.ConfigDict(dict(conv_impl=impl)))
      conv = ops.conv(c_out, (k, k), strides=stride, padding=k // 2)
      params = conv.init(jax.random.key(1), x)
      forward = jax.jit(conv.apply)
      g = jax.random.normal(jax.random.key(2), forward(params, x).shape, jnp.float32)
      backward = jax.jit(lambda params, x, g, apply=conv.apply: jax.vjp(apply, params, x)[1](g))
      times.append((best_ms(forward, params, x), best_ms(backward, params, x, g)))
    (xla_fwd, xla_bwd), (dnn_fwd, dnn_bwd) = times
    name = f"{k}x{k}/{stride}, {c_in}->{c_out}, {side}x{side} in, N={n}"
    print(f"| {name} | {xla_fwd:.1f} / {dnn_fwd:.1f} | {xla_bwd:.1f} / {dnn_bwd:.1f} |", flush=True)


if __name__ == "__main__":
  main()
