"""Classifiers on frozen features: the probe's C chosen by cross-validation (SimCLR Appendix
B.8), its folds, the one-standard-error rule over repeated splits, standardisation, and the
temperature-weighted kNN."""

import numpy as np
import pytest
from probe_helpers import blobs, copies
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from simclr_jax.probe import classifiers


def test_l2_grid_is_the_papers():
  grid = classifiers.L2_GRID  # SimCLR Appendix B.8: 45 log-spaced values in [1e-6, 1e5]
  assert len(grid) == 45 and grid[0] == pytest.approx(1e-6) and grid[-1] == pytest.approx(1e5)
  np.testing.assert_allclose(np.diff(np.log10(grid)), 11 / 44)


def test_select_logistic_c_ties_go_to_the_strongest_l2():
  x, y = blobs(3, 20, seed=1)  # separable: every C in the grid scores 100% in every fold
  chosen = classifiers.select_logistic_c(x, y)
  assert chosen.cv_top1 == 1.0 and chosen.folds == 5
  assert chosen.c == pytest.approx(1.0 / (1e5 * len(y)))  # C = 1 / (lambda N), the largest lambda


def test_select_logistic_c_picks_the_best_cv_score():
  rng = np.random.default_rng(0)
  labels = np.tile(np.arange(3), 30)
  noise = rng.normal(size=(90, 64))
  chance = classifiers.select_logistic_c(noise, labels)
  signal = noise.copy()
  signal[:, :3] += 3.0 * np.eye(3)[labels]
  informed = classifiers.select_logistic_c(signal, labels)
  assert chance.cv_top1 < 0.6 < informed.cv_top1
  # Independently: the chosen C's folds, rebuilt by hand, give the reported score, and no C of
  # a coarser grid around it does better.
  folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(signal, labels))

  def cv_top1(c):
    fit = classifiers.fit_logistic
    return np.mean(
      [np.mean(fit(signal[t], labels[t], c=c)(signal[v]).argmax(1) == labels[v]) for t, v in folds]
    )

  assert cv_top1(informed.c) == pytest.approx(informed.cv_top1)
  for c in 1.0 / (classifiers.L2_GRID[::11] * 90):
    assert cv_top1(c) <= informed.cv_top1 + 1e-9


def test_select_logistic_c_keeps_views_of_one_image_in_one_fold():
  # Honest CV scores random labels near chance (1/3). Exact copies stand in for an image's
  # augmented views; split across folds, they leak labels (64 dims memorise 60 points).
  _, _, views, view_labels = copies(60, 64, 4)
  groups = np.repeat(np.arange(60), 4)
  grid = classifiers.L2_GRID[::11]  # 1e-6 ... 1e5: memorising and regularised C alike
  leaky = classifiers.select_logistic_c(views, view_labels, lambdas=grid)
  grouped = classifiers.select_logistic_c(views, view_labels, groups=groups, lambdas=grid)
  assert leaky.cv_top1 > 0.95 and grouped.cv_top1 < 0.6


def test_cv_folds_is_the_smallest_class_up_to_the_folds_wanted():
  assert classifiers.CV_FOLDS == 5
  assert classifiers.cv_folds(np.asarray([40, 20, 10])) == 5
  assert classifiers.cv_folds(np.asarray([40, 4, 10])) == 4  # every fold holds each class
  assert classifiers.cv_folds(np.asarray([3, 2])) == 2
  assert classifiers.cv_folds(np.asarray([30, 1, 30])) == 1  # < 2: no k-fold split exists
  assert classifiers.cv_folds(np.asarray([40, 20]), folds=3) == 3
  with pytest.raises(ValueError, match="folds=1 must be >= 2"):
    classifiers.cv_folds(np.asarray([10, 10]), folds=1)
  with pytest.raises(ValueError, match="at least one class"):
    classifiers.cv_folds(np.asarray([], int))


def test_select_logistic_c_lowers_the_fold_count_for_small_classes():
  x, y = blobs(3, 3, seed=1)
  grid = classifiers.L2_GRID[::11]
  assert classifiers.select_logistic_c(x, y, lambdas=grid).folds == 3
  assert classifiers.select_logistic_c(x, y, folds=2, lambdas=grid).folds == 2
  groups = np.where(y == 0, np.arange(9) % 2, 10 + np.arange(9))  # class 0: 2 groups of images
  assert classifiers.select_logistic_c(x, y, groups=groups, lambdas=grid).folds == 2


def test_select_logistic_c_errors():
  x, y = blobs(3, 4, seed=1)
  with pytest.raises(ValueError, match="class 2 has 1"):
    classifiers.select_logistic_c(x[:9], y[:9])
  with pytest.raises(ValueError, match="class 0 has 1"):
    classifiers.select_logistic_c(x, y, groups=np.where(y == 0, 0, np.arange(12)))
  with pytest.raises(ValueError, match="folds=1"):
    classifiers.select_logistic_c(x, y, folds=1)
  with pytest.raises(ValueError, match="lambdas must be non-empty and all > 0"):
    classifiers.select_logistic_c(x, y, lambdas=np.asarray([1.0, 0.0]))
  with pytest.raises(ValueError, match="no scored rows"):
    classifiers.select_logistic_c(x, y, scored=np.zeros(12, bool))


def test_select_logistic_c_scores_only_the_scored_rows():
  # Centre rows carry nothing about their random labels; their "views" carry the label plainly.
  x, y, views, view_labels = copies(60, 64, 3)
  views = views + 5.0 * np.eye(64)[view_labels]
  rows, labels = np.concatenate([x, views]), np.concatenate([y, view_labels])
  groups = np.concatenate([np.arange(60), np.repeat(np.arange(60), 3)])
  grid = classifiers.L2_GRID[::11]
  everything = classifiers.select_logistic_c(rows, labels, groups=groups, lambdas=grid)
  centre = classifiers.select_logistic_c(
    rows, labels, groups=groups, scored=np.arange(240) < 60, lambdas=grid
  )
  assert everything.cv_top1 > 0.7 and centre.cv_top1 < 0.6


def test_knn_votes_are_temperature_weighted():
  train_x = np.asarray([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]], np.float32)
  train_y = np.asarray([0, 1, 1])
  query = np.asarray([[1.0, 0.1]], np.float32)  # much closer to the single class-0 example
  sharp = classifiers.knn_probabilities(train_x, train_y, query, k=3, temperature=0.07)
  flat = classifiers.knn_probabilities(train_x, train_y, query, k=3, temperature=100.0)
  assert sharp.argmax() == 0 and flat.argmax() == 1  # similarity wins vs. majority wins
  np.testing.assert_allclose(sharp.sum(axis=1), 1.0)


def test_one_standard_error_picks_the_strongest_l2_within_one_se_of_the_best():
  # Candidates from the strongest L2 (smallest C) to the weakest; k = 5 folds.
  scores = np.asarray(
    [
      [0.50] * 5,
      [0.68, 0.70, 0.72, 0.70, 0.70],  # mean 0.70
      [0.72, 0.74, 0.75, 0.74, 0.735],  # mean 0.737
      [0.70, 0.80, 0.75, 0.75, 0.75],  # the best: mean 0.75, sd 0.0354, SE 0.0354 / sqrt(5)
      [0.60] * 5,
    ]
  )
  se = np.std(scores[3], ddof=1) / np.sqrt(5)
  assert se == pytest.approx(0.0158114, abs=1e-6)
  assert classifiers.one_standard_error(scores, 5) == (2, pytest.approx(se))  # 0.737 >= 0.734
  wide = scores.copy()
  wide[3] = [0.55, 0.95, 0.75, 0.75, 0.75]  # SE 0.0632: now 0.70 is within one SE of 0.75
  assert classifiers.one_standard_error(wide, 5)[0] == 1
  # Repeated splits reuse the same images: the SE counts k = 5 folds, not the 10 scores
  # (sqrt(10) would give 0.0105 and leave 0.737 outside, picking the best, 3).
  repeated = np.concatenate([scores, scores], axis=1)
  index, se = classifiers.one_standard_error(repeated, 5)
  assert index == 2 and se == pytest.approx(np.std(repeated[3], ddof=1) / np.sqrt(5))
  flat = np.full((3, 5), 0.8)  # all tied, SE 0: the strongest L2
  assert classifiers.one_standard_error(flat, 5) == (0, 0.0)
  with pytest.raises(ValueError, match="expected"):
    classifiers.one_standard_error(scores[:, :1], 5)
  with pytest.raises(ValueError, match="folds=1"):
    classifiers.one_standard_error(scores, 1)


def test_select_logistic_c_repeated_1se_equals_an_independent_computation():
  x, y = blobs(3, 20, seed=5, dim=8)
  x = x + np.random.default_rng(6).normal(0, 1.5, x.shape).astype(np.float32)  # not separable
  grid = classifiers.L2_GRID[::4]
  cs = np.sort(1.0 / (grid * len(y)))
  folds = [
    f for r in range(3) for f in StratifiedKFold(5, shuffle=True, random_state=r).split(x, y)
  ]
  fold_scores = np.asarray(
    [
      cross_val_score(
        make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)), x, y, cv=folds
      )
      for c in cs
    ]
  )  # [C, 15]
  means = fold_scores.mean(axis=1)
  best = int(np.argmax(means))  # first maximum: the smallest C among ties
  se = np.std(fold_scores[best], ddof=1) / np.sqrt(5)
  expected = int(np.min(np.flatnonzero(means >= means[best] - se)))
  assert expected < best  # the rule matters here
  chosen = classifiers.select_logistic_c(x, y, lambdas=grid, rule="repeated_1se", repeats=3)
  assert chosen.c == pytest.approx(cs[expected]) and chosen.repeats == 3 and chosen.folds == 5
  assert chosen.cv_top1 == pytest.approx(means[expected])
  assert chosen.best_cv_top1 == pytest.approx(means[best]) and chosen.cv_se == pytest.approx(se)
  plain = classifiers.select_logistic_c(x, y, lambdas=grid)  # 'best' over the first split only
  first_split = fold_scores[:, :5].mean(axis=1)
  assert plain.c == pytest.approx(cs[int(np.argmax(first_split))])
  assert plain.repeats == 1 and plain.cv_se is None and plain.best_cv_top1 is None
  with pytest.raises(ValueError, match="rule='worst'"):
    classifiers.select_logistic_c(x, y, lambdas=grid, rule="worst")
  with pytest.raises(ValueError, match="repeats=0"):
    classifiers.select_logistic_c(x, y, lambdas=grid, repeats=0)


def test_probes_skip_their_own_standardisation_when_told():
  x, y = blobs(3, 20, seed=1)
  test_x, _ = blobs(3, 5, seed=2)
  x, test_x = 3.0 * x + 1.0, 3.0 * test_x + 1.0  # far from standardised
  raw = LogisticRegression(C=0.01, max_iter=1000).fit(x, y).predict_proba(test_x)
  unscaled = classifiers.fit_logistic(x, y, c=0.01, standardize=False)(test_x)
  np.testing.assert_allclose(unscaled, raw, rtol=1e-6)
  scaled = classifiers.fit_logistic(x, y, c=0.01)(test_x)
  assert not np.allclose(scaled, raw, atol=1e-3)  # the default standardises: another model
  scale = classifiers.standardizer(x)
  np.testing.assert_allclose(scale(test_x), (test_x - x.mean(0)) / x.std(0), rtol=1e-4, atol=1e-5)
  assert scale(test_x).dtype == np.float32
