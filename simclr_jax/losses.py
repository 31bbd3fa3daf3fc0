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
  rows = jnp.arange(logits.shape[0])
  local_loss = jnp.mean(terms)

  sims = jax.lax.stop_gradient(logits) * temperature
  columns = jnp.arange(logits.shape[1])
  is_negative = (columns[None, :] != self_index[:, None]) & (
    columns[None, :] != positive_index[:, None]
  )
  num_negatives = jnp.maximum(logits.shape[1] - 2, 1)
  metrics = {
    "contrastive_accuracy": jnp.mean(positive > jnp.max(negatives, axis=1)),
    "positive_similarity": jnp.mean(sims[rows, positive_index]),
    "negative_similarity": jnp.mean(
      jnp.sum(jnp.where(is_negative, sims, 0.0), axis=1) / num_negatives
    ),
  }
  if axis_name is None:
    return local_loss, metrics
  global_loss = jax.lax.pmean(local_loss, axis_name)
  loss = local_loss + jax.lax.stop_gradient(global_loss - local_loss)
  metrics = jax.lax.pmean(metrics, axis_name)
  return loss, metrics
