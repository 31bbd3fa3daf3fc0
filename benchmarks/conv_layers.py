"""Per-layer convolution times of the model's own convolution (`models.Conv`), to set beside
oneDNN's (`benchmarks/onednn_conv.cpp`, the library PyTorch's CPU convolutions run on).

    python -m benchmarks.conv_layers

For ResNet-18's 3x3 stages and its 7x7/2 stem at 64 px crops, batch 256 (128 pairs, both views)
in NHWC float32: forward, and backward (gradients of input and kernel together, as the train
step needs them; `models.conv2d`'s custom VJP computes both), each the best of 5 timed calls
after 2 warm-up calls, in ms. Run on a quiet machine; compile time is excluded.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from simclr_jax import models  # noqa: E402

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
  print("| layer | forward ms | backward (input + kernel) ms |")
  print("| --- | ---: | ---: |")
  for n, c_in, c_out, side, k, stride in SHAPES:
    conv = models.Conv(c_out, (k, k), strides=stride, padding=k // 2)
    x = jax.random.normal(jax.random.key(0), (n, side, side, c_in), jnp.float32)
    params = conv.init(jax.random.key(1), x)
    forward = jax.jit(conv.apply)
    y = forward(params, x)
    g = jax.random.normal(jax.random.key(2), y.shape, jnp.float32)

    backward = jax.jit(lambda params, x, g, apply=conv.apply: jax.vjp(apply, params, x)[1](g))

    name = f"{k}x{k}/{stride}, {c_in}->{c_out}, {side}x{side} in, N={n}"
    fwd, bwd = best_ms(forward, params, x), best_ms(backward, params, x, g)
    print(f"| {name} | {fwd:.1f} | {bwd:.1f} |", flush=True)


if __name__ == "__main__":
  main()
