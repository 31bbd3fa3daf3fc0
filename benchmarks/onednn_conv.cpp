// Per-layer convolution times in oneDNN, the library PyTorch's CPU convolutions run on, for the
// same layers and layout as `python -m benchmarks.conv_layers` (simclr-jax's own convolution).
//
//   apt-get install libdnnl-dev g++            # Debian 12: oneDNN 2.6.3
//   g++ -O2 -o /tmp/onednn_conv benchmarks/onednn_conv.cpp -ldnnl
//   OMP_NUM_THREADS=2 /tmp/onednn_conv
//
// ResNet-18's 3x3 stages and its 7x7/2 stem at 64 px crops, batch 256 (128 pairs, both views),
// NHWC float32 activations, weights in the layout oneDNN picks (format any): forward (training),
// backward-data and backward-weights, each the best of 5 timed calls after 2 warm-up calls, in
// ms. The stem's backward-data is printed too, though a network never needs its input's gradient.
// A feasibility check (session 9): not part of the project's build or tests.
#include <chrono>
#include <cstdio>
#include <dnnl.hpp>
#include <functional>
#include <vector>

namespace {

struct Layer {
  int n, c_in, c_out, side, kernel, stride;
};

double best_ms(const std::function<void()>& run) {
  run();
  run();
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    auto start = std::chrono::steady_clock::now();
    run();
    auto ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start);
    if (ms.count() < best) best = ms.count();
  }
  return best;
}

void fill(dnnl::memory& m) {
  auto* p = static_cast<float*>(m.get_data_handle());
  size_t count = m.get_desc().get_size() / sizeof(float);
  for (size_t i = 0; i < count; ++i) p[i] = 0.01f * static_cast<float>(i % 7);
}

}  // namespace

int main() {
  using dnnl::memory;
  using tag = memory::format_tag;
  using dt = memory::data_type;
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream stream(eng);
  const std::vector<Layer> layers = {{256, 64, 64, 16, 3, 1},
                                     {256, 128, 128, 8, 3, 1},
                                     {256, 256, 256, 4, 3, 1},
                                     {256, 512, 512, 2, 3, 1},
                                     {256, 3, 64, 64, 7, 2}};
  std::printf("oneDNN %d.%d.%d\n", dnnl_version()->major, dnnl_version()->minor,
              dnnl_version()->patch);
  std::printf("| layer | forward ms | backward-data ms | backward-weights ms | kernels |\n");
  std::printf("| --- | ---: | ---: | ---: | --- |\n");
  for (const Layer& l : layers) {
    const int pad = l.kernel / 2;
    const int out = (l.side + 2 * pad - l.kernel) / l.stride + 1;
    const memory::dims src{l.n, l.c_in, l.side, l.side}, weights{l.c_out, l.c_in, l.kernel, l.kernel};
    const memory::dims dst{l.n, l.c_out, out, out}, strides{l.stride, l.stride}, padding{pad, pad};
    const memory::desc src_md(src, dt::f32, tag::nhwc), dst_md(dst, dt::f32, tag::nhwc);
    const memory::desc any_weights(weights, dt::f32, tag::any);
    const auto algo = dnnl::algorithm::convolution_direct;
    const dnnl::convolution_forward::primitive_desc fwd_pd(
        dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, algo, src_md,
                                        any_weights, dst_md, strides, padding, padding),
        eng);
    const dnnl::convolution_backward_data::primitive_desc data_pd(
        dnnl::convolution_backward_data::desc(algo, src_md, any_weights, dst_md, strides, padding,
                                              padding),
        eng, fwd_pd);
    const dnnl::convolution_backward_weights::primitive_desc weights_pd(
        dnnl::convolution_backward_weights::desc(algo, src_md, any_weights, dst_md, strides,
                                                 padding, padding),
        eng, fwd_pd);
    memory x(src_md, eng), y(dst_md, eng), dx(src_md, eng), dy(dst_md, eng);
    memory w(fwd_pd.weights_desc(), eng), w_data(data_pd.weights_desc(), eng);
    memory dw(weights_pd.diff_weights_desc(), eng);
    for (memory* m : {&x, &y, &dx, &dy, &w, &w_data, &dw}) fill(*m);
    dnnl::convolution_forward fwd(fwd_pd);
    dnnl::convolution_backward_data bwd_data(data_pd);
    dnnl::convolution_backward_weights bwd_weights(weights_pd);
    const double fwd_ms = best_ms([&] {
      fwd.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, y}});
      stream.wait();
    });
    const double data_ms = best_ms([&] {
      bwd_data.execute(stream,
                       {{DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_WEIGHTS, w_data}, {DNNL_ARG_DIFF_SRC, dx}});
      stream.wait();
    });
    const double weights_ms = best_ms([&] {
      bwd_weights.execute(stream,
                          {{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_DIFF_WEIGHTS, dw}});
      stream.wait();
    });
    std::printf("| %dx%d/%d, %d->%d, %dx%d in, N=%d | %.1f | %.1f | %.1f | %s / %s / %s |\n", l.kernel,
                l.kernel, l.stride, l.c_in, l.c_out, l.side, l.side, l.n, fwd_ms, data_ms, weights_ms,
                fwd_pd.impl_info_str(), data_pd.impl_info_str(), weights_pd.impl_info_str());
  }
  return 0;
}
