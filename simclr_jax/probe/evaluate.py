"""Linear evaluation of a pretraining checkpoint: a linear probe and kNN on frozen features.

SimCLR §2.3's protocol: train a linear classifier on the frozen encoder's features h of a
labelled subset of the train split, score it on the test split. Any projection-head layer can be
probed instead (SimCLR §4.2, Fig. 8; the PyTorch original's `remove_top_layers`); `features`
extracts the layers, `classifiers` fits the probes, `protocol` draws the labels and the
validation split and summarises draws, `reports` draws the results.

    results = evaluate.run_linear_probe("runs/imagenet5", label_fraction=0.1)
    results = evaluate.run_linear_probe("runs/imagenet5", split="validation", num_draws=20)
"""

import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from sklearn import metrics

from simclr_jax import checkpoint, cpu_kernels, models
from simclr_jax.data import resolution, sources
from simclr_jax.probe import classifiers, features, protocol, reports

CLASSIFIERS = ("logistic", "linear_sgd")
SPLITS = ("test", "validation")
KNN_KS = (20, 200)


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
  c_rule: str = "best",
  cv_repeats: int = 1,
  standardize: bool = True,
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
    c_rule, cv_repeats: `classifiers.select_logistic_c`'s rule and repeats, when c is None.
    standardize: the probe standardises the features with its training rows' statistics; False
      when they are standardised already (`classifiers.standardizer`). kNN reads the features as
      given.

  Returns:
    ({'top1', ['top5'], 'knn': {'k20': {'k', 'top1'[, 'top5']}, 'k200': ...}[, 'logistic_c':
    {'c', 'cv_top1', 'folds' (both None when c was given)[, 'repeats', 'best_cv_top1', 'cv_se'
    (rule 'repeated_1se')]}]}, test predictions int [M]). A kNN entry's 'k' is the number of
    neighbours used (at most the labelled examples).

  Raises:
    ValueError: unknown classifier; `extra_train` not K views per example in example-major
      order; c <= 0; and `classifiers.select_logistic_c`'s (a class with < 2 labelled examples,
      an unknown rule, repeats < 1).
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
      chosen = classifiers.select_logistic_c(
        probe_x,
        probe_y,
        groups=groups,
        scored=scored,
        rule=c_rule,
        repeats=cv_repeats,
        standardize=standardize,
      )
      c = chosen.c
      selection = {"c": chosen.c, "cv_top1": chosen.cv_top1, "folds": chosen.folds}
      if c_rule != "best":
        selection.update(
          repeats=chosen.repeats, best_cv_top1=chosen.best_cv_top1, cv_se=chosen.cv_se
        )
    else:
      selection = {"c": float(c), "cv_top1": None, "folds": None}
    probe = classifiers.fit_logistic(probe_x, probe_y, c=c, standardize=standardize)
  elif classifier == "linear_sgd":
    probe = classifiers.fit_linear_sgd(
      probe_x, probe_y, num_classes=num_classes, seed=seed, standardize=standardize
    )
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
  num_draws: int = 1,
  split: str = "test",
  all_labels_cv: bool = False,
  tta_flip: bool = False,
  tta_sizes: tuple[int, ...] = (),
  standardize: bool = False,
  c_selection: str = "best",
  cv_repeats: int = 5,
) -> dict[str, Any]:
  """Linear evaluation of a pretraining run, from its checkpoint alone (SimCLR §2.3).

  Trains the probe on the train split's features (a `label_fraction` subset of the labels) and
  scores it on the test split (`config.data.eval_split`), every test example once; or, with
  `split='validation'`, on a validation split held out of the training images, reading no test
  image (`protocol.validation_split`; the labels are drawn from the other training images). With
  `num_draws` N, the probe is trained on N label draws (seeds seed .. seed + N - 1) and the
  figures are summarised over them (`protocol.summarize`); the per-class table, the confusion
  matrix and the top-level figures are the first draw's.

  Args:
    workdir: the pretraining `--workdir`.
    step: checkpoint step; None for the latest.
    data_root: image folder root (TFDS data dir for TFDS runs); None uses pretraining's.
    label_fraction: in (0, 1], stratified and seeded; floor(fraction x the training images)
      labels, drawn in validation runs from the images not held out.
    remove_top_layers: probe the head with its top K layers dropped (K = 0: z); None probes h.
    sweep_layers: also evaluate every depth from h to z and draw `acc_vs_layer.png`.
    classifier: 'logistic' (scikit-learn, the PyTorch original's) or 'linear_sgd' (optax, the
      paper's, SimCLR Appendix B.6).
    batch_size: feature-extraction batch; does not change the features.
    seed: random seed of the first label draw and of its SGD probe; draw k uses seed + k.
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
      labelled image leaves no k-fold split: C is then 1.0 (`protocol.plan_c_selection`). 1.0
      is scikit-learn's default, the PyTorch original's.
    conv_impl: `runtime.conv_impl` of the feature extraction (`cpu_kernels.make_ops`), whatever
      the run was trained with; speed only.
    num_draws: N >= 1 label draws.
    split: one of `SPLITS`, what the probe is scored on.
    all_labels_cv: also measure `protocol.all_labels_cv` on the probed layer with every label of
      the images the probe may be trained on (all training images; validation runs: those not
      held out).
    tta_flip: average the features of every view with its left-right mirror's.
    tta_sizes: average the features over whole-image views of these sides in px (each >= 1);
      empty: the one view of `image_size`.
    standardize: standardise every feature with the mean and sd over the (unlabelled) training
      images the probe may be trained on, instead of over the labelled ones; the probe and kNN
      read the standardised features.
    c_selection: one of `classifiers.C_RULES`, how cross-validation picks C.
    cv_repeats: k-fold splits of rule 'repeated_1se', >= 1 (rule 'best' uses one).

  Returns:
    The contents of `results.json`: 'settings', 'top1' (and 'top5' with >= 10 classes), 'knn',
    'per_class' (sklearn's classification report), 'confusion_matrix' (rows: true class),
    'sweep' (one entry per depth when sweeping), 'draws' and 'summary' (N > 1: each draw's
    figures and their `protocol.summarize`), 'validation_indices' (validation runs: indices of
    the held-out images in the train split's order), 'all_labels_cv', plus 'report_markdown'
    and 'files'.

  Raises:
    FileNotFoundError: no checkpoint (or not that step) in `workdir`.
    ValueError: classes of the data differ from the checkpoint's, bad label fraction,
      `remove_top_layers`, classifier, `image_size` (< 1), `crop_fraction` (outside (0, 1]),
      `train_views` (< 0), `probe_c` (<= 0), `num_draws` (< 1), `split`, `tta_sizes`,
      `c_selection` or `cv_repeats` (< 1), and the input pipeline's errors.
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
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}")
  if c_selection not in classifiers.C_RULES:
    raise ValueError(f"c_selection={c_selection!r} is not one of {classifiers.C_RULES}")
  if cv_repeats < 1:
    raise ValueError(f"cv_repeats={cv_repeats} must be >= 1.")
  if any(size < 1 for size in tta_sizes):
    raise ValueError(f"tta_sizes={tuple(tta_sizes)}: every size must be >= 1 px.")
  seeds = protocol.draw_seeds(num_draws, seed)
  repeats = cv_repeats if c_selection == "repeated_1se" else 1
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
  extract_averaged = functools.partial(
    features.extract_averaged_features,
    model,
    variables,
    config,
    batch_size=batch_size,
    depths=depths,
    sizes=tuple(tta_sizes),
    flip=tta_flip,
  )
  train_features, train_labels = extract_averaged(config.data.train_split)
  pool, held_out = None, None
  if split == "validation":
    pool, held_out = protocol.validation_split(train_labels, num_classes=num_classes)
    scored_features = {d: x[held_out] for d, x in train_features.items()}
    scored_labels = train_labels[held_out]
  else:
    scored_features, scored_labels = extract_averaged(config.data.eval_split)
  extra_features = None
  if train_views:
    extra_features, view_labels = extract(
      config.data.train_split, random_views=train_views, seed=seed
    )
  if standardize:
    fit_rows = slice(None) if pool is None else pool
    for d in depths:
      scale = classifiers.standardizer(train_features[d][fit_rows])
      train_features[d], scored_features[d] = scale(train_features[d]), scale(scored_features[d])
      if train_views:
        extra_features[d] = scale(extra_features[d])

  draws = []
  for draw_seed in seeds:
    subset, counts = protocol.label_subset(
      train_labels, label_fraction, num_classes=num_classes, seed=draw_seed, candidates=pool
    )
    if not draws:
      c, c_how = None, None
      if classifier == "logistic":
        c, c_how = protocol.plan_c_selection(
          counts,
          class_names,
          probe_c=probe_c,
          label_fraction=label_fraction,
          c_rule=c_selection,
          cv_repeats=repeats,
        )
    extra = {d: None for d in depths}
    if train_views:
      rows = (subset[:, None] * train_views + np.arange(train_views)).ravel()
      extra = {d: (extra_features[d][rows], view_labels[rows]) for d in depths}
    evaluations = {
      d: evaluate_layer(
        train_features[d][subset],
        train_labels[subset],
        scored_features[d],
        scored_labels,
        num_classes=num_classes,
        classifier=classifier,
        seed=draw_seed,
        extra_train=extra[d],
        c=c,
        c_rule=c_selection,
        cv_repeats=repeats,
        standardize=not standardize,
      )
      for d in depths
    }
    draws.append((draw_seed, subset, counts, evaluations))
  _, subset, counts, evaluations = draws[0]
  result, predictions = evaluations[depth]
  results: dict[str, Any] = {
    "settings": {
      "workdir": os.path.abspath(workdir),
      "step": pretrained.step,
      "data_source": config.data.source,
      "data_root": config.data.root if config.data.source == "folder" else config.data.tfds_name,
      "train_split": config.data.train_split,
      "test_split": config.data.eval_split,
      "split": split,
      "image_size": config.data.image_size,
      "last_crop_size": resolution.last_crop_size(config.data),
      "eval_image_size": resolution.eval_image_size(config.data),
      "eval_crop_fraction": resolution.eval_crop_fraction(config.data),
      "tta_flip": tta_flip,
      "tta_sizes": list(tta_sizes),
      "standardize": standardize,
      "train_views": train_views,
      "probe_train_rows": len(subset) + (len(extra[depth][1]) if train_views else 0),
      "classifier": classifier,
      "probe_c": c,
      "probe_c_selection": c_how,
      "c_selection": c_selection,
      "cv_repeats": repeats,
      "layer": features.layer_name(depth, num_layers),
      "head_layers_kept": depth,
      "remove_top_layers": num_layers - depth,
      "feature_dim": int(train_features[depth].shape[1]),
      "label_fraction": label_fraction,
      "seed": seed,
      "num_draws": num_draws,
      "draw_seeds": seeds,
      "batch_size": batch_size,
      "knn_temperature": classifiers.KNN_TEMPERATURE,
      "num_train": len(train_labels),
      "num_labelled": len(subset),
      "labelled_per_class": dict(zip(class_names, counts.tolist(), strict=True)),
      "num_test": len(scored_labels) if split == "test" else 0,
      "num_scored": len(scored_labels),
      "num_classes": num_classes,
    },
    **result,
    "per_class": reports.classification_table(scored_labels, predictions, class_names),
    "confusion_matrix": metrics.confusion_matrix(
      scored_labels, predictions, labels=np.arange(num_classes)
    ).tolist(),
  }
  if split == "validation":
    results["settings"]["validation"] = {
      "fraction": protocol.VALIDATION_FRACTION,
      "seed": protocol.VALIDATION_SEED,
      "num_images": len(held_out),
      "per_class": dict(
        zip(class_names, np.bincount(scored_labels, minlength=num_classes).tolist(), strict=True)
      ),
      "num_candidates": len(pool),
    }
    results["validation_indices"] = held_out.tolist()
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
  if num_draws > 1:
    results["draws"] = [
      _draw_entry(draw_seed, drawn, layers, depth, num_layers, sweep_layers)
      for draw_seed, drawn, _, layers in draws
    ]
    results["summary"] = protocol.summarize_draws(results["draws"])
  if all_labels_cv:
    rows = slice(None) if pool is None else pool
    results["all_labels_cv"] = {
      "layer": features.layer_name(depth, num_layers),
      **protocol.all_labels_cv(
        train_features[depth][rows], train_labels[rows], standardize=not standardize
      ),
    }
  results["report_markdown"] = reports.markdown_table(results["per_class"])
  results["files"] = {}
  if jax.process_index() == 0:
    _write_outputs(results, output_dir or os.path.join(workdir, "linear"), class_names)
  return results


def _draw_entry(draw_seed, subset, evaluations, depth, num_layers, sweep_layers) -> dict:
  """One label draw's figures for results.json's 'draws' (see `protocol.summarize_draws`)."""
  entry = {"seed": draw_seed, "labelled_indices": subset.tolist(), **evaluations[depth][0]}
  if sweep_layers:
    entry["sweep"] = [
      {"head_layers_kept": d, "layer": features.layer_name(d, num_layers), **evaluations[d][0]}
      for d in sorted(evaluations)
    ]
  return entry


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
      scored_on=settings["split"],
    )
  with open(files["results"] + ".tmp", "w") as f:
    json.dump(results, f, indent=2)
  os.replace(files["results"] + ".tmp", files["results"])
