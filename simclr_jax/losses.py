"""NT-Xent, the normalised temperature-scaled cross-entropy loss of SimCLR (arXiv 2002.05709).

For a global batch of M images, each seen as two views, there are 2M L2-normalised projections.
Anchor i's positive is its other view; every other projection of the global batch is a negative.
With sim(u, v) = u.v / (|u| |v|) and temperature tau, eq. (1) of the paper is

    l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) )

and the loss is its mean over all 2M anchors (Algorithm 1). Normalisations in use elsewhere:

- google-research/simclr (tf2 `add_contrastive_loss`) returns the *sum* of the two directions'
  means, i.e. exactly twice this loss (its gradient is twice ours; the optimum is the same).
- The PyTorch original this project grew from computes exp(sim_pos / tau) over the sum over k != i
  of exp(sim_ik / tau), and averages -log of that ratio over the 2M rows: this loss, unchanged.

`nt_xent_multi` generalises it to V >= 2 views of each image (multi-crop, Caron et al. 2020,
SwAV §3.2): every other view of the same image is a positive, as in SupCon's L_out (Khosla et al.
2020, eq. 2) with the image as the label; with V = 2 it is `nt_xent`.
"""

from typing import Any

import jax
import jax.numpy as jnp

_PRECISION = jax.lax.Precision.HIGHEST
# Logit of masked-out candidates: exp(_MASKED - x) is exactly 0 in float32 for any |x| < 1e8,
# and unlike -inf it keeps the gradient finite when a row has no candidate left (M = 1).
_MASKED = -1e9


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows of `x` scaled to unit L2 norm; a zero row stays zero (finite value and gradient).

  Args:
    x: float [N, D].
    eps: floor on the squared norm, so that a zero row divides by sqrt(eps), not by 0.

  Returns:
    float32 [N, D].
  """
  x = x.astype(jnp.float32)
  sq_norm = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps))


def _global_index_offset(axis_name: str | None, n_local: int) -> tuple[jax.Array | int, int]:
  """(index of this device's first pair in the global batch, number of devices)."""
  if axis_name is None:
    return 0, 1
  num_devices = jax.lax.psum(1, axis_name)
  return jax.lax.axis_index(axis_name) * n_local, num_devices


def _gather(x: jax.Array, axis_name: str | None) -> jax.Array:
  """[N, D] on each device -> [num_devices * N, D], the same (device-major) order everywhere."""
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, tiled=True)


def nt_xent_logits(
  z1: jax.Array, z2: jax.Array, *, temperature: float, axis_name: str | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Masked similarity logits of this device's anchors against the whole global batch.

  Global order of the 2M candidates: the view-1 projections of devices 0..K-1, then their
  view-2 projections. Local anchors are this device's view-1 rows, then its view-2 rows.

  Args:
    z1: float [N, D], projections of view 1 on this device (any float dtype).
    z2: float [N, D], projections of view 2, row i the other view of z1's row i.
    temperature: tau > 0.
    axis_name: pmap/shard_map axis to gather negatives over; None for one device.

  Returns:
    logits: float32 [2N, 2M], sim / tau, with each anchor's self-similarity masked (-1e9).
    positive_index: int32 [2N], the column of each anchor's positive.
    self_index: int32 [2N], the column of each anchor itself.
  """
  if z1.shape != z2.shape or z1.ndim != 2:
    raise ValueError(f"z1 and z2 must both be [N, D]; got {z1.shape} and {z2.shape}")
  n = z1.shape[0]
  z1, z2 = l2_normalize(z1), l2_normalize(z2)
  anchors = jnp.concatenate([z1, z2], axis=0)
  g1, g2 = _gather(z1, axis_name), _gather(z2, axis_name)
  m = g1.shape[0]
  candidates = jnp.concatenate([g1, g2], axis=0)
  logits = jnp.matmul(anchors, candidates.T, precision=_PRECISION) / temperature

  offset, _ = _global_index_offset(axis_name, n)
  pair = offset + jnp.arange(n, dtype=jnp.int32)
  self_index = jnp.concatenate([pair, m + pair])
  positive_index = jnp.concatenate([m + pair, pair])
  columns = jnp.arange(2 * m, dtype=jnp.int32)
  logits = jnp.where(columns[None, :] == self_index[:, None], _MASKED, logits)
  return logits, positive_index, self_index


def nt_xent_terms(
  z1: jax.Array, z2: jax.Array, *, temperature: float, axis_name: str | None = None
) -> jax.Array:
  """Per-anchor NT-Xent terms l(i, j) of eq. (1) for this device's 2N anchors.

  Args: as `nt_xent`.

  Returns:
    float32 [2N]: view-1 anchors' terms, then view-2 anchors'; each >= 0 up to rounding.
  """
  return _terms(z1, z2, temperature=temperature, axis_name=axis_name)[0]


def _terms(z1, z2, *, temperature, axis_name):
  logits, positive_index, self_index = nt_xent_logits(
    z1, z2, temperature=temperature, axis_name=axis_name
  )
  positive = jnp.take_along_axis(logits, positive_index[:, None], axis=1)[:, 0]
  # -log(e^p / (e^p + sum_neg e^n)) = log(1 + sum_neg e^(n - p)) = softplus(lse_neg(n - p)):
  # exact for the tiny terms of well-separated pairs, where lse(all) - p cancels in float32.
  columns = jnp.arange(logits.shape[1])
  negatives = jnp.where(columns[None, :] == positive_index[:, None], _MASKED, logits)
  terms = jax.nn.softplus(jax.nn.logsumexp(negatives - positive[:, None], axis=1))
  return terms, logits, negatives, positive, positive_index, self_index


def nt_xent(
  z1: jax.Array, z2: jax.Array, *, temperature: float, axis_name: str | None = None
) -> tuple[jax.Array, dict[str, Any]]:
  """NT-Xent loss (SimCLR eq. 1, averaged over all 2M anchors as in Algorithm 1).

  Negatives come from the global batch: with `axis_name` set (inside `jax.pmap` or
  `shard_map`), the projections of every device are gathered. Each device computes the terms
  of its own 2N anchors only.

  Multi-device contract: the returned loss *value* is the global-batch loss, identical on every
  device and equal to the single-device loss on the concatenated batch. Its *gradient* is the
  gradient of this device's share (the mean of its own anchors' terms), flowing into the other
  devices' projections through the all_gather. Averaging gradients with `lax.pmean` over
  `axis_name` therefore gives exactly the gradient of the global loss. Equal per-device N is
  assumed (pmap guarantees it).

  Args:
    z1: float [N, D] projections of view 1 on this device; any float dtype, computed in float32.
      Rows are L2-normalised here (a zero row stays zero).
    z2: float [N, D] projections of view 2; row i is the positive of z1's row i.
    temperature: tau > 0 (the paper uses 0.1 to 1.0; the PyTorch original used 0.05).
    axis_name: device axis to gather negatives over, or None for a single device.

  Returns:
    loss: float32 scalar, >= 0; log(2M - 1) when all projections coincide.
    metrics: float32 scalars over the global batch: `contrastive_accuracy` (fraction of anchors
      whose positive ranks first among the 2M - 1 candidates), `positive_similarity` (mean cosine
      similarity of positive pairs), `negative_similarity` (mean cosine similarity of an anchor
      to its 2M - 2 negatives).

  Raises:
    ValueError: z1 and z2 are not both [N, D] with the same shape.
  """
  terms, logits, negatives, positive, positive_index, self_index = _terms(
    z1, z2, temperature=temperature, axis_name=axis_name
  )
  metrics = _pair_metrics(
    logits, negatives, positive, positive_index, self_index, temperature=temperature
  )
  return _global_mean(jnp.mean(terms), metrics, axis_name)


def _pair_metrics(logits, negatives, positive, positive_index, self_index, *, temperature):
  """`nt_xent`'s metrics of this device's anchors, from `_terms`' outputs (no gradient)."""
  rows = jnp.arange(logits.shape[0])
  sims = jax.lax.stop_gradient(logits) * temperature
  columns = jnp.arange(logits.shape[1])
  is_negative = (columns[None, :] != self_index[:, None]) & (
    columns[None, :] != positive_index[:, None]
  )
  num_negatives = jnp.maximum(logits.shape[1] - 2, 1)
  return {
    "contrastive_accuracy": jnp.mean(positive > jnp.max(negatives, axis=1)),
    "positive_similarity": jnp.mean(sims[rows, positive_index]),
    "negative_similarity": jnp.mean(
      jnp.sum(jnp.where(is_negative, sims, 0.0), axis=1) / num_negatives
    ),
  }


def _global_mean(local_loss, metrics, axis_name):
  """The global loss value with this device's gradient, and the metrics averaged over devices."""
  if axis_name is None:
    return local_loss, metrics
  global_loss = jax.lax.pmean(local_loss, axis_name)
  loss = local_loss + jax.lax.stop_gradient(global_loss - local_loss)
  metrics = jax.lax.pmean(metrics, axis_name)
  return loss, metrics


def _positive_and_others(logits, positive_index):
  """Each row's logit at `positive_index` [A], and the logits with that column masked [A, C]."""
  positive = jnp.take_along_axis(logits, positive_index[:, None], axis=1)[:, 0]
  columns = jnp.arange(logits.shape[1])
  return positive, jnp.where(columns[None, :] == positive_index[:, None], _MASKED, logits)


def nt_xent_multi(
  z_views: jax.Array, *, temperature: float, axis_name: str | None = None
) -> tuple[jax.Array, dict[str, Any]]:
  """Multi-positive NT-Xent over V >= 2 views of each image (SupCon eq. 2; SwAV §3.2 multi-crop).

  The global batch holds V*M L2-normalised projections z(v, i): view v of image i. For the
  anchor (v, i), every other view of image i is a positive and every other projection a
  candidate of the denominator:

      l(v, i) = -1/(V-1) sum_{u != v} log( exp(s((v,i),(u,i)) / tau)
                                           / sum_{(w,j) != (v,i)} exp(s((v,i),(w,j)) / tau) )

  (s: cosine similarity), SupCon's L_out (Khosla et al. 2020, eq. 2) with the image as the
  label; the loss is the mean over all V*M anchors. With V = 2 it is `nt_xent(z_views[0],
  z_views[1])`, computed by the same operations. Each term is evaluated as
  softplus(logsumexp over the other candidates of (logit - positive logit)), as `nt_xent` does.

  Multi-device contract: as `nt_xent` (negatives gathered from every device; the value is the
  global loss on every device; the gradient is this device's share, so `lax.pmean` of the
  gradients is the gradient of the global loss).

  Args:
    z_views: float [V, N, D], this device's projections (any float dtype, computed in float32);
      ``z_views[v, i]`` is view v of this device's image i. Rows are L2-normalised here.
    temperature: tau > 0.
    axis_name: device axis to gather the candidates over, or None for a single device.

  Returns:
    loss: float32 scalar, >= 0; log(V*M - 1) when all projections coincide.
    metrics: `nt_xent`'s, of the first two views alone (view 1 against view 2, candidates the
      2M projections of those two views), equal to `nt_xent(z_views[0], z_views[1])`'s.

  Raises:
    ValueError: z_views is not [V, N, D] with V >= 2.
  """
  if z_views.ndim != 3 or z_views.shape[0] < 2:
    raise ValueError(f"z_views must be [V, N, D] with V >= 2 views; got {z_views.shape}")
  num_views, n = z_views.shape[:2]
  z = l2_normalize(z_views)
  anchors = z.reshape(num_views * n, -1)
  gathered = z if axis_name is None else jax.lax.all_gather(z, axis_name, axis=1, tiled=True)
  m = gathered.shape[1]
  # Global order of the V*M candidates: view-major, each view's M images in device order.
  candidates = gathered.reshape(num_views * m, -1)
  logits = jnp.matmul(anchors, candidates.T, precision=_PRECISION) / temperature

  offset, _ = _global_index_offset(axis_name, n)
  image = jnp.tile(offset + jnp.arange(n, dtype=jnp.int32), num_views)
  view = jnp.repeat(jnp.arange(num_views, dtype=jnp.int32), n)
  self_index = view * m + image
  columns = jnp.arange(num_views * m, dtype=jnp.int32)
  logits = jnp.where(columns[None, :] == self_index[:, None], _MASKED, logits)

  terms = 0.0
  for shift in range(1, num_views):
    positive, others = _positive_and_others(logits, (view + shift) % num_views * m + image)
    terms = terms + jax.nn.softplus(jax.nn.logsumexp(others - positive[:, None], axis=1))
  local_loss = jnp.mean(terms / (num_views - 1))

  # View 1 against view 2: the top-left [2N, 2M] block of the logits is `nt_xent_logits`'.
  pair, pair_self = logits[: 2 * n, : 2 * m], self_index[: 2 * n]
  pair_positive_index = (1 - view[: 2 * n]) * m + image[: 2 * n]
  pair_positive, pair_negatives = _positive_and_others(pair, pair_positive_index)
  metrics = _pair_metrics(
    pair, pair_negatives, pair_positive, pair_positive_index, pair_self, temperature=temperature
  )
  return _global_mean(local_loss, metrics, axis_name)
