// Declarations and argument checks shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
//
// The operator schemas live in csrc/registration.cpp (TORCH_LIBRARY(textcraftor, m)); each device file
// registers its kernels with TORCH_LIBRARY_IMPL(textcraftor, <CPU|CUDA>, m). Autograd and the fake (meta)
// kernels are registered from Python (textcraftor_fast/native.py), where torch.compile can see them.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

namespace textcraftor {

// Arithmetic type of the kernels: fp32 for fp32/bf16/fp16 data, fp64 for fp64 (gradcheck).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// (N, C, *) -> the group layout every kernel uses: N samples, G groups of CG channels, S spatial positions.
struct GroupShape {
  int64_t N, C, G, CG, S;
};

inline GroupShape check_group_norm_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias, int64_t num_groups) {
  TORCH_CHECK(x.dim() >= 2, "group_norm_silu: input must be (N, C, *), got ", x.dim(), " dims");
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, "group_norm_silu: num_channels ", C,
              " is not divisible by num_groups ", num_groups);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kDouble ||
                  x.scalar_type() == at::kHalf,
              "group_norm_silu: input dtype ", x.scalar_type(), " is not float32, bfloat16, float16 or float64");
  for (const auto* p : {&weight, &bias}) {
    if (p->has_value()) {
      TORCH_CHECK((*p)->dim() == 1 && (*p)->size(0) == C, "group_norm_silu: weight/bias must be (", C,
                  "), got ", (*p)->sizes());
      TORCH_CHECK((*p)->device() == x.device(), "group_norm_silu: weight/bias on ", (*p)->device(),
                  ", input on ", x.device());
    }
  }
  return {N, C, num_groups, C / num_groups, N == 0 ? 0 : x.numel() / (N * C)};
}

inline void check_cfg_ddim_args(const at::Tensor& x, const at::Tensor& uncond, const at::Tensor& cond) {
  TORCH_CHECK(x.sizes() == uncond.sizes() && x.sizes() == cond.sizes(), "cfg_ddim_step: x ", x.sizes(),
              ", uncond ", uncond.sizes(), " and cond ", cond.sizes(), " must have one shape");
  TORCH_CHECK(x.scalar_type() == uncond.scalar_type() && x.scalar_type() == cond.scalar_type(),
              "cfg_ddim_step: x, uncond and cond must share a dtype (got ", x.scalar_type(), ", ",
              uncond.scalar_type(), ", ", cond.scalar_type(), "); cast them to one first");
  TORCH_CHECK(x.device() == uncond.device() && x.device() == cond.device(),
              "cfg_ddim_step: x, uncond and cond must be on one device");
}

// GroupNorm kernels read channels-last (N, H, W, C) inputs in place; every other layout is copied to contiguous.
inline bool use_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// mean/rstd and all reductions: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64.
inline at::ScalarType stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// weight/bias as contiguous (C,) tensors in the statistics dtype; ones/zeros where absent.
inline at::Tensor affine_or(const std::optional<at::Tensor>& t, const at::Tensor& x, double fill) {
  if (t.has_value()) return t->to(stat_dtype(x)).contiguous();
  return at::full({x.size(1)}, fill, x.options().dtype(stat_dtype(x)));
}

inline GroupShape check_group_norm_backward_args(const at::Tensor& grad_out, const at::Tensor& input,
                                                 const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                 const at::Tensor& rstd, int64_t num_groups) {
  const GroupShape sh = check_group_norm_args(input, weight, bias, num_groups);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "group_norm_silu_backward: grad_out ", grad_out.sizes(),
              " != input ", input.sizes());
  TORCH_CHECK(mean.numel() == sh.N * sh.G && rstd.numel() == sh.N * sh.G && mean.scalar_type() == stat_dtype(input) &&
                  rstd.scalar_type() == stat_dtype(input),
              "group_norm_silu_backward: mean/rstd must be (N, G) in ", stat_dtype(input));
  return sh;
}

// Elementwise kernels read all tensors flat in one shared layout: the first tensor's when it is contiguous or
// channels-last and the others have its strides (the batch halves of one UNet output do), else contiguous copies.
inline std::vector<at::Tensor> same_dense_layout(std::initializer_list<at::Tensor> ts) {
  const at::Tensor& first = *ts.begin();
  bool shared = first.is_contiguous() || (first.dim() == 4 && first.is_contiguous(at::MemoryFormat::ChannelsLast));
  for (const auto& t : ts) shared = shared && t.strides() == first.strides();
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(shared ? t : t.contiguous());
  return out;
}

// The DDIM coefficients of one step (sampler.DDIMStep) and the guidance scale, as the kernels use them.
struct DDIMCoefs {
  double guidance, sqrt_alpha, sqrt_one_minus_alpha, sqrt_alpha_prev, direction;
  bool v_prediction;
};

// One element of the fused CFG + DDIM step and of its backward, in the accumulation type A (formulas in
// csrc/cpu/cfg_ddim.cpp's header); shared by the CPU loop and the CUDA kernel.
template <typename A>
struct CfgDdimMath {
  A s, a, b, ap, d;
  bool v;

  explicit CfgDdimMath(const DDIMCoefs& k)
      : s(k.guidance), a(k.sqrt_alpha), b(k.sqrt_one_minus_alpha), ap(k.sqrt_alpha_prev), d(k.direction),
        v(k.v_prediction) {}

  C10_HOST_DEVICE void forward(A x, A u, A c, A& x_prev, A& x0) const {
    const A m = u + s * (c - u);  // the guided model output, in the torch path's order
    if (v) {
      x0 = a * x - b * m;
      x_prev = ap * x0 + d * (a * m + b * x);
    } else {
      x0 = (x - b * m) / a;
      x_prev = ap * x0 + d * m;
    }
  }

  C10_HOST_DEVICE void backward(A g_prev, A g_x0, A& g_x, A& g_u, A& g_c) const {
    const A g0 = g_x0 + ap * g_prev;  // everything that reaches x0
    A gm;
    if (v) {
      const A ge = d * g_prev;
      gm = a * ge - b * g0;
      g_x = a * g0 + b * ge;
    } else {
      gm = d * g_prev - (b / a) * g0;
      g_x = g0 / a;
    }
    g_u = (A(1) - s) * gm;
    g_c = s * gm;
  }
};

}  // namespace textcraftor
