// Declarations and argument checks shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
//
// The operator schemas live in csrc/registration.cpp (TORCH_LIBRARY(textcraftor, m)); each device file
// registers its kernels with TORCH_LIBRARY_IMPL(textcraftor, <CPU|CUDA>, m). Autograd and the fake (meta)
// kernels are registered from Python (textcraftor_fast/native.py), where torch.compile can see them.
#pragma once

#include <ATen/ATen.h>

namespace textcraftor {

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

// The DDIM coefficients of one step (sampler.DDIMStep) and the guidance scale, as the kernels use them.
struct DDIMCoefs {
  double guidance, sqrt_alpha, sqrt_one_minus_alpha, sqrt_alpha_prev, direction;
  bool v_prediction;
};

}  // namespace textcraftor
