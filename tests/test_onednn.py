"""oneDNN convolutions through XLA FFI (`runtime.conv_impl='onednn'`) against XLA's: values and
gradients of single layers and of a whole SimCLR model, `make_ops`' choice of them, the errors."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from simclr_jax import cpu_kernels, models
from simclr_jax.cpu_kernels import onednn

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


def test_pmap_equals_single_device():
  # Several devices call the handlers concurrently (conftest: 4 CPU devices).
  n = jax.local_device_count()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(n, 2, 8, 8, 16)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 16, 32)), jnp.float32)
  mapped = jax.pmap(lambda x: onednn.conv2d(x, kernel, 1, 1))(x)
  for i in range(n):
    np.testing.assert_allclose(mapped[i], _xla(x[i], kernel, 1, 1), rtol=1e-4, atol=1e-4)


def test_errors():
  with pytest.raises(ValueError, match="runtime.conv_impl='mkl'"):
    cpu_kernels.make_ops(_runtime("mkl"))
  with pytest.raises(ValueError, match="runtime.conv_impl='onednn' computes in float32"):
    cpu_kernels.make_ops(_runtime("onednn"), dtype="bfloat16")
  x = jnp.zeros((1, 8, 8, 3), jnp.bfloat16)
  with pytest.raises(ValueError, match="got x bfloat16"):
    onednn.conv2d(x, jnp.zeros((3, 3, 3, 4), jnp.bfloat16), 1, 1)
  with pytest.raises(Exception, match="kernel C_in != input channels"):  # an error, not a crash
    jax.block_until_ready(onednn.conv2d(jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 5, 4)), 1, 1))


def test_library_path_keys_on_source_jax_compiler_and_onednn(monkeypatch, tmp_path):
  monkeypatch.setenv("SIMCLR_JAX_CACHE", str(tmp_path))
  toolchain = onednn._toolchain()
  assert re.match(rb"\d+\.\d+", toolchain), toolchain  # g++'s version first
  assert b"DNNL_VERSION_MAJOR" in toolchain and b"DNNL_VERSION_MINOR" in toolchain
  path = onednn.library_path()
  assert os.path.dirname(path) == str(tmp_path) and path == onednn.library_path()
  source = tmp_path / "other.cc"
  with open(onednn.SOURCE, "rb") as f:
    source.write_bytes(f.read() + b"// changed\n")
  changes = {
    "oneDNN": ("_toolchain", lambda: toolchain.replace(b"MINOR", b"MINOR 9")),
    "g++": ("_toolchain", lambda: b"99." + toolchain),
    "source": ("SOURCE", str(source)),
  }
  for name, (attribute, value) in changes.items():
    with monkeypatch.context() as m:
      m.setattr(onednn, attribute, value)
      assert onednn.library_path() != path, name  # another input: another build
  with monkeypatch.context() as m:
    m.setattr(jax, "__version__", "0.0.0")
    assert onednn.library_path() != path, "jax"
  assert onednn.library_path() == path


def test_auto_picks_onednn_where_it_runs_else_xla(monkeypatch, caplog):
  runtime = _runtime("auto")
  ops = cpu_kernels.make_ops(runtime, dtype="float32")
  assert ops.conv_impl == "onednn"  # CPU, float32, library builds
  model = models.build_model(default.get_config().model, image_size=32, ops=ops)
  assert model.encoder.conv.keywords["impl"] == "onednn"
  # no error, unlike conv_impl='onednn'
  assert cpu_kernels.make_ops(runtime, dtype="bfloat16").conv_impl == "xla"

  def unavailable():
    raise RuntimeError("g++ is missing here")

  monkeypatch.setattr(onednn, "register", unavailable)
  cpu_kernels.onednn_problem.cache_clear()  # the outcome is cached per process
  try:
    with caplog.at_level("WARNING"):
      fallback = cpu_kernels.make_ops(runtime, dtype="float32")
  finally:
    cpu_kernels.onednn_problem.cache_clear()
  assert fallback.conv_impl == fallback.conv.keywords["impl"] == "xla"
  assert "g++ is missing here" in caplog.text and "runtime.conv_impl='auto'" in caplog.text
  monkeypatch.undo()

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert cpu_kernels.make_ops(runtime, dtype="float32").conv_impl == "xla"
  cpu_only = "runtime.conv_impl='onednn' runs on the CPU backend only; this is 'gpu'"
  with pytest.raises(ValueError, match=cpu_only):
    cpu_kernels.make_ops(_runtime("onednn"), dtype="float32")


def test_register_failures_are_runtime_errors_and_leave_no_temp_file(monkeypatch, tmp_path):
  build = onednn.register.__wrapped__  # past the per-process cache; fails before registering
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("")
  monkeypatch.setenv("SIMCLR_JAX_CACHE", str(not_a_dir))
  with pytest.raises(RuntimeError, match="unavailable: FileExistsError"):
    build()
  cache = tmp_path / "cache"
  monkeypatch.setenv("SIMCLR_JAX_CACHE", str(cache))
  monkeypatch.setenv("PATH", str(tmp_path))  # no g++
  with pytest.raises(RuntimeError, match="needs g\\+\\+"):
    build()
  assert os.listdir(cache) == []  # the temp file of the failed build is gone
