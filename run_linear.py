"""Linear evaluation of a pretraining run: `python run_linear.py --workdir DIR`.

Rebuilds the model from the latest (or `--step`) checkpoint in DIR, probes the frozen features
of the train split with a `--label_fraction` of its labels, scores the test split (or, with
`--split validation`, images held out of the train split) and writes
`DIR/linear/{results.json,confusion_matrix.png[,acc_vs_layer.png]}`.

    python run_linear.py --workdir DIR --split validation --num_draws 20   # for choosing
    python run_linear.py --workdir DIR --num_draws 20 --all_labels_cv      # for reporting
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The pretraining workdir (holds checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
flags.DEFINE_string("data_root", None, "Image folder root; default the one pretraining used.")
flags.DEFINE_float("label_fraction", 0.1, "Fraction of training labels (stratified), in (0, 1].")
flags.DEFINE_integer(
  "remove_top_layers", None, "Probe the head with its top K layers dropped (0: z); default h."
)
flags.DEFINE_bool("sweep_layers", False, "Probe every depth from h to z; draw acc_vs_layer.png.")
flags.DEFINE_enum(
  "classifier", "logistic", ["logistic", "linear_sgd"], "scikit-learn or optax SGD probe."
)
flags.DEFINE_integer("batch_size", 256, "Feature-extraction batch size (features do not depend).")
flags.DEFINE_integer(
  "image_size",
  None,
  "Test-view side in px; default the checkpoint config's data.eval_image_size "
  "(0: the last training crop size).",
)
flags.DEFINE_float(
  "crop_fraction",
  None,
  "Centre-crop fraction of the shorter side; default the config's (1 for <= 32 px pretraining).",
)
flags.DEFINE_integer(
  "train_views",
  0,
  "K random views (crop + flip) of each labelled image added to the probe's training set; "
  "0: centre views only.",
)
flags.DEFINE_float(
  "probe_c",
  None,
  "Inverse L2 strength C of the logistic probe; default: chosen per layer by 5-fold "
  "cross-validation on the labelled subset (SimCLR Appendix B.8; fewer folds for classes under "
  "5 labelled images, C = 1.0 with a warning for a class of 1). 1.0: scikit-learn's default, "
  "the PyTorch original's.",
)
flags.DEFINE_integer(
  "seed", 0, "Random seed of the label subset and of the SGD probe (the first draw's)."
)
flags.DEFINE_integer(
  "num_draws",
  1,
  "Stratified label draws, draw k with seed seed + k; reports mean, sd and a 95% t-interval "
  "over them, every draw in results.json.",
)
flags.DEFINE_enum(
  "split",
  "test",
  ["test", "validation"],
  "What the probe is scored on: the test split, or a stratified 20% of the training images held "
  "out (fixed seed; labels drawn from the rest; no test image read) for making choices.",
)
flags.DEFINE_bool(
  "all_labels_cv",
  False,
  "Diagnostic: 5-fold CV accuracy of the logistic probe with every training label.",
)
flags.DEFINE_bool("tta_flip", False, "Average features over each view and its mirror image.")
flags.DEFINE_list(
  "tta_sizes",
  [],
  "Average features over whole-image views of these sides in px (e.g. 112,128,144); "
  "default the one view of --image_size.",
)
flags.DEFINE_bool(
  "standardize",
  False,
  "Standardise features with the statistics of every (unlabelled) training image the probe may "
  "use, instead of the labelled ones.",
)
flags.DEFINE_enum(
  "c_selection",
  "best",
  ["best", "repeated_1se"],
  "How cross-validation picks C: the best mean accuracy, or the strongest L2 within one "
  "standard error of it over --cv_repeats k-fold splits.",
)
flags.DEFINE_integer("cv_repeats", 5, "k-fold splits of --c_selection=repeated_1se.")
flags.DEFINE_string(
  "output_dir", None, "Where results.json and the plots go; default <workdir>/linear."
)
flags.DEFINE_enum(
  "conv_impl",
  "auto",
  ["flax", "xla", "onednn", "auto"],
  "Convolutions of the feature extraction (runtime.conv_impl); speed only, any run's checkpoint.",
)
flags.DEFINE_bool(
  "multihost", False, "Call jax.distributed.initialize() first (as run_pretrain.py, one per host)."
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (--multihost).")
flags.DEFINE_integer("num_processes", None, "Number of processes (--multihost).")
flags.DEFINE_integer("process_id", None, "This process's index (--multihost).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import tensorflow as tf

  # tf.data only: keep TensorFlow off the accelerators so JAX has all their memory.
  tf.config.set_visible_devices([], "GPU")
  if FLAGS.multihost:
    import jax

    # Every process extracts its share of the features; all then fit the same probe.
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from simclr_jax.probe import evaluate, reports

  logging.set_verbosity(logging.WARNING)
  results = evaluate.run_linear_probe(
    FLAGS.workdir,
    step=FLAGS.step,
    data_root=FLAGS.data_root,
    label_fraction=FLAGS.label_fraction,
    remove_top_layers=FLAGS.remove_top_layers,
    sweep_layers=FLAGS.sweep_layers,
    classifier=FLAGS.classifier,
    batch_size=FLAGS.batch_size,
    seed=FLAGS.seed,
    image_size=FLAGS.image_size,
    crop_fraction=FLAGS.crop_fraction,
    train_views=FLAGS.train_views,
    probe_c=FLAGS.probe_c,
    output_dir=FLAGS.output_dir,
    conv_impl=FLAGS.conv_impl,
    num_draws=FLAGS.num_draws,
    split=FLAGS.split,
    all_labels_cv=FLAGS.all_labels_cv,
    tta_flip=FLAGS.tta_flip,
    tta_sizes=tuple(int(size) for size in FLAGS.tta_sizes),
    standardize=FLAGS.standardize,
    c_selection=FLAGS.c_selection,
    cv_repeats=FLAGS.cv_repeats,
  )
  print(reports.format_summary(results))


if __name__ == "__main__":
  app.run(main)
