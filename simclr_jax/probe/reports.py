"""Reports of the linear probe: the per-class table, the confusion matrix and accuracy per layer.

The per-class table is scikit-learn's classification report written as Markdown, as in the
PyTorch original's README; the figures are matplotlib PNGs written atomically.
"""

import os
from typing import Any

import matplotlib
import numpy as np
from sklearn import metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_SUMMARY_ROWS = ("macro avg", "weighted avg")


def classification_table(
  labels: np.ndarray, predictions: np.ndarray, class_names: list[str]
) -> dict[str, Any]:
  """sklearn's classification report over every class (absent classes score 0, not an error).

  Args:
    labels, predictions: int [N] in [0, len(class_names)).

  Returns:
    {class name: {'precision', 'recall', 'f1-score', 'support'}, 'accuracy': float,
    'macro avg': {...}, 'weighted avg': {...}}; scores in [0, 1], support a count.
  """
  return metrics.classification_report(
    labels,
    predictions,
    labels=np.arange(len(class_names)),
    target_names=class_names,
    output_dict=True,
    zero_division=0,
  )


def markdown_table(report: dict[str, Any]) -> str:
  """A `classification_table` as a Markdown table: one row per class, accuracy, the averages."""
  lines = [
    "| class | precision | recall | f1-score | support |",
    "| --- | ---: | ---: | ---: | ---: |",
  ]

  def row(name, scores):
    values = (scores["precision"], scores["recall"], scores["f1-score"])
    cells = " | ".join(f"{v:.2f}" for v in values)
    return f"| {name} | {cells} | {int(scores['support'])} |"

  for name, scores in report.items():
    if name != "accuracy" and name not in _SUMMARY_ROWS:
      lines.append(row(name, scores))
  total = int(report["macro avg"]["support"])
  lines.append(f"| accuracy | | | {report['accuracy']:.2f} | {total} |")
  lines.extend(row(name, report[name]) for name in _SUMMARY_ROWS)
  return "\n".join(lines)


def _save(fig, path: str) -> None:
  tmp = path + ".tmp.png"
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, path)


def plot_confusion_matrix(
  matrix: np.ndarray, class_names: list[str], path: str, *, title: str = ""
) -> None:
  """Writes the confusion matrix (rows: true class, columns: predicted) as a PNG.

  Counts are printed in the cells for up to 20 classes.
  """
  n = len(class_names)
  side = min(4 + 0.5 * n, 30)
  fig, ax = plt.subplots(figsize=(side, side), dpi=100)
  display = metrics.ConfusionMatrixDisplay(matrix, display_labels=class_names)
  display.plot(ax=ax, include_values=n <= 20, xticks_rotation="vertical", colorbar=False)
  ax.set_title(title)
  fig.tight_layout()
  _save(fig, path)


def plot_accuracy_vs_layer(
  sweep: list[dict[str, Any]], path: str, *, classifier: str, chance: float, scored_on: str = "test"
) -> None:
  """Writes top-1 accuracy against the number of head layers kept (0: h) as a PNG.

  The PyTorch original's plot; SimCLR §4.2 (Fig. 8) compares the same layers.

  Args:
    sweep: one entry per depth with 'head_layers_kept', 'layer', 'top1' and
      'knn': {'k<k>': {'k', 'top1'}}, from `evaluate.run_linear_probe`.
    classifier: the probe's name, for the legend.
    chance: accuracy of guessing, 1 / classes, drawn as a dotted line.
    scored_on: the split the accuracies are measured on ('test' or 'validation'), for the axis.
  """
  kept = [p["head_layers_kept"] for p in sweep]
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  ax.plot(kept, [100 * p["top1"] for p in sweep], "o-", label=f"{classifier} probe")
  for key, knn in sweep[0]["knn"].items():
    ax.plot(
      kept,
      [100 * p["knn"][key]["top1"] for p in sweep],
      "s--",
      label=f"kNN, k={knn['k']}",
    )
  ax.axhline(100 * chance, color="grey", ls=":", label="chance")
  ax.set_xticks(kept, [f"{p['head_layers_kept']}\n({p['layer']})" for p in sweep])
  ax.set_xlabel("projection-head layers kept")
  ax.set_ylabel(f"{scored_on} top-1 accuracy (%)")
  ax.set_title("Linear evaluation against head depth")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  _save(fig, path)


def format_summary(results: dict[str, Any]) -> str:
  """The probe's results as text for a terminal: settings, table, accuracies, sweep, draws, files.

  Reads the keys `evaluate.run_linear_probe` writes; settings absent from older results.json
  files ('split', 'tta_flip', ...) read as their defaults.
  """
  s = results["settings"]
  selection = s.get("probe_c_selection")
  per_class = ", ".join(f"{k} {v}" for k, v in s["labelled_per_class"].items())
  if s.get("split", "test") == "validation":
    v = s["validation"]
    scored = (
      f"scored on {s['num_scored']} validation images held out of the training split "
      f"(seed {v['seed']}; labels drawn from the other {v['num_candidates']}; no test image read)"
    )
  else:
    scored = f"{s.get('num_scored', s['num_test'])} test images"
  lines = [
    f"Checkpoint step {s['step']} of {s['workdir']}; data {s['data_root']}",
    f"Probe: {s['classifier']} on {s['layer']} ({s['feature_dim']}-d), "
    f"{s['num_labelled']} of {s['num_train']} training labels ({s['label_fraction']:g}: "
    f"{per_class}); {scored}",
    f"Views: centre crop {s['eval_crop_fraction']} of the shorter side at "
    f"{s['eval_image_size']} px (pretraining crops: {s['image_size']} px"
    + (
      f", the last epochs' {s['last_crop_size']} px)"
      if s["last_crop_size"] != s["image_size"]
      else ")"
    )
    + (
      f"; probe also trained on {s['train_views']} random views of each labelled image"
      if s["train_views"]
      else ""
    ),
    *_levers_lines(s),
    "",
    results["report_markdown"],
    "",
    _accuracy_line(f"{s['classifier']} probe", results) + _c_text(results, selection),
  ]
  lines += [_accuracy_line(f"kNN (k={v['k']})", v) for v in results["knn"].values()]
  for p in results.get("sweep", []):
    knn = ", ".join(f"kNN k={v['k']} {v['top1']:.2%}" for v in p["knn"].values())
    lines.append(
      f"  {p['head_layers_kept']} head layers kept ({p['layer']}): top-1 {p['top1']:.2%}"
      f"{_c_text(p, selection)}; {knn}"
    )
  lines += _draws_lines(results)
  if "all_labels_cv" in results:
    d = results["all_labels_cv"]
    lines.append(
      f"Diagnostic, all {d['num_labelled']} training labels on {d['layer']}: {d['folds']}-fold CV "
      f"top-1 {d['top1']:.2%} (best of the C grid, C = {d['c']:.3g}; not a test figure)"
    )
  lines += [f"Wrote {path}" for path in results["files"].values()]
  return "\n".join(lines)


def _levers_lines(settings: dict[str, Any]) -> list[str]:
  """A line naming the test-time views and standardisation, when either is on."""
  parts = []
  if settings.get("tta_sizes") or settings.get("tta_flip"):
    sizes = settings.get("tta_sizes") or [settings["eval_image_size"]]
    views = f"averaged over whole-image views of {', '.join(map(str, sizes))} px"
    parts.append(views + (" and their mirror images" if settings.get("tta_flip") else ""))
  if settings.get("standardize"):
    parts.append("standardised with the statistics of every training image the probe may use")
  return [f"Features: {'; '.join(parts)}"] if parts else []


def _draws_lines(results: dict[str, Any]) -> list[str]:
  """Mean, sd and 95% interval over the label draws, and each draw's top-1, when N > 1."""
  if "summary" not in results:
    return []
  s, summary = results["settings"], results["summary"]
  seeds = s["draw_seeds"]

  def stats(x):
    low, high = x["ci95"]
    return f"{x['mean']:.2%} +- {x['sd']:.2%} (sd), 95% interval [{low:.2%}, {high:.2%}]"

  lines = [
    f"Over {len(seeds)} label draws (seeds {seeds[0]}-{seeds[-1]}): {s['classifier']} probe "
    f"top-1 {stats(summary['top1'])}",
    "  draws: " + ", ".join(f"{d['top1']:.1%}" for d in results["draws"]),
  ]
  lines += [
    f"  kNN (k={results['knn'][name]['k']}): top-1 {stats(x)}" for name, x in summary["knn"].items()
  ]
  lines += [
    f"  {p['head_layers_kept']} head layers kept ({p['layer']}): top-1 {stats(p['top1'])}"
    for p in summary.get("sweep", [])
  ]
  return lines


def _c_text(scores: dict[str, Any], selection: str | None = None) -> str:
  """' (C = ..., how chosen)' for a logistic probe's result, '' otherwise.

  `selection`: the settings' 'probe_c_selection', which says why a fixed C was fixed.
  """
  chosen = scores.get("logistic_c")
  if chosen is None:
    return ""
  if chosen["cv_top1"] is None:
    return f" (C = {chosen['c']:.3g}, {selection or 'fixed'})"
  cv = f"{chosen['cv_top1']:.2%}"
  if chosen.get("cv_se") is not None:
    return (
      f" (C = {chosen['c']:.3g}, chosen by {chosen['repeats']} x {chosen['folds']}-fold CV on "
      f"the labelled images, one-SE rule: CV top-1 {cv}, best {chosen['best_cv_top1']:.2%} "
      f"+- {chosen['cv_se']:.2%})"
    )
  return (
    f" (C = {chosen['c']:.3g}, chosen by {chosen['folds']}-fold CV on the labelled images: "
    f"best CV top-1 {cv})"
  )


def _accuracy_line(what: str, scores: dict[str, Any]) -> str:
  line = f"{what}: top-1 {scores['top1']:.2%}"
  if "top5" in scores:
    line += f", top-5 {scores['top5']:.2%}"
  return line
