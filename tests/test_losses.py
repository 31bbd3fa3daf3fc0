"""NT-Xent equivalence suite: the loss against independent NumPy references, on 1 and 4 devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import losses


def paper_reference(z1, z2, temperature):
  """Eq. (1) with the paper's interleaved indexing (2k-1, 2k), explicit loops, float64."""
  n = len(z1)
  z = np.empty((2 * n, z1.shape[1]), np.float64)
  z[0::2], z[1::2] = z1, z2  # z[2k] and z[2k+1] are the two views of image k

  def sim(u, v):
    return float(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v))

  def ell(i, j):
    numerator = np.exp(sim(z[i], z[j]) / temperature)
    denominator = sum(np.exp(sim(z[i], z[k]) / temperature) for k in range(2 * n) if k != i)
    return -np.log(numerator / denominator)

  per_pair = [ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n)]
  return sum(per_pair) / (2 * n)


def pytorch_original_reference(z1, z2, temperature):
  """The PyTorch original's formulation, vectorised, float64: per-row terms, order [z1; z2]."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n = len(z1)
  e = np.exp(z @ z.T / temperature)
  positive_of = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
  numerator = e[np.arange(2 * n), positive_of]
  denominator = (e * (1.0 - np.eye(2 * n))).sum(axis=1)
  return -np.log(numerator / denominator)


def random_pairs(seed, n, d):
  rng = np.random.default_rng(seed)
  z1 = rng.normal(size=(n, d)).astype(np.float32)
  z2 = (z1 + 0.7 * rng.normal(size=(n, d))).astype(np.float32)  # correlated, like real views
  return z1, z2


def loss_of(z1, z2, temperature):
  return float(losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature=temperature)[0])


@pytest.mark.parametrize("n,d", [(1, 3), (2, 8), (5, 16), (16, 128)])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
def test_matches_paper_equation(n, d, temperature):
  z1, z2 = random_pairs(n * 100 + d, n, d)
  expected = paper_reference(z1.astype(np.float64), z2.astype(np.float64), temperature)
  np.testing.assert_allclose(loss_of(z1, z2, temperature), expected, rtol=1e-5)


@pytest.mark.parametrize("n,d", [(3, 4), (8, 32), (32, 100)])
def test_matches_pytorch_original_formulation_per_anchor(n, d):
  temperature = 0.05  # the PyTorch original's
  z1, z2 = random_pairs(7 + n, n, d)
  expected_terms = pytorch_original_reference(z1, z2, temperature)
  terms = losses.nt_xent_terms(jnp.asarray(z1), jnp.asarray(z2), temperature=temperature)
  np.testing.assert_allclose(np.asarray(terms), expected_terms, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss_of(z1, z2, temperature), expected_terms.mean(), rtol=1e-5)


def test_official_implementation_is_twice_this_loss():
  """tf2's add_contrastive_loss: CE over [positives-and-others] per direction, summed."""
  z1, z2 = random_pairs(3, 6, 10)
  temperature = 0.5
  terms = pytorch_original_reference(z1, z2, temperature)
  official = terms[:6].mean() + terms[6:].mean()
  np.testing.assert_allclose(2 * loss_of(z1, z2, temperature), official, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_gradients_match_finite_differences(temperature):
  n, d = 3, 4
  z1, z2 = random_pairs(11, n, d)
  grad1, grad2 = jax.grad(
    lambda a, b: losses.nt_xent(a, b, temperature=temperature)[0], argnums=(0, 1)
  )(jnp.asarray(z1), jnp.asarray(z2))

  def reference(flat):
    return pytorch_original_reference(
      flat[: n * d].reshape(n, d), flat[n * d :].reshape(n, d), temperature
    ).mean()

  x = np.concatenate([z1.ravel(), z2.ravel()]).astype(np.float64)
  h = 1e-6
  numeric = np.array(
    [(reference(x + h * e) - reference(x - h * e)) / (2 * h) for e in np.eye(x.size)]
  )
  analytic = np.concatenate([np.asarray(grad1).ravel(), np.asarray(grad2).ravel()])
  np.testing.assert_allclose(analytic, numeric, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- multi-device

NUM_DEVICES = 4


def projection(params, x):
  """A small parameterised projection whose gradient we compare across device counts."""
  return jnp.tanh(x @ params["w"] + params["b"])


def loss_fn(params, x1, x2, temperature, axis_name):
  return losses.nt_xent(
    projection(params, x1), projection(params, x2), temperature=temperature, axis_name=axis_name
  )


@pytest.fixture(scope="module")
def sharded_problem():
  assert jax.local_device_count() >= NUM_DEVICES, "conftest.py must set 4 fake CPU devices"
  rng = np.random.default_rng(0)
  per_device, d_in, d_out = 3, 5, 6
  m = NUM_DEVICES * per_device
  x1 = rng.normal(size=(m, d_in)).astype(np.float32)
  x2 = (x1 + 0.5 * rng.normal(size=(m, d_in))).astype(np.float32)
  params = {
    "w": jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(d_out,)), jnp.float32),
  }
  return params, x1, x2, per_device


def shard(x, per_device):
  return x.reshape(NUM_DEVICES, per_device, *x.shape[1:])


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_pmap_equals_single_device(sharded_problem, temperature):
  params, x1, x2, per_device = sharded_problem
  m = len(x1)

  single_loss, single_metrics = loss_fn(params, x1, x2, temperature, None)
  single_grad = jax.grad(lambda p: loss_fn(p, x1, x2, temperature, None)[0])(params)
  single_terms = losses.nt_xent_terms(
    projection(params, x1), projection(params, x2), temperature=temperature
  )

  @functools.partial(jax.pmap, axis_name="d", in_axes=(None, 0, 0))
  def step(p, a, b):
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(p, a, b, temperature, "d")
    terms = losses.nt_xent_terms(
      projection(p, a), projection(p, b), temperature=temperature, axis_name="d"
    )
    return loss, metrics, jax.lax.pmean(grad, "d"), terms

  loss, metrics, grad, terms = step(params, shard(x1, per_device), shard(x2, per_device))

  np.testing.assert_allclose(np.asarray(loss), np.full(NUM_DEVICES, single_loss), rtol=1e-5)
  for name, value in single_metrics.items():
    np.testing.assert_allclose(np.asarray(metrics[name]), float(value), rtol=1e-5, atol=1e-6)
  for name in params:
    for device in range(NUM_DEVICES):
      np.testing.assert_allclose(grad[name][device], single_grad[name], rtol=1e-4, atol=1e-6)
  # Per-anchor terms: device k holds its view-1 anchors then its view-2 anchors.
  terms = np.asarray(terms).reshape(NUM_DEVICES, 2, per_device)
  view1_terms = terms[:, 0].reshape(m)
  view2_terms = terms[:, 1].reshape(m)
  np.testing.assert_allclose(view1_terms, single_terms[:m], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(view2_terms, single_terms[m:], rtol=1e-5, atol=1e-6)


def test_identical_embeddings_use_global_batch_size():
  """All projections equal: every candidate ties, so each term is log(2M - 1), M global."""
  per_device, temperature = 2, 0.3
  z = jnp.ones((NUM_DEVICES, per_device, 8))
  loss, metrics = jax.pmap(
    lambda a, b: losses.nt_xent(a, b, temperature=temperature, axis_name="d"), axis_name="d"
  )(z, z)
  m = NUM_DEVICES * per_device
  np.testing.assert_allclose(np.asarray(loss), np.log(2 * m - 1), rtol=1e-6)
  assert not np.allclose(np.log(2 * m - 1), np.log(2 * per_device - 1))
  np.testing.assert_allclose(np.asarray(metrics["positive_similarity"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(metrics["negative_similarity"]), 1.0, rtol=1e-6)


def test_metrics_on_separable_batch():
  """Orthogonal pairs, views identical: every positive ranks first, negatives are orthogonal."""
  z = jnp.eye(6, 16)
  _, metrics = losses.nt_xent(z, z, temperature=0.1)
  assert float(metrics["contrastive_accuracy"]) == 1.0
  np.testing.assert_allclose(float(metrics["positive_similarity"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["negative_similarity"]), 0.0, atol=1e-7)
  # Swap two positives: exactly those 4 anchors now rank a negative first.
  _, metrics = losses.nt_xent(z, z[jnp.array([1, 0, 2, 3, 4, 5])], temperature=0.1)
  np.testing.assert_allclose(float(metrics["contrastive_accuracy"]), 8 / 12, rtol=1e-6)


# ----------------------------------------------------------------------------- invariances


def test_invariances():
  z1, z2 = random_pairs(5, 7, 12)
  temperature = 0.2
  base = loss_of(z1, z2, temperature)
  np.testing.assert_allclose(loss_of(z2, z1, temperature), base, rtol=1e-6)
  perm = np.random.default_rng(1).permutation(7)
  np.testing.assert_allclose(loss_of(z1[perm], z2[perm], temperature), base, rtol=1e-6)
  scale = np.random.default_rng(2).uniform(0.01, 100.0, size=(7, 1)).astype(np.float32)
  np.testing.assert_allclose(loss_of(z1 * scale, z2 * 3.0, temperature), base, rtol=1e-5)
  # and it is not invariant to breaking the pairing
  assert abs(loss_of(z1, z2[perm], temperature) - base) > 1e-3


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("case", ["low_temperature", "wide", "large_norm", "zero_row", "bfloat16"])
def test_finite_loss_and_gradients(case):
  n, d, temperature, scale = 8, 32, 0.1, 1.0
  if case == "low_temperature":
    temperature = 0.01
  if case == "wide":
    d = 2048
  if case == "large_norm":
    scale = 1e3
  z1, z2 = random_pairs(9, n, d)
  z1, z2 = jnp.asarray(z1) * scale, jnp.asarray(z2) * scale
  if case == "zero_row":
    z1 = z1.at[0].set(0.0)
  if case == "bfloat16":
    z1, z2 = z1.astype(jnp.bfloat16), z2.astype(jnp.bfloat16)

  def f(a, b):
    return losses.nt_xent(a, b, temperature=temperature)[0]

  loss = f(z1, z2)
  grads = jax.grad(f, argnums=(0, 1))(z1, z2)
  assert loss.dtype == jnp.float32
  assert np.isfinite(float(loss)) and float(loss) > 0
  for g in grads:
    assert g.dtype == z1.dtype
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
  if case in ("low_temperature", "large_norm"):
    expected = pytorch_original_reference(np.asarray(z1), np.asarray(z2), temperature).mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
  if case == "zero_row":
    # the zero row has similarity 0 to everything; the reference with that row's cosine = 0
    z = np.concatenate([np.asarray(z1), np.asarray(z2)]).astype(np.float64)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    zn = np.where(norms > 0, z / np.maximum(norms, 1e-300), 0.0)
    e = np.exp(zn @ zn.T / temperature)
    positive_of = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    terms = -np.log(e[np.arange(2 * n), positive_of] / (e * (1 - np.eye(2 * n))).sum(1))
    np.testing.assert_allclose(float(loss), terms.mean(), rtol=1e-5)


def test_single_pair_has_zero_loss_and_finite_gradient():
  """M = 1: the positive is the only candidate, so the loss is exactly 0 and nothing is NaN."""
  z1, z2 = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[-1.0, 0.5, 2.0]])
  loss, grads = jax.value_and_grad(
    lambda a, b: losses.nt_xent(a, b, temperature=0.1)[0], argnums=(0, 1)
  )(z1, z2)
  assert float(loss) == 0.0
  for g in grads:
    np.testing.assert_array_equal(g, np.zeros_like(g))


def test_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    losses.nt_xent(jnp.ones((4, 3)), jnp.ones((5, 3)), temperature=0.1)


# ----------------------------------------------------------------------------- multi-positive


def multi_positive_reference(z_views, temperature):
  """SupCon's L_out (Khosla et al. 2020, eq. 2), the image as the label: loops, float64.

  Anchor (v, i): -1/(V-1) sum_{u != v} log(exp(s(vi, ui)/tau) / sum_{(w,j) != (v,i)} exp(s/tau)),
  averaged over all V*N anchors.
  """
  num_views, n, _ = z_views.shape
  z = np.asarray(z_views, np.float64)
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  anchors = [(v, i) for v in range(num_views) for i in range(n)]

  def e(a, b):
    return np.exp(float(z[a] @ z[b]) / temperature)

  total = 0.0
  for v, i in anchors:
    denominator = sum(e((v, i), (w, j)) for w, j in anchors if (w, j) != (v, i))
    positives = [u for u in range(num_views) if u != v]
    total -= sum(np.log(e((v, i), (u, i)) / denominator) for u in positives) / len(positives)
  return total / len(anchors)


def random_views(seed, num_views, n, d):
  """float32 [V, N, D]: V noisy views of N random images."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(1, n, d))
  return (images + 0.7 * rng.normal(size=(num_views, n, d))).astype(np.float32)


@pytest.mark.parametrize("num_views", [2, 3, 4])
@pytest.mark.parametrize("n,d", [(1, 3), (5, 8)])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_multi_matches_supcon_equation(num_views, n, d, temperature):
  z = random_views(num_views * 100 + n, num_views, n, d)
  loss, metrics = losses.nt_xent_multi(jnp.asarray(z), temperature=temperature)
  expected = multi_positive_reference(z, temperature)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
  # The metrics are view 1 against view 2's, whatever the other views.
  _, pair_metrics = losses.nt_xent(jnp.asarray(z[0]), jnp.asarray(z[1]), temperature=temperature)
  for name, value in pair_metrics.items():
    np.testing.assert_allclose(float(metrics[name]), float(value), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_multi_with_two_views_is_nt_xent(temperature):
  z1, z2 = random_pairs(13, 6, 10)

  def multi(a, b):
    return losses.nt_xent_multi(jnp.stack([a, b]), temperature=temperature)

  def pair(a, b):
    return losses.nt_xent(a, b, temperature=temperature)

  args = (jnp.asarray(z1), jnp.asarray(z2))
  (loss, metrics), grads = jax.value_and_grad(multi, argnums=(0, 1), has_aux=True)(*args)
  (expected, expected_metrics), expected_grads = jax.value_and_grad(
    pair, argnums=(0, 1), has_aux=True
  )(*args)
  # The same operations on the same numbers: equal up to float32 rounding of another fusion.
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-7, atol=0)
  for name, value in expected_metrics.items():
    np.testing.assert_allclose(float(metrics[name]), float(value), rtol=1e-7, atol=0, err_msg=name)
  for g, expected_g in zip(grads, expected_grads, strict=True):
    np.testing.assert_allclose(g, expected_g, rtol=1e-6, atol=1e-8)


def test_multi_gradients_match_finite_differences():
  shape, temperature = (3, 2, 4), 0.2
  z = random_views(17, *shape)
  grad = jax.grad(lambda x: losses.nt_xent_multi(x, temperature=temperature)[0])(jnp.asarray(z))
  x, h = z.astype(np.float64).ravel(), 1e-6
  numeric = np.array(
    [
      (
        multi_positive_reference((x + h * e).reshape(shape), temperature)
        - multi_positive_reference((x - h * e).reshape(shape), temperature)
      )
      / (2 * h)
      for e in np.eye(x.size)
    ]
  )
  np.testing.assert_allclose(np.asarray(grad).ravel(), numeric, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("num_views", [2, 4])
def test_multi_pmap_equals_single_device(sharded_problem, num_views):
  params, x1, _, per_device = sharded_problem
  temperature, m = 0.3, len(x1)
  noise = np.random.default_rng(num_views).normal(size=(num_views, *x1.shape))
  x = (x1[None] + 0.5 * noise).astype(np.float32)  # [V, M, d_in]

  def loss_fn(p, views, axis_name):
    z = projection(p, views)
    return losses.nt_xent_multi(z, temperature=temperature, axis_name=axis_name)

  (single_loss, single_metrics), single_grad = jax.value_and_grad(loss_fn, has_aux=True)(
    params, x, None
  )
  np.testing.assert_allclose(
    float(single_loss), multi_positive_reference(projection(params, x), temperature), rtol=1e-5
  )

  @functools.partial(jax.pmap, axis_name="d", in_axes=(None, 1))
  def step(p, views):
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(p, views, "d")
    return loss, metrics, jax.lax.pmean(grad, "d")

  loss, metrics, grad = step(params, x.reshape(num_views, NUM_DEVICES, per_device, -1))
  assert m == NUM_DEVICES * per_device
  np.testing.assert_allclose(np.asarray(loss), np.full(NUM_DEVICES, single_loss), rtol=1e-5)
  for name, value in single_metrics.items():
    np.testing.assert_allclose(np.asarray(metrics[name]), float(value), rtol=1e-5, atol=1e-6)
  for name in params:
    for device in range(NUM_DEVICES):
      np.testing.assert_allclose(grad[name][device], single_grad[name], rtol=1e-4, atol=1e-6)


def test_multi_identical_embeddings_use_every_view_of_the_global_batch():
  """All projections equal: each of the V-1 terms of an anchor is log(V*M - 1), M global."""
  num_views, per_device = 3, 2
  z = jnp.ones((NUM_DEVICES, num_views, per_device, 8))
  loss, _ = jax.pmap(
    lambda x: losses.nt_xent_multi(x, temperature=0.3, axis_name="d"), axis_name="d"
  )(z)
  np.testing.assert_allclose(
    np.asarray(loss), np.log(num_views * NUM_DEVICES * per_device - 1), rtol=1e-6
  )


def test_multi_rejects_bad_shapes():
  for shape in [(4, 3), (1, 4, 3)]:
    with pytest.raises(ValueError, match=r"\[V, N, D\] with V >= 2"):
      losses.nt_xent_multi(jnp.ones(shape), temperature=0.1)
