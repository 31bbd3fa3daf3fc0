"""Tests for simclr_jax.cpu_kernels: the kernels change speed only.

The convolution (on every path: XLA's with a chunked backward pass, dense and shifted matrix
products on tiny maps) and the stem's max-pool compute flax's values and gradients; `make_ops`
resolves a `config.runtime` section; and one SimCLR train step with the injected ops has flax's
loss and gradients and the values saved in tests/data (oneDNN's convolutions: tests/test_onednn.py).
"""

import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from configs import default, tiny
from simclr_jax import cpu_kernels, losses, models
from simclr_jax.cpu_kernels import conv, max_pool

DATA = os.path.join(os.path.dirname(__file__), "data")


def _runtime(conv_impl, conv_grad_chunk=None):
  """configs/default.py's runtime section with these two fields."""
  runtime = default.get_config().runtime
  runtime.conv_impl, runtime.conv_grad_chunk = conv_impl, conv_grad_chunk
  return runtime


def _sub_jaxprs(value):
  """The jaxprs in an equation parameter: a Jaxpr, a ClosedJaxpr's, or those in a tuple/list."""
  if isinstance(value, jax_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax_core.Jaxpr):
    yield value
  elif isinstance(value, tuple | list):
    for item in value:
      yield from _sub_jaxprs(item)


def _count_primitive(jaxpr, name: str) -> int:
  """Equations of primitive `name` in a jaxpr, sub-jaxprs (custom VJPs, pjit) included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        count += _count_primitive(sub, name)
  return count


def test_count_primitive_sees_inside_custom_vjps_and_jit():
  """The walk above finds equations nested in custom VJPs inside a jit, so the counts below are
  not zero by accident."""
  x, kernel = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
  jaxpr = jax.make_jaxpr(
    jax.jit(lambda x, k: max_pool.max_pool_3x3_s2(conv.conv2d(x, k, 1, 1, 0)))
  )(x, kernel).jaxpr
  assert len(jaxpr.eqns) == 1  # the jit; everything else is nested in it
  assert _count_primitive(jaxpr, "custom_vjp_call") == 2
  assert _count_primitive(jaxpr, "conv_general_dilated") == 1


# --- The convolution --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "hw,strides,channels,kernel",
  [(2, 1, 5, 3), (3, 2, 5, 3), (4, 2, 5, 3), (1, 1, 5, 3), (6, 1, 5, 3), (9, 2, 5, 3)]
  + [(2, 2, 5, 3), (2, 1, 5, 5)]  # dense matrix: with a stride; with a 5x5 kernel
  + [(9, 2, 3, 7), (8, 2, 3, 7), (5, 1, 4, 3), (3, 2, 1, 7)],  # stem-like: few input channels
)
def test_conv_equals_flax_conv_on_every_path(hw, strides, channels, kernel):
  """conv.Conv (for outputs <= 2x2 a dense matrix product or shifted products, else XLA's
  convolution) == nn.Conv, values and gradients."""
  _assert_conv_equals_flax_conv((hw, hw), strides, channels, kernel)


@pytest.mark.parametrize(
  "hw,strides",
  # dense product, dense with a stride, shifted products (twice), XLA's convolution
  [((1, 2), 1), ((2, 3), 2), ((4, 3), 2), ((3, 4), 2), ((3, 5), 2)],
)
def test_conv_equals_flax_conv_on_non_square_maps(hw, strides):
  _assert_conv_equals_flax_conv(hw, strides, 5, 3)


def _assert_conv_equals_flax_conv(hw, strides, channels, kernel):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, *hw, channels))
  padding = kernel // 2
  ours = conv.Conv(7, (kernel, kernel), strides, padding=padding)
  ref = nn.Conv(7, (kernel, kernel), strides, padding=padding, use_bias=False)
  params = ours.init(jax.random.PRNGKey(1), x)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
    ref.init(jax.random.PRNGKey(1), x)
  )

  def loss(module, p, x):
    return jnp.sum(jnp.sin(module.apply(p, x)))

  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  g_ours = jax.grad(loss, argnums=(1, 2))(ours, params, x)
  g_ref = jax.grad(loss, argnums=(1, 2))(ref, params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_takes_nn_conv_style_strides_and_padding_and_rejects_what_it_cannot_do():
  """Per-dimension strides and (low, high) padding pairs, as `nn.Conv` takes them, give the int
  form's result; unequal sides or dimensions, and a bias, are errors rather than wrong results."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 7, 3))
  ints = conv.Conv(4, (3, 3), 2, padding=1)
  params = ints.init(jax.random.PRNGKey(1), x)
  for strides, padding in [((2, 2), (1, 1)), ((2, 2), ((1, 1), (1, 1))), ([2, 2], [(1, 1)] * 2)]:
    pairs = conv.Conv(4, (3, 3), strides, padding=padding)
    np.testing.assert_array_equal(pairs.apply(params, x), ints.apply(params, x))
  for what, module in [
    ("padding", conv.Conv(4, (3, 3), 2, padding=((1, 0), (1, 1)))),
    ("strides", conv.Conv(4, (3, 3), (1, 2), padding=1)),
  ]:
    with pytest.raises(ValueError, match=f"same {what} everywhere"):
      module.init(jax.random.PRNGKey(1), x)
  with pytest.raises(ValueError, match="no bias"):
    conv.Conv(4, (3, 3), 1, padding=1, use_bias=True).init(jax.random.PRNGKey(1), x)


@pytest.mark.parametrize(
  "hw,strides,kernel,dots",
  [(2, 1, 3, 2), (1, 1, 3, 2), (2, 2, 3, 2), (3, 2, 3, 9), (4, 2, 3, 9), (2, 1, 5, 2)],
)
def test_small_map_path_is_one_dense_product_when_the_map_has_fewer_pixels_than_taps(
  hw, strides, kernel, dots
):
  """H*W < kh*kw: two products (build the matrix, apply it); else kh*kw shifted products."""
  x = jnp.ones((2, hw, hw, 4))
  module = conv.Conv(6, (kernel, kernel), strides, padding=kernel // 2)
  params = module.init(jax.random.PRNGKey(0), x)
  jaxpr = jax.make_jaxpr(module.apply)(params, x).jaxpr
  assert _count_primitive(jaxpr, "dot_general") == dots
  assert _count_primitive(jaxpr, "conv_general_dilated") == 0


def test_small_map_conv_matrix_rows_are_the_convolution_of_unit_images():
  """Row r of the matrix = the convolution of the image that is 1 at input entry r, else 0."""
  kernel = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 2, 3))
  matrix = np.asarray(conv.small_map_conv_matrix(kernel, (2, 3), 1, 1))
  assert matrix.shape == (2 * 3 * 2, 2 * 3 * 3)
  units = jnp.eye(12).reshape(12, 2, 3, 2)
  ref = jax.lax.conv_general_dilated(
    units, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  np.testing.assert_allclose(matrix, np.asarray(ref).reshape(12, -1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad_chunk,chunks", [(0, 1), (1, 6), (2, 3), (4, 2), (6, 1), (8, 1)])
@pytest.mark.parametrize("strides,kernel", [(1, 3), (2, 3), (2, 7), (2, 1)])
def test_conv_chunked_backward_equals_flax_conv_gradients(grad_chunk, chunks, strides, kernel):
  """The backward pass over chunks of images (concatenated input gradient, summed kernel
  gradient) == nn.Conv's gradients, for chunks that divide the batch of 6, that do not, and none;
  and the gradient really runs one input- and one kernel-gradient convolution per chunk."""
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 9, 9, 4))
  padding = kernel // 2
  ours = conv.Conv(6, (kernel, kernel), strides, padding=padding, grad_chunk=grad_chunk)
  ref = nn.Conv(6, (kernel, kernel), strides, padding=padding, use_bias=False)
  params = ours.init(jax.random.PRNGKey(1), x)
  # A per-image weighting makes every image's gradient different, so a chunk taken twice or
  # dropped changes the result.
  weights = jnp.arange(1.0, 7.0)[:, None, None, None]

  def loss(module, p, x):
    return jnp.sum(weights * jnp.sin(module.apply(p, x)))

  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  g_ours = jax.grad(loss, argnums=(1, 2))(ours, params, x)
  g_ref = jax.grad(loss, argnums=(1, 2))(ref, params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(ours, params, x)
  # forward, then dx and dW per chunk
  assert _count_primitive(jaxpr.jaxpr, "conv_general_dilated") == 1 + 2 * chunks


def test_conv_grad_chunk_is_capped_at_max_grad_chunks():
  """A chunk smaller than N / MAX_GRAD_CHUNKS is enlarged, so compiles stay bounded."""
  n = 2 * conv.MAX_GRAD_CHUNKS + 1
  x = jax.random.normal(jax.random.PRNGKey(0), (n, 4, 4, 2))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 3))

  def loss(k, x):
    return jnp.sum(conv.conv2d(x, k, 1, 1, 1) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(kernel, x)
  # chunks of ceil(33 / 16) = 3 images
  assert _count_primitive(jaxpr.jaxpr, "conv_general_dilated") == 1 + 2 * 11
  ref = jax.grad(lambda k, x: jnp.sum(conv.conv2d(x, k, 1, 1, 0) ** 2), argnums=(0, 1))
  for a, b in zip(jax.grad(loss, argnums=(0, 1))(kernel, x), ref(kernel, x), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_make_ops_grad_chunk_reaches_every_conv_of_build_model():
  """runtime.conv_grad_chunk reaches every encoder convolution through make_ops and build_model:
  with 2 images in chunks of 1, the gradient has two more transposed convolutions per
  convolution kernel than unchunked."""
  config = tiny.get_config().model
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3))

  def gradient_convolutions(chunk):
    ops = cpu_kernels.make_ops(_runtime("xla", chunk))
    model = models.build_model(config, image_size=32, ops=ops)
    variables = model.init(jax.random.PRNGKey(1), images, train=False)

    def loss(params):
      (z, _), _ = model.apply(
        {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
      )
      return jnp.sum(z**2)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"]).jaxpr
    return variables, _count_primitive(jaxpr, "conv_general_dilated")

  variables, whole = gradient_convolutions(0)
  _, chunked = gradient_convolutions(1)
  kernels = [
    leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]["encoder"])
    if path[-1].key == "kernel"
  ]
  assert len(kernels) > 10 and chunked - whole == 2 * len(kernels)


def test_conv_chunked_backward_in_bfloat16_keeps_dtype_and_value():
  """bf16 compute: the chunked kernel gradient keeps the kernel's dtype and equals, to bf16
  precision, the float32 gradient of the same (bf16-rounded) inputs."""
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 6, 3)).astype(jnp.bfloat16)
  kernel = (jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4)) * 0.3).astype(jnp.bfloat16)

  def loss(k, x, chunk):
    return jnp.sum(conv.conv2d(x, k, 1, 1, chunk).astype(jnp.float32) ** 2)

  g16 = jax.grad(loss)(kernel, x, 1)
  g32 = jax.grad(loss)(kernel.astype(jnp.float32), x.astype(jnp.float32), 0)
  assert g16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(g16), g32, rtol=2e-2, atol=2e-2 * float(jnp.abs(g32).max()))


# --- The stem's max-pool ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 3), (1, 1, 1, 2), (3, 2, 5, 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_equals_flax_max_pool_values_and_gradients(shape, dtype):
  """The custom-gradient stem max-pool == nn.max_pool (XLA reduce-window and its autodiff)."""
  x = jax.random.normal(jax.random.PRNGKey(0), shape).astype(dtype)

  def ref(x):
    return nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))

  y, vjp = jax.vjp(max_pool.max_pool_3x3_s2, x)
  y_ref, vjp_ref = jax.vjp(ref, x)
  assert y.dtype == dtype
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  g = jax.random.normal(jax.random.PRNGKey(1), y.shape).astype(dtype)
  # An input that is the maximum of several windows sums their gradients, in another order.
  tol = 1e-6 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(
    np.asarray(vjp(g)[0], np.float32), np.asarray(vjp_ref(g)[0], np.float32), rtol=tol, atol=tol
  )


def test_max_pool_gradient_routes_each_output_to_one_input_under_ties():
  """Ties (e.g. the zeros after ReLU): each window's gradient reaches exactly one input."""
  x = jnp.zeros((1, 6, 6, 1)).at[0, 2, 2, 0].set(1.0)
  g = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
  dx = jax.vjp(max_pool.max_pool_3x3_s2, x)[1](g)[0]
  assert float(dx.sum()) == float(g.sum())
  # Windows (rows/cols 1-3 and 3-5 in input coordinates) containing (2, 2) send it their share:
  # windows centred at output (1, 1) only; the rest go to each window's first (top-left) input.
  assert float(dx[0, 2, 2, 0]) == float(g[0, 1, 1, 0])


# --- make_ops and what build_model injects ----------------------------------------------------


def _encoder_jaxpr(ops):
  """(model, forward jaxpr) of ResNet-18 at width 1/16 on 64 px: the ImageNet stem with its
  max-pool, and 2x2 maps in stage 4."""
  config = default.get_config().model
  config.depth, config.width_multiplier, config.cifar_stem = 18, 0.0625, False
  model = models.build_model(config, image_size=64, ops=ops)
  images = jnp.zeros((2, 64, 64, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
  return model, jax.make_jaxpr(lambda v: model.apply(v, images, train=False))(variables).jaxpr


def test_build_model_defaults_to_flax_conv_and_max_pool():
  """ops=None: the ResNet runs flax's nn.Conv and nn.max_pool (XLA's convolution and
  reduce-window, no custom gradient) for all 20 convolutions of ResNet-18 and the stem's pool."""
  model, jaxpr = _encoder_jaxpr(None)
  assert model.encoder.conv is nn.Conv and model.encoder.max_pool is models.stem_max_pool
  assert _count_primitive(jaxpr, "conv_general_dilated") == 20
  assert _count_primitive(jaxpr, "reduce_window_max") == 1
  assert _count_primitive(jaxpr, "custom_vjp_call") == 0
  # Control: the CPU kernels are custom VJPs and pool without reduce-window: 16 of conv2d (stage
  # 4's 3x3 convolutions are matrix products) and the max-pool.
  _, kernels = _encoder_jaxpr(cpu_kernels.make_ops(_runtime("xla")))
  assert _count_primitive(kernels, "custom_vjp_call") == 17
  assert _count_primitive(kernels, "reduce_window_max") == 0


def test_make_ops_flax_gives_flax_ops_on_the_cpu():
  """runtime.conv_impl='flax' on the CPU backend: flax's ops, the very program of ops=None."""
  assert jax.default_backend() == "cpu"
  ops = cpu_kernels.make_ops(_runtime("flax", 4))
  assert ops.conv is nn.Conv and ops.max_pool is models.stem_max_pool
  assert ops.conv_impl == "flax" and ops.sequential_augment  # the CPU's augmentation loop
  assert str(_encoder_jaxpr(ops)[1]) == str(_encoder_jaxpr(None)[1])


@pytest.mark.parametrize("chunk, expected", [(None, cpu_kernels.CPU_GRAD_CHUNK), (0, 0), (4, 4)])
def test_make_ops_xla_on_the_cpu_gives_the_cpu_kernels(chunk, expected):
  ops = cpu_kernels.make_ops(_runtime("xla", chunk))
  assert ops.conv.func is conv.Conv
  assert ops.conv.keywords == {"grad_chunk": expected, "impl": "xla"}
  assert ops.max_pool is max_pool.max_pool_3x3_s2
  assert ops.conv_impl == "xla" and ops.sequential_augment


@pytest.mark.parametrize("conv_impl", ["flax", "xla", "auto"])
def test_make_ops_off_the_cpu_gives_flax_ops(monkeypatch, conv_impl):
  """Accelerators run flax's ops (whatever the chunk) and the vmapped augmentation."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  ops = cpu_kernels.make_ops(_runtime(conv_impl, 4))
  assert ops.conv is nn.Conv and ops.max_pool is models.stem_max_pool
  assert not ops.sequential_augment
  assert ops.conv_impl == ("flax" if conv_impl == "flax" else "xla")


@pytest.mark.parametrize("field, value", [("conv_impl", "mkl"), ("conv_grad_chunk", -1)])
def test_make_ops_rejects_bad_values(field, value):
  runtime = _runtime("xla")
  setattr(runtime, field, value)
  with pytest.raises(ValueError, match=f"runtime.{field}={value!r}"):
    cpu_kernels.make_ops(runtime)


# --- One SimCLR train step --------------------------------------------------------------------


def _step_values(ops) -> dict[str, np.ndarray]:
  """Loss, gradients and new BN statistics of one SimCLR step on a fixed batch of 8 pairs.

  ResNet-18 at width 1/16 on 64 px images: the ImageNet stem (7x7/2 convolution, max-pool) and
  stage 4's 2x2 maps (the matrix-product path of `cpu_kernels.conv.Conv`) are both exercised.
  """
  config = default.get_config().model
  config.depth, config.width_multiplier, config.cifar_stem = 18, 0.0625, False
  config.head.output_dim = 16
  model = models.build_model(config, image_size=64, ops=ops)
  images = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (16, 64, 64, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), images, train=False)

  def loss_fn(params):
    (z, _), updates = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      images,
      train=True,
      mutable=["batch_stats"],
    )
    z1, z2 = jnp.split(z, 2)
    return losses.nt_xent(z1, z2, temperature=0.5)[0], updates

  (loss, updates), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
  values = {"loss": np.asarray(loss)}
  for prefix, tree in (("grad", grads), ("batch_stats", updates["batch_stats"])):
    for key, leaf in flax.traverse_util.flatten_dict(tree, sep="/").items():
      values[f"{prefix}/{key}"] = np.asarray(leaf)
  return values


def _assert_close(actual, expected, rtol, atol):
  """allclose per array, `atol` relative to the array's largest magnitude (gradients of a
  layer share one scale; float32 rounding differs in absolute terms at that scale)."""
  assert actual.keys() == expected.keys()
  for key in expected:
    scale = max(float(np.abs(expected[key]).max()), 1e-30)
    np.testing.assert_allclose(
      actual[key], expected[key], rtol=rtol, atol=atol * scale, err_msg=key
    )


@pytest.fixture(scope="module")
def flax_values():
  return _step_values(None)


_ONEDNN_PROBLEM = cpu_kernels.onednn_problem()
_NEEDS_ONEDNN = pytest.mark.skipif(_ONEDNN_PROBLEM is not None, reason=str(_ONEDNN_PROBLEM))
CASES = [
  ("xla", None, "xla"),
  ("xla", 4, "xla_chunk4"),
  pytest.param("onednn", None, "onednn", marks=_NEEDS_ONEDNN),
]


@pytest.mark.parametrize("conv_impl, chunk, saved", CASES)
def test_step_unchanged_by_the_move(conv_impl, chunk, saved):
  """Each implementation gives the loss and gradients saved in tests/data, computed when the
  kernels were part of models.py."""
  expected = dict(np.load(os.path.join(DATA, f"step_reference_{saved}.npz")))
  actual = _step_values(cpu_kernels.make_ops(_runtime(conv_impl, chunk)))
  _assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "conv_impl, chunk", [("xla", None), ("xla", 4), pytest.param("onednn", None, marks=_NEEDS_ONEDNN)]
)
def test_step_equals_flax_ops(flax_values, conv_impl, chunk):
  """Each implementation computes the step of flax's `nn.Conv` and `nn.max_pool`."""
  actual = _step_values(cpu_kernels.make_ops(_runtime(conv_impl, chunk)))
  _assert_close(actual, flax_values, rtol=1e-5, atol=1e-5)
