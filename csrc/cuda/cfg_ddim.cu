// Classifier-free guidance + one DDIM step on CUDA (forward and backward): the per-element math of the CPU
// kernel (CfgDdimMath in csrc/ops.h), one thread per element (grid-stride), fp32 arithmetic (fp64 for fp64).
// Launches on the legacy default stream (see csrc/cuda/group_norm_silu.cu). NOT BUILT OR TESTED on the
// machine these were written on (CPU-only torch): see docs/native_ops.md.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../ops.h"

namespace textcraftor {
namespace {

template <typename T>
__global__ void forward_kernel(const T* x, const T* u, const T* c, T* x_prev, T* x0, int64_t n,
                               CfgDdimMath<acc_t<T>> f) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    acc_t<T> xp, x0i;
    f.forward(x[i], u[i], c[i], xp, x0i);
    x_prev[i] = static_cast<T>(xp);
    x0[i] = static_cast<T>(x0i);
  }
}

template <typename T>
__global__ void backward_kernel(const T* g_prev, const T* g_x0, T* g_x, T* g_u, T* g_c, int64_t n,
                                CfgDdimMath<acc_t<T>> f) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    acc_t<T> gx, gu, gc;
    f.backward(g_prev[i], g_x0[i], gx, gu, gc);
    g_x[i] = static_cast<T>(gx);
    g_u[i] = static_cast<T>(gu);
    g_c[i] = static_cast<T>(gc);
  }
}

int blocks_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 65535)));
}

std::tuple<at::Tensor, at::Tensor> cfg_ddim_step_cuda(const at::Tensor& x, const at::Tensor& uncond,
                                                      const at::Tensor& cond, double guidance, double sqrt_alpha,
                                                      double sqrt_one_minus_alpha, double sqrt_alpha_prev,
                                                      double direction, bool v_prediction) {
  check_cfg_ddim_args(x, uncond, cond);
  c10::DeviceGuard guard(x.device());
  const DDIMCoefs k{guidance, sqrt_alpha, sqrt_one_minus_alpha, sqrt_alpha_prev, direction, v_prediction};
  const auto t = same_dense_layout({x, uncond, cond});
  at::Tensor x_prev = at::empty_like(t[0]), x0 = at::empty_like(t[0]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cfg_ddim_step_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(x.numel()), 256>>>(
        t[0].const_data_ptr<scalar_t>(), t[1].const_data_ptr<scalar_t>(), t[2].const_data_ptr<scalar_t>(),
        x_prev.mutable_data_ptr<scalar_t>(), x0.mutable_data_ptr<scalar_t>(), x.numel(),
        CfgDdimMath<acc_t<scalar_t>>(k));
  });
  TORCH_CHECK(cudaGetLastError() == cudaSuccess, "cfg_ddim_step: CUDA kernel launch failed");
  return {x_prev, x0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cfg_ddim_step_backward_cuda(
    const at::Tensor& grad_x_prev, const at::Tensor& grad_x0, double guidance, double sqrt_alpha,
    double sqrt_one_minus_alpha, double sqrt_alpha_prev, double direction, bool v_prediction) {
  check_cfg_ddim_args(grad_x_prev, grad_x0, grad_x0);
  c10::DeviceGuard guard(grad_x_prev.device());
  const DDIMCoefs k{guidance, sqrt_alpha, sqrt_one_minus_alpha, sqrt_alpha_prev, direction, v_prediction};
  const auto t = same_dense_layout({grad_x_prev, grad_x0});
  at::Tensor g_x = at::empty_like(t[0]), g_u = at::empty_like(t[0]), g_c = at::empty_like(t[0]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g_x.scalar_type(), "cfg_ddim_step_backward_cuda", [&] {
    backward_kernel<scalar_t><<<blocks_for(g_x.numel()), 256>>>(
        t[0].const_data_ptr<scalar_t>(), t[1].const_data_ptr<scalar_t>(), g_x.mutable_data_ptr<scalar_t>(),
        g_u.mutable_data_ptr<scalar_t>(), g_c.mutable_data_ptr<scalar_t>(), g_x.numel(),
        CfgDdimMath<acc_t<scalar_t>>(k));
  });
  TORCH_CHECK(cudaGetLastError() == cudaSuccess, "cfg_ddim_step_backward: CUDA kernel launch failed");
  return {g_x, g_u, g_c};
}

}  // namespace

TORCH_LIBRARY_IMPL(textcraftor, CUDA, m) {
  m.impl("cfg_ddim_step", &cfg_ddim_step_cuda);
  m.impl("cfg_ddim_step_backward", &cfg_ddim_step_backward_cuda);
}

}  // namespace textcraftor
