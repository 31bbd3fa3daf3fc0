"""Linear evaluation of a pretraining checkpoint: a linear probe and kNN on frozen features.

SimCLR §2.3's protocol: train a linear classifier on the frozen encoder's features h of a
labelled subset of the train split, score it on the test split. Any projection-head layer can be
probed instead (SimCLR §4.2, Fig. 8; the PyTorch original's `remove_top_layers`); `features`
extracts the layers, `classifiers` fits the probes, `reports` draws the results.

    results = evaluate.run_linear_probe("runs/imagenet5", label_fraction=0.1)
"""

import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from sklearn import metrics
from sklearn.model_selection import train_test_split

from simclr_jax import checkpoint, cpu_kernels, models
from simclr_jax.data import resolution, sources
from simclr_jax.probe import classifiers, features, reports

CLASSIFIERS = ("logistic", "linear_sgd")
KNN_KS = (20, 200)

CV_DESCRIPTION = (
  "stratified k-fold CV on the labelled subset (k and C per layer under 'logistic_c'), "
  "45 L2 strengths (SimCLR Appendix B.8), split seed 0"
)
"""How the logistic probe's C is chosen by default; recorded in results.json's settings."""


def label_subset(
  labels: np.ndarray, fraction: float, *, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """A stratified, seeded subset of the labelled examples (the PyTorch original's 10% protocol).

  Each class keeps about `fraction` of its examples (floor or ceil, sklearn's stratified split;
  floor(fraction * N) in all).

  Args:
    labels: int [N] in [0, num_classes).
    fraction: in (0, 1]; 1 keeps every example.
    num_classes: number of classes C.
    seed: random seed of the draw.

  Returns:
    (indices int64 [M] sorted, counts int64 [C]: kept examples per class).

  Raises:
    ValueError: fraction outside (0, 1], a class without examples, or a fraction that leaves a
      class without examples (naming the classes).
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"label_fraction={fraction} must be in (0, 1].")
  labels = np.asarray(labels)
  totals = np.bincount(labels, minlength=num_classes)
  if (totals == 0).any():
    raise ValueError(f"classes {np.flatnonzero(totals == 0).tolist()} have no training examples.")
  hint = (
    f"label_fraction={fraction} leaves a class without labelled examples (examples per class: "
    f"{totals.tolist()}); each class needs fraction x its count >= 1, i.e. about "
    f"{1 / totals.min():.3g} or more."
  )
  indices = np.arange(len(labels))
  if fraction < 1:
    try:
      indices, _ = train_test_split(
        indices, train_size=fraction, stratify=labels, random_state=seed
      )
    except ValueError as e:
      raise ValueError(hint) from e
  counts = np.bincount(labels[indices], minlength=num_classes)
  if (counts == 0).any():
    raise ValueError(f"{hint} Empty: classes {np.flatnonzero(counts == 0).tolist()}.")
  return np.sort(indices), counts


def evaluate_layer(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  test_features: np.ndarray,
  test_labels: np.ndarray,
  *,
  num_classes: int,
  classifier: str = "logistic",
  seed: int = 0,
  extra_train: tuple[np.ndarray, np.ndarray] | None = None,
  c: float | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
  """Trains the probe on one layer's labelled features and scores it and kNN on the test split.

  Args:
    train_features: float [N, D], the labelled subset; train_labels: int [N], every class present.
    test_features: float [M, D]; test_labels: int [M].
    num_classes: C; classifier: one of `CLASSIFIERS`; seed: random seed of the SGD probe.
    extra_train: (float [N * K, D], int [N * K]) more training rows for the probe only: K
      augmented views of each labelled example, example-major (rows i K .. i K + K - 1 are views
      of example i); the kNN memory stays `train_features`.
    c: the logistic probe's inverse L2 strength (scikit-learn's C, > 0); None chooses it by
      cross-validation on the probe's training rows (SimCLR Appendix B.8;
      `classifiers.select_logistic_c`: the views of one example stay in one fold, and only centre
      views are scored). Unused by 'linear_sgd'.

  Returns:
    ({'top1', ['top5'], 'knn': {'k20': {'k', 'top1'[, 'top5']}, 'k200': ...}[, 'logistic_c':
    {'c', 'cv_top1', 'folds' (both None when c was given)}]}, test predictions int [M]). A kNN
    entry's 'k' is the number of neighbours used (at most the labelled examples).

  Raises:
    ValueError: unknown classifier; `extra_train` not K views per example in example-major
      order; c <= 0; and `classifiers.select_logistic_c`'s (a class with < 2 labelled examples).
  """
  probe_x, probe_y = train_features, train_labels
  n = len(train_labels)
  groups, scored = None, None
  if extra_train is not None:
    views = len(extra_train[1]) // n
    if len(extra_train[1]) != views * n or not np.array_equal(
      extra_train[1], np.repeat(train_labels, views)
    ):
      raise ValueError(
        f"extra_train ({len(extra_train[1])} rows) is not K views of each of the {n} labelled "
        "examples in example-major order: its labels do not repeat train_labels K times each."
      )
    probe_x = np.concatenate([train_features, extra_train[0]])
    probe_y = np.concatenate([train_labels, extra_train[1]])
    groups = np.concatenate([np.arange(n), np.repeat(np.arange(n), views)])
    scored = np.arange(len(probe_y)) < n  # validate on centre views, as the test split is read
  if c is not None and not c > 0:
    raise ValueError(f"c={c} must be > 0 (None: chosen by cross-validation).")
  selection = None
  if classifier == "logistic":
    if c is None:
      chosen = classifiers.select_logistic_c(probe_x, probe_y, groups=groups, scored=scored)
      c = chosen.c
      selection = {"c": chosen.c, "cv_top1": chosen.cv_top1, "folds": chosen.folds}
    else:
      selection = {"c": float(c), "cv_top1": None, "folds": None}
    probe = classifiers.fit_logistic(probe_x, probe_y, c=c)
  elif classifier == "linear_sgd":
    probe = classifiers.fit_linear_sgd(probe_x, probe_y, num_classes=num_classes, seed=seed)
  else:
    raise ValueError(f"classifier={classifier!r} is not one of {CLASSIFIERS}")
  probabilities = probe(test_features)
  result: dict[str, Any] = classifiers.accuracies(probabilities, test_labels)
  result["knn"] = {}
  for k in KNN_KS:
    used = min(k, len(train_labels))
    votes = classifiers.knn_probabilities(train_features, train_labels, test_features, k=used)
    result["knn"][f"k{k}"] = {"k": used, **classifiers.accuracies(votes, test_labels)}
  if selection is not None:
    result["logistic_c"] = selection
  return result, probabilities.argmax(axis=1)


def plan_c_selection(
  counts: np.ndarray, class_names: list[str], *, probe_c: float | None, label_fraction: float
) -> tuple[float | None, str]:
  """How the logistic probe's C is chosen for these labelled images (SimCLR Appendix B.8).

  Stratified k-fold cross-validation needs every class in every fold, so k falls from
  `classifiers.CV_FOLDS` to the smallest class's count (`classifiers.cv_folds`); a class with a
  single labelled image leaves no k-fold split, so C falls back to `classifiers.DEFAULT_C`. Either
  change logs a warning naming the class instead of stopping the probe.

  Args:
    counts: int [C], labelled images per class, each >= 1 (from `label_subset`).
    class_names: the C class names, in label order.
    probe_c: the caller's fixed C (> 0), or None to choose it by cross-validation.
    label_fraction: the fraction that gave `counts`, for the warnings.

  Returns:
    (c, selection): c the fixed C for `evaluate_layer` (None: chosen by cross-validation per
    layer); selection says how, for results.json's settings: 'fixed' (the caller's),
    `CV_DESCRIPTION`, or 'fixed: class <name> has 1 labelled image ...' (the fallback).
  """
  if probe_c is not None:
    return probe_c, "fixed"
  name, smallest = class_names[int(np.argmin(counts))], int(np.min(counts))
  k = classifiers.cv_folds(counts)
  if k < 2:
    logging.warning(
      "Class %r has %d labelled image at label_fraction=%g, too few to choose the probe's C by "
      "cross-validation; using C = %g (scikit-learn's default).",
      name,
      smallest,
      label_fraction,
      classifiers.DEFAULT_C,
    )
    return classifiers.DEFAULT_C, (
      f"fixed: class {name!r} has {smallest} labelled image at label_fraction={label_fraction}, "
      f"too few for cross-validation; C = {classifiers.DEFAULT_C:g}, scikit-learn's default"
    )
  if k < classifiers.CV_FOLDS:
    logging.warning(
      "Class %r has %d labelled images at label_fraction=%g: the probe's C is chosen by %d-fold "
      "instead of %d-fold cross-validation.",
      name,
      smallest,
      label_fraction,
      k,
      classifiers.CV_FOLDS,
    )
  return None, CV_DESCRIPTION


def _data_config(pretrained: checkpoint.Pretrained, data_root: str | None):
  """The pretraining config with `data_root` swapped in, and its class names, checked."""
  config = ml_collections.ConfigDict(pretrained.config.to_dict())
  if data_root:
    if config.data.source == "tfds":
      config.data.tfds_data_dir = data_root
    else:
      config.data.root = data_root
  try:
    names = sources.get_class_names(config.data)
  except ValueError as e:
    raise ValueError(
      f"{e} (data root from {'data_root' if data_root else 'the checkpoint'})"
    ) from e
  if names != pretrained.class_names:
    expected = pretrained.class_names
    raise ValueError(
      f"The classes of data root {data_root or config.data.root!r} do not match the "
      f"checkpoint's: missing {sorted(set(expected) - set(names))}, unexpected "
      f"{sorted(set(names) - set(expected))} (checkpoint: {expected}, data: {names})."
    )
  return config, names


def run_linear_probe(
  workdir: str,
  *,
  step: int | None = None,
  data_root: str | None = None,
  label_fraction: float = 0.1,
  remove_top_layers: int | None = None,
  sweep_layers: bool = False,
  classifier: str = "logistic",
  batch_size: int = 256,
  seed: int = 0,
  output_dir: str | None = None,
  image_size: int | None = None,
  crop_fraction: float | None = None,
  train_views: int = 0,
  probe_c: float | None = None,
  conv_impl: str = "auto",
) -> dict[str, Any]:
  """Linear evaluation of a pretraining run, from its checkpoint alone (SimCLR §2.3).

  Trains the probe on the train split's features (a `label_fraction` subset of the labels) and
  scores it on the test split (`config.data.eval_split`), every test example once.

  Args:
    workdir: the pretraining `--workdir`.
    step: checkpoint step; None for the latest.
    data_root: image folder root (TFDS data dir for TFDS runs); None uses pretraining's.
    label_fraction: in (0, 1], stratified and seeded by `seed`.
    remove_top_layers: probe the head with its top K layers dropped (K = 0: z); None probes h.
    sweep_layers: also evaluate every depth from h to z and draw `acc_vs_layer.png`.
    classifier: 'logistic' (scikit-learn, the PyTorch original's) or 'linear_sgd' (optax, the
      paper's, SimCLR Appendix B.6).
    batch_size: feature-extraction batch; does not change the features.
    seed: random seed of the label subset and of the SGD probe.
    output_dir: where to write; default `<workdir>/linear`.
    image_size: side in px of the test view for train and test features; None keeps the
      checkpoint config's `data.eval_image_size` (0 there: the last pretraining crop size). A value
      above the training crop size applies FixRes's train/test resolution correction.
    crop_fraction: centre-crop fraction in (0, 1] of the shorter side; None keeps the
      checkpoint config's `data.eval_crop_fraction`. Ignored (1, the whole image) when the
      last pretraining crops were at most 32 px; `settings` records the fraction used.
    train_views: K >= 1 adds K random views (random-resized crop with the pretraining's area and
      aspect ranges, left-right flip, no colour distortion) of each labelled image to the
      probe's training set, as SimCLR's reference code augments its linear classifier's
      training; 0 trains on the centre views only. kNN always uses the centre views.
    probe_c: the logistic probe's inverse L2 strength (scikit-learn's C, > 0); None (default)
      chooses it per layer by cross-validation on the labelled subset alone, from SimCLR
      Appendix B.8's 45 L2 strengths (`classifiers.select_logistic_c`: 5 folds, fewer for classes
      under 5 labelled images; with `train_views`, the views of an image stay in its fold and
      only centre views are scored; each layer's C is in the results). A class with a single
      labelled image leaves no k-fold split: C is then 1.0 (see `plan_c_selection`). 1.0 is
      scikit-learn's default, the PyTorch original's.
    conv_impl: `runtime.conv_impl` of the feature extraction (`cpu_kernels.make_ops`), whatever
      the run was trained with; speed only.

  Returns:
    The contents of `results.json`: 'settings', 'top1' (and 'top5' with >= 10 classes), 'knn',
    'per_class' (sklearn's classification report), 'confusion_matrix' (rows: true class),
    'sweep' (one entry per depth when sweeping), plus 'report_markdown' and 'files'.

  Raises:
    FileNotFoundError: no checkpoint (or not that step) in `workdir`.
    ValueError: classes of the data differ from the checkpoint's, bad label fraction,
      `remove_top_layers`, classifier, `image_size` (< 1), `crop_fraction` (outside (0, 1]) or
      `train_views` (< 0), `probe_c` (<= 0), and the input pipeline's errors.
  """
  if classifier not in CLASSIFIERS:
    raise ValueError(f"classifier={classifier!r} is not one of {CLASSIFIERS}")
  if image_size is not None and image_size < 1:
    raise ValueError(f"image_size={image_size} must be a positive number of pixels.")
  if crop_fraction is not None and not 0 < crop_fraction <= 1:
    raise ValueError(f"crop_fraction={crop_fraction} must be in (0, 1].")
  if train_views < 0:
    raise ValueError(f"train_views={train_views} must be >= 0 (0: centre views only).")
  if probe_c is not None and not probe_c > 0:
    raise ValueError(f"probe_c={probe_c} must be > 0 (None: chosen by cross-validation).")
  pretrained = checkpoint.load_pretrained(workdir, step)
  config, class_names = _data_config(pretrained, data_root)
  if image_size is not None:
    config.data.eval_image_size = image_size
  if crop_fraction is not None:
    config.data.eval_crop_fraction = crop_fraction
  num_classes = len(class_names)
  num_layers = config.model.head.num_layers
  depth = features.probe_depth(num_layers, remove_top_layers)
  depths = tuple(range(num_layers + 1)) if sweep_layers else (depth,)

  ops = cpu_kernels.make_ops(
    ml_collections.ConfigDict(dict(conv_impl=conv_impl)), dtype=config.model.dtype
  )
  model = models.build_model(config.model, image_size=config.data.image_size, ops=ops)
  variables = {"params": pretrained.params, "batch_stats": pretrained.batch_stats}
  extract = functools.partial(
    features.extract_features, model, variables, config, batch_size=batch_size, depths=depths
  )
  train_features, train_labels = extract(config.data.train_split)
  subset, counts = label_subset(train_labels, label_fraction, num_classes=num_classes, seed=seed)
  c, c_selection = None, None
  if classifier == "logistic":
    c, c_selection = plan_c_selection(
      counts, class_names, probe_c=probe_c, label_fraction=label_fraction
    )
  test_features, test_labels = extract(config.data.eval_split)
  extra = {d: None for d in depths}
  if train_views:
    view_features, view_labels = extract(
      config.data.train_split, random_views=train_views, seed=seed
    )
    rows = (subset[:, None] * train_views + np.arange(train_views)).ravel()
    extra = {d: (view_features[d][rows], view_labels[rows]) for d in depths}

  evaluations = {}
  for d in depths:
    evaluations[d] = evaluate_layer(
      train_features[d][subset],
      train_labels[subset],
      test_features[d],
      test_labels,
      num_classes=num_classes,
      classifier=classifier,
      seed=seed,
      extra_train=extra[d],
      c=c,
    )
  result, predictions = evaluations[depth]
  results: dict[str, Any] = {
    "settings": {
      "workdir": os.path.abspath(workdir),
      "step": pretrained.step,
      "data_source": config.data.source,
      "data_root": config.data.root if config.data.source == "folder" else config.data.tfds_name,
      "train_split": config.data.train_split,
      "test_split": config.data.eval_split,
      "image_size": config.data.image_size,
      "last_crop_size": resolution.last_crop_size(config.data),
      "eval_image_size": resolution.eval_image_size(config.data),
      "eval_crop_fraction": resolution.eval_crop_fraction(config.data),
      "train_views": train_views,
      "probe_train_rows": len(subset) + (len(extra[depth][1]) if train_views else 0),
      "classifier": classifier,
      "probe_c": c,
      "probe_c_selection": c_selection,
      "layer": features.layer_name(depth, num_layers),
      "head_layers_kept": depth,
      "remove_top_layers": num_layers - depth,
      "feature_dim": int(train_features[depth].shape[1]),
      "label_fraction": label_fraction,
      "seed": seed,
      "batch_size": batch_size,
      "knn_temperature": classifiers.KNN_TEMPERATURE,
      "num_train": len(train_labels),
      "num_labelled": len(subset),
      "labelled_per_class": dict(zip(class_names, counts.tolist(), strict=True)),
      "num_test": len(test_labels),
      "num_classes": num_classes,
    },
    **result,
    "per_class": reports.classification_table(test_labels, predictions, class_names),
    "confusion_matrix": metrics.confusion_matrix(
      test_labels, predictions, labels=np.arange(num_classes)
    ).tolist(),
  }
  if sweep_layers:
    results["sweep"] = [
      {
        "head_layers_kept": d,
        "remove_top_layers": num_layers - d,
        "layer": features.layer_name(d, num_layers),
        "feature_dim": int(train_features[d].shape[1]),
        **evaluations[d][0],
      }
      for d in depths
    ]
  results["report_markdown"] = reports.markdown_table(results["per_class"])
  results["files"] = {}
  if jax.process_index() == 0:
    _write_outputs(results, output_dir or os.path.join(workdir, "linear"), class_names)
  return results


def _write_outputs(results: dict[str, Any], output_dir: str, class_names: list[str]) -> None:
  """Writes the figures and results.json (which lists them) into `output_dir`."""
  os.makedirs(output_dir, exist_ok=True)
  settings = results["settings"]
  files = results["files"]
  files["results"] = os.path.join(output_dir, "results.json")
  files["confusion_matrix"] = os.path.join(output_dir, "confusion_matrix.png")
  reports.plot_confusion_matrix(
    np.asarray(results["confusion_matrix"]),
    class_names,
    files["confusion_matrix"],
    title=f"{settings['classifier']} probe on {settings['layer']}: top-1 {results['top1']:.1%}",
  )
  if "sweep" in results:
    files["acc_vs_layer"] = os.path.join(output_dir, "acc_vs_layer.png")
    reports.plot_accuracy_vs_layer(
      results["sweep"],
      files["acc_vs_layer"],
      classifier=settings["classifier"],
      chance=1 / settings["num_classes"],
    )
  with open(files["results"] + ".tmp", "w") as f:
    json.dump(results, f, indent=2)
  os.replace(files["results"] + ".tmp", files["results"])
