"""Steady-state throughput of the pmapped SimCLR train step, with compile time reported apart.

    python -m benchmarks.train_step                      # the standard table
    python -m benchmarks.train_step --cases r18:64:128   # depth:pixels:global_batch[:cifar]

For each case: compile seconds, seconds per step (median of timed steps after warm-up), image
pairs per second, FLOPs per pair from XLA's cost analysis of the compiled step, achieved FLOP/s.
With `--breakdown`, also the seconds of the step's parts, each compiled alone: the on-device
augmentation of both views, the forward pass of both views (BN in training mode), and forward +
gradient of the NT-Xent loss (no augmentation, no optimiser update).
The step is the real one (`train.make_train_step`: augmentation, both views through the encoder,
NT-Xent over all devices, LARS update), fed with a fixed on-device batch so the input pipeline is
not measured here (see `benchmarks/input_pipeline.py`). `--noaugment` leaves the augmentation out,
comparable to what `benchmarks/pytorch_reference.py` times for the PyTorch original (its
augmentation runs in the data loader; its optimiser and head differ, a small share of the step).
"""

import functools
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import default  # noqa: E402
from simclr_jax import augment, cpu_kernels, losses, models, optim, parallel, train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list(
  "cases",
  ["r18:96:64", "r18:224:32", "r50:224:16", "r18:32:256:cifar"],
  "depth:image_px:global_batch[:cifar] per case.",
)
flags.DEFINE_integer("steps", 5, "Timed steps per case (after 2 warm-up steps).")
flags.DEFINE_string("dtype", "float32", "Compute dtype: float32 or bfloat16.")
flags.DEFINE_enum(
  "conv_impl",
  "xla",
  list(cpu_kernels.CONV_IMPLS),
  "runtime.conv_impl: XLA's convolutions, oneDNN's (FFI), auto (oneDNN where it runs) or flax.",
)
flags.DEFINE_integer(
  "grad_chunk", None, "runtime.conv_grad_chunk (images per backward chunk); default: auto."
)
flags.DEFINE_bool(
  "augment",
  True,
  "Run the on-device augmentation inside the step (the real step). --noaugment times the model "
  "step alone (forward, backward, LARS), comparable to the PyTorch reference's step, whose "
  "augmentation runs in its data loader (its optimiser and head differ: Adam, 512-100-100-100).",
)
flags.DEFINE_bool("breakdown", False, "Also time augmentation, forward, forward+gradient alone.")


def _config(depth: int, size: int, batch: int, cifar: bool):
  config = default.get_config()
  config.model.depth = depth
  config.model.cifar_stem = cifar
  config.model.dtype = FLAGS.dtype
  config.runtime.conv_grad_chunk = FLAGS.grad_chunk
  config.runtime.conv_impl = FLAGS.conv_impl
  config.augment.enabled = FLAGS.augment
  config.data.image_size = size
  config.batch_size = batch
  return config


def _flops(p_step, args) -> float:
  try:
    cost = p_step.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))
  except Exception:  # cost analysis is best effort on some backends
    return float("nan")


def _median_seconds(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def breakdown(config, state, batch_arrays, key) -> dict:
  """Seconds of the step's parts, each pmapped and compiled alone (same shapes as the step)."""
  ops = cpu_kernels.make_ops(config.runtime, dtype=config.model.dtype)

  def augment_only(batch, key):
    return augment.augment_views(
      key, batch["view1"], batch["view2"], config.augment, loop=ops.sequential_augment
    )

  def loss(params, batch_stats, images):
    (projection, _), _ = state.apply_fn(
      {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    z1, z2 = jnp.split(projection, 2, axis=0)
    return losses.nt_xent(z1, z2, temperature=config.temperature, axis_name=parallel.AXIS_NAME)[0]

  def forward(state, batch):
    images = jnp.concatenate([batch["view1"], batch["view2"]], axis=0)
    return loss(state.params, state.batch_stats, images)

  def gradient(state, batch):
    images = jnp.concatenate([batch["view1"], batch["view2"]], axis=0)
    return jax.grad(loss)(state.params, state.batch_stats, images)

  pmap = functools.partial(jax.pmap, axis_name=parallel.AXIS_NAME)
  return {
    "augment_s": _median_seconds(pmap(augment_only, in_axes=(0, None)), batch_arrays, key),
    "forward_s": _median_seconds(pmap(forward), state, batch_arrays),
    "gradient_s": _median_seconds(pmap(gradient), state, batch_arrays),
  }


def run_case(spec: str) -> dict:
  parts = spec.split(":")
  depth, size, batch = int(parts[0].lstrip("r")), int(parts[1]), int(parts[2])
  cifar = len(parts) > 3 and parts[3] == "cifar"
  config = _config(depth, size, batch, cifar)
  devices = jax.local_device_count()
  schedule = optim.warmup_cosine(
    config.optim, batch_size=batch, steps_per_epoch=100, num_epochs=100
  )
  ops = cpu_kernels.make_ops(config.runtime, dtype=config.model.dtype)
  model = models.build_model(config.model, image_size=size, axis_name=parallel.AXIS_NAME, ops=ops)
  state = parallel.replicate(
    train.create_train_state(config, model, jax.random.PRNGKey(0), schedule)
  )
  rng = np.random.default_rng(0)
  shape = (devices, batch // devices, size, size, 3)
  batch_arrays = {
    "view1": jax.device_put(rng.uniform(size=shape).astype(np.float32)),
    "view2": jax.device_put(rng.uniform(size=shape).astype(np.float32)),
  }
  key = jax.random.PRNGKey(1)
  p_step = train.make_train_step(config, schedule, sequential_augment=ops.sequential_augment)

  start = time.perf_counter()
  state, metrics = p_step(state, batch_arrays, key)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  flops = _flops(p_step, (state, batch_arrays, key)) * devices  # cost is per device
  state, metrics = p_step(state, batch_arrays, key)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    state, metrics = p_step(state, batch_arrays, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  parts = breakdown(config, state, batch_arrays, key) if FLAGS.breakdown else {}
  return {
    **parts,
    "case": f"ResNet-{depth}{' CIFAR' if cifar else ''} {size}px",
    "batch": batch,
    "compile_s": compile_s,
    "step_s": step_s,
    "pairs_s": batch / step_s,
    "gflop_pair": flops / batch / 1e9,
    "gflop_s": flops / step_s / 1e9,
  }


def main(argv):
  del argv
  augmentation = "on-device augmentation included" if FLAGS.augment else "no augmentation"
  print(
    f"devices: {jax.devices()}  dtype: {FLAGS.dtype}  "
    f"convolutions: {cpu_kernels.make_ops(_config(18, 64, 8, False).runtime).conv_impl}  "
    f"{augmentation}"
  )
  header = "| case | batch | compile s | step s | pairs/s | GFLOP/pair | GFLOP/s |"
  print(header)
  print("|" + "---|" * 7)
  for spec in FLAGS.cases:
    r = run_case(spec)
    print(
      f"| {r['case']} | {r['batch']} | {r['compile_s']:.1f} | {r['step_s']:.3f} | "
      f"{r['pairs_s']:.1f} | {r['gflop_pair']:.2f} | {r['gflop_s']:.1f} |",
      flush=True,
    )
    if FLAGS.breakdown:
      print(
        f"|   parts of the step: augmentation {r['augment_s']:.3f} s, forward "
        f"{r['forward_s']:.3f} s, forward + gradient {r['gradient_s']:.3f} s |",
        flush=True,
      )


if __name__ == "__main__":
  app.run(main)
