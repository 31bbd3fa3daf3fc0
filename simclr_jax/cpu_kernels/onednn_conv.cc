// oneDNN convolution forward, backward-data and backward-weights as XLA FFI handlers, so that
// `cpu_kernels.conv.Conv(impl="onednn")` runs on the library PyTorch's CPU convolutions use.
// NHWC activations, HWIO kernels, float32, symmetric zero padding, equal strides in H and W.
// Built on first use and loaded by simclr_jax/cpu_kernels/onednn.py (g++, Debian's libdnnl-dev 2.6, jaxlib's
// FFI headers). oneDNN's primitive cache keeps the JIT-compiled kernels between calls; the
// primitive descriptors are rebuilt at each call (microseconds).
#include <cstdint>
#include <exception>
#include <string>
#include <dnnl.hpp>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;
using Buf = ffi::Buffer<ffi::F32, 4>;
using Res = ffi::ResultBuffer<ffi::F32, 4>;
using Dims = ffi::Span<const int64_t>;

namespace {
dnnl::engine& eng() { static dnnl::engine e(dnnl::engine::kind::cpu, 0); return e; }

// One convolution: NHWC activations, the HWIO kernel as given and in the layout oneDNN picks.
struct Conv {
  memory::desc src, dst, hwio, any_weights;
  memory::dims strides, pad;
};

// From the input x [N, H, W, Ci] and kernel [kh, kw, Ci, Co] shapes.
Conv describe(Dims x, Dims k, int64_t stride, int64_t pad) {
  const int64_t ho = (x[1] + 2 * pad - k[0]) / stride + 1, wo = (x[2] + 2 * pad - k[1]) / stride + 1;
  const memory::dims weights{k[3], k[2], k[0], k[1]};
  return {memory::desc({x[0], x[3], x[1], x[2]}, dt::f32, tag::nhwc),
          memory::desc({x[0], k[3], ho, wo}, dt::f32, tag::nhwc),
          memory::desc(weights, dt::f32, tag::hwio), memory::desc(weights, dt::f32, tag::any),
          {stride, stride}, {pad, pad}};
}

// Checks what Python promises: matching channels, stride >= 1, padding >= 0, and y's extents
// [N, Ho, Wo, Co], so that a mismatch is an error rather than a buffer overrun.
ffi::Error check(Dims x, Dims k, Dims y, int64_t stride, int64_t pad) {
  if (stride < 1 || pad < 0) return ffi::Error::InvalidArgument("stride must be >= 1, pad >= 0");
  if (k[2] != x[3]) return ffi::Error::InvalidArgument("kernel C_in != input channels");
  const memory::dims d = describe(x, k, stride, pad).dst.dims();  // N, Co, Ho, Wo
  if (y[0] != d[0] || y[1] != d[2] || y[2] != d[3] || y[3] != d[1])
    return ffi::Error::InvalidArgument("buffer shapes do not match the convolution");
  return ffi::Error::Success();
}

memory bind(const memory::desc& desc, void* data) { return memory(desc, eng(), data); }

// `user` in the layout `want`: itself, or a reordered copy.
memory in_layout(const memory& user, const memory::desc& want, dnnl::stream& s) {
  if (user.get_desc() == want) return user;
  memory copy(want, eng());
  dnnl::reorder(user, copy).execute(s, const_cast<memory&>(user), copy);
  return copy;
}

dnnl::convolution_forward::primitive_desc forward_pd(const Conv& c) {
  return {{dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, c.src,
           c.any_weights, c.dst, c.strides, c.pad, c.pad},
          eng()};
}

// Runs `body(stream)` and waits; oneDNN's exceptions become FFI errors, never a crash.
template <typename F>
ffi::Error run(F&& body) {
  try {
    dnnl::stream s(eng());
    body(s);
    s.wait();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(e.what());
  }
}
}  // namespace

// y [N, Ho, Wo, Co] from x [N, H, W, Ci] and kernel [kh, kw, Ci, Co].
static ffi::Error ConvFwdImpl(Buf x, Buf k, Res y, int64_t stride, int64_t pad) {
  if (auto e = check(x.dimensions(), k.dimensions(), y->dimensions(), stride, pad); e.failure())
    return e;
  const Conv c = describe(x.dimensions(), k.dimensions(), stride, pad);
  return run([&](dnnl::stream& s) {
    const auto pd = forward_pd(c);
    memory w = in_layout(bind(c.hwio, k.typed_data()), pd.weights_desc(), s);
    dnnl::convolution_forward(pd).execute(
        s, {{DNNL_ARG_SRC, bind(c.src, x.typed_data())}, {DNNL_ARG_WEIGHTS, w},
            {DNNL_ARG_DST, bind(c.dst, y->typed_data())}});
  });
}

// dx [N, H, W, Ci] (its shape from the result) from dy [N, Ho, Wo, Co] and the kernel.
static ffi::Error ConvBwdDataImpl(Buf dy, Buf k, Res dx, int64_t stride, int64_t pad) {
  if (auto e = check(dx->dimensions(), k.dimensions(), dy.dimensions(), stride, pad); e.failure())
    return e;
  const Conv c = describe(dx->dimensions(), k.dimensions(), stride, pad);
  return run([&](dnnl::stream& s) {
    const dnnl::convolution_backward_data::primitive_desc pd(
        {dnnl::algorithm::convolution_direct, c.src, c.any_weights, c.dst, c.strides, c.pad, c.pad},
        eng(), forward_pd(c));
    memory w = in_layout(bind(c.hwio, k.typed_data()), pd.weights_desc(), s);
    dnnl::convolution_backward_data(pd).execute(
        s, {{DNNL_ARG_DIFF_DST, bind(c.dst, dy.typed_data())}, {DNNL_ARG_WEIGHTS, w},
            {DNNL_ARG_DIFF_SRC, bind(c.src, dx->typed_data())}});
  });
}

// dk [kh, kw, Ci, Co] (its shape from the result) from x [N, H, W, Ci] and dy [N, Ho, Wo, Co].
static ffi::Error ConvBwdWeightsImpl(Buf x, Buf dy, Res dk, int64_t stride, int64_t pad) {
  if (auto e = check(x.dimensions(), dk->dimensions(), dy.dimensions(), stride, pad); e.failure())
    return e;
  const Conv c = describe(x.dimensions(), dk->dimensions(), stride, pad);
  return run([&](dnnl::stream& s) {
    const dnnl::convolution_backward_weights::primitive_desc pd(
        {dnnl::algorithm::convolution_direct, c.src, c.any_weights, c.dst, c.strides, c.pad, c.pad},
        eng(), forward_pd(c));
    memory user_dw = bind(c.hwio, dk->typed_data());
    const bool same = pd.diff_weights_desc() == c.hwio;
    memory dw = same ? user_dw : memory(pd.diff_weights_desc(), eng());
    dnnl::convolution_backward_weights(pd).execute(
        s, {{DNNL_ARG_SRC, bind(c.src, x.typed_data())},
            {DNNL_ARG_DIFF_DST, bind(c.dst, dy.typed_data())}, {DNNL_ARG_DIFF_WEIGHTS, dw}});
    if (!same) dnnl::reorder(dw, user_dw).execute(s, dw, user_dw);
  });
}

#define BIND3 \
  ffi::Ffi::Bind().Arg<Buf>().Arg<Buf>().Ret<ffi::Buffer<ffi::F32, 4>>().Attr<int64_t>("stride").Attr<int64_t>("pad")
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvFwd, ConvFwdImpl, BIND3);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBwdData, ConvBwdDataImpl, BIND3);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBwdWeights, ConvBwdWeightsImpl, BIND3);
