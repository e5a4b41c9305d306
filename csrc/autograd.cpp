// Autograd for the textcraftor ops, registered at the Autograd key (covers CPU and CUDA): the backward of
// each op is its fused native backward op, called through the dispatcher so it runs on the input's device
// (and as its fake kernel under torch.compile / FakeTensor tracing).
//
// Why C++ and not torch.library.register_autograd: the Python autograd wrapper costs ~150-250 us per call on
// this 2-core box, more than the whole GroupNorm+SiLU at the tiny world's shapes (~40 calls per UNet pass),
// which made the cpp backend slower than eager there. C++ autograd keeps the op's overhead at eager's level.
// Double backward is not supported (the backward ops have no autograd kernel).
#include <torch/autograd.h>
#include <torch/library.h>

namespace textcraftor {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_group_norm_silu(
    const at::Tensor& x, const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b, int64_t groups,
    double eps, bool silu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("textcraftor::group_norm_silu", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                           int64_t, double, bool)>();
  return op.call(x, w, b, groups, eps, silu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_group_norm_silu_backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& w,
    const std::optional<at::Tensor>& b, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups, bool silu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("textcraftor::group_norm_silu_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t, bool)>();
  return op.call(dy, x, w, b, mean, rstd, groups, silu);
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class GroupNormSilu : public torch::autograd::Function<GroupNormSilu> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& w,
                               const std::optional<at::Tensor>& b, int64_t groups, double eps, bool silu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = call_group_norm_silu(x, w, b, groups, eps, silu);
    // Saved: x, the affine and the (N, G) stats. Not y: backward recomputes it (the point of the fusion).
    ctx->save_for_backward({x, w.value_or(at::Tensor()), b.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["silu"] = silu;
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dx, dw, db] = call_group_norm_silu_backward(grads[0], s[0], opt(s[1]), opt(s[2]), s[3], s[4],
                                                      ctx->saved_data["groups"].toInt(),
                                                      ctx->saved_data["silu"].toBool());
    const bool need_dx = ctx->needs_input_grad(0);
    return {need_dx ? dx : at::Tensor(), s[1].defined() ? dw : at::Tensor(), s[2].defined() ? db : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

using Coefs = std::array<double, 5>;  // guidance, sqrt_alpha, sqrt_one_minus_alpha, sqrt_alpha_prev, direction

std::tuple<at::Tensor, at::Tensor> call_cfg_ddim_step(const at::Tensor& x, const at::Tensor& u, const at::Tensor& c,
                                                      const Coefs& k, bool v) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("textcraftor::cfg_ddim_step", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, double, double, double, double,
                                                                 double, bool)>();
  return op.call(x, u, c, k[0], k[1], k[2], k[3], k[4], v);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_cfg_ddim_step_backward(const at::Tensor& g_prev,
                                                                           const at::Tensor& g_x0, const Coefs& k,
                                                                           bool v) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("textcraftor::cfg_ddim_step_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, double, double, double, double, double, bool)>();
  return op.call(g_prev, g_x0, k[0], k[1], k[2], k[3], k[4], v);
}

class CfgDdimStep : public torch::autograd::Function<CfgDdimStep> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& u, const at::Tensor& c,
                               double s, double a, double b, double ap, double d, bool v) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [x_prev, x0] = call_cfg_ddim_step(x, u, c, {s, a, b, ap, d}, v);
    ctx->saved_data["coefs"] = std::vector<double>{s, a, b, ap, d};  // affine map: no tensors saved
    ctx->saved_data["v"] = v;
    return {x_prev, x0};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto coefs = ctx->saved_data["coefs"].toDoubleVector();
    const Coefs k{coefs[0], coefs[1], coefs[2], coefs[3], coefs[4]};
    // An output that did not reach the loss arrives undefined: its gradient is zero.
    const at::Tensor& ref = grads[0].defined() ? grads[0] : grads[1];
    const at::Tensor g_prev = grads[0].defined() ? grads[0] : at::zeros_like(ref);
    const at::Tensor g_x0 = grads[1].defined() ? grads[1] : at::zeros_like(ref);
    auto [gx, gu, gc] = call_cfg_ddim_step_backward(g_prev, g_x0, k, ctx->saved_data["v"].toBool());
    variable_list out{gx, gu, gc};
    for (int i = 0; i < 3; ++i) {
      if (!ctx->needs_input_grad(i)) out[i] = at::Tensor();
    }
    out.resize(9);  // six scalar arguments: no gradient
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_autograd(const at::Tensor& x,
                                                                        const std::optional<at::Tensor>& w,
                                                                        const std::optional<at::Tensor>& b,
                                                                        int64_t groups, double eps, bool silu) {
  auto out = GroupNormSilu::apply(x, w, b, groups, eps, silu);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor> cfg_ddim_step_autograd(const at::Tensor& x, const at::Tensor& u,
                                                          const at::Tensor& c, double s, double a, double b,
                                                          double ap, double d, bool v) {
  auto out = CfgDdimStep::apply(x, u, c, s, a, b, ap, d, v);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(textcraftor, Autograd, m) {
  m.impl("group_norm_silu", &group_norm_silu_autograd);
  m.impl("cfg_ddim_step", &cfg_ddim_step_autograd);
}

}  // namespace textcraftor
