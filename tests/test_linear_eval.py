"""Linear evaluation: frozen features, label subsets, probes, kNN, reports, and the pipeline
pretrain -> Orbax checkpoint -> probe end to end on a toy folder of coloured images."""

import json
import os

import jax
import numpy as np
import pytest
from absl.testing import flagsaver
from PIL import Image
from sklearn.model_selection import StratifiedKFold

import run_linear
from configs import tiny
from simclr_jax import checkpoint, input_pipeline, linear_eval, models, probe_reports, probes, train

# Learnable by any encoder: the class is the hue; brightness and pixel noise vary per image.
COLOURS = {"blue": (0.1, 0.2, 0.9), "green": (0.1, 0.8, 0.2), "red": (0.9, 0.1, 0.1)}
NUM_TRAIN, NUM_TEST = 16, 7  # per class; 21 test images never fill whole batches of 8
BATCH_SIZE = 8


def write_colour_folder(root, classes=COLOURS, *, num_train=NUM_TRAIN, num_test=NUM_TEST):
  rng = np.random.default_rng(0)
  for split, n in (("train", num_train), ("test", num_test)):
    for name, rgb in classes.items():
      os.makedirs(root / split / name)
      for i in range(n):
        image = np.asarray(rgb) * rng.uniform(0.6, 1.0) + rng.normal(0, 0.05, (32, 32, 3))
        pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / name / f"{i}.png")
  return str(root)


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
  """configs/tiny.py pretrained for 2 epochs (6 steps) on the colour folder: (root, workdir)."""
  root = write_colour_folder(tmp_path_factory.mktemp("colours"))
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny.get_config()
  config.data.root = root
  # unsafe_rbg keys compile far faster than threefry on CPU; the probe needs no stronger PRNG.
  with jax.default_prng_impl("unsafe_rbg"):
    train.pretrain(config, workdir)
  return root, workdir


def _tree_copy(tree):
  return jax.tree_util.tree_map(np.array, tree)


def test_features_independent_of_batch_size_and_repeats(pretrained_run):
  root, workdir = pretrained_run
  pretrained = checkpoint.load_pretrained(workdir)
  config = pretrained.config
  num_layers = config.model.head.num_layers
  model = models.build_model(config.model, image_size=config.data.image_size)
  variables = {"params": pretrained.params, "batch_stats": pretrained.batch_stats}
  before = _tree_copy(variables)
  depths = tuple(range(num_layers + 1))

  def extract(batch_size):
    return linear_eval.extract_features(
      model, variables, config, "test", batch_size=batch_size, depths=depths
    )

  (one, labels), (eight, labels8), (again, _) = extract(1), extract(BATCH_SIZE), extract(BATCH_SIZE)
  _, expected_labels, _ = input_pipeline.list_image_folder(root, "test", list(COLOURS))
  np.testing.assert_array_equal(labels, expected_labels)  # each example once, in order
  np.testing.assert_array_equal(labels8, expected_labels)
  for d in depths:
    assert one[d].shape[0] == len(COLOURS) * NUM_TEST and one[d].dtype == np.float32
    np.testing.assert_array_equal(eight[d], again[d])
    # XLA picks kernels by shape, so 1 and 2 rows per device may round differently (~1e-7).
    np.testing.assert_allclose(one[d], eight[d], rtol=0, atol=1e-6 * np.abs(eight[d]).max())

  # Against one plain inference-mode apply on one device over the unpadded images.
  ds, _, _ = input_pipeline.eval_dataset(config, "test", batch_size=BATCH_SIZE)
  images = np.concatenate(
    [b["image"].reshape(-1, 32, 32, 3)[b["mask"].reshape(-1)] for b in ds.as_numpy_iterator()]
  )
  _, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  expected = (aux["features"], *aux["head_layers"])
  for d in depths:
    np.testing.assert_allclose(eight[d], expected[d], rtol=0, atol=1e-6 * np.abs(eight[d]).max())
  assert eight[0].shape[1] == models.feature_dim(config.model)
  assert eight[num_layers].shape[1] == config.model.head.output_dim

  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, before)
  reloaded = checkpoint.load_pretrained(workdir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded.params, before["params"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded.batch_stats, before["batch_stats"])


def test_label_subset_counts_per_class():
  labels = np.repeat([0, 1, 2], [40, 20, 10])
  indices, counts = linear_eval.label_subset(labels, 0.1, num_classes=3, seed=0)
  np.testing.assert_array_equal(counts, [4, 2, 1])
  np.testing.assert_array_equal(np.bincount(labels[indices], minlength=3), counts)
  assert np.all(np.diff(indices) > 0)
  again, _ = linear_eval.label_subset(labels, 0.1, num_classes=3, seed=0)
  other, _ = linear_eval.label_subset(labels, 0.1, num_classes=3, seed=1)
  np.testing.assert_array_equal(indices, again)
  assert not np.array_equal(indices, other)
  half, counts = linear_eval.label_subset(labels, 0.5, num_classes=3, seed=0)
  np.testing.assert_array_equal(counts, [20, 10, 5])
  everything, counts = linear_eval.label_subset(labels, 1.0, num_classes=3, seed=0)
  np.testing.assert_array_equal(everything, np.arange(70))
  np.testing.assert_array_equal(counts, [40, 20, 10])


@pytest.mark.parametrize(
  "sizes, fraction, match",
  [
    ([40, 20, 10], 0.0, "must be in"),
    ([40, 20, 10], 1.5, "must be in"),
    ([100, 100, 2], 0.1, r"without labelled examples.*Empty: classes \[2\]"),
    ([10] * 5, 0.05, "without labelled examples"),  # fewer picks than classes
    ([10, 0, 10], 0.5, r"classes \[1\] have no training examples"),
  ],
)
def test_label_subset_errors(sizes, fraction, match):
  labels = np.repeat(np.arange(len(sizes)), sizes)
  with pytest.raises(ValueError, match=match):
    linear_eval.label_subset(labels, fraction, num_classes=len(sizes), seed=0)


def _blobs(num_classes, per_class, *, seed, dim=16):
  """Gaussian clusters around fixed centres; `seed` draws the points."""
  centres = np.random.default_rng(0).normal(0, 3, (num_classes, dim))
  labels = np.repeat(np.arange(num_classes), per_class)
  noise = np.random.default_rng(seed).normal(0, 1, (len(labels), dim))
  return (centres[labels] + noise).astype(np.float32), labels


@pytest.mark.parametrize("classifier", linear_eval.CLASSIFIERS)
def test_probes_separate_blobs(classifier):
  x, y = _blobs(12, 30, seed=1)
  test_x, test_y = _blobs(12, 10, seed=2)
  result, predictions = linear_eval.evaluate_layer(
    x, y, test_x, test_y, num_classes=12, classifier=classifier, c=1.0
  )
  assert result["top1"] > 0.9 and result["top5"] >= result["top1"]
  assert np.mean(predictions == test_y) == pytest.approx(result["top1"])
  assert result["knn"]["k20"]["k"] == 20 and result["knn"]["k200"]["k"] == 200
  assert result["knn"]["k20"]["top1"] > 0.9
  few, _ = linear_eval.evaluate_layer(
    x[y < 3], y[y < 3], test_x[test_y < 3], test_y[test_y < 3], num_classes=3, c=1.0
  )
  assert "top5" not in few and few["knn"]["k200"]["k"] == 90  # k capped at the labelled count


def test_l2_grid_is_the_papers():
  grid = probes.L2_GRID  # SimCLR Appendix B.8: 45 log-spaced values in [1e-6, 1e5]
  assert len(grid) == 45 and grid[0] == pytest.approx(1e-6) and grid[-1] == pytest.approx(1e5)
  np.testing.assert_allclose(np.diff(np.log10(grid)), 11 / 44)


def test_select_logistic_c_ties_go_to_the_strongest_l2():
  x, y = _blobs(3, 20, seed=1)  # separable: every C in the grid scores 100% in every fold
  chosen = probes.select_logistic_c(x, y)
  assert chosen.cv_top1 == 1.0 and chosen.folds == 5
  assert chosen.c == pytest.approx(1.0 / (1e5 * len(y)))  # C = 1 / (lambda N), the largest lambda


def test_select_logistic_c_picks_the_best_cv_score():
  rng = np.random.default_rng(0)
  labels = np.tile(np.arange(3), 30)
  noise = rng.normal(size=(90, 64))
  chance = probes.select_logistic_c(noise, labels)
  signal = noise.copy()
  signal[:, :3] += 3.0 * np.eye(3)[labels]
  informed = probes.select_logistic_c(signal, labels)
  assert chance.cv_top1 < 0.6 < informed.cv_top1
  # Independently: the chosen C's folds, rebuilt by hand, give the reported score, and no C of
  # a coarser grid around it does better.
  folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(signal, labels))

  def cv_top1(c):
    return np.mean(
      [
        np.mean(probes.fit_logistic(signal[t], labels[t], c=c)(signal[v]).argmax(1) == labels[v])
        for t, v in folds
      ]
    )

  assert cv_top1(informed.c) == pytest.approx(informed.cv_top1)
  for c in 1.0 / (probes.L2_GRID[::11] * 90):
    assert cv_top1(c) <= informed.cv_top1 + 1e-9


def _copies(num, dim, views, seed=0):
  """Random features with random labels (nothing to learn), each row repeated `views` times."""
  rng = np.random.default_rng(seed)
  x, y = rng.normal(size=(num, dim)), rng.integers(0, 3, num)
  return x, y, np.repeat(x, views, axis=0), np.repeat(y, views)  # example-major copies


def test_select_logistic_c_keeps_views_of_one_image_in_one_fold():
  # Honest CV scores random labels near chance (1/3). Exact copies stand in for an image's
  # augmented views; split across folds, they leak labels (64 dims memorise 60 points).
  _, _, views, view_labels = _copies(60, 64, 4)
  groups = np.repeat(np.arange(60), 4)
  grid = probes.L2_GRID[::11]  # 1e-6 ... 1e5: memorising and regularised C alike
  leaky = probes.select_logistic_c(views, view_labels, lambdas=grid)
  grouped = probes.select_logistic_c(views, view_labels, groups=groups, lambdas=grid)
  assert leaky.cv_top1 > 0.95 and grouped.cv_top1 < 0.6


def test_select_logistic_c_lowers_the_fold_count_for_small_classes():
  x, y = _blobs(3, 3, seed=1)
  grid = probes.L2_GRID[::11]
  assert probes.select_logistic_c(x, y, lambdas=grid).folds == 3
  assert probes.select_logistic_c(x, y, folds=2, lambdas=grid).folds == 2
  groups = np.where(y == 0, np.arange(9) % 2, 10 + np.arange(9))  # class 0: 2 groups of images
  assert probes.select_logistic_c(x, y, groups=groups, lambdas=grid).folds == 2


def test_select_logistic_c_errors():
  x, y = _blobs(3, 4, seed=1)
  with pytest.raises(ValueError, match="class 2 has 1"):
    probes.select_logistic_c(x[:9], y[:9])
  with pytest.raises(ValueError, match="class 0 has 1"):
    probes.select_logistic_c(x, y, groups=np.where(y == 0, 0, np.arange(12)))
  with pytest.raises(ValueError, match="folds=1"):
    probes.select_logistic_c(x, y, folds=1)
  with pytest.raises(ValueError, match="lambdas must be non-empty and all > 0"):
    probes.select_logistic_c(x, y, lambdas=np.asarray([1.0, 0.0]))
  with pytest.raises(ValueError, match="no scored rows"):
    probes.select_logistic_c(x, y, scored=np.zeros(12, bool))


def test_evaluate_layer_records_and_uses_the_chosen_c(monkeypatch):
  x, y = _blobs(3, 20, seed=1)
  test_x, test_y = _blobs(3, 10, seed=2)
  fitted = []
  fit = probes.fit_logistic
  monkeypatch.setattr(probes, "fit_logistic", lambda *a, c: fitted.append(c) or fit(*a, c=c))
  chosen, _ = linear_eval.evaluate_layer(x, y, test_x, test_y, num_classes=3)
  expected = 1.0 / (1e5 * 60)
  assert chosen["logistic_c"] == {"c": pytest.approx(expected), "cv_top1": 1.0, "folds": 5}
  fixed, _ = linear_eval.evaluate_layer(x, y, test_x, test_y, num_classes=3, c=1.0)
  assert fixed["logistic_c"] == {"c": 1.0, "cv_top1": None, "folds": None}
  assert fitted == [pytest.approx(expected), 1.0]  # the probe is fit with the chosen C
  sgd, _ = linear_eval.evaluate_layer(x, y, test_x, test_y, num_classes=3, classifier="linear_sgd")
  assert "logistic_c" not in sgd
  with pytest.raises(ValueError, match="c=0.0 must be > 0"):
    linear_eval.evaluate_layer(x, y, test_x, test_y, num_classes=3, c=0.0)
  with pytest.raises(ValueError, match=r"extra_train \(7 rows\) is not K views"):
    linear_eval.evaluate_layer(x, y, test_x, test_y, num_classes=3, extra_train=(x[:7], y[:7]))
  shuffled = (np.tile(x, (2, 1)), np.tile(y, 2))  # view-major: labels out of order
  with pytest.raises(ValueError, match="example-major"):
    linear_eval.evaluate_layer(x, y, test_x, test_y, num_classes=3, extra_train=shuffled)


def test_select_logistic_c_scores_only_the_scored_rows():
  # Centre rows carry nothing about their random labels; their "views" carry the label plainly.
  x, y, views, view_labels = _copies(60, 64, 3)
  views = views + 5.0 * np.eye(64)[view_labels]
  rows, labels = np.concatenate([x, views]), np.concatenate([y, view_labels])
  groups = np.concatenate([np.arange(60), np.repeat(np.arange(60), 3)])
  grid = probes.L2_GRID[::11]
  everything = probes.select_logistic_c(rows, labels, groups=groups, lambdas=grid)
  centre = probes.select_logistic_c(
    rows, labels, groups=groups, scored=np.arange(240) < 60, lambdas=grid
  )
  assert everything.cv_top1 > 0.7 and centre.cv_top1 < 0.6


def test_evaluate_layer_validates_on_whole_images_only():
  # Random labels: if an image's views fell in other folds than the image (copies), or if views
  # that carry the label were scored (signal), CV would score far above chance.
  x, y, copies, copy_labels = _copies(60, 64, 3)
  for views in (copies, copies + 5.0 * np.eye(64)[copy_labels]):
    result, _ = linear_eval.evaluate_layer(
      x, y, x[:6], y[:6], num_classes=3, extra_train=(views, copy_labels)
    )
    assert result["logistic_c"]["cv_top1"] < 0.6


def test_knn_votes_are_temperature_weighted():
  train_x = np.asarray([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]], np.float32)
  train_y = np.asarray([0, 1, 1])
  query = np.asarray([[1.0, 0.1]], np.float32)  # much closer to the single class-0 example
  sharp = probes.knn_probabilities(train_x, train_y, query, k=3, temperature=0.07)
  flat = probes.knn_probabilities(train_x, train_y, query, k=3, temperature=100.0)
  assert sharp.argmax() == 0 and flat.argmax() == 1  # similarity wins vs. majority wins
  np.testing.assert_allclose(sharp.sum(axis=1), 1.0)


def test_probe_end_to_end(pretrained_run):
  root, workdir = pretrained_run
  results = linear_eval.run_linear_probe(
    workdir, label_fraction=0.5, sweep_layers=True, batch_size=BATCH_SIZE
  )
  settings = results["settings"]
  assert settings["data_root"] == root and settings["layer"] == "h"
  assert settings["labelled_per_class"] == {name: NUM_TRAIN // 2 for name in COLOURS}
  assert settings["num_test"] == len(COLOURS) * NUM_TEST
  assert results["top1"] >= 0.9  # chance is 1/3
  assert settings["probe_c"] is None and settings["probe_c_selection"] == linear_eval.CV_DESCRIPTION
  assert results["logistic_c"]["cv_top1"] is not None and results["logistic_c"]["folds"] == 5
  assert "chosen by 5-fold CV on the labelled images" in probe_reports.format_summary(results)
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
    linear_eval.run_linear_probe(str(tmp_path))
  other = write_colour_folder(tmp_path / "other", {"blue": (0, 0, 1), "cyan": (0, 1, 1)})
  with pytest.raises(ValueError, match=r"do not match.*missing \['green', 'red'\]"):
    linear_eval.run_linear_probe(workdir, data_root=other)
  with pytest.raises(ValueError, match="remove_top_layers=3"):
    linear_eval.run_linear_probe(workdir, remove_top_layers=3)
  with pytest.raises(ValueError, match="without labelled examples"):
    linear_eval.run_linear_probe(workdir, label_fraction=0.02, batch_size=BATCH_SIZE)
  with pytest.raises(ValueError, match="classifier"):
    linear_eval.run_linear_probe(workdir, classifier="svm")
  with pytest.raises(ValueError, match="probe_c=-1.0 must be > 0"):
    linear_eval.run_linear_probe(workdir, probe_c=-1.0)
  with pytest.raises(ValueError, match="train_views=-1"):
    linear_eval.run_linear_probe(workdir, train_views=-1)
  with pytest.raises(ValueError, match="image_size=0"):
    linear_eval.run_linear_probe(workdir, image_size=0)
  with pytest.raises(ValueError, match=r"crop_fraction=1.5 must be in \(0, 1\]"):
    linear_eval.run_linear_probe(workdir, crop_fraction=1.5)


def test_a_onednn_checkpoint_is_probed_with_auto(pretrained_run):
  """A run trained with conv_impl='onednn' is probed with 'auto': XLA where oneDNN cannot run."""
  root, workdir = pretrained_run
  pretrained = checkpoint.load_pretrained(workdir)
  pretrained.config.model.conv_impl = "onednn"
  config, names = linear_eval._data_config(pretrained, None)
  assert config.model.conv_impl == "auto" and names == sorted(COLOURS)
  pretrained.config.model.conv_impl = "xla"
  assert linear_eval._data_config(pretrained, None)[0].model.conv_impl == "xla"
