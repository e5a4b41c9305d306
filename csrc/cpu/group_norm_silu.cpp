// GroupNorm + SiLU on CPU, forward and backward, OpenMP over (batch x group).
//
// What is fused: eager torch runs group_norm then silu (two kernels) and saves the input AND the normalised
// tensor for backward (plus mean/rstd); its backward runs silu_backward then group_norm_backward. Here one
// pass writes silu(xhat * w + b) and backward recomputes y = xhat * w + b and silu'(y) = s (1 + y (1 - s)),
// s = sigmoid(y), from the input, so autograd keeps only x, the affine and the (N, G) mean/rstd.
//
// Layout: each (n, g) group is R rows of L contiguous elements. Contiguous (N, C, *): a row is one channel
// (L = spatial size, per-row affine). Channels-last (N, H, W, C): a row is one spatial position and the
// group's CG channels are its L columns (per-column affine). Any other layout is copied to contiguous once.
// One task per (n, g) (grouped on small maps): at SD batch 2 that is 64 tasks, plenty for a CPU's cores; statistics use shifted
// sums (shift = the group's first element) in fp32 vector lanes flushed to fp64 every kFlush elements, so
// long rows (VAE 512x512: 262144 positions) lose no precision. Inputs fp32/bf16/fp16 compute in fp32,
// fp64 in fp64 (for gradcheck). Backward writes silu'(y) * dz to a per-thread fp32 scratch of one group
// (CG * S elements: 160 KB at the UNet's largest map) so the second pass does no exp.
// Deterministic: every reduction runs in a fixed order inside one task; the weight/bias gradients reduce
// the per-(n, c) partials over n in order after the parallel loop.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../ops.h"

namespace textcraftor {
namespace {

using at::vec::Vectorized;

constexpr int64_t kFlush = 4096;  // elements summed in vector lanes before flushing into fp64

// Groups per task: at least ~32k elements each, so small maps (the tiny world's) stay on one thread instead of
// paying an OpenMP fork/join (and spin-waits on a loaded box) for microseconds of work.
int64_t grain(const GroupShape& sh) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, sh.CG * sh.S));
}

template <typename A>
double hsum(const Vectorized<A>& v) {
  A tmp[Vectorized<A>::size()];
  v.store(tmp);
  double s = 0;
  for (int64_t i = 0; i < Vectorized<A>::size(); ++i) s += tmp[i];
  return s;
}

// Coefficient k at column l: the row's scalar (per-row, contiguous layout) or column l's (channels-last).
template <bool kPerCol, typename A>
Vectorized<A> coef(const A* c, int64_t l, int64_t count) {
  if constexpr (kPerCol) {
    return Vectorized<A>::loadu(c + l, count);
  } else {
    return Vectorized<A>(*c);
  }
}

// exp_u20: ATen's inline AVX2 polynomial exp (<= 20 ulp, ~2e-6 relative in fp32; exact libm exp for fp64), ~3x
// cheaper than SLEEF's 1-ulp exp, which alone made eager's SiLU cost more than its GroupNorm.
template <typename A>
Vectorized<A> sigmoid_of(const Vectorized<A>& y) {
  const Vectorized<A> one(1);
  return one / (one + y.neg().exp_u20());
}

template <typename A>
Vectorized<A> silu_of(const Vectorized<A>& y) {
  return y * sigmoid_of(y);
}

// Row in the accumulation type: the input itself when it already is, else converted into buf.
template <typename T, typename A>
const A* load_row(const T* src, int64_t n, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(src[i]);
    return buf;
  }
}

template <typename T, typename A>
A* out_row(T* dst, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename T, typename A>
void store_row(const A* src, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, A>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// s1 += sum(x - k), s2 += sum((x - k)^2) over one row.
template <typename A>
void row_moments(const A* x, int64_t len, A k, double& s1, double& s2) {
  using Vec = Vectorized<A>;
  const Vec kv(k), zero(0);
  for (int64_t b0 = 0; b0 < len; b0 += kFlush) {
    const int64_t b1 = std::min(len, b0 + kFlush);
    Vec v1(0), v2(0);
    for (int64_t l = b0; l < b1; l += Vec::size()) {
      const int64_t cnt = std::min<int64_t>(Vec::size(), b1 - l);
      const Vec d = Vec::set(zero, Vec::loadu(x + l, cnt) - kv, cnt);
      v1 += d;
      v2 += d * d;
    }
    s1 += hsum(v1);
    s2 += hsum(v2);
  }
}

// out = silu?(x * a + b): the forward epilogue.
template <bool kPerCol, typename A>
void row_affine_silu(const A* x, int64_t len, const A* a, const A* b, bool silu, A* out) {
  using Vec = Vectorized<A>;
  for (int64_t l = 0; l < len; l += Vec::size()) {
    const int64_t cnt = std::min<int64_t>(Vec::size(), len - l);
    Vec y = Vec::loadu(x + l, cnt) * coef<kPerCol>(a, l, cnt) + coef<kPerCol>(b, l, cnt);
    if (silu) y = silu_of(y);
    y.store(out + l, cnt);
  }
}

// Backward pass 1 over one row: dy = dz * silu'(x a + b) (or dz), stored to `dy`; per-channel sums of dy and
// dy * xhat go to sum_dy / sum_dyx: the row's channel (per-row) or each column's (per-column, += into arrays).
template <bool kPerCol, typename A>
void row_backward_sums(const A* x, const A* dz, int64_t len, const A* a, const A* b, A mean, A rstd, bool silu,
                       A* dy, A* sum_dy, A* sum_dyx) {
  using Vec = Vectorized<A>;
  const Vec one(1), zero(0), mv(mean), rv(rstd);
  Vec v1(0), v2(0);
  for (int64_t l = 0; l < len; l += Vec::size()) {
    const int64_t cnt = std::min<int64_t>(Vec::size(), len - l);
    const Vec xv = Vec::loadu(x + l, cnt);
    Vec g = Vec::loadu(dz + l, cnt);
    if (silu) {
      const Vec y = xv * coef<kPerCol>(a, l, cnt) + coef<kPerCol>(b, l, cnt);
      const Vec s = sigmoid_of(y);
      g = g * s * (one + y * (one - s));
    }
    g = Vec::set(zero, g, cnt);
    g.store(dy + l, cnt);
    const Vec gx = g * ((xv - mv) * rv);
    if constexpr (kPerCol) {
      (Vec::loadu(sum_dy + l, cnt) + g).store(sum_dy + l, cnt);
      (Vec::loadu(sum_dyx + l, cnt) + gx).store(sum_dyx + l, cnt);
    } else {
      v1 += g;
      v2 += gx;
    }
  }
  if constexpr (!kPerCol) {
    *sum_dy += static_cast<A>(hsum(v1));
    *sum_dyx += static_cast<A>(hsum(v2));
  }
}

// Backward pass 2: dx = p * dy + q * x + r (p = rstd w_c; q, r fold the group means of dxhat and dxhat xhat).
template <bool kPerCol, typename A>
void row_dx(const A* dy, const A* x, int64_t len, const A* p, A q, A r, A* out) {
  using Vec = Vectorized<A>;
  const Vec qv(q), rv(r);
  for (int64_t l = 0; l < len; l += Vec::size()) {
    const int64_t cnt = std::min<int64_t>(Vec::size(), len - l);
    const Vec dx = Vec::loadu(dy + l, cnt) * coef<kPerCol>(p, l, cnt) + Vec::loadu(x + l, cnt) * qv + rv;
    dx.store(out + l, cnt);
  }
}

// Where group (n, g) lives: R rows of L contiguous elements, row_stride apart.
struct Rows {
  int64_t base, rows, len, stride;
};

Rows group_rows(const GroupShape& sh, int64_t n, int64_t g, bool channels_last) {
  if (channels_last) return {n * sh.S * sh.C + g * sh.CG, sh.S, sh.CG, sh.C};
  return {(n * sh.C + g * sh.CG) * sh.S, sh.CG, sh.S, sh.S};
}

// The pre-SiLU affine of group g folded with its statistics: y = x * a_c + b_c.
template <typename A>
void fold_affine(const A* w, const A* b, int64_t c0, int64_t cg, A mean, A rstd, A* a_out, A* b_out) {
  for (int64_t c = 0; c < cg; ++c) {
    a_out[c] = rstd * w[c0 + c];
    b_out[c] = b[c0 + c] - mean * a_out[c];
  }
}

template <typename T, bool kCL>
void forward_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const GroupShape& sh, double eps,
                    bool silu, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  using A = acc_t<T>;
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const A *wp = w.const_data_ptr<A>(), *bp = b.const_data_ptr<A>();
  A *mp = mean.mutable_data_ptr<A>(), *rp = rstd.mutable_data_ptr<A>();
  const double count = static_cast<double>(sh.CG * sh.S);
  at::parallel_for(0, sh.N * sh.G, grain(sh), [&](int64_t begin, int64_t end) {
    const int64_t row_len = kCL ? sh.CG : sh.S;
    std::vector<A> xbuf(row_len), obuf(row_len), a(sh.CG), bb(sh.CG);
    for (int64_t ng = begin; ng < end; ++ng) {
      const Rows g = group_rows(sh, ng / sh.G, ng % sh.G, kCL);
      const A shift = static_cast<A>(xp[g.base]);
      double s1 = 0, s2 = 0;
      for (int64_t r = 0; r < g.rows; ++r) {
        row_moments(load_row(xp + g.base + r * g.stride, g.len, xbuf.data()), g.len, shift, s1, s2);
      }
      const double m = s1 / count, var = std::max(0.0, s2 / count - m * m);
      mp[ng] = static_cast<A>(shift + m);
      rp[ng] = static_cast<A>(1.0 / std::sqrt(var + eps));
      fold_affine(wp, bp, (ng % sh.G) * sh.CG, sh.CG, mp[ng], rp[ng], a.data(), bb.data());
      for (int64_t r = 0; r < g.rows; ++r) {
        const A* row = load_row(xp + g.base + r * g.stride, g.len, xbuf.data());
        A* out = out_row(yp + g.base + r * g.stride, obuf.data());
        row_affine_silu<kCL>(row, g.len, kCL ? a.data() : a.data() + r, kCL ? bb.data() : bb.data() + r, silu, out);
        store_row(out, yp + g.base + r * g.stride, g.len);
      }
    }
  });
}

// Per-group backward; writes dx and the (N, C) fp64 partial sums of dy * xhat (dweight) and dy (dbias).
template <typename T, bool kCL>
void backward_kernel(const at::Tensor& dz, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                     const at::Tensor& mean, const at::Tensor& rstd, const GroupShape& sh, bool silu, at::Tensor& dx,
                     at::Tensor& dw_part, at::Tensor& db_part) {
  using A = acc_t<T>;
  const T *xp = x.const_data_ptr<T>(), *dzp = dz.const_data_ptr<T>();
  T* dxp = dx.mutable_data_ptr<T>();
  const A *wp = w.const_data_ptr<A>(), *bp = b.const_data_ptr<A>();
  const A *mp = mean.const_data_ptr<A>(), *rp = rstd.const_data_ptr<A>();
  double *dwp = dw_part.mutable_data_ptr<double>(), *dbp = db_part.mutable_data_ptr<double>();
  const double count = static_cast<double>(sh.CG * sh.S);
  at::parallel_for(0, sh.N * sh.G, grain(sh), [&](int64_t begin, int64_t end) {
    const int64_t row_len = kCL ? sh.CG : sh.S;
    std::vector<A> xbuf(row_len), zbuf(row_len), obuf(row_len), scratch(sh.CG * sh.S);
    std::vector<A> a(sh.CG), bb(sh.CG), p(sh.CG), col_dy(sh.CG), col_dyx(sh.CG);
    std::vector<double> sdy(sh.CG), sdyx(sh.CG);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / sh.G, c0 = (ng % sh.G) * sh.CG;
      const Rows g = group_rows(sh, n, ng % sh.G, kCL);
      const A m = mp[ng], rs = rp[ng];
      fold_affine(wp, bp, c0, sh.CG, m, rs, a.data(), bb.data());
      std::fill(sdy.begin(), sdy.end(), 0.0);
      std::fill(sdyx.begin(), sdyx.end(), 0.0);
      std::fill(col_dy.begin(), col_dy.end(), A(0));
      std::fill(col_dyx.begin(), col_dyx.end(), A(0));
      for (int64_t r = 0; r < g.rows; ++r) {
        const A* xr = load_row(xp + g.base + r * g.stride, g.len, xbuf.data());
        const A* zr = load_row(dzp + g.base + r * g.stride, g.len, zbuf.data());
        A* dy = scratch.data() + r * g.len;
        if constexpr (kCL) {
          row_backward_sums<true>(xr, zr, g.len, a.data(), bb.data(), m, rs, silu, dy, col_dy.data(), col_dyx.data());
          if ((r + 1) % 256 == 0 || r + 1 == g.rows) {  // flush the fp32 column sums every 256 rows
            for (int64_t c = 0; c < sh.CG; ++c) {
              sdy[c] += col_dy[c];
              sdyx[c] += col_dyx[c];
              col_dy[c] = col_dyx[c] = 0;
            }
          }
        } else {
          for (int64_t b0 = 0; b0 < g.len; b0 += kFlush) {  // per channel, flushed every kFlush elements
            A s_dy = 0, s_dyx = 0;
            const int64_t nb = std::min(kFlush, g.len - b0);
            row_backward_sums<false>(xr + b0, zr + b0, nb, a.data() + r, bb.data() + r, m, rs, silu, dy + b0,
                                     &s_dy, &s_dyx);
            sdy[r] += s_dy;
            sdyx[r] += s_dyx;
          }
        }
      }
      // dx = rstd (w dy - mean_g(w dy) - xhat mean_g(w dy xhat)), xhat = (x - mean) rstd
      double sum1 = 0, sum2 = 0;
      for (int64_t c = 0; c < sh.CG; ++c) {
        sum1 += wp[c0 + c] * sdy[c];
        sum2 += wp[c0 + c] * sdyx[c];
        p[c] = rs * wp[c0 + c];
        dwp[n * sh.C + c0 + c] = sdyx[c];
        dbp[n * sh.C + c0 + c] = sdy[c];
      }
      const double m1 = sum1 / count, m2 = sum2 / count;
      const A q = static_cast<A>(-double(rs) * rs * m2), r0 = static_cast<A>(double(rs) * (rs * m2 * m - m1));
      for (int64_t r = 0; r < g.rows; ++r) {
        const A* xr = load_row(xp + g.base + r * g.stride, g.len, xbuf.data());
        A* out = out_row(dxp + g.base + r * g.stride, obuf.data());
        row_dx<kCL>(scratch.data() + r * g.len, xr, g.len, kCL ? p.data() : p.data() + r, q, r0, out);
        store_row(out, dxp + g.base + r * g.stride, g.len);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(const at::Tensor& input,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   int64_t num_groups, double eps, bool silu) {
  const GroupShape sh = check_group_norm_args(input, weight, bias, num_groups);
  const bool cl = use_channels_last(input);
  const at::Tensor x = cl ? input : input.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::zeros({sh.N, sh.G}, x.options().dtype(stat_dtype(x)));  // zeros: an empty input
  at::Tensor rstd = at::zeros_like(mean);
  if (x.numel() == 0) return {y, mean, rstd};
  const at::Tensor w = affine_or(weight, x, 1.0), b = affine_or(bias, x, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_silu", [&] {
    if (cl) {
      forward_kernel<scalar_t, true>(x, w, b, sh, eps, silu, y, mean, rstd);
    } else {
      forward_kernel<scalar_t, false>(x, w, b, sh, eps, silu, y, mean, rstd);
    }
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu) {
  const GroupShape sh = check_group_norm_backward_args(grad_out, input, weight, bias, mean, rstd, num_groups);
  const bool cl = use_channels_last(input);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = input.contiguous(fmt), dz = grad_out.to(input.scalar_type()).contiguous(fmt);
  const auto affine_dtype = weight.has_value() ? weight->scalar_type() : input.scalar_type();
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw_part = at::zeros({sh.N, sh.C}, x.options().dtype(at::kDouble));
  at::Tensor db_part = at::zeros({sh.N, sh.C}, x.options().dtype(at::kDouble));
  if (x.numel() > 0) {
    const at::Tensor w = affine_or(weight, x, 1.0), b = affine_or(bias, x, 0.0);
    const at::Tensor m = mean.contiguous(), r = rstd.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_silu_backward", [&] {
      if (cl) {
        backward_kernel<scalar_t, true>(dz, x, w, b, m, r, sh, silu, dx, dw_part, db_part);
      } else {
        backward_kernel<scalar_t, false>(dz, x, w, b, m, r, sh, silu, dx, dw_part, db_part);
      }
    });
  }
  // Reduce the per-(n, c) partials over n in a fixed order (N is the batch: small).
  at::Tensor dw = at::zeros({sh.C}, x.options().dtype(at::kDouble)), db = at::zeros_like(dw);
  const double *dwp = dw_part.const_data_ptr<double>(), *dbp = db_part.const_data_ptr<double>();
  double *dwo = dw.mutable_data_ptr<double>(), *dbo = db.mutable_data_ptr<double>();
  for (int64_t n = 0; n < sh.N; ++n) {
    for (int64_t c = 0; c < sh.C; ++c) {
      dwo[c] += dwp[n * sh.C + c];
      dbo[c] += dbp[n * sh.C + c];
    }
  }
  return {dx, dw.to(affine_dtype), db.to(affine_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(textcraftor, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
}

}  // namespace textcraftor
