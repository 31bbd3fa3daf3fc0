"""Classifiers on frozen features: the linear probes and a weighted kNN (SimCLR §4; the seed's).

Each takes feature arrays, not images: `fit_*` train on labelled features [N, D] and return a
`Probe`, `knn_probabilities` votes directly. Labels are int in [0, C) and must cover every class,
so probability columns are the classes in order.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import metrics
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

KNN_TEMPERATURE = 0.07
"""T of the kNN votes (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination", §3.4)."""

Probe = Callable[[np.ndarray], np.ndarray]
"""Maps float32 features [N, D] to class probabilities float [N, C]."""


def fit_logistic(
  features: np.ndarray, labels: np.ndarray, *, c: float = 1.0, max_iter: int = 1000
) -> Probe:
  """Multinomial logistic regression (L-BFGS, L2) on standardised features: the seed's probe.

  Also the paper's probe for transfer learning (SimCLR Appendix B.8).

  Args:
    features: float [N, D].
    labels: int [N], covering every class.
    c: inverse L2 strength, > 0.
    max_iter: L-BFGS iterations.

  Returns:
    A `Probe`.
  """
  model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
  model.fit(features, labels)
  return model.predict_proba


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
) -> Probe:
  """A linear head trained with SGD: the paper's ImageNet protocol (SimCLR Appendix B.6).

  Nesterov momentum, LR base_lr * B / 256 with cosine decay to 0, no weight decay, on
  standardised features (an affine map, so the head stays linear in h). Each epoch is a seeded
  shuffle in batches of B = min(batch_size, N), the remainder dropped. Meant for large labelled
  sets; with few labels it takes few steps, and `fit_logistic` is the better estimate.

  Args:
    features: float [N, D]; labels: int [N] in [0, num_classes).
    num_classes: C, the number of output logits.
    seed: seed of the shuffles.
    epochs: passes over the N examples.
    batch_size: examples per step (capped at N).
    base_lr: learning rate per 256 examples of batch.
    momentum: Nesterov momentum coefficient in [0, 1).

  Returns:
    A `Probe`.
  """
  scaler = StandardScaler().fit(features)
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
