"""First run on an accelerator host: the devices, the multi-device tests, step and input speed.

    python -m benchmarks.device_check --peak_tflops_float32=495 --peak_tflops_bfloat16=989
    python -m benchmarks.device_check --tiny        # every part at toy sizes, on any CPU

(The peaks above are one H100 SXM's dense tensor-core figures, float32 counted as TF32; give your
device's, per device.) It prints, and writes to `--json_out` when given:

1. the backend, JAX's version, the processes, and each device's kind;
2. `pytest` on the multi-device tests (`--pytest`; they run on fake CPU devices whatever the host
   has, tests/conftest.py: they check this code on this install, not the accelerator);
3. the pretraining step, `train.make_train_step` as `train.pretrain` builds it (on-device
   augmentation, both views through the encoder, NT-Xent over all devices, LARS; the default
   `config.runtime`), pmapped over the local devices on a fixed batch: ResNet-18 at 96 px with
   256 pairs and ResNet-50 at 224 px with 128 pairs, each in float32 and bfloat16. Per case:
   compile seconds, seconds per step (median of `--steps` after 2 warm-up steps), pairs/s,
   images/s (two views per pair), TFLOP/s from XLA's cost analysis of the compiled step, and
   MFU, that over `--peak_tflops_<dtype>` times the device count (n/a without a peak). A case
   that fails (e.g. out of memory) prints its error;
4. the host input pipeline (tf.data: decode, two random-resized crops per image) in images/s at
   96 and 224 px, on `--data_root`'s train split or on synthetic JPEGs of 500 x 375 px.

Exits 1 if the tests or a case failed. Figures belong in docs/benchmarks.md.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import default  # noqa: E402
from simclr_jax import cpu_kernels, models, optim, parallel, train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MULTI_DEVICE_TESTS = [
  "tests/test_losses.py::test_pmap_equals_single_device",
  "tests/test_models.py::test_pmap_batch_norm_matches_single_device_on_concatenated_batch",
  "tests/test_train.py::test_one_step_on_one_device_equals_four_devices",
  "tests/test_checkpoint.py::test_replicated_save_restores_on_one_device",
  "tests/test_multiprocess.py",
]
CASES = [(18, 96, 256), (50, 224, 128)]  # (ResNet depth, image px, pairs per step)
TINY_CASES = [(18, 32, 16)]
DTYPES = ("float32", "bfloat16")

FLAGS = flags.FLAGS
flags.DEFINE_bool(
  "tiny", False, "Toy sizes (ResNet-18 at 1/8 width, 32 px, 16 pairs): a smoke run."
)
flags.DEFINE_list("pytest", None, "Tests to run; default the multi-device tests (tiny: one).")
flags.DEFINE_integer("steps", 5, "Timed steps per case (tiny: 2).")
flags.DEFINE_float("peak_tflops_float32", None, "Peak TFLOP/s of one device in float32.")
flags.DEFINE_float("peak_tflops_bfloat16", None, "Peak TFLOP/s of one device in bfloat16.")
flags.DEFINE_string("data_root", None, "Image folder for the input pipeline; default synthetic.")
flags.DEFINE_integer("pipeline_images", 512, "Images the input pipeline reads per size (tiny: 16).")
flags.DEFINE_string("json_out", None, "Also write the results here as JSON.")


def describe_devices() -> dict:
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  info = {
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "processes": jax.process_count(),
    "devices": len(devices),
    "local_devices": jax.local_device_count(),
    "device_kinds": kinds,
    "host_cpus": os.cpu_count(),
  }
  print(
    f"Backend {info['backend']} (jax {info['jax']}): {info['processes']} process(es), "
    f"{info['devices']} device(s) ({info['local_devices']} local): {', '.join(kinds)}; "
    f"{info['host_cpus']} host CPUs"
  )
  for d in jax.local_devices():
    print(f"  {d}")
  return info


def run_tests(tests: list[str]) -> dict:
  command = [sys.executable, "-m", "pytest", "-q", *tests]
  print(f"\n$ {' '.join(command[1:])}", flush=True)
  start = time.perf_counter()
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
  print("\n".join(tail))
  return {"tests": tests, "returncode": result.returncode, "seconds": seconds, "tail": tail}


def _config(depth: int, size: int, pairs: int, dtype: str, tiny: bool):
  config = default.get_config()
  config.model.depth = depth
  config.model.dtype = dtype
  config.data.image_size = size
  config.batch_size = pairs
  if tiny:
    config.model.width_multiplier = 0.125
    config.model.head.hidden_dim = 32
    config.model.head.output_dim = 16
  return config


def time_step(depth: int, size: int, pairs: int, dtype: str, steps: int, tiny: bool) -> dict:
  """Compile and steady-state time of one case of the pretraining step; see the module doc."""
  config = _config(depth, size, pairs, dtype, tiny)
  devices = jax.local_device_count()
  row = {"model": f"ResNet-{depth}", "px": size, "pairs": pairs, "dtype": dtype}
  if pairs % devices:
    return dict(row, error=f"{pairs} pairs do not split over {devices} devices")
  schedule = optim.warmup_cosine(
    config.optim, batch_size=pairs, steps_per_epoch=100, num_epochs=100
  )
  ops = cpu_kernels.make_ops(config.runtime, dtype=dtype)
  model = models.build_model(config.model, image_size=size, axis_name=parallel.AXIS_NAME, ops=ops)
  state = parallel.replicate(
    train.create_train_state(config, model, jax.random.PRNGKey(0), schedule)
  )
  rng = np.random.default_rng(0)
  sharding = jax.sharding.NamedSharding(
    jax.sharding.Mesh(np.array(jax.local_devices()), (parallel.AXIS_NAME,)),
    jax.sharding.PartitionSpec(parallel.AXIS_NAME),
  )
  shape = (devices, pairs // devices, size, size, 3)
  batch = jax.device_put(
    {
      "view1": rng.uniform(size=shape).astype(np.float32),
      "view2": rng.uniform(size=shape).astype(np.float32),
      "example_id": parallel.example_ids(pairs),
    },
    sharding,
  )
  key = jax.random.PRNGKey(1)
  start = time.perf_counter()
  p_step = train.make_train_step(config, schedule, sequential_augment=ops.sequential_augment)
  step = p_step.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - start
  cost = step.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  flops = float((cost or {}).get("flops", float("nan"))) * devices  # the program is per device
  for _ in range(2):
    state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  tflops = flops / step_s / 1e12
  peak = getattr(FLAGS, f"peak_tflops_{dtype}")
  return dict(
    row,
    devices=devices,
    compile_s=compile_s,
    step_s=step_s,
    pairs_per_s=pairs / step_s,
    images_per_s=2 * pairs / step_s,
    tflops=tflops,
    mfu=tflops / (peak * devices) if peak else None,
    loss=float(np.asarray(parallel.unreplicate(metrics)["loss"])),
  )


def _synthetic_folder(root: str, count: int, size: tuple[int, int]) -> str:
  """`count` smooth random JPEGs of `size` (width, height) px in two classes under root/train."""
  from PIL import Image

  rng = np.random.default_rng(0)
  for i in range(count):
    folder = os.path.join(root, "train", f"class{i % 2}")
    os.makedirs(folder, exist_ok=True)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize(size, Image.BILINEAR).save(os.path.join(folder, f"{i}.jpg"))
  return root


def time_pipeline(root: str, size: int, images: int) -> dict:
  """Decoded images per second of the host pretraining pipeline (two crops of each)."""
  from simclr_jax.data import pipeline

  config = default.get_config()
  config.data.root = root
  config.data.image_size = size
  devices = jax.device_count()
  config.batch_size = devices * max(1, min(32, images // 2) // devices)
  start = time.perf_counter()
  ds, source = pipeline.pretrain_dataset(config, seed=0)
  batches = ds.as_numpy_iterator()
  next(batches)
  setup_s = time.perf_counter() - start
  steps = max(1, min(images, source.num_examples) // config.batch_size)
  start = time.perf_counter()
  for _ in range(steps):
    next(batches)
  seconds = time.perf_counter() - start
  return {
    "px": size,
    "images": steps * config.batch_size,
    "setup_s": setup_s,
    "images_per_s": steps * config.batch_size / seconds,
  }


def _fmt(x, spec: str) -> str:
  return "n/a" if x is None else format(x, spec)


def main(argv):
  del argv
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")  # tf.data only
  tiny = FLAGS.tiny
  steps = FLAGS.steps if not tiny or FLAGS["steps"].present else 2
  results = {"devices": describe_devices()}
  tests = FLAGS.pytest
  if tests is None:
    tests = MULTI_DEVICE_TESTS[:1] if tiny else MULTI_DEVICE_TESTS
  failed = False
  if tests:
    results["pytest"] = run_tests(tests)
    failed = results["pytest"]["returncode"] != 0

  print(
    "\n| model | px | pairs | dtype | compile s | s/step | pairs/s | images/s | TFLOP/s | MFU |"
  )
  print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  results["steps"] = []
  for depth, size, pairs in TINY_CASES if tiny else CASES:
    for dtype in DTYPES:
      try:
        row = time_step(depth, size, pairs, dtype, steps, tiny)
      except Exception as e:  # e.g. out of memory: report it and go on
        row = {
          "model": f"ResNet-{depth}",
          "px": size,
          "pairs": pairs,
          "dtype": dtype,
          "error": f"{type(e).__name__}: {str(e)[:300]}",
        }
      results["steps"].append(row)
      if "error" in row:
        failed = True
        print(f"| {row['model']} | {size} | {pairs} | {dtype} | failed: {row['error']} |")
        continue
      print(
        f"| {row['model']} | {size} | {pairs} | {dtype} | {row['compile_s']:.1f} | "
        f"{row['step_s']:.4f} | {row['pairs_per_s']:.1f} | {row['images_per_s']:.1f} | "
        f"{row['tflops']:.2f} | {_fmt(row['mfu'], '.1%')} |",
        flush=True,
      )

  images = FLAGS.pipeline_images if not tiny or FLAGS["pipeline_images"].present else 16
  print(f"\nInput pipeline ({os.cpu_count()} host CPUs), decoded images/s, two crops each:")
  results["pipeline"] = []
  with tempfile.TemporaryDirectory() as tmp:
    root = FLAGS.data_root or _synthetic_folder(tmp, images, (64, 48) if tiny else (500, 375))
    for size in (32,) if tiny else (96, 224):
      row = time_pipeline(root, size, images)
      results["pipeline"].append(row)
      print(f"  {size} px: {row['images_per_s']:.1f} images/s (setup {row['setup_s']:.1f} s)")
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(results, f, indent=2)
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
