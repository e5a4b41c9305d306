// Classifier-free guidance + one DDIM step on CPU, forward and backward, in one pass over memory.
//
// The sampler's torch path (sampler.guided_model_output then sampler.ddim_update) runs ~6 elementwise kernels
// and materialises the guided output; this reads x, uncond, cond once and writes x_prev and x0:
//   epsilon:       m = u + s (c - u);  x0 = (x - b m) / a;    x_prev = ap x0 + d m
//   v_prediction:  v = u + s (c - u);  x0 = a x - b v;  eps = a v + b x;  x_prev = ap x0 + d eps
// with a = sqrt(alpha_bar_t), b = sqrt(1 - alpha_bar_t), ap = sqrt(alpha_bar_prev), d = the direction
// coefficient (sampler.DDIMStep). The map is affine, so backward needs no saved tensors at all:
//   G0 = g_x0 + ap g_xprev (gradient reaching x0)
//   epsilon:       g_m = d g_xprev - (b / a) G0;   g_x = G0 / a
//   v_prediction:  g_eps = d g_xprev;  g_m = a g_eps - b G0;  g_x = a G0 + b g_eps
//   g_u = (1 - s) g_m;  g_c = s g_m
// Arithmetic is in fp32 (fp64 for fp64) in the torch path's order, so results agree with it to rounding
// (FMA contraction may differ by an ulp). Tensors are read flat when all three share one dense layout
// (contiguous, channels-last or the batch halves of one UNet output), else copied to contiguous once.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "../ops.h"

namespace textcraftor {
namespace {

constexpr int64_t kGrain = 16384;

template <typename T>
void forward_kernel(const T* x, const T* u, const T* c, T* x_prev, T* x0, int64_t n, const DDIMCoefs& k) {
  const CfgDdimMath<acc_t<T>> f(k);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t<T> xp, x0i;
      f.forward(x[i], u[i], c[i], xp, x0i);
      x_prev[i] = static_cast<T>(xp);
      x0[i] = static_cast<T>(x0i);
    }
  });
}

template <typename T>
void backward_kernel(const T* g_prev, const T* g_x0, T* g_x, T* g_u, T* g_c, int64_t n, const DDIMCoefs& k) {
  const CfgDdimMath<acc_t<T>> f(k);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t<T> gx, gu, gc;
      f.backward(g_prev[i], g_x0[i], gx, gu, gc);
      g_x[i] = static_cast<T>(gx);
      g_u[i] = static_cast<T>(gu);
      g_c[i] = static_cast<T>(gc);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cfg_ddim_step_cpu(const at::Tensor& x, const at::Tensor& uncond,
                                                     const at::Tensor& cond, double guidance, double sqrt_alpha,
                                                     double sqrt_one_minus_alpha, double sqrt_alpha_prev,
                                                     double direction, bool v_prediction) {
  check_cfg_ddim_args(x, uncond, cond);
  const DDIMCoefs k{guidance, sqrt_alpha, sqrt_one_minus_alpha, sqrt_alpha_prev, direction, v_prediction};
  const auto t = same_dense_layout({x, uncond, cond});
  at::Tensor x_prev = at::empty_like(t[0]), x0 = at::empty_like(t[0]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cfg_ddim_step", [&] {
    forward_kernel<scalar_t>(t[0].const_data_ptr<scalar_t>(), t[1].const_data_ptr<scalar_t>(),
                             t[2].const_data_ptr<scalar_t>(), x_prev.mutable_data_ptr<scalar_t>(),
                             x0.mutable_data_ptr<scalar_t>(), x.numel(), k);
  });
  return {x_prev, x0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cfg_ddim_step_backward_cpu(
    const at::Tensor& grad_x_prev, const at::Tensor& grad_x0, double guidance, double sqrt_alpha,
    double sqrt_one_minus_alpha, double sqrt_alpha_prev, double direction, bool v_prediction) {
  check_cfg_ddim_args(grad_x_prev, grad_x0, grad_x0);
  const DDIMCoefs k{guidance, sqrt_alpha, sqrt_one_minus_alpha, sqrt_alpha_prev, direction, v_prediction};
  const auto t = same_dense_layout({grad_x_prev, grad_x0});
  at::Tensor g_x = at::empty_like(t[0]), g_u = at::empty_like(t[0]), g_c = at::empty_like(t[0]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g_x.scalar_type(), "cfg_ddim_step_backward", [&] {
    backward_kernel<scalar_t>(t[0].const_data_ptr<scalar_t>(), t[1].const_data_ptr<scalar_t>(),
                              g_x.mutable_data_ptr<scalar_t>(), g_u.mutable_data_ptr<scalar_t>(),
                              g_c.mutable_data_ptr<scalar_t>(), g_x.numel(), k);
  });
  return {g_x, g_u, g_c};
}

}  // namespace

TORCH_LIBRARY_IMPL(textcraftor, CPU, m) {
  m.impl("cfg_ddim_step", &cfg_ddim_step_cpu);
  m.impl("cfg_ddim_step_backward", &cfg_ddim_step_backward_cpu);
}

}  // namespace textcraftor
