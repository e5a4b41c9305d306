// The textcraftor operator library: schemas only. Kernels register per device (csrc/cpu, csrc/cuda);
// autograd (the fused native backward ops below) and fake kernels are registered in
// textcraftor_fast/native.py with torch.library.register_autograd / register_fake.
#include <torch/library.h>

TORCH_LIBRARY(textcraftor, m) {
  // GroupNorm over (N, C, *) with an optional fused SiLU epilogue. Returns (y, mean, rstd); mean and rstd are
  // (N, G) in float32 (float64 for float64 input): all a backward needs besides the input and the affine.
  m.def("group_norm_silu(Tensor input, Tensor? weight, Tensor? bias, int num_groups, float eps, bool silu)"
        " -> (Tensor, Tensor, Tensor)");
  // The fused backward: (grad_input, grad_weight, grad_bias); grad_weight/grad_bias are (C,) in the weight's
  // dtype (the input's when there is no weight) and are cheap by-products of the sums grad_input needs.
  m.def("group_norm_silu_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor mean,"
        " Tensor rstd, int num_groups, bool silu) -> (Tensor, Tensor, Tensor)");
  // Classifier-free guidance then one DDIM step, in one pass: eps = u + s (c - u) (epsilon) or the v
  // prediction; returns (x_prev, x0). Affine in (x, uncond, cond), so the backward needs no saved tensors.
  m.def("cfg_ddim_step(Tensor x, Tensor uncond, Tensor cond, float guidance, float sqrt_alpha,"
        " float sqrt_one_minus_alpha, float sqrt_alpha_prev, float direction, bool v_prediction)"
        " -> (Tensor, Tensor)");
  m.def("cfg_ddim_step_backward(Tensor grad_x_prev, Tensor grad_x0, float guidance, float sqrt_alpha,"
        " float sqrt_one_minus_alpha, float sqrt_alpha_prev, float direction, bool v_prediction)"
        " -> (Tensor, Tensor, Tensor)");
}
