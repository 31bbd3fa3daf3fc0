"""The ResNet stem's 3x3/2 max-pool with a gradient that XLA's CPU backend runs fast.

XLA lowers max-pool's gradient to select-and-scatter, which is slow on CPU; here the backward
pass is nine masked, stride-2 spreads that XLA fuses into one loop (docs/benchmarks.md).
"""

import jax
import jax.numpy as jnp


def _taps(x: jnp.ndarray):
  """The nine stride-2 windows' taps of a 3x3/2 max-pool with padding 1 (padding never wins)."""
  out_h, out_w = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  for i in range(3):
    for j in range(3):
      yield i, j, xp[:, i : i + 2 * out_h - 1 : 2, j : j + 2 * out_w - 1 : 2]


def _forward(x: jnp.ndarray):
  out = index = None
  for i, j, tap in _taps(x):
    if out is None:
      out, index = tap, jnp.zeros(tap.shape, jnp.int8)
    else:
      wins = tap > out  # strict: ties go to the first tap in row-major window order
      out, index = jnp.where(wins, tap, out), jnp.where(wins, jnp.int8(3 * i + j), index)
  return out, (index, x.shape)


def _backward(residuals, g):
  index, (_, h, w, _) = residuals
  zero = jnp.zeros((), g.dtype)
  grad = 0
  for i in range(3):
    for j in range(3):
      routed = jnp.where(index == 3 * i + j, g, zero)
      # Tap (i, j) of output (y, x) read padded input (2y + i, 2x + j): spread with stride 2.
      grad = grad + jax.lax.pad(
        routed,
        zero,
        ((0, 0, 0), (i, 2 - i, 1), (j, 2 - j, 1), (0, 0, 0)),
      )
  return (grad[:, 1 : h + 1, 1 : w + 1],)


@jax.custom_vjp
def max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
  """3x3 max-pool, stride 2, padding 1 (He et al. 2016, Table 1), as `models.stem_max_pool`.

  Same values as `nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))`; the gradient goes to the
  first maximum of each window (row-major), a subgradient of max.

  Args:
    x: float [N, H, W, C].

  Returns:
    [N, ceil(H / 2), ceil(W / 2), C], dtype of x.
  """
  return _forward(x)[0]


max_pool_3x3_s2.defvjp(_forward, _backward)
