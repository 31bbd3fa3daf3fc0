"""LARS masks, learning-rate scaling and the warmup-cosine schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from simclr_jax import optim


def toy_params():
  return {
    "conv": {"kernel": jnp.full((3, 3, 4, 8), 0.5)},
    "bn": {"scale": jnp.full((8,), 2.0), "bias": jnp.full((8,), 1.0)},
    "dense": {"kernel": jnp.full((8, 4), -0.5), "bias": jnp.full((4,), 3.0)},
  }


def test_decay_mask_excludes_batch_norm_and_biases():
  mask = optim.decay_mask(toy_params())
  assert mask == {
    "conv": {"kernel": True},
    "bn": {"scale": False, "bias": False},
    "dense": {"kernel": True, "bias": False},
  }


@pytest.mark.parametrize("name", ["lars", "sgd", "adam", "adamw"])
def test_weight_decay_leaves_batch_norm_and_biases_untouched(name):
  """With zero gradients, only weight decay moves parameters: kernels move, the rest do not."""
  config = default.get_config().optim
  config.name = name
  config.weight_decay = 0.1
  tx = optim.create_optimizer(config, optax.constant_schedule(0.5))
  params = toy_params()
  state = tx.init(params)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, state, params)
  new = optax.apply_updates(params, updates)
  for path in (("bn", "scale"), ("bn", "bias"), ("dense", "bias")):
    np.testing.assert_array_equal(new[path[0]][path[1]], params[path[0]][path[1]])
  for layer in ("conv", "dense"):
    assert np.all(np.abs(new[layer]["kernel"]) < np.abs(params[layer]["kernel"]))


def test_lars_trust_ratio_skips_batch_norm_and_biases():
  """A bias update is the plain momentum-SGD step; a kernel's is rescaled by the trust ratio."""
  config = default.get_config().optim
  config.weight_decay = 0.0
  lr, eta = 0.5, config.trust_coefficient
  tx = optim.create_optimizer(config, optax.constant_schedule(lr))
  params = toy_params()
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.01), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["bias"], -lr * 0.01, rtol=1e-6)
  np.testing.assert_allclose(updates["bn"]["scale"], -lr * 0.01, rtol=1e-6)
  kernel, g = params["conv"]["kernel"], grads["conv"]["kernel"]
  trust = eta * jnp.linalg.norm(kernel) / jnp.linalg.norm(g)
  np.testing.assert_allclose(updates["conv"]["kernel"], -lr * trust * g, rtol=1e-5)


def test_learning_rate_scaling_rules():
  config = default.get_config().optim
  config.base_lr = 0.3
  assert optim.peak_learning_rate(config, 4096) == pytest.approx(4.8)  # paper §B.1
  config.lr_scaling = "sqrt"
  config.base_lr = 0.075
  assert optim.peak_learning_rate(config, 4096) == pytest.approx(4.8)
  config.lr_scaling = "bogus"
  with pytest.raises(ValueError, match="lr_scaling.*bogus"):
    optim.peak_learning_rate(config, 256)


def test_warmup_cosine_schedule():
  config = default.get_config().optim
  config.base_lr, config.warmup_epochs = 0.3, 2
  schedule = optim.warmup_cosine(config, batch_size=512, steps_per_epoch=10, num_epochs=10)
  peak = 0.6
  np.testing.assert_allclose(schedule(0), 0.0, atol=1e-9)
  np.testing.assert_allclose(schedule(10), peak / 2, rtol=1e-6)  # halfway through warmup
  np.testing.assert_allclose(schedule(20), peak, rtol=1e-6)
  np.testing.assert_allclose(schedule(60), peak / 2, rtol=1e-5)  # cosine midpoint
  np.testing.assert_allclose(schedule(100), 0.0, atol=1e-7)
  values = np.array([schedule(s) for s in range(20, 101)])
  assert np.all(np.diff(values) <= 1e-9)
  config.warmup_epochs = 11
  with pytest.raises(ValueError, match="warmup_epochs"):
    optim.warmup_cosine(config, batch_size=512, steps_per_epoch=10, num_epochs=10)


def test_unknown_optimizer_is_named():
  config = default.get_config().optim
  config.name = "rmsprop"
  with pytest.raises(ValueError, match="rmsprop"):
    optim.create_optimizer(config, optax.constant_schedule(0.1))
