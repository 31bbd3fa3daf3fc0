"""Tests for simclr_jax.models: architecture, initialisation, presets, dtypes, cross-device BN.

The models here use flax's convolution and max-pool; the CPU kernels that `build_model` can inject
instead are tested in tests/test_cpu_kernels.py."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, tiny
from simclr_jax import models

# unsafe_rbg keys compile in a fraction of threefry's time on CPU; tests need no stronger PRNG.
KEY = jax.random.key(0, impl="unsafe_rbg")

# He et al. 2016, Table 1.
BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BLOCKS_PER_STAGE[152] = (3, 8, 36, 3)


def _images(n, size=32, seed=0):
  return jax.random.uniform(jax.random.key(seed, impl="unsafe_rbg"), (n, size, size, 3))


def _num_params(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def tiny_model():
  """configs/tiny.py model (ResNet-18, 8 first-stage filters, 32 px) with real parameters."""
  config = tiny.get_config()
  model = models.build_model(config.model, image_size=32)
  variables = jax.jit(lambda key: model.init(key, _images(4), train=False))(KEY)
  return config, model, variables


@pytest.fixture(scope="module")
def tiny_apply(tiny_model):
  """Jitted (eval, train) applies of the tiny model, shared so each compiles once."""
  _, model, _ = tiny_model
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
  train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  return evaluate, train


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
@pytest.mark.parametrize("cifar_stem", [True, False])
def test_encoder_shapes(depth, cifar_stem):
  encoder = models.RESNETS[depth](width_multiplier=0.125, cifar_stem=cifar_stem)
  h, variables = jax.eval_shape(
    lambda key: encoder.init_with_output(key, _images(2), train=False, mutable=True), KEY
  )
  width = 8 * 8 * (1 if depth < 50 else 4)  # 512 * wm basic, 2048 * wm bottleneck
  assert (h.shape, h.dtype) == ((2, width), jnp.float32)
  assert encoder.feature_dim == width
  stages = variables["intermediates"]
  first = 32 if cifar_stem else 8
  assert stages["stage1"][0].shape[1:3] == (first, first)
  assert stages["stage4"][0].shape[1:3] == (first // 8, first // 8)
  blocks = [k for k in variables["params"] if "_block" in k]
  for stage, count in enumerate(BLOCKS_PER_STAGE[depth], start=1):
    assert sum(k.startswith(f"stage{stage}_") for k in blocks) == count
  stem = variables["params"]["stem_conv"]["kernel"].shape
  assert stem == ((3, 3, 3, 8) if cifar_stem else (7, 7, 3, 8))


@pytest.mark.parametrize(
  "depth, cifar_stem, expected",
  [
    (18, False, 11_176_512),  # torchvision resnet18: 11,689,512 minus the 513,000 fc
    (50, False, 23_508_032),  # torchvision resnet50: 25,557,032 minus the 2,049,000 fc
    (18, True, 11_176_512 - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64),
  ],
)
def test_parameter_counts_match_standard_resnets(depth, cifar_stem, expected):
  encoder = models.RESNETS[depth](cifar_stem=cifar_stem)
  variables = jax.eval_shape(lambda key: encoder.init(key, _images(1, 64), train=False), KEY)
  assert _num_params(variables["params"]) == expected
  assert encoder.feature_dim == (512 if depth == 18 else 2048)


def _blocks(params):
  return {k: v for k, v in params.items() if "_block" in k}


def test_last_bn_scale_of_every_block_is_zero(tiny_model):
  _, _, variables = tiny_model
  blocks = _blocks(variables["params"]["encoder"])
  assert len(blocks) == 8
  for name, block in blocks.items():
    assert set(block) >= {"bn1", "bn2"}, name
    np.testing.assert_array_equal(block["bn2"]["scale"], 0.0)
    np.testing.assert_array_equal(block["bn1"]["scale"], 1.0)


@pytest.mark.parametrize("block_cls", [models.BasicBlock, models.BottleneckBlock])
def test_block_is_identity_at_init(block_cls):
  filters = 4
  block = block_cls(
    filters,
    conv=functools.partial(nn.Conv, use_bias=False),
    norm=functools.partial(nn.BatchNorm, use_running_average=False),
  )
  x = jax.random.normal(KEY, (2, 6, 6, filters * block_cls.expansion))
  variables = block.init(KEY, x)
  last = sorted(k for k in variables["params"] if k.startswith("bn"))[-1]
  assert "shortcut_conv" not in variables["params"]
  y, _ = block.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y, jax.nn.relu(x), atol=1e-6)
  # Control: with the residual branch switched on the block is no longer the identity.
  params = {**variables["params"], last: {**variables["params"][last]}}
  params[last]["scale"] = jnp.ones_like(params[last]["scale"])
  y, _ = block.apply({**variables, "params": params}, x, mutable=["batch_stats"])
  assert not np.allclose(y, jax.nn.relu(x), atol=1e-3)


def test_residual_branches_do_not_affect_features_at_init(tiny_model):
  """At init every block is relu(shortcut(x)), projection shortcuts included."""
  _, model, variables = tiny_model
  encode = jax.jit(lambda v, x: model.apply(v, x, train=False, method=models.SimCLRModel.encode))
  x = _images(2)
  h = encode(variables, x)
  params = jax.tree_util.tree_map_with_path(
    lambda path, p: p + 1.0 if "_block" in str(path) and "'conv" in str(path) else p,
    variables["params"],
  )
  np.testing.assert_allclose(encode({**variables, "params": params}, x), h, rtol=1e-5, atol=1e-6)
  # Control: once the last BN scales are non-zero the same perturbation changes h.
  live = jax.tree_util.tree_map_with_path(
    lambda path, p: p + 1.0 if "'bn2'" in str(path) and "scale" in str(path) else p, params
  )
  assert not np.allclose(encode({**variables, "params": live}, x), h, atol=1e-3)


def test_pytorch_original_head_preset_is_512_100_100_100():
  """The PyTorch original's head on ResNet-18: a plain MLP (biases, no BN), 512-100-100-100."""
  config = default.get_config().model
  config.depth = 18
  config.head.preset = "pytorch_original"
  config.head.num_layers = 3
  config.head.hidden_dim = 100
  config.head.output_dim = 100
  model = models.build_model(config, image_size=32)
  (z, aux), variables = jax.eval_shape(
    lambda key: model.init_with_output(key, _images(2), train=False), KEY
  )
  head = variables["params"]["head"]
  assert sorted(head) == ["dense1", "dense2", "dense3"]
  assert [head[f"dense{i}"]["kernel"].shape for i in (1, 2, 3)] == [
    (512, 100),
    (100, 100),
    (100, 100),
  ]
  assert all(head[f"dense{i}"]["bias"].shape == (100,) for i in (1, 2, 3))
  assert "head" not in variables["batch_stats"]
  assert [a.shape for a in aux["head_layers"]] == [(2, 100)] * 3
  assert z.shape == (2, 100) and aux["features"].shape == (2, 512)


@pytest.mark.parametrize("num_layers", [2, 3])
def test_simclr_head_preset_layer_shapes(num_layers):
  config = default.get_config().model  # ResNet-50, hidden_dim 0 -> 2048, output 128
  config.head.num_layers = num_layers
  model = models.build_model(config, image_size=224)
  assert model.encoder.cifar_stem is False
  (z, aux), variables = jax.eval_shape(
    lambda key: model.init_with_output(key, _images(2, 64), train=False), KEY
  )
  head = variables["params"]["head"]
  widths = [2048] * num_layers + [128]
  for i in range(1, num_layers + 1):
    assert sorted(head[f"dense{i}"]) == ["kernel"]  # no bias
    assert head[f"dense{i}"]["kernel"].shape == tuple(widths[i - 1 : i + 1])
    last = i == num_layers
    assert sorted(head[f"bn{i}"]) == (["scale"] if last else ["bias", "scale"])
    assert variables["batch_stats"]["head"][f"bn{i}"]["mean"].shape == (widths[i],)
  assert [a.shape for a in aux["head_layers"]] == [(2, w) for w in widths[1:]]
  assert z.shape == (2, 128) and aux["features"].shape == (2, 2048)


@pytest.mark.parametrize("preset", ["simclr", "pytorch_original"])
def test_head_activations(preset):
  head = models.ProjectionHead(
    num_layers=3, hidden_dim=16, output_dim=8, **models.HEAD_PRESETS[preset]
  )
  h = jax.random.normal(KEY, (16, 12))
  variables = head.init(KEY, h, train=False)
  layers, _ = head.apply(variables, h, train=True, mutable=["batch_stats"])
  assert [a.shape for a in layers] == [(16, 16), (16, 16), (16, 8)]
  assert all(a.dtype == jnp.float32 for a in layers)
  assert all(bool((a >= 0).all()) for a in layers[:-1])  # ReLU on hidden layers
  assert bool((layers[-1] < 0).any())  # none on z
  if preset == "simclr":  # BN in train mode, no shift: z is standardised per feature
    np.testing.assert_allclose(layers[-1].mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(layers[-1].var(0), 1.0, rtol=0.15)  # var / (var + epsilon)


def test_bn_running_statistics_use_momentum_0_9():
  head = models.ProjectionHead(num_layers=1, output_dim=3)
  h = jax.random.normal(KEY, (8, 5)) + 2.0
  variables = head.init(KEY, h, train=False)
  _, state = head.apply(variables, h, train=True, mutable=["batch_stats"])
  u = h @ variables["params"]["dense1"]["kernel"]
  stats = state["batch_stats"]["bn1"]
  np.testing.assert_allclose(stats["mean"], 0.1 * u.mean(0), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * u.var(0), rtol=1e-4)


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny_model, tiny_apply):
  config, _, variables = tiny_model
  config = config.copy_and_resolve_references()
  config.model.dtype = "bfloat16"
  model = models.build_model(config.model, image_size=32)
  shapes = jax.eval_shape(lambda key: model.init(key, _images(4), train=False), KEY)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes["params"]))
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes["batch_stats"]))
  x = _images(4)
  (z, aux), state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))(
    variables, x
  )
  assert state["intermediates"]["encoder"]["stage1"][0].dtype == jnp.bfloat16
  assert z.dtype == aux["features"].dtype == jnp.float32
  assert all(a.dtype == jnp.float32 for a in aux["head_layers"])
  _, aux32 = tiny_apply[0](variables, x)
  np.testing.assert_allclose(aux["features"], aux32["features"], rtol=0.1, atol=0.05)
  assert not np.array_equal(aux["features"], aux32["features"])


def test_projection_is_last_head_layer(tiny_model, tiny_apply):
  config, _, variables = tiny_model
  z, aux = tiny_apply[0](variables, _images(4))
  assert z.shape == (4, config.model.head.output_dim)
  assert len(aux["head_layers"]) == config.model.head.num_layers
  np.testing.assert_array_equal(z, aux["head_layers"][-1])
  assert aux["features"].shape == (4, models.feature_dim(config.model))


def test_eval_mode_uses_running_statistics(tiny_model, tiny_apply):
  _, _, variables = tiny_model
  evaluate, train = tiny_apply
  x = _images(4)
  others = x.at[1:].set(_images(3, seed=1))
  np.testing.assert_allclose(
    evaluate(variables, x)[0][0], evaluate(variables, others)[0][0], rtol=1e-5, atol=1e-6
  )
  # Control: in train mode batch statistics couple the examples.
  assert not np.allclose(train(variables, x)[0][0][0], train(variables, others)[0][0][0], atol=1e-4)


def test_pmap_batch_norm_matches_single_device_on_concatenated_batch(tiny_model, tiny_apply):
  config, _, variables = tiny_model
  synced = models.build_model(config.model, image_size=32, axis_name="batch")
  x = _images(4)
  (z, aux), state = tiny_apply[1](variables, x)
  n = jax.local_device_count()
  assert n == 4
  replicated = jax.tree.map(lambda a: jnp.stack([a] * n), variables)
  (zp, auxp), statep = jax.pmap(
    lambda v, x: synced.apply(v, x, train=True, mutable=["batch_stats"]), axis_name="batch"
  )(replicated, x.reshape(n, 1, *x.shape[1:]))  # one example per device
  np.testing.assert_allclose(zp.reshape(z.shape), z, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(auxp["features"].reshape(4, -1), aux["features"], rtol=1e-4, atol=1e-5)
  for device in range(n):
    jax.tree.map(
      lambda p, s, d=device: np.testing.assert_allclose(p[d], s, rtol=1e-4, atol=1e-5),
      statep["batch_stats"],
      state["batch_stats"],
    )
  assert np.abs(state["batch_stats"]["head"]["bn2"]["mean"]).max() > 0  # stats did update


def test_build_model_cifar_stem_and_hidden_dim():
  config = tiny.get_config().model
  assert models.build_model(config, image_size=32).encoder.cifar_stem is True
  assert models.build_model(config, image_size=64).encoder.cifar_stem is False
  config.cifar_stem = True
  assert models.build_model(config, image_size=224).encoder.cifar_stem is True
  config.cifar_stem = False
  assert models.build_model(config, image_size=32).encoder.cifar_stem is False
  config.head.hidden_dim = 0
  model = models.build_model(config, image_size=32, axis_name="batch")
  assert model.head.hidden_dim == 64 and model.encoder.axis_name == model.head.axis_name == "batch"


@pytest.mark.parametrize(
  "depth, width_multiplier, expected", [(18, 0.125, 64), (34, 2.0, 1024), (50, 1.0, 2048)]
)
def test_feature_dim(depth, width_multiplier, expected):
  config = default.get_config().model
  config.depth = depth
  config.width_multiplier = width_multiplier
  assert models.feature_dim(config) == expected


@pytest.mark.parametrize(
  "field, value",
  [
    ("depth", 20),
    ("dtype", "float16"),
    ("head.preset", "byol"),
    ("width_multiplier", 0.0),
    ("head.num_layers", 0),
  ],
)
def test_build_model_rejects_bad_values(field, value):
  config = tiny.get_config().model
  section, _, name = ("." + field).rpartition(".")
  setattr(config.head if section else config, name, value)
  with pytest.raises(ValueError, match=f"model.{field}={value!r}"):
    models.build_model(config, image_size=32)
