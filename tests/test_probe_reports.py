"""Reports of the probe: the per-class table, the terminal summary (how C was chosen), the PNGs."""

import os

import numpy as np
import pytest

from simclr_jax.probe import reports

NAMES = ["ant", "bee", "cat"]
LABELS = np.asarray([0, 0, 1, 1, 2])
PREDICTIONS = np.asarray([0, 1, 1, 1, 0])  # 'cat' is never predicted


def test_classification_table_and_its_markdown():
  table = reports.classification_table(LABELS, PREDICTIONS, NAMES)
  assert table["ant"] == pytest.approx(
    {"precision": 0.5, "recall": 0.5, "f1-score": 0.5, "support": 2}
  )
  assert table["bee"]["precision"] == pytest.approx(2 / 3) and table["bee"]["recall"] == 1.0
  assert table["cat"]["precision"] == 0.0  # never predicted: 0, not an error
  assert table["accuracy"] == pytest.approx(0.6)
  lines = reports.markdown_table(table).splitlines()
  assert lines[:2] == [
    "| class | precision | recall | f1-score | support |",
    "| --- | ---: | ---: | ---: | ---: |",
  ]
  assert lines[2:6] == [
    "| ant | 0.50 | 0.50 | 0.50 | 2 |",
    "| bee | 0.67 | 1.00 | 0.80 | 2 |",
    "| cat | 0.00 | 0.00 | 0.00 | 1 |",
    "| accuracy | | | 0.60 | 5 |",
  ]
  assert [line.split(" | ")[0] for line in lines[6:]] == ["| macro avg", "| weighted avg"]


def _results(logistic_c, selection):
  settings = {
    "step": 6,
    "workdir": "/runs/toy",
    "data_root": "/data/toy",
    "classifier": "logistic",
    "layer": "h",
    "feature_dim": 64,
    "num_labelled": 7,
    "num_train": 70,
    "label_fraction": 0.1,
    "labelled_per_class": {"ant": 3, "bee": 3, "cat": 1},
    "num_test": 9,
    "eval_crop_fraction": 1.0,
    "eval_image_size": 32,
    "image_size": 32,
    "last_crop_size": 32,
    "train_views": 0,
    "probe_c_selection": selection,
  }
  return {
    "settings": settings,
    "top1": 0.5,
    "knn": {"k20": {"k": 7, "top1": 0.25}},
    "logistic_c": logistic_c,
    "report_markdown": "| class |",
    "files": {"results": "/runs/toy/linear/results.json"},
  }


def test_format_summary_says_how_c_was_chosen():
  cv = {"c": 0.02, "cv_top1": 0.75, "folds": 3}
  lines = reports.format_summary(_results(cv, "stratified k-fold CV ...")).splitlines()
  assert lines[0] == "Checkpoint step 6 of /runs/toy; data /data/toy"
  assert "7 of 70 training labels (0.1: ant 3, bee 3, cat 1); 9 test images" in lines[1]
  assert (
    "logistic probe: top-1 50.00% (C = 0.02, chosen by 3-fold CV on the labelled images: "
    "best CV top-1 75.00%)" in lines
  )
  assert "kNN (k=7): top-1 25.00%" in lines and lines[-1] == "Wrote /runs/toy/linear/results.json"
  fixed = {"c": 1.0, "cv_top1": None, "folds": None}
  assert "logistic probe: top-1 50.00% (C = 1, fixed)" in reports.format_summary(
    _results(fixed, "fixed")
  )
  fallback = "fixed: class 'cat' has 1 labelled image"
  assert f"(C = 1, {fallback})" in reports.format_summary(_results(fixed, fallback))


def test_figures_are_written_as_png(tmp_path):
  matrix = np.asarray([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
  sweep = [
    {"head_layers_kept": d, "layer": name, "top1": top1, "knn": {"k20": {"k": 7, "top1": 0.5}}}
    for d, name, top1 in [(0, "h", 0.9), (1, "head layer 1", 0.8), (2, "z", 0.6)]
  ]
  reports.plot_confusion_matrix(matrix, NAMES, str(tmp_path / "cm.png"), title="toy")
  reports.plot_accuracy_vs_layer(
    sweep, str(tmp_path / "layers.png"), classifier="logistic", chance=1 / 3
  )
  assert sorted(os.listdir(tmp_path)) == ["cm.png", "layers.png"]  # no temporary files left
  for name in ("cm.png", "layers.png"):
    with open(tmp_path / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
