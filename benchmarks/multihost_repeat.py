"""Multi-process pretraining with checkpoint saves, repeated: does every run finish?

    python -m benchmarks.multihost_repeat --runs 20      # 2 processes x 2 CPU devices each

Each run starts `--processes` processes of `run_pretrain.py --multihost` on this host
(coordinator on a free localhost port), each with `--devices_per_process` CPU devices
(`runtime.num_cpu_devices`), on `configs/tiny.py` over a small image folder (`--images_per_class`
images of each class of `--data_root`'s train split, linked), saving a checkpoint every epoch.
A run that has not ended after `--timeout` seconds gets SIGABRT (its processes write their Python
stacks into their logs: `PYTHONFAULTHANDLER`) and is then killed. A run passes when every
process exits 0 and prints `Pretraining finished` with a finite loss.

Prints one line per run (passed or not, seconds, exit codes) and then `finished N/M` with the
minimum, median and maximum seconds of the runs that passed; the logs of runs that did not pass
stay in `--logdir`. Exits 1 unless every run passed.
"""

import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_integer("runs", 20, "Runs in a row.")
flags.DEFINE_integer("processes", 2, "Processes per run.")
flags.DEFINE_integer("devices_per_process", 2, "CPU devices of each process.")
flags.DEFINE_integer("epochs", 3, "Epochs per run; a checkpoint is saved after each.")
flags.DEFINE_float("timeout", 600, "Seconds before a run counts as hung and is killed.")
flags.DEFINE_string(
  "data_root", os.path.join(REPO, "..", "shared", "data", "cifar10-jpg-mini"), "Image folder."
)
flags.DEFINE_integer("images_per_class", 4, "Training images linked from each class.")
flags.DEFINE_string("logdir", None, "Where the logs of failed runs stay; default a temp dir.")
flags.DEFINE_bool(
  "compilation_cache", True, "Share a persistent JAX compilation cache between the runs."
)
flags.DEFINE_list("overrides", [], "More run_pretrain.py flags, e.g. --config.batch_size=32.")


def _subset(root: str, per_class: int, out: str) -> str:
  """Links the first `per_class` train images of every class of `root` into `out/train`."""
  train = os.path.join(root, "train")
  for name in sorted(os.listdir(train)):
    files = sorted(os.listdir(os.path.join(train, name)))[:per_class]
    os.makedirs(os.path.join(out, "train", name))
    for f in files:
      os.symlink(os.path.join(train, name, f), os.path.join(out, "train", name, f))
  return out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_once(data_root: str, workdir: str, env: dict[str, str]) -> tuple[bool, float, list]:
  """One multi-process run; returns (passed, seconds, exit codes or 'hung')."""
  port = _free_port()
  procs, logs = [], []
  start = time.perf_counter()
  for i in range(FLAGS.processes):
    log = open(os.path.join(workdir, f"process{i}.log"), "w")
    command = [
      sys.executable,
      os.path.join(REPO, "run_pretrain.py"),
      f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
      f"--workdir={os.path.join(workdir, 'run')}",
      f"--config.data.root={data_root}",
      f"--config.num_epochs={FLAGS.epochs}",
      "--config.checkpoint_every_epochs=1",
      f"--config.runtime.num_cpu_devices={FLAGS.devices_per_process}",
      "--multihost",
      f"--coordinator_address=localhost:{port}",
      f"--num_processes={FLAGS.processes}",
      f"--process_id={i}",
      *FLAGS.overrides,
    ]
    procs.append(
      subprocess.Popen(
        command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
      )
    )
    logs.append(log)
  deadline = start + FLAGS.timeout
  codes: list = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(1.0, deadline - time.perf_counter())))
    except subprocess.TimeoutExpired:
      codes.append("hung")
  seconds = time.perf_counter() - start
  if "hung" in codes:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGABRT)  # faulthandler writes the stacks to the log
    time.sleep(5)
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  for log in logs:
    log.close()
  passed = all(c == 0 for c in codes)
  for i in range(FLAGS.processes):
    with open(os.path.join(workdir, f"process{i}.log")) as f:
      found = re.search(r"Pretraining finished at step \d+ .*: loss (\S+),", f.read())
    passed = passed and found is not None and math.isfinite(float(found.group(1)))
  return passed, seconds, codes


def main(argv):
  del argv
  logdir = FLAGS.logdir or tempfile.mkdtemp(prefix="multihost_repeat_")
  env = dict(os.environ, PYTHONFAULTHANDLER="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)
  with tempfile.TemporaryDirectory() as tmp:
    data_root = _subset(FLAGS.data_root, FLAGS.images_per_class, os.path.join(tmp, "data"))
    if FLAGS.compilation_cache:
      env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tmp, "jax_cache")
    times, failed = [], []
    for run in range(1, FLAGS.runs + 1):
      workdir = os.path.join(logdir, f"run{run:02d}")
      os.makedirs(workdir)
      passed, seconds, codes = run_once(data_root, workdir, env)
      print(
        f"run {run:2d}: {'passed' if passed else 'FAILED'} in {seconds:.0f} s, exit codes {codes}",
        flush=True,
      )
      if passed:
        times.append(seconds)
        subprocess.run(["rm", "-rf", workdir], check=True)
      else:
        failed.append(workdir)
  summary = f"finished {len(times)}/{FLAGS.runs}"
  if times:
    summary += (
      f"; seconds per run: min {min(times):.0f}, median {statistics.median(times):.0f}, "
      f"max {max(times):.0f}"
    )
  print(summary)
  if failed:
    print("logs of the failed runs:", *failed, sep="\n  ")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
