// oneDNN convolution forward, backward-data and backward-weights as XLA FFI handlers, so that
// `models.Conv(impl="onednn")` runs on the library PyTorch's CPU convolutions use.
// NHWC activations, HWIO kernels, float32, symmetric zero padding, equal strides in H and W.
// Built on first use and loaded by simclr_jax/onednn.py (g++, Debian's libdnnl-dev 2.6, jaxlib's
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

namespace {
dnnl::engine& eng() { static dnnl::engine e(dnnl::engine::kind::cpu, 0); return e; }

struct Geo { memory::dims src, wei, dst, strides, pad; };

Geo geometry(int64_t n, int64_t h, int64_t w, int64_t ci, int64_t kh, int64_t kw, int64_t co,
             int64_t stride, int64_t pad) {
  int64_t ho = (h + 2 * pad - kh) / stride + 1, wo = (w + 2 * pad - kw) / stride + 1;
  return {{n, ci, h, w}, {co, ci, kh, kw}, {n, co, ho, wo}, {stride, stride}, {pad, pad}};
}

using Buf = ffi::Buffer<ffi::F32, 4>;
using Res = ffi::ResultBuffer<ffi::F32, 4>;

// Checks what Python promises: matching channels, positive stride, non-negative padding, and the
// expected output extents, so that a mismatch is an error rather than a buffer overrun.
ffi::Error check(const Geo& g, int64_t kernel_c_in, int64_t c_in, ffi::Span<const int64_t> out,
                 bool out_is_dst, int64_t stride, int64_t pad) {
  if (stride < 1 || pad < 0) return ffi::Error::InvalidArgument("stride must be >= 1, pad >= 0");
  if (kernel_c_in != c_in) return ffi::Error::InvalidArgument("kernel C_in != input channels");
  const memory::dims& d = out_is_dst ? g.dst : g.src;
  if (out[0] != d[0] || out[1] != d[2] || out[2] != d[3] || out[3] != d[1])
    return ffi::Error::InvalidArgument("buffer shapes do not match the convolution");
  return ffi::Error::Success();
}

template <typename F>
ffi::Error guarded(F&& body) {
  try {
    return body();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(e.what());
  }
}

dnnl::convolution_forward::primitive_desc fwd_pd(const Geo& g) {
  return dnnl::convolution_forward::primitive_desc(
      dnnl::convolution_forward::desc(
          dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
          memory::desc(g.src, dt::f32, tag::nhwc), memory::desc(g.wei, dt::f32, tag::any),
          memory::desc(g.dst, dt::f32, tag::nhwc), g.strides, g.pad, g.pad),
      eng());
}
}  // namespace

static ffi::Error ConvFwdImpl(Buf x, Buf k, Res y, int64_t stride, int64_t pad) {
  auto xd = x.dimensions(); auto kd = k.dimensions();
  Geo g = geometry(xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], stride, pad);
  if (auto e = check(g, kd[2], xd[3], y->dimensions(), true, stride, pad); e.failure()) return e;
  return guarded([&]() -> ffi::Error {
  dnnl::stream s(eng());
  auto pd = fwd_pd(g);
  memory user_w(memory::desc(g.wei, dt::f32, tag::hwio), eng(), k.typed_data());
  memory w = user_w;
  if (pd.weights_desc() != user_w.get_desc()) {
    w = memory(pd.weights_desc(), eng());
    dnnl::reorder(user_w, w).execute(s, user_w, w);
  }
  memory src(memory::desc(g.src, dt::f32, tag::nhwc), eng(), x.typed_data());
  memory dst(memory::desc(g.dst, dt::f32, tag::nhwc), eng(), y->typed_data());
  dnnl::convolution_forward(pd).execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, dst}});
  s.wait();
  return ffi::Error::Success();
  });
}

// dx from dy [N, Ho, Wo, Co] and kernel [kh, kw, Ci, Co]; dx's shape comes from the result.
static ffi::Error ConvBwdDataImpl(Buf dy, Buf k, Res dx, int64_t stride, int64_t pad) {
  auto xd = dx->dimensions(); auto kd = k.dimensions();
  Geo g = geometry(xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], stride, pad);
  if (auto e = check(g, kd[2], xd[3], dy.dimensions(), true, stride, pad); e.failure()) return e;
  return guarded([&]() -> ffi::Error {
  dnnl::stream s(eng());
  auto fpd = fwd_pd(g);
  dnnl::convolution_backward_data::primitive_desc pd(
      dnnl::convolution_backward_data::desc(
          dnnl::algorithm::convolution_direct, memory::desc(g.src, dt::f32, tag::nhwc),
          memory::desc(g.wei, dt::f32, tag::any), memory::desc(g.dst, dt::f32, tag::nhwc),
          g.strides, g.pad, g.pad),
      eng(), fpd);
  memory user_w(memory::desc(g.wei, dt::f32, tag::hwio), eng(), k.typed_data());
  memory w = user_w;
  if (pd.weights_desc() != user_w.get_desc()) {
    w = memory(pd.weights_desc(), eng());
    dnnl::reorder(user_w, w).execute(s, user_w, w);
  }
  memory ddst(memory::desc(g.dst, dt::f32, tag::nhwc), eng(), dy.typed_data());
  memory dsrc(memory::desc(g.src, dt::f32, tag::nhwc), eng(), dx->typed_data());
  dnnl::convolution_backward_data(pd).execute(s, {{DNNL_ARG_DIFF_DST, ddst}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DIFF_SRC, dsrc}});
  s.wait();
  return ffi::Error::Success();
  });
}

// dk [kh, kw, Ci, Co] from x [N, H, W, Ci] and dy [N, Ho, Wo, Co].
static ffi::Error ConvBwdWeightsImpl(Buf x, Buf dy, Res dk, int64_t stride, int64_t pad) {
  auto xd = x.dimensions(); auto kd = dk->dimensions();
  Geo g = geometry(xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], stride, pad);
  if (auto e = check(g, kd[2], xd[3], dy.dimensions(), true, stride, pad); e.failure()) return e;
  return guarded([&]() -> ffi::Error {
  dnnl::stream s(eng());
  auto fpd = fwd_pd(g);
  dnnl::convolution_backward_weights::primitive_desc pd(
      dnnl::convolution_backward_weights::desc(
          dnnl::algorithm::convolution_direct, memory::desc(g.src, dt::f32, tag::nhwc),
          memory::desc(g.wei, dt::f32, tag::any), memory::desc(g.dst, dt::f32, tag::nhwc),
          g.strides, g.pad, g.pad),
      eng(), fpd);
  memory user_dw(memory::desc(g.wei, dt::f32, tag::hwio), eng(), dk->typed_data());
  memory dw = user_dw;
  bool reorder = pd.diff_weights_desc() != user_dw.get_desc();
  if (reorder) dw = memory(pd.diff_weights_desc(), eng());
  memory src(memory::desc(g.src, dt::f32, tag::nhwc), eng(), x.typed_data());
  memory ddst(memory::desc(g.dst, dt::f32, tag::nhwc), eng(), dy.typed_data());
  dnnl::convolution_backward_weights(pd).execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, ddst}, {DNNL_ARG_DIFF_WEIGHTS, dw}});
  if (reorder) dnnl::reorder(dw, user_dw).execute(s, dw, user_dw);
  s.wait();
  return ffi::Error::Success();
  });
}

#define BIND3 ffi::Ffi::Bind().Arg<Buf>().Arg<Buf>().Ret<ffi::Buffer<ffi::F32, 4>>().Attr<int64_t>("stride").Attr<int64_t>("pad")
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvFwd, ConvFwdImpl, BIND3);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBwdData, ConvBwdDataImpl, BIND3);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBwdWeights, ConvBwdWeightsImpl, BIND3);
