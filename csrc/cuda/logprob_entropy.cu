// CUDA kernels of megarl::logprob_entropy_stats, _fwd and _bwd (schemas, CPU kernels and the
// math: csrc/logprob_entropy.cpp; Python side: megarl/ops/logprob_entropy.py).
//
// One thread block per row. Each thread streams 16-byte packs of the row (8 bf16/fp16 or 4 fp32
// logits, fp32 math), keeping an online (max m, s = sum e^d, w = sum e^d d) with
// d = (x - m) / temperature; the threads' triples merge by the same rescaling rule (warp
// shuffles, then one warp over the warps' results). The backward kernel streams the row once
// more and writes dL/dx in the logits' dtype. Rows whose start is not 16-byte aligned get a
// scalar head so the packs are aligned.
//
// Only device-generic c10 headers are used (stream via c10::Stream::native_handle), so this file
// also compiles against the headers of a CPU-only torch wheel.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "checks.h"

namespace megarl {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kMinD = -100.f;  // as in the CPU kernel: exp(-100) is 0 and -100 * 0 = 0
constexpr int kStatsMode = 0;    // write the shard's (max, s, w, zt)
constexpr int kFwdMode = 1;      // write (logprob, entropy, (max, log s)) of an unsharded row

__device__ __forceinline__ float neg_inf() { return -INFINITY; }

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

struct Acc {
  float m, s, w;
};

// Adds the values v[0..n) to a thread's accumulator (n is a compile-time pack size or 1).
template <int N>
__device__ __forceinline__ void acc_add(Acc& a, const float (&v)[N], float inv_t) {
  float vm = a.m;
#pragma unroll
  for (int k = 0; k < N; ++k) vm = v[k] > vm ? v[k] : vm;  // NaN never becomes the max
  if (vm > a.m) {
    if (a.s > 0.f) {
      const float c = (a.m - vm) * inv_t;
      const float e = __expf(c);
      // e == 0 (e.g. finfo.min padding far below): drop the old sums; c * s may be -inf.
      a.w = e > 0.f ? e * (a.w + c * a.s) : 0.f;
      a.s = e > 0.f ? a.s * e : 0.f;
    }
    a.m = vm;
  }
  if (a.m == neg_inf()) return;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float d = (v[k] - a.m) * inv_t;
    d = d < kMinD ? kMinD : d;  // written so that NaN stays NaN
    const float e = __expf(d);
    a.s += e;
    a.w += e * d;
  }
}

// Merges b into a; an empty side (s == 0: nothing or only -inf seen) adds nothing.
__device__ __forceinline__ void acc_merge(Acc& a, Acc b, float inv_t) {
  if (b.s == 0.f) return;
  if (a.s == 0.f) {
    a = b;
    return;
  }
  if (b.m > a.m) {
    const Acc t = a;
    a = b;
    b = t;
  }
  const float c = (b.m - a.m) * inv_t;
  const float e = __expf(c);
  if (e == 0.f) return;  // b is negligible; c * b.s may be -inf
  a.s += e * b.s;
  a.w += e * (b.w + c * b.s);
}

__device__ __forceinline__ Acc warp_merge(Acc a, float inv_t) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Acc b;
    b.m = __shfl_xor_sync(kFullMask, a.m, offset);
    b.s = __shfl_xor_sync(kFullMask, a.s, offset);
    b.w = __shfl_xor_sync(kFullMask, a.w, offset);
    acc_merge(a, b, inv_t);
  }
  return a;
}

// The block's merged accumulator, valid in thread 0. blockDim.x is a multiple of 32, <= 1024.
__device__ Acc block_merge(Acc a, float inv_t) {
  __shared__ float sm[3][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
  a = warp_merge(a, inv_t);
  if (lane == 0) {
    sm[0][warp] = a.m;
    sm[1][warp] = a.s;
    sm[2][warp] = a.w;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < num_warps ? Acc{sm[0][lane], sm[1][lane], sm[2][lane]} : Acc{neg_inf(), 0.f, 0.f};
    a = warp_merge(a, inv_t);
  }
  return a;
}

// Number of leading elements before the first 16-byte boundary (at most V).
template <typename T>
__device__ __forceinline__ int64_t head_elems(const T* p, int64_t V) {
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 16) / sizeof(T);
  const int64_t head = mis == 0 ? 0 : Pack<T>::kSize - mis;
  return head < V ? head : V;
}

template <typename T, int kMode>
__global__ void row_stats_kernel(const T* __restrict__ x, int64_t ld, int64_t V, const int64_t* __restrict__ targets,
                                 int64_t vocab_start, float inv_t, float* __restrict__ out_a,
                                 float* __restrict__ out_b, float* __restrict__ out_c) {
  constexpr int P = Pack<T>::kSize;
  const int64_t r = blockIdx.x;
  const T* row = x + r * ld;
  Acc a{neg_inf(), 0.f, 0.f};
  const int64_t head = head_elems(row, V);
  const int64_t num_packs = (V - head) / P;
  if (threadIdx.x < head) {
    const float v[1] = {static_cast<float>(row[threadIdx.x])};
    acc_add(a, v, inv_t);
  }
  const Pack<T>* packs = reinterpret_cast<const Pack<T>*>(row + head);
  // Two packs in flight per thread and iteration.
  for (int64_t i = threadIdx.x; i < num_packs; i += 2 * blockDim.x) {
    const Pack<T> p0 = packs[i];
    const bool has1 = i + blockDim.x < num_packs;
    Pack<T> p1;
    if (has1) p1 = packs[i + blockDim.x];
    float v[P];
#pragma unroll
    for (int k = 0; k < P; ++k) v[k] = static_cast<float>(p0.v[k]);
    acc_add(a, v, inv_t);
    if (has1) {
#pragma unroll
      for (int k = 0; k < P; ++k) v[k] = static_cast<float>(p1.v[k]);
      acc_add(a, v, inv_t);
    }
  }
  for (int64_t j = head + num_packs * P + threadIdx.x; j < V; j += blockDim.x) {
    const float v[1] = {static_cast<float>(row[j])};
    acc_add(a, v, inv_t);
  }
  a = block_merge(a, inv_t);
  if (threadIdx.x != 0) return;
  const int64_t lt = targets[r] - vocab_start;
  const bool own = lt >= 0 && lt < V;
  float zt = kMode == kStatsMode ? 0.f : NAN;  // unsharded: an out-of-range target gives NaN
  if (own) zt = a.m == neg_inf() ? neg_inf() : (static_cast<float>(row[lt]) - a.m) * inv_t;
  if (kMode == kStatsMode) {
    float* o = out_a + 4 * r;
    o[0] = a.m;
    o[1] = a.s;
    o[2] = a.w;
    o[3] = zt;
  } else {
    const float log_s = logf(a.s);
    out_a[r] = zt - log_s;
    out_b[r] = log_s - a.w / a.s;
    out_c[2 * r] = a.m;
    out_c[2 * r + 1] = log_s;
  }
}

template <typename T>
__global__ void row_grad_kernel(const float* __restrict__ g_lp, const float* __restrict__ g_ent,
                                const T* __restrict__ x, int64_t ld, T* __restrict__ gx, int64_t V,
                                const int64_t* __restrict__ targets, int64_t vocab_start,
                                const float* __restrict__ lse_stats, const float* __restrict__ entropy, float inv_t) {
  constexpr int P = Pack<T>::kSize;
  const int64_t r = blockIdx.x;
  const T* row = x + r * ld;
  T* grow = gx + r * V;
  const float mx = lse_stats[2 * r], log_s = lse_stats[2 * r + 1];
  const float gl = g_lp[r], ge = g_ent[r];
  const float c1 = -gl - ge * entropy[r];
  const int64_t lt = targets[r] - vocab_start;  // matches no column when outside the shard
  auto grad_at = [&](float v, int64_t j) -> float {
    float d = (v - mx) * inv_t - log_s;
    d = d < kMinD ? kMinD : d;
    const float p = __expf(d);
    float g = p * (c1 - ge * d);
    if (j == lt) g += gl;
    return g * inv_t;
  };
  const int64_t head = head_elems(row, V);
  const bool same_alignment = head == head_elems(grow, V);
  if (!same_alignment) {  // a strided input whose rows and the output's rows align differently
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) grow[j] = static_cast<T>(grad_at(static_cast<float>(row[j]), j));
    return;
  }
  const int64_t num_packs = (V - head) / P;
  if (threadIdx.x < head) grow[threadIdx.x] = static_cast<T>(grad_at(static_cast<float>(row[threadIdx.x]), threadIdx.x));
  const Pack<T>* packs = reinterpret_cast<const Pack<T>*>(row + head);
  Pack<T>* out = reinterpret_cast<Pack<T>*>(grow + head);
  for (int64_t i = threadIdx.x; i < num_packs; i += blockDim.x) {
    const Pack<T> p = packs[i];
    Pack<T> q;
    const int64_t j0 = head + i * P;
#pragma unroll
    for (int k = 0; k < P; ++k) q.v[k] = static_cast<T>(grad_at(static_cast<float>(p.v[k]), j0 + k));
    out[i] = q;
  }
  for (int64_t j = head + num_packs * P + threadIdx.x; j < V; j += blockDim.x)
    grow[j] = static_cast<T>(grad_at(static_cast<float>(row[j]), j));
}

// ---------------------------------------------------------------------------------------------
// Host side

int threads_for(int64_t V) { return V >= 2048 ? 256 : 64; }

cudaStream_t current_stream(const at::Tensor& t) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device());
  return static_cast<cudaStream_t>(stream.native_handle());
}

void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_common(const at::Tensor& logits, const at::Tensor& targets, double temperature, const char* op) {
  check_logprob_inputs(logits, targets, temperature, op);
  TORCH_CHECK_VALUE(logits.size(0) <= std::numeric_limits<int32_t>::max(), op, ": too many rows for one grid: ",
                    logits.size(0));
}

at::Tensor rows_dense(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

#define MEGARL_DISPATCH_LOGITS(TYPE, NAME, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)       \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

at::Tensor stats_cuda(const at::Tensor& logits_in, const at::Tensor& targets_in, double temperature,
                      int64_t vocab_start) {
  check_common(logits_in, targets_in, temperature, "logprob_entropy_stats");
  c10::DeviceGuard guard(logits_in.device());
  const at::Tensor logits = rows_dense(logits_in);
  const at::Tensor targets = targets_in.contiguous();
  const int64_t T = logits.size(0), V = logits.size(1);
  at::Tensor stats = at::empty({T, 4}, logits.options().dtype(at::kFloat));
  if (T == 0) return stats;
  const float inv_t = static_cast<float>(1.0 / temperature);
  MEGARL_DISPATCH_LOGITS(logits.scalar_type(), "logprob_entropy_stats", [&] {
    row_stats_kernel<scalar_t, kStatsMode><<<static_cast<unsigned>(T), threads_for(V), 0, current_stream(logits)>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), V, targets.data_ptr<int64_t>(), vocab_start, inv_t,
        stats.data_ptr<float>(), nullptr, nullptr);
  });
  check_launch("logprob_entropy_stats");
  return stats;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& logits_in, const at::Tensor& targets_in,
                                                        double temperature) {
  check_common(logits_in, targets_in, temperature, "logprob_entropy_fwd");
  c10::DeviceGuard guard(logits_in.device());
  const at::Tensor logits = rows_dense(logits_in);
  const at::Tensor targets = targets_in.contiguous();
  const int64_t T = logits.size(0), V = logits.size(1);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({T}, f32), entropy = at::empty({T}, f32), lse = at::empty({T, 2}, f32);
  if (T == 0) return {logprobs, entropy, lse};
  const float inv_t = static_cast<float>(1.0 / temperature);
  MEGARL_DISPATCH_LOGITS(logits.scalar_type(), "logprob_entropy_fwd", [&] {
    row_stats_kernel<scalar_t, kFwdMode><<<static_cast<unsigned>(T), threads_for(V), 0, current_stream(logits)>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), V, targets.data_ptr<int64_t>(), 0, inv_t,
        logprobs.data_ptr<float>(), entropy.data_ptr<float>(), lse.data_ptr<float>());
  });
  check_launch("logprob_entropy_fwd");
  return {logprobs, entropy, lse};
}

at::Tensor bwd_cuda(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy, const at::Tensor& logits_in,
                    const at::Tensor& targets_in, const at::Tensor& lse_stats, const at::Tensor& entropy,
                    double temperature, int64_t vocab_start) {
  check_common(logits_in, targets_in, temperature, "logprob_entropy_bwd");
  check_logprob_bwd_saved(grad_logprobs, grad_entropy, lse_stats, entropy, logits_in, "logprob_entropy_bwd");
  const int64_t T = logits_in.size(0);
  c10::DeviceGuard guard(logits_in.device());
  const at::Tensor logits = rows_dense(logits_in);
  const at::Tensor targets = targets_in.contiguous(), g_lp = grad_logprobs.contiguous(),
                   g_ent = grad_entropy.contiguous(), ls = lse_stats.contiguous(), ent = entropy.contiguous();
  const int64_t V = logits.size(1);
  at::Tensor grad = at::empty({T, V}, logits.options());
  if (T == 0) return grad;
  const float inv_t = static_cast<float>(1.0 / temperature);
  MEGARL_DISPATCH_LOGITS(logits.scalar_type(), "logprob_entropy_bwd", [&] {
    row_grad_kernel<scalar_t><<<static_cast<unsigned>(T), threads_for(V), 0, current_stream(logits)>>>(
        g_lp.data_ptr<float>(), g_ent.data_ptr<float>(), logits.data_ptr<scalar_t>(), logits.stride(0),
        grad.data_ptr<scalar_t>(), V, targets.data_ptr<int64_t>(), vocab_start, ls.data_ptr<float>(),
        ent.data_ptr<float>(), inv_t);
  });
  check_launch("logprob_entropy_bwd");
  return grad;
}

}  // namespace
}  // namespace megarl

TORCH_LIBRARY_IMPL(megarl, CUDA, m) {
  m.impl("logprob_entropy_stats", &megarl::stats_cuda);
  m.impl("logprob_entropy_fwd", &megarl::fwd_cuda);
  m.impl("logprob_entropy_bwd", &megarl::bwd_cuda);
}
