"""Classifiers on frozen features: the linear probes and a weighted kNN (SimCLR §2.3, B.6, B.8).

Each takes feature arrays, not images: `fit_*` train on labelled features [N, D] and return a
`Probe`, `knn_probabilities` votes directly. Labels are int in [0, C) and must cover every class,
so probability columns are the classes in order. `fit_logistic` is the PyTorch original's probe,
`fit_linear_sgd` the paper's ImageNet one; `select_logistic_c` chooses the former's L2 strength,
by the best cross-validated accuracy or by the one-standard-error rule (`one_standard_error`).
"""

import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import metrics
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

KNN_TEMPERATURE = 0.07
"""T of the kNN votes (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination", §3.4)."""

L2_GRID = np.logspace(-6.0, 5.0, 45)
"""The L2 strengths lambda searched for the logistic probe: 45 log-spaced values in [1e-6, 1e5]
(SimCLR Appendix B.8, "Linear evaluation" of transfer learning)."""

CV_FOLDS = 5
"""k of the k-fold cross-validation that chooses the logistic probe's C, before `cv_folds`."""

C_RULES = ("best", "repeated_1se")
"""How `select_logistic_c` picks C from the cross-validation scores: 'best', the highest mean
accuracy; 'repeated_1se', the strongest L2 within one standard error of it (`one_standard_error`),
over repeated k-fold splits."""

DEFAULT_C = 1.0
"""scikit-learn's default C, the PyTorch original's; the probe's C when cross-validation cannot
run (a class with a single labelled image)."""

Probe = Callable[[np.ndarray], np.ndarray]
"""Maps float32 features [N, D] to class probabilities float [N, C]."""


def _logistic_model(c: float, max_iter: int, standardize: bool):
  """scikit-learn's standardiser (the identity when `standardize` is False) and logistic model."""
  scaler = StandardScaler(with_mean=standardize, with_std=standardize)
  return make_pipeline(scaler, LogisticRegression(C=c, max_iter=max_iter))


def fit_logistic(
  features: np.ndarray,
  labels: np.ndarray,
  *,
  c: float = DEFAULT_C,
  max_iter: int = 1000,
  standardize: bool = True,
) -> Probe:
  """Multinomial logistic regression (L-BFGS, L2) on standardised features.

  The PyTorch original's probe, and the paper's for transfer learning (SimCLR Appendix B.8).

  Args:
    features: float [N, D].
    labels: int [N], covering every class.
    c: scikit-learn's inverse L2 strength, > 0 (`DEFAULT_C`, scikit-learn's default, is the
      PyTorch original's; `select_logistic_c` picks it as the paper does). Not the class count C.
    max_iter: L-BFGS iterations.
    standardize: standardise each feature with the mean and sd of these N rows; False when the
      caller has standardised them already (`standardizer`, on more images than the labelled).

  Returns:
    A `Probe`.
  """
  model = _logistic_model(c, max_iter, standardize)
  model.fit(features, labels)
  return model.predict_proba


def standardizer(features: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
  """Per-feature standardisation with the mean and sd of `features` (constant features: sd 1).

  Fitted on the unlabelled features of every training image the probe could be trained on, its
  statistics are less noisy than those of a few labelled images; no label is read.

  Args:
    features: float [N, D], N >= 1.

  Returns:
    A function mapping float [M, D] to float32 [M, D], (x - mean) / sd.
  """
  scaler = StandardScaler().fit(features)
  return lambda x: scaler.transform(x).astype(np.float32)


class CSelection(NamedTuple):
  """The outcome of `select_logistic_c`."""

  c: float
  """scikit-learn's inverse L2 strength for `fit_logistic`, > 0."""
  cv_top1: float
  """Mean validation accuracy of that C over the folds, in [0, 1]. Under rule 'best' the maximum
  over the grid, so an optimistic estimate of the probe's accuracy."""
  folds: int
  """k, the number of folds used (`folds`, or fewer for small classes: `cv_folds`)."""
  repeats: int = 1
  """How many times the k-fold split was drawn (split random seeds 0 .. repeats - 1)."""
  best_cv_top1: float | None = None
  """Rule 'repeated_1se': the best mean accuracy over the grid, in [0, 1]; None under 'best'."""
  cv_se: float | None = None
  """Rule 'repeated_1se': the standard error of the best C's mean accuracy; None under 'best'."""


def cv_folds(class_counts: np.ndarray, folds: int = CV_FOLDS) -> int:
  """k for stratified k-fold CV over classes of these sizes: min(folds, the smallest class).

  Every fold must hold an example of every class, so k cannot exceed the smallest class.

  Args:
    class_counts: int [C], examples (or groups of examples) per class, each >= 0.
    folds: the k wanted, >= 2.

  Returns:
    k in [0, folds]; k < 2 (a class with fewer than 2 examples) means no k-fold split exists.

  Raises:
    ValueError: folds < 2, or no classes.
  """
  if folds < 2:
    raise ValueError(f"folds={folds} must be >= 2.")
  if len(class_counts) == 0:
    raise ValueError("cv_folds needs at least one class.")
  return min(folds, int(np.min(class_counts)))


def one_standard_error(fold_scores: np.ndarray, folds: int) -> tuple[int, float]:
  """The one-standard-error rule (Hastie et al., "The Elements of Statistical Learning", §7.10).

  Among candidates ordered from the strongest regularisation to the weakest, picks the first whose
  mean score is within one standard error of the best mean. The standard error is the best
  candidate's sd over all its fold scores divided by sqrt(`folds`): repeated splits of the same
  images average out the split, but they add no images, so the error counts the k folds of one
  pass, not the k x repeats scores.

  Args:
    fold_scores: float [P, S], the score of each of P candidates (strongest regularisation first)
      on each of S = k x repeats validation folds, S >= 2.
    folds: k, the folds of one pass, >= 2.

  Returns:
    (index in [0, P) of the candidate chosen, the standard error used).

  Raises:
    ValueError: fewer than 2 scores per candidate, no candidates, or folds < 2.
  """
  fold_scores = np.asarray(fold_scores, np.float64)
  if fold_scores.ndim != 2 or fold_scores.shape[0] == 0 or fold_scores.shape[1] < 2:
    raise ValueError(
      f"fold_scores has shape {fold_scores.shape}; expected [candidates >= 1, folds >= 2]."
    )
  if folds < 2:
    raise ValueError(f"folds={folds} must be >= 2.")
  means = fold_scores.mean(axis=1)
  best = int(np.flatnonzero(means >= means.max() - 1e-9)[0])
  se = float(fold_scores[best].std(ddof=1) / np.sqrt(folds))
  return int(np.flatnonzero(means >= means[best] - se - 1e-9)[0]), se


def select_logistic_c(
  features: np.ndarray,
  labels: np.ndarray,
  *,
  groups: np.ndarray | None = None,
  scored: np.ndarray | None = None,
  folds: int = CV_FOLDS,
  lambdas: np.ndarray = L2_GRID,
  max_iter: int = 1000,
  rule: str = "best",
  repeats: int = 1,
  standardize: bool = True,
) -> CSelection:
  """Picks the logistic probe's L2 strength by cross-validation on the labelled rows alone.

  SimCLR Appendix B.8 selects the L2 regularisation of its logistic-regression probe from 45
  log-spaced values in [1e-6, 1e5] on held-out labelled data; here that is stratified k-fold CV
  on the probe's own training rows, so the test split is never seen. The paper does not give the
  scale of its lambda; we read it as weighing a mean loss (mean CE + lambda/2 |w|^2), while
  scikit-learn's C weighs a summed one (C sum CE + 1/2 |w|^2, intercept not penalised), so
  C = 1 / (lambda N) with N the number of rows (on a fold's (k-1)/k share of the rows the same C
  is lambda k/(k-1), as in any CV over C). Each fold fits `fit_logistic`'s model (standardiser and
  L-BFGS logistic regression) on its training rows alone. The k-fold split is drawn `repeats`
  times, with split random seeds 0, 1, ...; a C's score is its mean accuracy over all k x repeats
  folds. Rule 'best' takes the highest score, ties (to 1e-9) to the strongest regularisation
  (smallest C); 'repeated_1se' the strongest regularisation within one standard error of the
  highest (`one_standard_error`), which the noisy scores of a few labelled images call for. Fits
  that stop at `max_iter` (large C on separable folds) are scored as they stand, silently.

  Args:
    features: float [N, D].
    labels: int [N], class ids.
    groups: int [N] or None: rows with one group id (augmented views of one image) stay in
      one fold.
    scored: bool [N] or None (all rows): the validation rows that count; e.g. only the centre
      views, the view the test split is read at, when the others are augmented copies.
    folds: k >= 2; lowered to the smallest class count (with groups, the smallest number of
      groups of a class) when that is smaller (`cv_folds`).
    lambdas: the L2 strengths searched, non-empty, all > 0.
    max_iter: L-BFGS iterations per fit.
    rule: one of `C_RULES`.
    repeats: how many k-fold splits, >= 1.
    standardize: as `fit_logistic`'s.

  Returns:
    A `CSelection`.

  Raises:
    ValueError: a class with fewer than 2 examples (or groups), so no 2-fold split exists; folds
      < 2; empty or non-positive lambdas; an unknown rule; repeats < 1; a fold without scored
      rows; and scikit-learn's own (e.g. groups or scored of the wrong length).
  """
  lambdas = np.asarray(lambdas, np.float64)
  if lambdas.size == 0 or not np.all(lambdas > 0):
    raise ValueError(f"lambdas must be non-empty and all > 0; got {lambdas}.")
  if rule not in C_RULES:
    raise ValueError(f"rule={rule!r} is not one of {C_RULES}.")
  if repeats < 1:
    raise ValueError(f"repeats={repeats} must be >= 1.")
  classes = np.unique(labels)
  if groups is None:
    per_class = np.bincount(np.searchsorted(classes, labels))
  else:
    per_class = np.array([len(np.unique(groups[labels == c])) for c in classes])
  k = cv_folds(per_class, folds)
  if k < 2:
    raise ValueError(
      f"Choosing the probe's C by cross-validation needs >= 2 labelled images per class; class "
      f"{classes[per_class.argmin()]} has {k}. Pass a fixed C (--probe_c) instead."
    )
  splits = []
  for repeat in range(repeats):
    if groups is None:
      splits += StratifiedKFold(k, shuffle=True, random_state=repeat).split(features, labels)
    else:
      splitter = StratifiedGroupKFold(k, shuffle=True, random_state=repeat)
      splits += splitter.split(features, labels, groups)
  if scored is not None:
    scored = np.asarray(scored, bool)
    if scored.shape != (len(labels),):
      raise ValueError(f"scored has shape {scored.shape}; expected ({len(labels)},).")
    splits = [(train, held_out[scored[held_out]]) for train, held_out in splits]
    if any(len(held_out) == 0 for _, held_out in splits):
      raise ValueError("A cross-validation fold has no scored rows.")
  cs = np.sort(1.0 / (lambdas * len(labels)))
  search = GridSearchCV(
    _logistic_model(DEFAULT_C, max_iter, standardize),
    {"logisticregression__C": cs},
    scoring="accuracy",
    cv=splits,
    refit=False,
    error_score="raise",
  )
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    search.fit(features, labels)
  scores = search.cv_results_["mean_test_score"]  # [len(cs)], in the order of cs
  if rule == "best":
    best = int(np.flatnonzero(scores >= scores.max() - 1e-9)[0])  # the smallest C of the best
    return CSelection(float(cs[best]), float(scores[best]), k, repeats)
  fold_scores = np.stack(
    [search.cv_results_[f"split{i}_test_score"] for i in range(len(splits))], axis=1
  )
  chosen, se = one_standard_error(fold_scores, k)
  return CSelection(float(cs[chosen]), float(scores[chosen]), k, repeats, float(scores.max()), se)


def fit_linear_sgd(
  features: np.ndarray,
  labels: np.ndarray,
  *,
  num_classes: int,
  seed: int,
  epochs: int = 90,
  batch_size: int = 4096,
  base_lr: float = 0.1,
  momentum: float = 0.9,
  standardize: bool = True,
) -> Probe:
  """A linear head trained with SGD: the paper's ImageNet protocol (SimCLR Appendix B.6).

  Nesterov momentum, LR base_lr * B / 256 with cosine decay to 0, no weight decay, on
  standardised features (an affine map, so the head stays linear in h). Each epoch is a seeded
  shuffle in batches of B = min(batch_size, N), the remainder dropped. Meant for large labelled
  sets; with few labels it takes few steps, and `fit_logistic` is the better estimate.

  Args:
    features: float [N, D]; labels: int [N] in [0, num_classes).
    num_classes: C, the number of output logits.
    seed: random seed of the shuffles.
    epochs: passes over the N examples.
    batch_size: examples per step (capped at N).
    base_lr: learning rate per 256 examples of batch.
    momentum: Nesterov momentum coefficient in [0, 1).
    standardize: as `fit_logistic`'s.

  Returns:
    A `Probe`.
  """
  scaler = StandardScaler(with_mean=standardize, with_std=standardize).fit(features)
  x = jnp.asarray(scaler.transform(features), jnp.float32)
  y = jnp.asarray(labels, jnp.int32)
  n, dim = x.shape
  batch = min(batch_size, n)
  steps = n // batch
  tx = optax.sgd(
    optax.cosine_decay_schedule(base_lr * batch / 256, epochs * steps),
    momentum=momentum,
    nesterov=True,
  )

  def loss_fn(params, xb, yb):
    logits = xb @ params["kernel"] + params["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def fit(x, y, key):
    def step(carry, idx):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params, x[idx], y[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    def epoch(carry, epoch_key):
      order = jax.random.permutation(epoch_key, n)[: steps * batch].reshape(steps, batch)
      return jax.lax.scan(step, carry, order)[0], None

    params = {"kernel": jnp.zeros((dim, num_classes)), "bias": jnp.zeros((num_classes,))}
    carry = (params, tx.init(params))
    return jax.lax.scan(epoch, carry, jax.random.split(key, epochs))[0][0]

  params = jax.device_get(fit(x, y, jax.random.key(seed)))

  def predict_proba(test_features):
    logits = scaler.transform(test_features) @ params["kernel"] + params["bias"]
    return np.asarray(jax.nn.softmax(logits, axis=-1))

  return predict_proba


def accuracies(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """{'top1'} and, with at least 10 classes, {'top5'}: fractions in [0, 1].

  ``probabilities``: float [M, C] (any scores; only their order per row matters); ``labels``: int
  [M] in [0, C).
  """
  num_classes = probabilities.shape[1]
  result = {"top1": float(metrics.accuracy_score(labels, probabilities.argmax(axis=1)))}
  if num_classes >= 10:
    result["top5"] = float(
      metrics.top_k_accuracy_score(labels, probabilities, k=5, labels=np.arange(num_classes))
    )
  return result


def knn_probabilities(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  test_features: np.ndarray,
  *,
  k: int,
  temperature: float = KNN_TEMPERATURE,
) -> np.ndarray:
  """Weighted kNN votes (Wu et al. 2018, §3.4): cosine similarity s, each neighbour votes exp(s/T).

  Args:
    train_features, test_features: float [N, D], [M, D]; zero rows count as similarity 0.
    train_labels: int [N], covering every class.
    k: neighbours, in [1, N].
    temperature: T > 0.

  Returns:
    float [M, C]: each class's share of the votes.

  Raises:
    ValueError: from scikit-learn, for k outside [1, N].
  """
  knn = KNeighborsClassifier(
    n_neighbors=k,
    metric="cosine",
    algorithm="brute",
    weights=lambda distance: np.exp((1.0 - distance) / temperature),
  )
  return knn.fit(train_features, train_labels).predict_proba(test_features)
