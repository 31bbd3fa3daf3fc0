"""The on-device augmentation of both views with each Gaussian blur: matrix products vs dm-pix.

    python -m benchmarks.blur

`simclr_jax.augment.gaussian_blur` blurs with two banded matrix products; dm-pix's
`pix.gaussian_blur` (the reference it is tested against) with two depthwise convolutions. This
times `augment.augment_views` (default config: blur p=0.5 in both views, and every other op) with
each, jitted, median of 5 runs after compiling, on the same images and keys, and prints the
largest difference between the two outputs.
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dm_pix as pix  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from simclr_jax import augment, cpu_kernels  # noqa: E402

CASES = ((64, 128), (96, 64), (224, 32))  # (pixels, pairs)


def _augment_ms(blur, images, key) -> tuple[float, jax.Array]:
  config = default.get_config().augment
  loop = cpu_kernels.make_ops(default.get_config().runtime).sequential_augment
  pairs = images.shape[0]

  def run(key, view1, view2):
    return augment.augment_views(
      key, view1, view2, config, example_ids=jnp.arange(pairs), loop=loop
    )

  original = augment.gaussian_blur
  augment.gaussian_blur = blur  # read at trace time by random_gaussian_blur
  try:
    fn = jax.jit(run)
    out = jax.block_until_ready(fn(key, images, images))
    times = []
    for _ in range(5):
      start = time.perf_counter()
      jax.block_until_ready(fn(key, images, images))
      times.append(time.perf_counter() - start)
  finally:
    augment.gaussian_blur = original
  return statistics.median(times) * 1e3, out[0]


def main():
  print(f"devices: {jax.devices()}")
  print("| px | pairs | dm-pix blur ms | matrix blur ms | max difference |")
  print("|---|---|---|---|---|")
  key = jax.random.PRNGKey(0)
  for size, pairs in CASES:
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(pairs, size, size, 3)), jnp.float32)
    ref_ms, ref = _augment_ms(pix.gaussian_blur, images, key)
    ours_ms, ours = _augment_ms(augment.gaussian_blur, images, key)
    diff = float(jnp.max(jnp.abs(ref - ours)))
    print(f"| {size} | {pairs} | {ref_ms:.1f} | {ours_ms:.1f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
  main()
