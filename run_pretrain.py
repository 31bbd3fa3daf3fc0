"""SimCLR pretraining: `python run_pretrain.py --config configs/<name>.py --workdir DIR`.

Override any config field on the command line, e.g. `--config.num_epochs=10`. Running again
with the same workdir resumes from its latest checkpoint. On several hosts, pass
`--multihost` on every host (see README).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, loss history and plots.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (one process per host).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (--multihost).")
flags.DEFINE_integer("num_processes", None, "Number of processes (--multihost).")
flags.DEFINE_integer("process_id", None, "This process's index (--multihost).")
flags.DEFINE_float(
  "sync_timeout",
  600.0,
  "Seconds a process waits for the others where all must meet (first step, each checkpoint "
  "save or restore) before it stops with an error and its thread stacks; 0: no limit.",
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.logging.Filter):
  """Drops the INFO chatter of Orbax and TensorFlow; their warnings and errors still show."""

  def filter(self, record):
    noisy = ("/orbax/", "/tensorflow/", "/tensorstore/")
    return record.levelno >= logging.logging.WARNING or not any(
      part in record.pathname for part in noisy
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.config.runtime.num_cpu_devices < 0:
    raise app.UsageError(
      f"config.runtime.num_cpu_devices must be >= 0, got {FLAGS.config.runtime.num_cpu_devices}"
    )
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import tensorflow as tf

  # tf.data only: keep TensorFlow off the accelerators so JAX has all their memory.
  tf.config.set_visible_devices([], "GPU")
  import jax

  if FLAGS.config.runtime.num_cpu_devices:
    # Before JAX's backends start; the step is pmapped over these devices on a CPU-only host.
    jax.config.update("jax_num_cpu_devices", FLAGS.config.runtime.num_cpu_devices)
  if FLAGS.multihost:
    # Unset values are auto-detected from the cluster (SLURM, Open MPI, Cloud TPU, ...).
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  from simclr_jax import train

  logging.info("JAX processes: %d, local devices: %s", jax.process_count(), jax.local_devices())
  if FLAGS.config.runtime.num_cpu_devices and jax.default_backend() != "cpu":
    logging.warning(
      "config.runtime.num_cpu_devices=%d is ignored: the step runs on the %s devices",
      FLAGS.config.runtime.num_cpu_devices,
      jax.default_backend(),
    )
  os.makedirs(FLAGS.workdir, exist_ok=True)
  try:
    summary = train.pretrain(FLAGS.config, FLAGS.workdir, sync_timeout_s=FLAGS.sync_timeout)
  except BaseException:
    if jax.process_count() == 1:
      raise
    # Exiting normally would wait for the other processes (jax.distributed's exit handler),
    # which may be waiting for this one.
    logging.exception("Process %d of %d failed", jax.process_index(), jax.process_count())
    logging.flush()
    os._exit(1)
  logging.info("Done: %s", summary)
  if summary["already_complete"]:
    print(f"Nothing to train: {FLAGS.workdir} already holds the final step {summary['step']}.")
    return
  print(
    f"Pretraining finished at step {summary['step']} (epoch {summary['epoch']}): "
    f"loss {summary['loss']:.4f}, contrastive accuracy {summary['contrastive_accuracy']:.3f}. "
    f"Outputs in {FLAGS.workdir}"
  )


if __name__ == "__main__":
  app.run(main)
