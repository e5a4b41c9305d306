// GroupNorm + SiLU on CUDA, forward and backward: one thread block per (n, g), fp32 (fp64) statistics.
//
// The simple layout (no spatial split: a block per group, see kernels/groupnorm.py for why the Triton kernel
// splits groups) and only <ATen/ATen.h> / <torch/library.h> are used, so this compiles wherever nvcc and a CUDA
// torch exist. Limits, stated: kernels launch on the legacy default stream (without ATen/cuda headers there is
// no current-stream query), so do not call these ops inside a non-default torch.cuda.stream; channels-last
// input is read through a contiguous copy and the result converted back (the CPU kernel reads it in place).
// Backward recomputes silu'(y) from x in its second pass instead of keeping a scratch buffer.
// NOT BUILT OR TESTED on the machine these were written on (CPU-only torch): see docs/native_ops.md.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../ops.h"

namespace textcraftor {
namespace {

constexpr int kThreads = 256;

// Sum of v over the block (every thread gets the result). shared: kThreads elements.
template <typename A>
__device__ A block_sum(A v, A* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  const A out = shared[0];
  __syncthreads();
  return out;
}

template <typename A>
__device__ A sigmoid(A y) {
  return A(1) / (A(1) + exp(-y));
}

// x, y: (N, C, S) contiguous; w, b: (C,) in A; mean, rstd: (N, G) in A.
template <typename T, typename A>
__global__ void forward_kernel(const T* x, const A* w, const A* b, T* y, A* mean, A* rstd, int64_t C, int64_t G,
                               int64_t S, double eps, bool silu) {
  __shared__ A shared[kThreads];
  const int64_t ng = blockIdx.x, cg = C / G, count = cg * S;
  const T* xg = x + ng * count;
  const A shift = static_cast<A>(xg[0]);
  A s1 = 0, s2 = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const A d = static_cast<A>(xg[i]) - shift;
    s1 += d;
    s2 += d * d;
  }
  s1 = block_sum(s1, shared);
  s2 = block_sum(s2, shared);
  const A m = s1 / count, var = max(A(0), s2 / count - m * m);
  const A mu = shift + m, rs = A(1) / sqrt(var + A(eps));
  if (threadIdx.x == 0) {
    mean[ng] = mu;
    rstd[ng] = rs;
  }
  const int64_t c0 = (ng % G) * cg;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const int64_t c = c0 + i / S;
    A v = (static_cast<A>(xg[i]) - mu) * rs * w[c] + b[c];
    if (silu) v = v * sigmoid(v);
    y[ng * count + i] = static_cast<T>(v);
  }
}

// dw_part, db_part: (N, C) per-sample partial sums of dy * xhat and dy.
template <typename T, typename A>
__global__ void backward_kernel(const T* dz, const T* x, const A* w, const A* b, const A* mean, const A* rstd, T* dx,
                                A* dw_part, A* db_part, int64_t C, int64_t G, int64_t S, bool silu) {
  __shared__ A shared[kThreads];
  const int64_t ng = blockIdx.x, cg = C / G, count = cg * S, n = ng / G, c0 = (ng % G) * cg;
  const T *xg = x + ng * count, *dzg = dz + ng * count;
  const A mu = mean[ng], rs = rstd[ng];
  auto dy_at = [&](int64_t i, int64_t c) {  // dz * silu'(y), y recomputed from x
    const A g = static_cast<A>(dzg[i]);
    if (!silu) return g;
    const A v = (static_cast<A>(xg[i]) - mu) * rs * w[c] + b[c], s = sigmoid(v);
    return g * s * (A(1) + v * (A(1) - s));
  };
  A sum1 = 0, sum2 = 0;  // group sums of w dy and w dy xhat
  for (int64_t c = c0; c < c0 + cg; ++c) {
    A a1 = 0, a2 = 0;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
      const int64_t i = (c - c0) * S + s;
      const A g = dy_at(i, c);
      a1 += g;
      a2 += g * (static_cast<A>(xg[i]) - mu) * rs;
    }
    a1 = block_sum(a1, shared);
    a2 = block_sum(a2, shared);
    if (threadIdx.x == 0) {
      db_part[n * C + c] = a1;
      dw_part[n * C + c] = a2;
    }
    sum1 += w[c] * a1;
    sum2 += w[c] * a2;
  }
  const A m1 = sum1 / count, m2 = sum2 / count;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const int64_t c = c0 + i / S;
    const A xhat = (static_cast<A>(xg[i]) - mu) * rs;
    dx[ng * count + i] = static_cast<T>(rs * (w[c] * dy_at(i, c) - m1 - xhat * m2));
  }
}

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "textcraftor CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cuda(const at::Tensor& input,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    const std::optional<at::Tensor>& bias,
                                                                    int64_t num_groups, double eps, bool silu) {
  const GroupShape sh = check_group_norm_args(input, weight, bias, num_groups);
  c10::DeviceGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::zeros({sh.N, sh.G}, x.options().dtype(stat_dtype(x))), rstd = at::zeros_like(mean);
  if (x.numel() > 0) {
    const at::Tensor w = affine_or(weight, x, 1.0), b = affine_or(bias, x, 0.0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_silu_cuda", [&] {
      using A = acc_t<scalar_t>;
      forward_kernel<scalar_t, A><<<sh.N * sh.G, kThreads>>>(
          x.const_data_ptr<scalar_t>(), w.const_data_ptr<A>(), b.const_data_ptr<A>(), y.mutable_data_ptr<scalar_t>(),
          mean.mutable_data_ptr<A>(), rstd.mutable_data_ptr<A>(), sh.C, sh.G, sh.S, eps, silu);
      check_launch();
    });
  }
  if (use_channels_last(input)) y = y.contiguous(at::MemoryFormat::ChannelsLast);  // the CPU op's output format
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu) {
  const GroupShape sh = check_group_norm_backward_args(grad_out, input, weight, bias, mean, rstd, num_groups);
  c10::DeviceGuard guard(input.device());
  const at::Tensor x = input.contiguous(), dz = grad_out.to(input.scalar_type()).contiguous();
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw_part = at::zeros({sh.N, sh.C}, x.options().dtype(stat_dtype(x))), db_part = at::zeros_like(dw_part);
  if (x.numel() > 0) {
    const at::Tensor w = affine_or(weight, x, 1.0), b = affine_or(bias, x, 0.0);
    const at::Tensor m = mean.contiguous(), r = rstd.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_silu_backward_cuda", [&] {
      using A = acc_t<scalar_t>;
      backward_kernel<scalar_t, A><<<sh.N * sh.G, kThreads>>>(
          dz.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w.const_data_ptr<A>(), b.const_data_ptr<A>(),
          m.const_data_ptr<A>(), r.const_data_ptr<A>(), dx.mutable_data_ptr<scalar_t>(), dw_part.mutable_data_ptr<A>(),
          db_part.mutable_data_ptr<A>(), sh.C, sh.G, sh.S, silu);
      check_launch();
    });
  }
  if (use_channels_last(input)) dx = dx.contiguous(at::MemoryFormat::ChannelsLast);
  const auto affine_dtype = weight.has_value() ? weight->scalar_type() : input.scalar_type();
  return {dx, dw_part.sum(0).to(affine_dtype), db_part.sum(0).to(affine_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(textcraftor, CUDA, m) {
  m.impl("group_norm_silu", &group_norm_silu_cuda);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cuda);
}

}  // namespace textcraftor
