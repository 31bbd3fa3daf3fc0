"""oneDNN convolutions through XLA FFI (`runtime.conv_impl='onednn'`) against XLA's: values and
gradients of single layers and of a whole SimCLR model, `make_ops`' choice of them, the errors,
and how the extension built at install time (`pip install '.[cpu-kernels]'`) is found and loaded.

Tests that run oneDNN skip, saying why, where the extension is not installed."""

import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from simclr_jax import cpu_kernels, models
from simclr_jax.cpu_kernels import onednn

PROBLEM = cpu_kernels.onednn_problem()
needs_onednn = pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))

LAYERS = [  # (N, side, C_in, C_out, kernel, stride): the stem, 3x3 stages, strided, 1x1 shortcut
  (4, 9, 3, 8, 7, 2),
  (3, 8, 16, 32, 3, 1),
  (2, 8, 16, 32, 3, 2),
  (2, 8, 16, 32, 1, 2),
  (2, 5, 8, 8, 3, 1),
  (2, (7, 9), 6, 10, 3, 2),  # H != W: catches swapped spatial axes
]


def _runtime(conv_impl):
  """configs/default.py's runtime section with this conv_impl."""
  runtime = default.get_config().runtime
  runtime.conv_impl = conv_impl
  return runtime


def _xla(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (stride, stride),
    ((padding, padding),) * 2,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


@needs_onednn
@pytest.mark.parametrize("n, side, c_in, c_out, k, stride", LAYERS)
def test_conv2d_equals_xla_values_and_gradients(n, side, c_in, c_out, k, stride):
  rng = np.random.default_rng(k * 10 + stride)
  h, w = side if isinstance(side, tuple) else (side, side)
  x = jnp.asarray(rng.normal(size=(n, h, w, c_in)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)), jnp.float32)
  padding = k // 2
  ours, ours_vjp = jax.vjp(lambda x, w: onednn.conv2d(x, w, stride, padding), x, kernel)
  ref, ref_vjp = jax.vjp(lambda x, w: _xla(x, w, stride, padding), x, kernel)
  assert ours.shape == ref.shape and ours.dtype == jnp.float32
  g = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)
  for a, b in zip((ours, *ours_vjp(g)), (ref, *ref_vjp(g)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  jitted_grad = jax.jit(jax.grad(lambda x, w: jnp.sum(onednn.conv2d(x, w, stride, padding) * g)))
  np.testing.assert_allclose(jitted_grad(x, kernel), ref_vjp(g)[0], rtol=1e-4, atol=1e-4)


@needs_onednn
def test_model_with_onednn_equals_xla():
  config = default.get_config().model
  config.depth = 18
  config.width_multiplier = 0.25
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 32, 32, 3)), jnp.float32)
  xla = models.build_model(config, image_size=32, ops=cpu_kernels.make_ops(_runtime("xla")))
  ours = models.build_model(config, image_size=32, ops=cpu_kernels.make_ops(_runtime("onednn")))
  variables = xla.init(jax.random.key(0), images, train=False)
  calls = str(jax.make_jaxpr(lambda v: ours.apply(v, images, train=False))(variables))
  # The switch reaches every convolution: ResNet-18 has 20 (stem, 16 in blocks, 3 shortcuts).
  assert calls.count("onednn_ConvFwd") == 20
  assert "onednn" not in str(jax.make_jaxpr(lambda v: xla.apply(v, images, train=False))(variables))

  def loss(model):
    def f(params):
      (z, _), _ = model.apply(
        {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
      )
      return jnp.sum(z**2), z

    return jax.value_and_grad(f, has_aux=True)(variables["params"])

  (ref_loss, ref_z), ref_grads = loss(xla)
  (our_loss, our_z), our_grads = loss(ours)
  np.testing.assert_allclose(our_z, ref_z, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(our_loss, ref_loss, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(our_grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.abs(b).max()) + 1e-6)


def _ffi_calls(jaxpr) -> list[tuple[str, jnp.dtype]]:
  """(target, output dtype) of every FFI call in a jaxpr, sub-jaxprs (custom VJPs, jit) included."""
  calls = []
  for eqn in jaxpr.eqns:
    if "target_name" in eqn.params:
      calls.append((eqn.params["target_name"], eqn.outvars[0].aval.dtype))
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          calls += _ffi_calls(inner)
  return calls


@needs_onednn
def test_bfloat16_model_on_onednn_equals_xlas_bfloat16_model():
  """model.dtype='bfloat16' (float32 parameters and loss): every convolution is a bfloat16
  oneDNN call, and the gradient is XLA's bfloat16 model's up to rounding (both are ~0.986 in
  cosine from float32's here: the rest of the model rounds to bfloat16 too)."""
  config = default.get_config().model
  config.depth, config.width_multiplier, config.dtype = 18, 0.25, "bfloat16"
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(8, 32, 32, 3)), jnp.float32)
  grads = {}
  for conv_impl in ("xla", "onednn"):
    ops = cpu_kernels.make_ops(_runtime(conv_impl), dtype="bfloat16")
    model = models.build_model(config, image_size=32, ops=ops)
    variables = model.init(jax.random.key(0), images, train=False)

    def loss(params, model=model, variables=variables):
      (z, _), _ = model.apply(
        {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
      )
      return jnp.sum(z**2)

    calls = _ffi_calls(jax.make_jaxpr(jax.grad(loss))(variables["params"]).jaxpr)
    assert calls.count(("onednn_ConvFwd", jnp.dtype(jnp.bfloat16))) == (conv_impl == "onednn") * 20
    leaves = jax.tree.leaves(jax.grad(loss)(variables["params"]))
    grads[conv_impl] = jnp.concatenate([g.ravel() for g in leaves])
  ours, ref = grads["onednn"], grads["xla"]
  assert ours.dtype == jnp.float32  # float32 parameters
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-3 * float(jnp.abs(ref).max()))


@needs_onednn
def test_pmap_equals_single_device():
  # Several devices call the handlers concurrently (conftest: 4 CPU devices).
  n = jax.local_device_count()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(n, 2, 8, 8, 16)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 16, 32)), jnp.float32)
  mapped = jax.pmap(lambda x: onednn.conv2d(x, kernel, 1, 1))(x)
  for i in range(n):
    np.testing.assert_allclose(mapped[i], _xla(x[i], kernel, 1, 1), rtol=1e-4, atol=1e-4)


def test_errors_before_any_call():
  with pytest.raises(ValueError, match="runtime.conv_impl='mkl'"):
    cpu_kernels.make_ops(_runtime("mkl"))
  with pytest.raises(ValueError, match="runtime.conv_impl='onednn' computes in .*'float16'"):
    cpu_kernels.make_ops(_runtime("onednn"), dtype="float16")
  for x_dtype, kernel_dtype in ((jnp.bfloat16, jnp.float32), (jnp.float16, jnp.float16)):
    x, kernel = jnp.zeros((1, 8, 8, 3), x_dtype), jnp.zeros((3, 3, 3, 4), kernel_dtype)
    with pytest.raises(ValueError, match=f"got x {jnp.dtype(x_dtype).name}, kernel"):
      onednn.conv2d(x, kernel, 1, 1)


@needs_onednn
@pytest.mark.parametrize("n, side, c_in, c_out, k, stride", LAYERS[:4])
def test_bfloat16_conv2d_equals_float32_xla_to_bfloat16_precision(n, side, c_in, c_out, k, stride):
  """bfloat16 in and out, float32 accumulation: XLA's float32 convolution of the same (rounded)
  operands, rounded once more, for the output and both gradients."""
  rng = np.random.default_rng(k * 10 + stride)
  x = jnp.asarray(rng.normal(size=(n, side, side, c_in)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)), jnp.bfloat16)
  padding = k // 2
  ours, ours_vjp = jax.vjp(lambda x, w: onednn.conv2d(x, w, stride, padding), x, kernel)
  f32 = (x.astype(jnp.float32), kernel.astype(jnp.float32))
  ref, ref_vjp = jax.vjp(lambda x, w: _xla(x, w, stride, padding), *f32)
  g = jnp.asarray(rng.normal(size=ref.shape), jnp.bfloat16)
  for a, b in zip((ours, *ours_vjp(g)), (ref, *ref_vjp(g.astype(jnp.float32))), strict=True):
    assert a.dtype == jnp.bfloat16 and a.shape == b.shape
    scale = float(jnp.abs(b).max())
    np.testing.assert_allclose(np.float32(a), b, rtol=1e-2, atol=1e-2 * scale)


@needs_onednn
def test_handler_errors_are_errors_not_crashes():
  with pytest.raises(Exception, match="kernel C_in != input channels"):
    jax.block_until_ready(onednn.conv2d(jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 5, 4)), 1, 1))


@needs_onednn
def test_runs_on_the_wheels_onednn_3_not_a_system_one():
  """The handlers and their libdnnl.so.3 come from the Python environment (the extension and
  the oneDNN wheel the cpu-kernels extra installs), never from a system oneDNN (Debian's
  libdnnl-dev is 2.x, libdnnl.so.2)."""
  import simclr_jax_onednn

  described = onednn.register()
  assert described.startswith("oneDNN 3.") and simclr_jax_onednn.LIBRARY in described
  wheel_library = onednn._onednn_library(simclr_jax_onednn.ONEDNN_DISTRIBUTION)
  with open("/proc/self/maps") as f:
    mapped = {line.split()[-1] for line in f if "libdnnl.so" in line}
  assert mapped == {os.path.realpath(wheel_library)}, mapped


def test_missing_extension_or_library_is_a_runtime_error_saying_how_to_install(monkeypatch):
  register = onednn.register.__wrapped__  # past the per-process cache
  monkeypatch.setattr(onednn, "EXTENSION", "simclr_jax_no_such_extension")
  with pytest.raises(RuntimeError, match=r"not installed .*pip install '\.\[cpu-kernels\]'"):
    register()
  fake = types.ModuleType("simclr_jax_fake_extension")
  fake.LIBRARY, fake.ONEDNN_DISTRIBUTION = "/nonexistent/libonednn_conv.so", "no-such-onednn"
  monkeypatch.setitem(sys.modules, fake.__name__, fake)
  monkeypatch.setattr(onednn, "EXTENSION", fake.__name__)
  with pytest.raises(RuntimeError, match=r"shared library \(no-such-onednn\) is not installed"):
    register()


def test_auto_falls_back_to_xla_with_one_warning(monkeypatch, caplog):
  def unavailable():
    raise RuntimeError("the extension is missing here")

  monkeypatch.setattr(onednn, "register", unavailable)
  cpu_kernels.onednn_problem.cache_clear()  # the outcome is cached per process
  try:
    with caplog.at_level("WARNING"):
      fallback = cpu_kernels.make_ops(_runtime("auto"), dtype="float32")
      again = cpu_kernels.make_ops(_runtime("auto"), dtype="float32")
  finally:
    cpu_kernels.onednn_problem.cache_clear()
    cpu_kernels._warn_fallback.cache_clear()
  assert fallback.conv_impl == fallback.conv.keywords["impl"] == again.conv_impl == "xla"
  warnings = [r for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1, [r.getMessage() for r in warnings]
  assert "the extension is missing here" in caplog.text
  assert "runtime.conv_impl='auto'" in caplog.text


@needs_onednn
def test_auto_picks_onednn_where_it_runs_and_says_so(caplog):
  runtime = _runtime("auto")
  with caplog.at_level("INFO"):
    ops = cpu_kernels.make_ops(runtime, dtype="float32")
  assert ops.conv_impl == "onednn"  # CPU, float32, extension installed
  assert "runtime.conv_impl='auto': onednn convolutions (oneDNN 3." in caplog.text
  model = models.build_model(default.get_config().model, image_size=32, ops=ops)
  assert model.encoder.conv.keywords["impl"] == "onednn"
  assert cpu_kernels.make_ops(runtime, dtype="bfloat16").conv_impl == "onednn"


def test_auto_and_onednn_off_the_cpu(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert cpu_kernels.make_ops(_runtime("auto"), dtype="float32").conv_impl == "xla"
  cpu_only = "runtime.conv_impl='onednn' runs on the CPU backend only; this is 'gpu'"
  with pytest.raises(ValueError, match=cpu_only):
    cpu_kernels.make_ops(_runtime("onednn"), dtype="float32")
