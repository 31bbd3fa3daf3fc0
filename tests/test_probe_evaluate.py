"""Linear evaluation: one layer's probe and kNN, how C is chosen, and the pipeline pretrain ->
Orbax checkpoint -> probe end to end on a toy folder of coloured images: label draws, the
validation split (no test image read), standardisation, the levers and the CLI."""

import dataclasses
import functools
import json
import logging
import math
import os
import shutil

import ml_collections
import numpy as np
import probe_helpers
import pytest
from absl.testing import flagsaver
from probe_helpers import BATCH_SIZE, COLOURS, NUM_TEST, NUM_TRAIN, blobs, copies

import run_linear
from configs import tiny
from simclr_jax import checkpoint, models
from simclr_jax.data import image_folder
from simclr_jax.probe import classifiers, evaluate, features, protocol, reports


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
  return probe_helpers.pretrain_colour_run(tmp_path_factory)


@pytest.mark.parametrize("classifier", evaluate.CLASSIFIERS)
def test_probes_separate_blobs(classifier):
  x, y = blobs(12, 30, seed=1)
  test_x, test_y = blobs(12, 10, seed=2)
  result, predictions = evaluate.evaluate_layer(
    x, y, test_x, test_y, num_classes=12, classifier=classifier, c=1.0
  )
  assert result["top1"] > 0.9 and result["top5"] >= result["top1"]
  assert np.mean(predictions == test_y) == pytest.approx(result["top1"])
  assert result["knn"]["k20"]["k"] == 20 and result["knn"]["k200"]["k"] == 200
  assert result["knn"]["k20"]["top1"] > 0.9
  few, _ = evaluate.evaluate_layer(
    x[y < 3], y[y < 3], test_x[test_y < 3], test_y[test_y < 3], num_classes=3, c=1.0
  )
  assert "top5" not in few and few["knn"]["k200"]["k"] == 90  # k capped at the labelled count


def test_evaluate_layer_records_and_uses_the_chosen_c(monkeypatch):
  x, y = blobs(3, 20, seed=1)
  test_x, test_y = blobs(3, 10, seed=2)
  fitted = []
  fit = classifiers.fit_logistic
  monkeypatch.setattr(
    classifiers, "fit_logistic", lambda *a, c, **kw: fitted.append(c) or fit(*a, c=c, **kw)
  )
  chosen, _ = evaluate.evaluate_layer(x, y, test_x, test_y, num_classes=3)
  expected = 1.0 / (1e5 * 60)
  assert chosen["logistic_c"] == {"c": pytest.approx(expected), "cv_top1": 1.0, "folds": 5}
  fixed, _ = evaluate.evaluate_layer(x, y, test_x, test_y, num_classes=3, c=1.0)
  assert fixed["logistic_c"] == {"c": 1.0, "cv_top1": None, "folds": None}
  assert fitted == [pytest.approx(expected), 1.0]  # the probe is fit with the chosen C
  sgd, _ = evaluate.evaluate_layer(x, y, test_x, test_y, num_classes=3, classifier="linear_sgd")
  assert "logistic_c" not in sgd
  with pytest.raises(ValueError, match="c=0.0 must be > 0"):
    evaluate.evaluate_layer(x, y, test_x, test_y, num_classes=3, c=0.0)
  with pytest.raises(ValueError, match=r"extra_train \(7 rows\) is not K views"):
    evaluate.evaluate_layer(x, y, test_x, test_y, num_classes=3, extra_train=(x[:7], y[:7]))
  shuffled = (np.tile(x, (2, 1)), np.tile(y, 2))  # view-major: labels out of order
  with pytest.raises(ValueError, match="example-major"):
    evaluate.evaluate_layer(x, y, test_x, test_y, num_classes=3, extra_train=shuffled)


def test_evaluate_layer_validates_on_whole_images_only():
  # Random labels: if an image's views fell in other folds than the image (copies), or if views
  # that carry the label were scored (signal), CV would score far above chance.
  x, y, repeats, copy_labels = copies(60, 64, 3)
  for views in (repeats, repeats + 5.0 * np.eye(64)[copy_labels]):
    result, _ = evaluate.evaluate_layer(
      x, y, x[:6], y[:6], num_classes=3, extra_train=(views, copy_labels)
    )
    assert result["logistic_c"]["cv_top1"] < 0.6


def test_probe_with_a_single_labelled_image_of_a_class(pretrained_run, tmp_path, caplog):
  """A class with 1 labelled image at 10%: C falls back to 1.0, a warning names the class."""
  _, workdir = pretrained_run
  small = probe_helpers.write_colour_folder(
    tmp_path / "small", num_train={"blue": 30, "green": 30, "red": 10}, num_test=3
  )
  with caplog.at_level(logging.WARNING):
    results = evaluate.run_linear_probe(
      workdir,
      data_root=small,
      label_fraction=0.1,
      sweep_layers=True,
      batch_size=BATCH_SIZE,
      output_dir=str(tmp_path / "probe"),
    )
  assert "Class 'red' has 1 labelled image at label_fraction=0.1" in caplog.text
  settings = results["settings"]
  assert settings["labelled_per_class"] == {"blue": 3, "green": 3, "red": 1}
  assert settings["probe_c"] == 1.0
  assert settings["probe_c_selection"].startswith("fixed: class 'red' has 1 labelled image")
  for scores in (results, *results["sweep"]):
    assert scores["logistic_c"] == {"c": 1.0, "cv_top1": None, "folds": None}
  assert np.sum(results["confusion_matrix"]) == 3 * len(COLOURS)
  assert "(C = 1, fixed: class 'red' has 1 labelled image" in reports.format_summary(results)
  with open(tmp_path / "probe" / "results.json") as f:
    written = json.load(f)
  assert written["settings"] == settings and written["top1"] == results["top1"]


def test_probe_end_to_end(pretrained_run):
  root, workdir = pretrained_run
  results = evaluate.run_linear_probe(
    workdir, label_fraction=0.5, sweep_layers=True, batch_size=BATCH_SIZE
  )
  settings = results["settings"]
  assert settings["data_root"] == root and settings["layer"] == "h"
  assert settings["labelled_per_class"] == {name: NUM_TRAIN // 2 for name in COLOURS}
  assert settings["num_test"] == settings["num_scored"] == len(COLOURS) * NUM_TEST
  assert settings["split"] == "test" and settings["draw_seeds"] == [0]
  assert "draws" not in results and "summary" not in results  # one draw: today's output
  assert not settings["standardize"] and not settings["tta_flip"] and not settings["tta_sizes"]
  assert results["top1"] >= 0.9  # chance is 1/3
  assert settings["probe_c"] is None and settings["probe_c_selection"] == protocol.CV_DESCRIPTION
  assert results["logistic_c"]["cv_top1"] is not None and results["logistic_c"]["folds"] == 5
  assert "chosen by 5-fold CV on the labelled images" in reports.format_summary(results)
  assert results["knn"]["k20"]["top1"] >= 0.9
  assert np.sum(results["confusion_matrix"]) == len(COLOURS) * NUM_TEST
  num_layers = tiny.get_config().model.head.num_layers
  sweep = results["sweep"]
  assert [p["head_layers_kept"] for p in sweep] == list(range(num_layers + 1))
  assert [p["layer"] for p in sweep] == ["h", "head layer 1", "z"]
  assert sweep[0]["top1"] == results["top1"]
  table = results["report_markdown"].splitlines()
  assert table[0] == "| class | precision | recall | f1-score | support |"
  assert [r.split(" | ")[0] for r in table[2:5]] == [f"| {name}" for name in COLOURS]

  files = results["files"]
  assert set(files) == {"results", "confusion_matrix", "acc_vs_layer"}
  assert os.path.dirname(files["results"]) == os.path.join(workdir, "linear")
  with open(files["results"]) as f:
    written = json.load(f)
  assert written["top1"] == results["top1"] and written["settings"] == settings
  assert len(written["sweep"]) == num_layers + 1
  for key in ("confusion_matrix", "acc_vs_layer"):
    with open(files[key], "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _spy(monkeypatch, module, name):
  """Wraps module.name to record each call's positional and keyword arguments."""
  calls, original = [], getattr(module, name)

  def spy(*args, **kwargs):
    calls.append((args, kwargs))
    return original(*args, **kwargs)

  monkeypatch.setattr(module, name, spy)
  return calls


def test_validation_run_reads_no_test_image(pretrained_run, tmp_path, monkeypatch):
  """Scored on images held out of the train split, labels drawn from the others, statistics from
  those others: the run succeeds on a copy of the data that has no test split at all."""
  root, workdir = pretrained_run
  shutil.copytree(os.path.join(root, "train"), tmp_path / "data" / "train")
  extracted = _spy(monkeypatch, features, "extract_features")
  fitted = _spy(monkeypatch, classifiers, "standardizer")
  results = evaluate.run_linear_probe(
    workdir,
    data_root=str(tmp_path / "data"),
    label_fraction=0.25,
    batch_size=BATCH_SIZE,
    output_dir=str(tmp_path / "probe"),
    split="validation",
    num_draws=3,
    standardize=True,
    all_labels_cv=True,
  )
  assert {args[3] for args, _ in extracted} == {"train"}  # (model, variables, config, split)
  paths, labels, _ = image_folder.list_image_folder(root, "train", list(COLOURS))
  held_out = np.asarray(results["validation_indices"])
  rest = np.setdiff1d(np.arange(len(labels)), held_out)
  num_train = len(COLOURS) * NUM_TRAIN
  settings = results["settings"]
  assert settings["split"] == "validation" and settings["num_test"] == 0
  assert len(held_out) == settings["num_scored"] == math.ceil(0.2 * num_train)
  assert sorted(np.bincount(labels[held_out]).tolist()) == [3, 3, 4]  # stratified
  assert settings["validation"]["num_candidates"] == len(rest) == num_train - len(held_out)
  assert np.sum(results["confusion_matrix"]) == len(held_out)
  assert all("/train/" in paths[i] for i in held_out)

  draws = results["draws"]
  assert [d["seed"] for d in draws] == settings["draw_seeds"] == [0, 1, 2]
  for k, draw in enumerate(draws):
    labelled = np.asarray(draw["labelled_indices"])
    assert len(labelled) == num_train // 4 and not np.intersect1d(labelled, held_out).size
    assert not set(paths[i] for i in labelled) & set(paths[i] for i in held_out)
    expected, _ = protocol.label_subset(labels, 0.25, num_classes=3, seed=k, candidates=rest)
    np.testing.assert_array_equal(labelled, expected)  # draw k: seed k, whatever the run
  assert results["top1"] == draws[0]["top1"]
  assert results["summary"]["top1"] == protocol.summarize([d["top1"] for d in draws])
  assert results["all_labels_cv"]["num_labelled"] == len(rest)

  # Standardisation: fitted on the unlabelled features of the images the probe may use.
  pretrained = checkpoint.load_pretrained(workdir)
  model = models.build_model(pretrained.config.model, image_size=32)
  train_features, _ = features.extract_features(
    model,
    {"params": pretrained.params, "batch_stats": pretrained.batch_stats},
    pretrained.config,
    "train",
    batch_size=BATCH_SIZE,
  )
  (fit_rows,), _ = fitted[0]
  np.testing.assert_allclose(fit_rows, train_features[0][rest], rtol=1e-5, atol=1e-5)
  with open(tmp_path / "probe" / "results.json") as f:
    written = json.load(f)
  assert written["validation_indices"] == held_out.tolist() and len(written["draws"]) == 3


def test_draws_and_standardisation_on_the_test_split(pretrained_run, tmp_path, monkeypatch):
  _, workdir = pretrained_run
  fitted = _spy(monkeypatch, classifiers, "standardizer")
  probe = functools.partial(
    evaluate.run_linear_probe,
    workdir,
    label_fraction=0.25,
    batch_size=BATCH_SIZE,
    output_dir=str(tmp_path / "probe"),
    standardize=True,
    probe_c=1.0,  # the CV of C is checked elsewhere; here: what each draw is
  )
  results = probe(num_draws=2, sweep_layers=True)
  num_layers = tiny.get_config().model.head.num_layers
  assert len(fitted) == num_layers + 1  # one standardiser per layer
  for (fit_rows,), _ in fitted:
    assert len(fit_rows) == len(COLOURS) * NUM_TRAIN  # the training images, never the test's
  single = probe(seed=1, sweep_layers=True)  # draw 1 of every N-draw run is the seed-1 run
  assert results["draws"][1]["top1"] == single["top1"]
  assert [p["top1"] for p in results["draws"][1]["sweep"]] == [p["top1"] for p in single["sweep"]]
  assert results["draws"][1]["labelled_indices"] != results["draws"][0]["labelled_indices"]
  assert single["settings"]["draw_seeds"] == [1]
  sweep = results["summary"]["sweep"]
  assert [p["layer"] for p in sweep] == ["h", "head layer 1", "z"]
  for d, p in enumerate(sweep):
    assert p["top1"] == protocol.summarize([r["sweep"][d]["top1"] for r in results["draws"]])


def test_cli_protocol_and_levers(pretrained_run, capsys, tmp_path):
  _, workdir = pretrained_run
  argv = ["run_linear.py", f"--workdir={workdir}", "--label_fraction=0.25"]
  argv += [f"--batch_size={BATCH_SIZE}", f"--output_dir={tmp_path}/probe", "--num_draws=2"]
  argv += ["--split=validation", "--all_labels_cv", "--tta_flip", "--tta_sizes=24"]
  argv += ["--standardize", "--c_selection=repeated_1se", "--cv_repeats=2"]
  with flagsaver.flagsaver():
    run_linear.FLAGS(argv)
    run_linear.main(argv[:1])
  out = capsys.readouterr().out
  with open(os.path.join(tmp_path, "probe", "results.json")) as f:
    written = json.load(f)
  s = written["settings"]
  assert (s["tta_flip"], s["tta_sizes"], s["standardize"]) == (True, [24], True)
  assert (s["c_selection"], s["cv_repeats"], s["num_draws"]) == ("repeated_1se", 2, 2)
  chosen = written["logistic_c"]
  assert chosen["repeats"] == 2 and chosen["folds"] == 4  # 4 labelled images a class
  assert chosen["cv_top1"] >= chosen["best_cv_top1"] - chosen["cv_se"]
  assert "scored on 10 validation images held out of the training split" in out
  assert "no test image read" in out
  assert "Features: averaged over whole-image views of 24 px and their mirror images" in out
  assert "one-SE rule" in out and "Over 2 label draws (seeds 0-1): logistic probe top-1" in out
  assert "95% interval" in out and "Diagnostic, all 38 training labels on h: 5-fold CV" in out


def test_cli(pretrained_run, capsys, tmp_path):
  _, workdir = pretrained_run
  argv = ["run_linear.py", f"--workdir={workdir}", "--remove_top_layers=0", "--sweep_layers"]
  argv += ["--classifier=linear_sgd", "--label_fraction=1.0", f"--batch_size={BATCH_SIZE}"]
  argv += ["--image_size=24", "--crop_fraction=0.5", "--train_views=2"]
  argv += [f"--output_dir={tmp_path}/probe"]
  with flagsaver.flagsaver():
    run_linear.FLAGS(argv)
    run_linear.main(argv[:1])
  out = capsys.readouterr().out
  assert "Probe: linear_sgd on z (16-d), 48 of 48 training labels" in out
  assert "| class | precision | recall | f1-score | support |" in out
  with open(os.path.join(tmp_path, "probe", "results.json")) as f:
    written = json.load(f)
  assert os.path.exists(os.path.join(tmp_path, "probe", "acc_vs_layer.png"))
  assert written["settings"]["remove_top_layers"] == 0
  assert written["settings"]["eval_image_size"] == 24
  assert written["settings"]["train_views"] == 2
  assert written["settings"]["probe_train_rows"] == 48 * 3  # centre view + 2 random views each
  assert written["settings"]["eval_crop_fraction"] == 1.0  # 32 px pretraining: whole images
  assert "Views: centre crop 1.0 of the shorter side at 24 px (pretraining crops: 32 px)" in out
  assert "probe also trained on 2 random views of each labelled image" in out
  assert written["top1"] > 0.6


def test_bad_inputs(pretrained_run, tmp_path):
  root, workdir = pretrained_run
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    evaluate.run_linear_probe(str(tmp_path))
  other = probe_helpers.write_colour_folder(
    tmp_path / "other", {"blue": (0, 0, 1), "cyan": (0, 1, 1)}
  )
  with pytest.raises(ValueError, match=r"do not match.*missing \['green', 'red'\]"):
    evaluate.run_linear_probe(workdir, data_root=other)
  with pytest.raises(ValueError, match="remove_top_layers=3"):
    evaluate.run_linear_probe(workdir, remove_top_layers=3)
  with pytest.raises(ValueError, match="without labelled examples"):
    evaluate.run_linear_probe(workdir, label_fraction=0.02, batch_size=BATCH_SIZE)
  with pytest.raises(ValueError, match="classifier"):
    evaluate.run_linear_probe(workdir, classifier="svm")
  with pytest.raises(ValueError, match="probe_c=-1.0 must be > 0"):
    evaluate.run_linear_probe(workdir, probe_c=-1.0)
  with pytest.raises(ValueError, match="train_views=-1"):
    evaluate.run_linear_probe(workdir, train_views=-1)
  with pytest.raises(ValueError, match="image_size=0"):
    evaluate.run_linear_probe(workdir, image_size=0)
  with pytest.raises(ValueError, match=r"crop_fraction=1.5 must be in \(0, 1\]"):
    evaluate.run_linear_probe(workdir, crop_fraction=1.5)


def test_checkpoints_load_whatever_runtime_or_fields_they_were_saved_with(pretrained_run):
  """Speed settings are not the model: a checkpoint saved with the old fields (model.conv_impl,
  model.conv_grad_chunk, top-level num_cpu_devices, head preset 'seed') loads with them moved to
  `runtime` and renamed, and probes give the same features under any conv_impl."""
  root, workdir = pretrained_run
  saved = checkpoint.load_pretrained(workdir).config.to_dict()
  old = json.loads(json.dumps(saved))
  del old["runtime"]
  old["num_cpu_devices"] = 2
  old["model"].update(conv_impl="onednn", conv_grad_chunk=8)
  old["model"]["head"]["preset"] = "seed"
  upgraded = checkpoint.upgrade_config(old)
  assert upgraded["runtime"] == {"conv_impl": "onednn", "conv_grad_chunk": 8, "num_cpu_devices": 2}
  assert "conv_impl" not in upgraded["model"] and "num_cpu_devices" not in upgraded
  assert upgraded["model"]["head"]["preset"] == "pytorch_original"
  assert checkpoint.upgrade_config(saved) == saved  # today's configs pass unchanged
  config, names = evaluate._data_config(
    dataclasses.replace(
      checkpoint.load_pretrained(workdir), config=ml_collections.ConfigDict(upgraded)
    ),
    None,
  )
  assert names == sorted(COLOURS) and config.model.head.preset == "pytorch_original"
