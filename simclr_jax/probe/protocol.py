"""The probe's protocol: which labels train it, which images score it, how draws are summarised.

A probe figure depends on which few images carry labels, so a figure is read over several
stratified label draws, draw k with random seed k, the same draws for every method compared, and
reported as mean, sd and a 95% t-interval over the draws (`summarize`). Choices (a recipe, a
probe setting) are made on a validation split carved from the training images
(`validation_split`), never on the test split. `all_labels_cv` measures what the features hold
with every training label, a ceiling the few-label probe can be compared with. Conventions and
the rules for using them: docs/experiments.md, "Protocol". `plan_c_selection` says how the
probe's L2 strength will be chosen for the labelled images at hand.

    pool, held_out = protocol.validation_split(train_labels, num_classes=5)
    subset, counts = protocol.label_subset(
      train_labels, 0.1, num_classes=5, seed=0, candidates=pool
    )
"""

import math
from typing import Any

import numpy as np
from absl import logging
from scipy import stats
from sklearn.model_selection import train_test_split

from simclr_jax.probe import classifiers

VALIDATION_FRACTION = 0.2
"""Share of the training images held out as the validation split (250 of imagenet-5's 1250)."""

VALIDATION_SEED = 1_000_000
"""Random seed of the validation split: fixed, and apart from the label draws' seeds 0, 1, ..."""

CONFIDENCE = 0.95
"""Coverage of the t-interval `summarize` reports."""


def label_subset(
  labels: np.ndarray,
  fraction: float,
  *,
  num_classes: int,
  seed: int,
  candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """A stratified, seeded subset of the labelled examples (the PyTorch original's 10% protocol).

  Each class keeps about `fraction` of its examples (floor or ceil, sklearn's stratified split;
  floor(fraction * N) in all). With `candidates`, the same number, floor(fraction * N) with N all
  the examples, is drawn from the candidates alone (at most all of them), stratified over their
  classes: the labelled images of a validation run, drawn beside the held-out images.

  Args:
    labels: int [N] in [0, num_classes).
    fraction: in (0, 1]; 1 keeps every example (every candidate).
    num_classes: number of classes C.
    seed: random seed of the draw.
    candidates: int [P], distinct indices into `labels` to draw from; None: all N.

  Returns:
    (indices int64 [M] into `labels`, sorted, counts int64 [C]: kept examples per class).

  Raises:
    ValueError: fraction outside (0, 1], a class without examples (among the candidates), or a
      fraction that leaves a class without examples (naming the classes).
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"label_fraction={fraction} must be in (0, 1].")
  labels = np.asarray(labels)
  indices = np.arange(len(labels)) if candidates is None else np.sort(candidates)
  totals = np.bincount(labels[indices], minlength=num_classes)
  if (totals == 0).any():
    raise ValueError(f"classes {np.flatnonzero(totals == 0).tolist()} have no training examples.")
  hint = (
    f"label_fraction={fraction} leaves a class without labelled examples (examples per class: "
    f"{totals.tolist()}); each class needs fraction x its count >= 1, i.e. about "
    f"{1 / totals.min():.3g} or more."
  )
  if candidates is None:
    size = fraction if fraction < 1 else None
  else:
    size = min(math.floor(fraction * len(labels)), len(indices))
    size = size if size < len(indices) else None
  if size is not None:
    try:
      indices, _ = train_test_split(
        indices, train_size=size, stratify=labels[indices], random_state=seed
      )
    except ValueError as e:
      raise ValueError(hint) from e
  counts = np.bincount(labels[indices], minlength=num_classes)
  if (counts == 0).any():
    raise ValueError(f"{hint} Empty: classes {np.flatnonzero(counts == 0).tolist()}.")
  return np.sort(indices), counts


def validation_split(
  labels: np.ndarray,
  *,
  num_classes: int,
  fraction: float = VALIDATION_FRACTION,
  seed: int = VALIDATION_SEED,
) -> tuple[np.ndarray, np.ndarray]:
  """Holds out a stratified share of the training examples as a validation split.

  The probe of a validation run is trained on labels drawn from the rest (`label_subset` with
  `candidates`) and scored on the held-out examples, so recipes and probe settings are chosen
  without the test split. The split depends on `seed` alone, not on the label draws.

  Args:
    labels: int [N] in [0, num_classes), the training split's labels.
    num_classes: number of classes C.
    fraction: share held out, in (0, 1): ceil(fraction * N) examples, stratified.
    seed: random seed of the split.

  Returns:
    (rest int64 [N - V], held_out int64 [V]): disjoint sorted indices into `labels` that together
    cover them, every class in both.

  Raises:
    ValueError: fraction outside (0, 1), or a split that leaves a class out of either part.
  """
  if not 0 < fraction < 1:
    raise ValueError(f"validation fraction={fraction} must be in (0, 1).")
  labels = np.asarray(labels)
  try:
    rest, held_out = train_test_split(
      np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed
    )
  except ValueError as e:
    raise ValueError(
      f"Cannot hold out {fraction:g} of the training examples as a stratified validation split "
      f"(examples per class: {np.bincount(labels, minlength=num_classes).tolist()}): {e}"
    ) from e
  for part, name in ((rest, "the rest"), (held_out, "the validation split")):
    missing = np.flatnonzero(np.bincount(labels[part], minlength=num_classes) == 0)
    if missing.size:
      raise ValueError(f"Classes {missing.tolist()} have no examples in {name}.")
  return np.sort(rest), np.sort(held_out)


def cv_description(rule: str = "best", repeats: int = 1) -> str:
  """How the logistic probe's C is chosen by cross-validation; recorded in results.json."""
  if rule == "best":
    how = "split seed 0" if repeats == 1 else f"{repeats} splits (seeds 0-{repeats - 1})"
    return (
      "stratified k-fold CV on the labelled subset (k and C per layer under 'logistic_c'), "
      f"45 L2 strengths (SimCLR Appendix B.8), {how}"
    )
  return (
    f"stratified k-fold CV on the labelled subset repeated {repeats} times (split seeds "
    f"0-{repeats - 1}; k and C per layer under 'logistic_c'), 45 L2 strengths (SimCLR Appendix "
    "B.8), the strongest L2 within one standard error of the best mean accuracy"
  )


CV_DESCRIPTION = cv_description()
"""How the logistic probe's C is chosen by default; recorded in results.json's settings."""


def plan_c_selection(
  counts: np.ndarray,
  class_names: list[str],
  *,
  probe_c: float | None,
  label_fraction: float,
  c_rule: str = "best",
  cv_repeats: int = 1,
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
    c_rule, cv_repeats: how cross-validation picks C (`classifiers.select_logistic_c`).

  Returns:
    (c, selection): c the fixed C for `evaluate_layer` (None: chosen by cross-validation per
    layer); selection says how, for results.json's settings: 'fixed' (the caller's),
    `cv_description(c_rule, cv_repeats)` (`CV_DESCRIPTION` by default), or 'fixed: class <name>
    has 1 labelled image ...' (the fallback).
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
  return None, cv_description(c_rule, cv_repeats)


def draw_seeds(num_draws: int, first: int = 0) -> list[int]:
  """The label draws' random seeds: draw k uses seed first + k (0 .. N-1 by default).

  Raises:
    ValueError: num_draws < 1.
  """
  if num_draws < 1:
    raise ValueError(f"num_draws={num_draws} must be >= 1.")
  return list(range(first, first + num_draws))


def summarize(values) -> dict[str, Any]:
  """Mean, sd and a `CONFIDENCE` t-interval of a figure over label draws.

  The interval is mean +- t_{(1 + CONFIDENCE) / 2, n - 1} sd / sqrt(n): it covers the label
  draws' spread for this checkpoint and this test set, not the test set's sampling noise nor a
  second pretraining run's.

  Args:
    values: float [n], n >= 1, one figure per draw.

  Returns:
    {'n', 'mean', 'sd' (ddof 1), 'ci95': [low, high]}; 'sd' and 'ci95' are None when n = 1.

  Raises:
    ValueError: no values.
  """
  values = np.asarray(values, np.float64)
  if values.size == 0:
    raise ValueError("summarize needs at least one value.")
  n, mean = values.size, float(values.mean())
  if n == 1:
    return {"n": 1, "mean": mean, "sd": None, "ci95": None}
  sd = float(values.std(ddof=1))
  half = float(stats.t.ppf((1 + CONFIDENCE) / 2, n - 1) * sd / math.sqrt(n))
  return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def summarize_draws(draws: list[dict[str, Any]]) -> dict[str, Any]:
  """`summarize` of each figure over label draws.

  Args:
    draws: one entry per draw, each {'top1', ['top5'], 'knn': {name: {'top1', ...}},
      ['sweep': [{'head_layers_kept', 'layer', 'top1', ...}, ...]]}, the same keys in every entry.

  Returns:
    {'top1': summary, ['top5': summary], 'knn': {name: summary of its top1}, ['sweep':
    [{'head_layers_kept', 'layer', 'top1': summary}, ...]]}.

  Raises:
    ValueError: no draws.
  """
  if not draws:
    raise ValueError("summarize_draws needs at least one draw.")
  first = draws[0]
  summary: dict[str, Any] = {
    key: summarize([d[key] for d in draws]) for key in ("top1", "top5") if key in first
  }
  summary["knn"] = {
    name: summarize([d["knn"][name]["top1"] for d in draws]) for name in first["knn"]
  }
  if "sweep" in first:
    summary["sweep"] = [
      {
        "head_layers_kept": layer["head_layers_kept"],
        "layer": layer["layer"],
        "top1": summarize([d["sweep"][i]["top1"] for d in draws]),
      }
      for i, layer in enumerate(first["sweep"])
    ]
  return summary


def paired_difference(
  draws: list[dict[str, Any]], baseline: list[dict[str, Any]], key: str = "top1"
) -> dict[str, Any]:
  """`summarize` of a figure's difference to a baseline's, draw by draw.

  Two methods probed on the same label draws differ by less than either varies across draws, so
  their comparison reads the per-draw differences (a paired t-interval), not two separate
  intervals. Both must come from the same split and the same draws.

  Args:
    draws, baseline: results.json's 'draws' of two runs, each entry with 'seed',
      'labelled_indices' and `key`.
    key: the figure compared, e.g. 'top1'.

  Returns:
    `summarize` of draws[k][key] - baseline[k][key] over k.

  Raises:
    ValueError: different numbers of draws, seeds or labelled images.
  """
  if len(draws) != len(baseline):
    raise ValueError(f"{len(draws)} draws against {len(baseline)}; pair the same draws.")
  for a, b in zip(draws, baseline, strict=True):
    if a["seed"] != b["seed"] or a["labelled_indices"] != b["labelled_indices"]:
      raise ValueError(
        f"Draw with seed {a['seed']} is paired with seed {b['seed']} or other labelled images: "
        "compare runs on the same split, label fraction and draws."
      )
  return summarize([a[key] - b[key] for a, b in zip(draws, baseline, strict=True)])


def all_labels_cv(
  features: np.ndarray,
  labels: np.ndarray,
  *,
  standardize: bool = True,
  lambdas: np.ndarray = classifiers.L2_GRID,
) -> dict[str, Any]:
  """Cross-validated accuracy of the logistic probe with every given label: a diagnostic.

  Stratified 5-fold CV (split seed 0) over the 45 L2 strengths of `classifiers.select_logistic_c`,
  reporting the best mean accuracy: what the frozen features hold when labels are plentiful,
  against which the few-label probe's shortfall reads. A maximum over the grid, so slightly
  optimistic; it chooses nothing and trains no reported probe.

  Args:
    features: float [N, D], every training image the probe may be trained on.
    labels: int [N], at least 2 per class.
    standardize: as `classifiers.fit_logistic`'s.
    lambdas: the L2 strengths searched.

  Returns:
    {'top1': the best mean fold accuracy in [0, 1], 'c', 'folds', 'num_labelled': N}.

  Raises:
    ValueError: `classifiers.select_logistic_c`'s.
  """
  chosen = classifiers.select_logistic_c(features, labels, lambdas=lambdas, standardize=standardize)
  return {
    "top1": chosen.cv_top1,
    "c": chosen.c,
    "folds": chosen.folds,
    "num_labelled": len(labels),
  }
