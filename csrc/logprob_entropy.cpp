// Log-probability of the target and entropy of softmax(logits / temperature), fused over the
// vocabulary: the op schemas and the CPU kernels (CUDA kernels: cuda/logprob_entropy.cu).
//
// Row statistics, taken in ONE pass over a row of logits x (length V) relative to the running
// maximum m of the raw logits, with d_j = (x_j - m) / temperature:
//   s  = sum_j exp(d_j)            w  = sum_j exp(d_j) d_j            zt = d_target
// give logprob = zt - log s and entropy = log s - w / s. Both entropy terms are >= 0 (s >= 1,
// w <= 0), so logits of 1e4 lose nothing to cancellation. When the maximum grows from m to m'
// the sums are rescaled with c = (m - m') / temperature: s <- e^c s, w <- e^c (w + c s).
// Shards of the vocabulary (tensor parallelism) merge with the same rule (megarl/ops).
//
// Backward, for upstream grads g_lp, g_ent and with log p_j = (x_j - M) / temperature - log S:
//   dL/dx_j = [g_lp (1[j = t] - p_j) - g_ent p_j (log p_j + H)] / temperature
// one more pass over the row from the saved per-row (M, log S, H); no softmax is kept.
//
// A -inf logit is a masked vocabulary entry: p_j = 0 and it adds nothing (its d_j is clamped
// before multiplying, so 0 * -inf never appears); so does a finfo.min one: a rescale factor
// that underflows to 0 drops the old sums instead of multiplying 0 by an overflowed c * s. A row whose logits are all -inf has no
// distribution: logprob, entropy and its gradient are NaN, as torch.log_softmax gives.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "checks.h"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
// Each row function is compiled for AVX-512, AVX2+FMA and baseline x86-64; the loader picks
// the best the CPU has (the torch wheel itself is built for baseline x86-64).
#define MEGARL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MEGARL_CLONES
#endif
#define MEGARL_INLINE inline __attribute__((always_inline))

namespace megarl {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Lower clamp of d before exp: exp(-100) is 0 in float, and -100 * 0 = 0 where -inf * 0 = NaN.
constexpr float kMinD = -100.f;
// Elements of a row handled per max-then-exp step: 16 KiB of floats stays in L1.
constexpr int64_t kBlock = 4096;

MEGARL_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
MEGARL_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

MEGARL_INLINE float to_float(float v) { return v; }
MEGARL_INLINE float to_float(c10::BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.x) << 16); }
MEGARL_INLINE float to_float(c10::Half v) { return static_cast<float>(v); }

template <typename T>
MEGARL_INLINE T from_float(float f);
template <>
MEGARL_INLINE float from_float<float>(float f) {
  return f;
}
template <>
MEGARL_INLINE c10::BFloat16 from_float<c10::BFloat16>(float f) {
  // Round to nearest even, NaN stays NaN (as c10::BFloat16(float), but branch-free).
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  c10::BFloat16 out;
  out.x = static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
  return out;
}
template <>
MEGARL_INLINE c10::Half from_float<c10::Half>(float f) {
  return c10::Half(f);
}

// exp(x) for x <= 0 (NaN propagates), in plain arithmetic the compiler vectorises: Cody-Waite
// reduction x = n ln2 + r, a degree-6 polynomial for e^r (relative error ~1e-7), 2^n from the
// exponent bits. Results below 2^-126 (x < -87) are flushed to 0.
MEGARL_INLINE float exp_nonpos(float x) {
  const float xc = x < -87.f ? -87.f : x;
  const float kShift = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + kShift;
  const float n = t - kShift;
  const int32_t ni = static_cast<int32_t>(float_to_bits(t)) - static_cast<int32_t>(float_to_bits(kShift));
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.f;
  const float scale = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  return x < -87.f ? 0.f : er * scale;
}

// One row's (m, s, w): online over blocks of kBlock, a max pass then an exp pass per block.
template <typename T>
MEGARL_INLINE void row_stats_impl(const T* x, int64_t V, float inv_t, float* out) {
  float m = kNegInf, s = 0.f, w = 0.f;
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t n = std::min(kBlock, V - b);
    const T* xb = x + b;
    float bm = kNegInf;
#pragma omp simd reduction(max : bm)
    for (int64_t j = 0; j < n; ++j) {
      const float v = to_float(xb[j]);
      bm = bm < v ? v : bm;
    }
    if (bm > m) {
      if (s > 0.f) {
        const float c = (m - bm) * inv_t;
        const float e = std::exp(c);
        // e == 0: what came before is negligible (e.g. finfo.min padding), and c * s may be
        // -inf, which e * (...) would turn into NaN.
        w = e > 0.f ? e * (w + c * s) : 0.f;
        s = e > 0.f ? s * e : 0.f;
      }
      m = bm;
    }
    if (m == kNegInf) continue;  // every logit so far is -inf
    float bs = 0.f, bw = 0.f;
#pragma omp simd reduction(+ : bs, bw)
    for (int64_t j = 0; j < n; ++j) {
      float d = (to_float(xb[j]) - m) * inv_t;
      d = d < kMinD ? kMinD : d;
      const float e = exp_nonpos(d);
      bs += e;
      bw += e * d;
    }
    s += bs;
    w += bw;
  }
  out[0] = m;
  out[1] = s;
  out[2] = w;
}

// One row of dL/dx (see the top of the file); c1 = -g_lp - g_ent H.
template <typename T>
MEGARL_INLINE void row_grad_impl(const T* x, T* gx, int64_t V, float inv_t, float row_max, float log_s, float c1,
                                 float g_ent) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    float d = (to_float(x[j]) - row_max) * inv_t - log_s;
    d = d < kMinD ? kMinD : d;
    const float p = exp_nonpos(d);
    gx[j] = from_float<T>(p * (c1 - g_ent * d) * inv_t);
  }
}

MEGARL_CLONES void row_stats(const float* x, int64_t V, float inv_t, float* out) { row_stats_impl(x, V, inv_t, out); }
MEGARL_CLONES void row_stats(const c10::BFloat16* x, int64_t V, float inv_t, float* out) {
  row_stats_impl(x, V, inv_t, out);
}
MEGARL_CLONES void row_stats(const c10::Half* x, int64_t V, float inv_t, float* out) {
  row_stats_impl(x, V, inv_t, out);
}
MEGARL_CLONES void row_grad(const float* x, float* gx, int64_t V, float inv_t, float mx, float ls, float c1, float ge) {
  row_grad_impl(x, gx, V, inv_t, mx, ls, c1, ge);
}
MEGARL_CLONES void row_grad(const c10::BFloat16* x, c10::BFloat16* gx, int64_t V, float inv_t, float mx, float ls,
                            float c1, float ge) {
  row_grad_impl(x, gx, V, inv_t, mx, ls, c1, ge);
}
MEGARL_CLONES void row_grad(const c10::Half* x, c10::Half* gx, int64_t V, float inv_t, float mx, float ls, float c1,
                            float ge) {
  row_grad_impl(x, gx, V, inv_t, mx, ls, c1, ge);
}

// Target's d relative to the row max; -inf when the whole row (hence the target) is -inf.
template <typename T>
MEGARL_INLINE float target_d(const T* x, int64_t local_target, float row_max, float inv_t) {
  if (row_max == kNegInf) return kNegInf;
  return (to_float(x[local_target]) - row_max) * inv_t;
}

int64_t row_grain(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1)); }

// Rows may be strided (a view of a wider buffer); the vocabulary dimension must be dense.
at::Tensor rows_dense(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

#define MEGARL_DISPATCH_LOGITS(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// [T, 4] float32: (row max of the raw logits, s, w, zt) for this shard, whose columns are the
// global ids [vocab_start, vocab_start + V); zt is 0 where the target lies outside the shard.
at::Tensor stats_cpu(const at::Tensor& logits_in, const at::Tensor& targets_in, double temperature,
                     int64_t vocab_start) {
  check_logprob_inputs(logits_in, targets_in, temperature, "logprob_entropy_stats");
  const at::Tensor logits = rows_dense(logits_in);
  const at::Tensor targets = targets_in.contiguous();
  const int64_t T = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  const float inv_t = static_cast<float>(1.0 / temperature);
  at::Tensor stats = at::empty({T, 4}, logits.options().dtype(at::kFloat));
  float* st = stats.data_ptr<float>();
  const int64_t* tg = targets.data_ptr<int64_t>();
  MEGARL_DISPATCH_LOGITS(logits.scalar_type(), "logprob_entropy_stats", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = x + r * ld;
        float* o = st + 4 * r;
        row_stats(row, V, inv_t, o);
        const int64_t lt = tg[r] - vocab_start;
        o[3] = (lt >= 0 && lt < V) ? target_d(row, lt, o[0], inv_t) : 0.f;
      }
    });
  });
  return stats;
}

// Unsharded forward: (logprobs [T], entropy [T], lse_stats [T, 2] = (row max, log s)) float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& logits_in, const at::Tensor& targets_in,
                                                       double temperature) {
  check_logprob_inputs(logits_in, targets_in, temperature, "logprob_entropy_fwd");
  const at::Tensor logits = rows_dense(logits_in);
  const at::Tensor targets = targets_in.contiguous();
  const int64_t T = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({T}, f32), entropy = at::empty({T}, f32), lse = at::empty({T, 2}, f32);
  float *lp = logprobs.data_ptr<float>(), *ent = entropy.data_ptr<float>(), *ls = lse.data_ptr<float>();
  const int64_t* tg = targets.data_ptr<int64_t>();
  MEGARL_DISPATCH_LOGITS(logits.scalar_type(), "logprob_entropy_fwd", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = x + r * ld;
        float o[3];
        row_stats(row, V, inv_t, o);
        const float log_s = std::log(o[1]);
        const int64_t t = tg[r];
        // Out-of-range targets are rejected in Python on CPU; NaN keeps them visible here.
        const float zt = (t >= 0 && t < V) ? target_d(row, t, o[0], inv_t) : std::numeric_limits<float>::quiet_NaN();
        lp[r] = zt - log_s;
        ent[r] = log_s - o[2] / o[1];
        ls[2 * r] = o[0];
        ls[2 * r + 1] = log_s;
      }
    });
  });
  return {logprobs, entropy, lse};
}

// dL/dlogits for this shard (columns = global ids [vocab_start, vocab_start + V)), in the
// logits' dtype, from float32 upstream grads and the saved global (row max, log s) and entropy.
at::Tensor bwd_cpu(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy, const at::Tensor& logits_in,
                   const at::Tensor& targets_in, const at::Tensor& lse_stats, const at::Tensor& entropy,
                   double temperature, int64_t vocab_start) {
  check_logprob_inputs(logits_in, targets_in, temperature, "logprob_entropy_bwd");
  check_logprob_bwd_saved(grad_logprobs, grad_entropy, lse_stats, entropy, logits_in, "logprob_entropy_bwd");
  const int64_t T = logits_in.size(0);
  const at::Tensor logits = rows_dense(logits_in);
  const at::Tensor targets = targets_in.contiguous(), g_lp = grad_logprobs.contiguous(),
                   g_ent = grad_entropy.contiguous(), ls = lse_stats.contiguous(), ent = entropy.contiguous();
  const int64_t V = logits.size(1), ld = logits.stride(0);
  const float inv_t = static_cast<float>(1.0 / temperature);
  at::Tensor grad = at::empty({T, V}, logits.options());
  const int64_t* tg = targets.data_ptr<int64_t>();
  const float *glp = g_lp.data_ptr<float>(), *gent = g_ent.data_ptr<float>(), *lsp = ls.data_ptr<float>(),
              *hp = ent.data_ptr<float>();
  MEGARL_DISPATCH_LOGITS(logits.scalar_type(), "logprob_entropy_bwd", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* gx = grad.data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = x + r * ld;
        scalar_t* grow = gx + r * V;
        const float mx = lsp[2 * r], log_s = lsp[2 * r + 1];
        const float c1 = -glp[r] - gent[r] * hp[r];
        row_grad(row, grow, V, inv_t, mx, log_s, c1, gent[r]);
        const int64_t lt = tg[r] - vocab_start;
        if (lt >= 0 && lt < V) {  // the target's extra g_lp term, rounded once with the rest
          float d = (to_float(row[lt]) - mx) * inv_t - log_s;
          d = d < kMinD ? kMinD : d;
          const float p = exp_nonpos(d);
          grow[lt] = from_float<scalar_t>((p * (c1 - gent[r] * d) + glp[r]) * inv_t);
        }
      }
    });
  });
  return grad;
}

}  // namespace
}  // namespace megarl

TORCH_LIBRARY_FRAGMENT(megarl, m) {
  m.def("logprob_entropy_stats(Tensor logits, Tensor targets, float temperature, int vocab_start) -> Tensor");
  m.def("logprob_entropy_fwd(Tensor logits, Tensor targets, float temperature) -> (Tensor, Tensor, Tensor)");
  m.def(
      "logprob_entropy_bwd(Tensor grad_logprobs, Tensor grad_entropy, Tensor logits, Tensor targets, "
      "Tensor lse_stats, Tensor entropy, float temperature, int vocab_start) -> Tensor");
}

TORCH_LIBRARY_IMPL(megarl, CPU, m) {
  m.impl("logprob_entropy_stats", &megarl::stats_cpu);
  m.impl("logprob_entropy_fwd", &megarl::fwd_cpu);
  m.impl("logprob_entropy_bwd", &megarl::bwd_cpu);
}
