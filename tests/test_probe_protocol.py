"""The probe's protocol: label draws (seeds, strata, repeatability), the validation split carved
from the training images, the summary over draws (mean, sd, t-interval), how C will be chosen,
and the all-labels cross-validation diagnostic."""

import logging

import numpy as np
import pytest
from probe_helpers import COLOURS, blobs
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from simclr_jax.probe import classifiers, protocol

# imagenet-5's training split: 250 images of each of 5 classes.
IMAGENET5_LABELS = np.repeat(np.arange(5), 250)


def test_label_subset_counts_per_class():
  labels = np.repeat([0, 1, 2], [40, 20, 10])
  indices, counts = protocol.label_subset(labels, 0.1, num_classes=3, seed=0)
  np.testing.assert_array_equal(counts, [4, 2, 1])
  np.testing.assert_array_equal(np.bincount(labels[indices], minlength=3), counts)
  assert np.all(np.diff(indices) > 0)
  again, _ = protocol.label_subset(labels, 0.1, num_classes=3, seed=0)
  other, _ = protocol.label_subset(labels, 0.1, num_classes=3, seed=1)
  np.testing.assert_array_equal(indices, again)
  assert not np.array_equal(indices, other)
  half, counts = protocol.label_subset(labels, 0.5, num_classes=3, seed=0)
  np.testing.assert_array_equal(counts, [20, 10, 5])
  everything, counts = protocol.label_subset(labels, 1.0, num_classes=3, seed=0)
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
    protocol.label_subset(labels, fraction, num_classes=len(sizes), seed=0)


def test_draws_use_seeds_0_to_n_minus_1_and_repeat_exactly():
  assert protocol.draw_seeds(20) == list(range(20))
  assert protocol.draw_seeds(3, first=5) == [5, 6, 7]
  with pytest.raises(ValueError, match="num_draws=0 must be >= 1"):
    protocol.draw_seeds(0)
  labels = np.random.default_rng(3).permutation(IMAGENET5_LABELS)

  def draws():
    return [
      protocol.label_subset(labels, 0.1, num_classes=5, seed=s)[0] for s in protocol.draw_seeds(20)
    ]

  first, second = draws(), draws()
  for k, (a, b) in enumerate(zip(first, second, strict=True)):
    np.testing.assert_array_equal(a, b)  # the same draws for every method compared
    # Draw k is the seed-k draw, as a single run with --seed k makes it.
    np.testing.assert_array_equal(a, protocol.label_subset(labels, 0.1, num_classes=5, seed=k)[0])
    np.testing.assert_array_equal(np.bincount(labels[a], minlength=5), [25] * 5)  # stratified
  assert len({tuple(a) for a in first}) == 20  # 20 different draws


def test_summarize_matches_numpy_and_scipy():
  values = np.asarray([0.712, 0.736, 0.72, 0.72, 0.756])
  summary = protocol.summarize(values)
  low, high = stats.t.interval(0.95, df=4, loc=values.mean(), scale=stats.sem(values))
  assert summary["n"] == 5
  assert summary["mean"] == pytest.approx(np.mean(values))
  assert summary["sd"] == pytest.approx(np.std(values, ddof=1))
  assert summary["ci95"] == pytest.approx([low, high])
  # By hand: t_{0.975, 4} = 2.776.
  half = 2.7764451 * np.std(values, ddof=1) / np.sqrt(5)
  assert summary["ci95"] == pytest.approx([values.mean() - half, values.mean() + half], abs=1e-6)
  assert protocol.summarize([0.7]) == {"n": 1, "mean": 0.7, "sd": None, "ci95": None}
  with pytest.raises(ValueError, match="at least one value"):
    protocol.summarize([])


def test_summarize_draws_summarises_every_figure():
  def draw(top1, knn, layers):
    sweep = [{"head_layers_kept": d, "layer": n, "top1": t} for d, (n, t) in enumerate(layers)]
    return {"top1": top1, "knn": {"k20": {"k": 20, "top1": knn}}, "sweep": sweep}

  draws = [draw(0.7, 0.6, [("h", 0.7), ("z", 0.5)]), draw(0.8, 0.62, [("h", 0.8), ("z", 0.55)])]
  summary = protocol.summarize_draws(draws)
  assert summary["top1"] == protocol.summarize([0.7, 0.8])
  assert summary["knn"]["k20"] == protocol.summarize([0.6, 0.62])
  assert summary["sweep"][1] == {
    "head_layers_kept": 1,
    "layer": "z",
    "top1": protocol.summarize([0.5, 0.55]),
  }
  assert "top5" not in summary


def test_validation_split_is_held_out_of_every_label_draw():
  labels = np.random.default_rng(4).permutation(IMAGENET5_LABELS)
  rest, held_out = protocol.validation_split(labels, num_classes=5)
  assert len(held_out) == 250 and len(rest) == 1000
  np.testing.assert_array_equal(np.bincount(labels[held_out], minlength=5), [50] * 5)
  np.testing.assert_array_equal(np.union1d(rest, held_out), np.arange(1250))
  again_rest, again = protocol.validation_split(labels, num_classes=5)
  np.testing.assert_array_equal(again, held_out)  # a fixed seed: the same split every run
  np.testing.assert_array_equal(again_rest, rest)
  for seed in protocol.draw_seeds(20):
    subset, counts = protocol.label_subset(labels, 0.1, num_classes=5, seed=seed, candidates=rest)
    assert len(subset) == 125 and not np.intersect1d(subset, held_out).size
    np.testing.assert_array_equal(counts, [25] * 5)
    assert np.isin(subset, rest).all()
  everything, _ = protocol.label_subset(labels, 1.0, num_classes=5, seed=0, candidates=rest)
  np.testing.assert_array_equal(everything, rest)  # "all labels" of a validation run: the rest
  # The split is the seed's alone: another seed gives another split.
  _, other = protocol.validation_split(labels, num_classes=5, seed=protocol.VALIDATION_SEED + 1)
  assert not np.array_equal(other, held_out)


def test_validation_split_errors():
  with pytest.raises(ValueError, match=r"fraction=1 must be in \(0, 1\)"):
    protocol.validation_split(IMAGENET5_LABELS, num_classes=5, fraction=1)
  with pytest.raises(ValueError, match=r"stratified validation split.*\[1, 10\]"):
    protocol.validation_split(np.repeat([0, 1], [1, 10]), num_classes=2)
  with pytest.raises(ValueError, match=r"Classes \[2\] have no examples in the rest"):
    protocol.validation_split(np.repeat([0, 1, 2], [10, 10, 0]), num_classes=3)


def test_all_labels_cv_equals_sklearn_cross_val_score():
  x, y = blobs(3, 20, seed=5, dim=8)
  x = x + np.random.default_rng(6).normal(0, 2.5, x.shape).astype(np.float32)  # not separable
  grid = classifiers.L2_GRID[::4]
  diagnostic = protocol.all_labels_cv(x, y, lambdas=grid)
  folds = StratifiedKFold(5, shuffle=True, random_state=0)
  scores = {
    c: cross_val_score(
      make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)), x, y, cv=folds
    ).mean()
    for c in np.sort(1.0 / (grid * len(y)))
  }
  best = max(scores.values())
  assert 0.5 < best < 1.0  # a case where C matters
  assert diagnostic["top1"] == pytest.approx(best)
  assert scores[diagnostic["c"]] == pytest.approx(best)
  assert diagnostic["c"] == min(c for c, s in scores.items() if s >= best - 1e-9)
  assert diagnostic["folds"] == 5 and diagnostic["num_labelled"] == 60


def test_plan_c_selection_lowers_the_folds_then_fixes_c(caplog):
  names = list(COLOURS)  # blue, green, red
  with caplog.at_level(logging.WARNING):
    assert protocol.plan_c_selection(
      np.asarray([5, 6, 9]), names, probe_c=None, label_fraction=0.1
    ) == (None, protocol.CV_DESCRIPTION)
  assert not caplog.records  # >= 5 labelled images a class: 5 folds, nothing to say
  with caplog.at_level(logging.WARNING):
    c, how = protocol.plan_c_selection(
      np.asarray([3, 2, 4]), names, probe_c=None, label_fraction=0.1
    )
  assert (c, how) == (None, protocol.CV_DESCRIPTION)
  assert "'green' has 2 labelled images" in caplog.text and "2-fold" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    c, how = protocol.plan_c_selection(
      np.asarray([3, 3, 1]), names, probe_c=None, label_fraction=0.1
    )
  assert c == classifiers.DEFAULT_C == 1.0
  assert how.startswith("fixed: class 'red' has 1 labelled image at label_fraction=0.1")
  assert "'red' has 1 labelled image" in caplog.text and "C = 1" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    fixed = protocol.plan_c_selection(np.asarray([1, 1, 1]), names, probe_c=0.5, label_fraction=1)
  assert fixed == (0.5, "fixed") and not caplog.records  # the caller's C: no CV to run
  _, how = protocol.plan_c_selection(
    np.asarray([5, 5, 5]),
    names,
    probe_c=None,
    label_fraction=0.1,
    c_rule="repeated_1se",
    cv_repeats=5,
  )
  assert "repeated 5 times" in how and "one standard error" in how


def test_paired_difference_reads_the_per_draw_differences():
  def run(top1s):
    return [{"seed": k, "labelled_indices": [k, k + 10], "top1": t} for k, t in enumerate(top1s)]

  lever, baseline = run([0.74, 0.75, 0.73, 0.76]), run([0.72, 0.74, 0.72, 0.73])
  diff = protocol.paired_difference(lever, baseline)
  d = np.asarray([0.02, 0.01, 0.01, 0.03])
  low, high = stats.ttest_rel(
    [0.74, 0.75, 0.73, 0.76], [0.72, 0.74, 0.72, 0.73]
  ).confidence_interval()
  assert diff["mean"] == pytest.approx(d.mean()) and diff["sd"] == pytest.approx(d.std(ddof=1))
  assert diff["ci95"] == pytest.approx([low, high])
  with pytest.raises(ValueError, match="pair the same draws"):
    protocol.paired_difference(lever[:3], baseline)
  shifted = run([0.72, 0.74, 0.72, 0.73])
  shifted[2]["labelled_indices"] = [0, 1]
  with pytest.raises(ValueError, match="same split, label fraction and draws"):
    protocol.paired_difference(lever, shifted)
