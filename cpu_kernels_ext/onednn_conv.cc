// oneDNN convolution forward, backward-data and backward-weights as XLA FFI handlers, so that
// `cpu_kernels.conv.Conv(impl="onednn")` runs on the library PyTorch's CPU convolutions use.
// NHWC activations, HWIO kernels, symmetric zero padding, equal strides in H and W; float32, or
// bfloat16 (oneDNN accumulates in float32). Built when simclr-jax is installed (CMakeLists.txt
// beside this file) against oneDNN 3.x from PyPI and jaxlib's XLA FFI headers; loaded by
// simclr_jax/cpu_kernels/onednn.py through plain C symbols. oneDNN's primitive cache keeps the
// JIT-compiled kernels between calls; the primitive descriptors are rebuilt at each call
// (microseconds).
#include <cstdint>
#include <exception>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

static_assert(DNNL_VERSION_MAJOR >= 3, "needs oneDNN 3.x (its 2.x operation descriptors are gone)");

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;
using Buf = ffi::AnyBuffer;
using Res = ffi::Result<ffi::AnyBuffer>;
using Dims = ffi::Span<const int64_t>;

namespace {
dnnl::engine& eng() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

// oneDNN's type for an XLA buffer's, or undef for one it is not given here.
dt type_of(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return dt::f32;
    case ffi::DataType::BF16: return dt::bf16;
    default: return dt::undef;
  }
}

// One convolution: NHWC activations, the HWIO kernel as given and in the layout oneDNN picks.
struct Conv {
  memory::desc src, dst, hwio, any_weights;
  memory::dims strides, pad;
};

// From the input x [N, H, W, Ci] and kernel [kh, kw, Ci, Co] shapes, all of type `type`.
Conv describe(Dims x, Dims k, int64_t stride, int64_t pad, dt type) {
  const int64_t ho = (x[1] + 2 * pad - k[0]) / stride + 1, wo = (x[2] + 2 * pad - k[1]) / stride + 1;
  const memory::dims weights{k[3], k[2], k[0], k[1]};
  return {memory::desc({x[0], x[3], x[1], x[2]}, type, tag::nhwc),
          memory::desc({x[0], k[3], ho, wo}, type, tag::nhwc),
          memory::desc(weights, type, tag::hwio), memory::desc(weights, type, tag::any),
          {stride, stride}, {pad, pad}};
}

Conv describe(const Buf& x, const Buf& k, int64_t stride, int64_t pad) {
  return describe(x.dimensions(), k.dimensions(), stride, pad, type_of(x.element_type()));
}

// Checks what Python promises: 4-d buffers of one type, float32 or bfloat16, matching channels,
// stride >= 1, padding >= 0, and y's extents [N, Ho, Wo, Co], so that a mismatch is an error
// rather than a buffer overrun.
ffi::Error check(const Buf& x, const Buf& k, const Buf& y, int64_t stride, int64_t pad) {
  if (x.dimensions().size() != 4 || k.dimensions().size() != 4 || y.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("buffers must be 4-d (NHWC activations, HWIO kernel)");
  const dt type = type_of(x.element_type());
  if (type == dt::undef || type_of(k.element_type()) != type || type_of(y.element_type()) != type)
    return ffi::Error::InvalidArgument("buffers must all be float32 or all bfloat16");
  if (stride < 1 || pad < 0) return ffi::Error::InvalidArgument("stride must be >= 1, pad >= 0");
  const Dims xd = x.dimensions(), kd = k.dimensions(), yd = y.dimensions();
  if (kd[2] != xd[3]) return ffi::Error::InvalidArgument("kernel C_in != input channels");
  const memory::dims d = describe(xd, kd, stride, pad, type).dst.get_dims();  // N, Co, Ho, Wo
  if (yd[0] != d[0] || yd[1] != d[2] || yd[2] != d[3] || yd[3] != d[1])
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
  return {eng(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
          c.src, c.any_weights, c.dst, c.strides, c.pad, c.pad};
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
  if (auto e = check(x, k, *y, stride, pad); e.failure()) return e;
  const Conv c = describe(x, k, stride, pad);
  return run([&](dnnl::stream& s) {
    const auto pd = forward_pd(c);
    memory w = in_layout(bind(c.hwio, k.untyped_data()), pd.weights_desc(), s);
    dnnl::convolution_forward(pd).execute(
        s, {{DNNL_ARG_SRC, bind(c.src, x.untyped_data())}, {DNNL_ARG_WEIGHTS, w},
            {DNNL_ARG_DST, bind(c.dst, y->untyped_data())}});
  });
}

// dx [N, H, W, Ci] (its shape from the result) from dy [N, Ho, Wo, Co] and the kernel.
static ffi::Error ConvBwdDataImpl(Buf dy, Buf k, Res dx, int64_t stride, int64_t pad) {
  if (auto e = check(*dx, k, dy, stride, pad); e.failure()) return e;
  const Conv c = describe(*dx, k, stride, pad);
  return run([&](dnnl::stream& s) {
    const dnnl::convolution_backward_data::primitive_desc pd(
        eng(), dnnl::algorithm::convolution_direct, c.src, c.any_weights, c.dst, c.strides, c.pad,
        c.pad, forward_pd(c));
    memory w = in_layout(bind(c.hwio, k.untyped_data()), pd.weights_desc(), s);
    dnnl::convolution_backward_data(pd).execute(
        s, {{DNNL_ARG_DIFF_DST, bind(c.dst, dy.untyped_data())}, {DNNL_ARG_WEIGHTS, w},
            {DNNL_ARG_DIFF_SRC, bind(c.src, dx->untyped_data())}});
  });
}

// dk [kh, kw, Ci, Co] (its shape from the result) from x [N, H, W, Ci] and dy [N, Ho, Wo, Co].
static ffi::Error ConvBwdWeightsImpl(Buf x, Buf dy, Res dk, int64_t stride, int64_t pad) {
  if (auto e = check(x, *dk, dy, stride, pad); e.failure()) return e;
  const Conv c = describe(x, *dk, stride, pad);
  return run([&](dnnl::stream& s) {
    const dnnl::convolution_backward_weights::primitive_desc pd(
        eng(), dnnl::algorithm::convolution_direct, c.src, c.any_weights, c.dst, c.strides, c.pad,
        c.pad, forward_pd(c));
    memory user_dw = bind(c.hwio, dk->untyped_data());
    const bool same = pd.diff_weights_desc() == c.hwio;
    memory dw = same ? user_dw : memory(pd.diff_weights_desc(), eng());
    dnnl::convolution_backward_weights(pd).execute(
        s, {{DNNL_ARG_SRC, bind(c.src, x.untyped_data())},
            {DNNL_ARG_DIFF_DST, bind(c.dst, dy.untyped_data())}, {DNNL_ARG_DIFF_WEIGHTS, dw}});
    if (!same) dnnl::reorder(dw, user_dw).execute(s, dw, user_dw);
  });
}

#define BIND3 \
  ffi::Ffi::Bind().Arg<Buf>().Arg<Buf>().Ret<Buf>().Attr<int64_t>("stride").Attr<int64_t>("pad")
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvFwd, ConvFwdImpl, BIND3);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBwdData, ConvBwdDataImpl, BIND3);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBwdWeights, ConvBwdWeightsImpl, BIND3);

// The version of the oneDNN library loaded: major * 10000 + minor * 100 + patch.
extern "C" int SimclrOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
