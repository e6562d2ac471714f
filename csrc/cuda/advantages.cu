// CUDA kernels of megarl::gae, megarl::gae_backward and megarl::group_advantages (schemas and CPU
// kernels: csrc/advantages.cpp; equations: megarl/ops/advantages.py).
//
// GAE: one warp per row. The recursion over t is an affine map of the state
// (next_value, advantage), so each lane composes the map of its contiguous chunk of T/32
// positions, a warp shuffle scan composes the chunks, and each lane then replays its chunk from
// the exact incoming state. Two passes over the row (the second mostly from L1/L2), fp32 state.
//
// group_advantages: an open-addressing hash table (>= 2N slots, atomicCAS on "first element
// index + 1", so every int64 id is a valid key and no sentinel id exists) maps each element to
// its group's slot; per-slot count/sum/squared deviations accumulate with fp64 atomics. O(N), no
// sort. A single huge group serialises its atomics on one address: fine for RL batch sizes.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "checks.h"

namespace megarl {
namespace {

constexpr int kWarpSize = 32;
constexpr int kRowsPerBlock = 4;  // one warp per row
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// GAE forward

// s -> M s + b on the state s = (next_value, advantage).
template <typename acc_t>
struct Affine2 {
  acc_t m00, m01, m10, m11, b0, b1;
};

template <typename acc_t>
__device__ __forceinline__ Affine2<acc_t> identity2() {
  return {acc_t(1), acc_t(0), acc_t(0), acc_t(1), acc_t(0), acc_t(0)};
}

// (f o g)(s) = f(g(s)): g acts first.
template <typename acc_t>
__device__ __forceinline__ Affine2<acc_t> compose2(const Affine2<acc_t>& f, const Affine2<acc_t>& g) {
  Affine2<acc_t> h;
  h.m00 = f.m00 * g.m00 + f.m01 * g.m10;
  h.m01 = f.m00 * g.m01 + f.m01 * g.m11;
  h.m10 = f.m10 * g.m00 + f.m11 * g.m10;
  h.m11 = f.m10 * g.m01 + f.m11 * g.m11;
  h.b0 = f.m00 * g.b0 + f.m01 * g.b1 + f.b0;
  h.b1 = f.m10 * g.b0 + f.m11 * g.b1 + f.b1;
  return h;
}

template <typename acc_t>
__device__ __forceinline__ Affine2<acc_t> shfl_down2(const Affine2<acc_t>& f, int offset) {
  return {__shfl_down_sync(kFullMask, f.m00, offset), __shfl_down_sync(kFullMask, f.m01, offset),
          __shfl_down_sync(kFullMask, f.m10, offset), __shfl_down_sync(kFullMask, f.m11, offset),
          __shfl_down_sync(kFullMask, f.b0, offset),  __shfl_down_sync(kFullMask, f.b1, offset)};
}

template <typename scalar_t>
__global__ void gae_forward_kernel(const scalar_t* __restrict__ rewards, const scalar_t* __restrict__ values,
                                   const bool* __restrict__ mask, scalar_t* __restrict__ adv,
                                   scalar_t* __restrict__ ret, int64_t B, int64_t T,
                                   at::opmath_type<scalar_t> gamma, at::opmath_type<scalar_t> gamma_lam) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= B) return;  // warp-uniform: the shuffles below always see a full warp
  const int64_t chunk = (T + kWarpSize - 1) / kWarpSize;
  const int64_t lo = min(T, lane * chunk);
  const int64_t hi = min(T, lo + chunk);
  const int64_t base = row * T;

  // Map of this lane's chunk, walked backward: F <- f_t o F with f_t(nv, A) =
  // (v_t, gamma*nv + gamma*lam*A + r_t - v_t) at valid t, the identity at masked t.
  Affine2<acc_t> f = identity2<acc_t>();
  for (int64_t t = hi - 1; t >= lo; --t) {
    if (!mask[base + t]) continue;
    const acc_t v = static_cast<acc_t>(values[base + t]);
    const acc_t r = static_cast<acc_t>(rewards[base + t]);
    Affine2<acc_t> h;
    h.m00 = acc_t(0);
    h.m01 = acc_t(0);
    h.b0 = v;
    h.m10 = gamma * f.m00 + gamma_lam * f.m10;
    h.m11 = gamma * f.m01 + gamma_lam * f.m11;
    h.b1 = gamma * f.b0 + gamma_lam * f.b1 + r - v;
    f = h;
  }
  // Inclusive suffix scan: lane l ends with f_l o f_{l+1} o ... o f_31.
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const Affine2<acc_t> later = shfl_down2(f, offset);
    if (lane + offset < kWarpSize) f = compose2(f, later);
  }
  // The state entering lane l's chunk is (f_{l+1} o ... o f_31)(0, 0): lane l+1's offset part.
  acc_t next_value = __shfl_down_sync(kFullMask, f.b0, 1);
  acc_t last_adv = __shfl_down_sync(kFullMask, f.b1, 1);
  if (lane == kWarpSize - 1) next_value = last_adv = acc_t(0);

  for (int64_t t = hi - 1; t >= lo; --t) {
    const acc_t v = static_cast<acc_t>(values[base + t]);
    if (mask[base + t]) {
      const acc_t delta = static_cast<acc_t>(rewards[base + t]) + gamma * next_value - v;
      last_adv = delta + gamma_lam * last_adv;
      next_value = v;
      adv[base + t] = static_cast<scalar_t>(last_adv);
      ret[base + t] = static_cast<scalar_t>(last_adv + v);
    } else {
      adv[base + t] = static_cast<scalar_t>(0);
      ret[base + t] = static_cast<scalar_t>(v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// GAE backward: the adjoint runs forward in time on the scalar carry G (see advantages.cpp),
// G <- gamma*lam*G + (grad_adv_t + grad_ret_t) at valid t: a scalar affine map, scanned the same way.

template <typename scalar_t>
__global__ void gae_backward_kernel(const scalar_t* __restrict__ grad_adv, const scalar_t* __restrict__ grad_ret,
                                    const bool* __restrict__ mask, scalar_t* __restrict__ grad_rewards,
                                    scalar_t* __restrict__ grad_values, int64_t B, int64_t T,
                                    at::opmath_type<scalar_t> gamma, at::opmath_type<scalar_t> gamma_lam) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= B) return;
  const int64_t chunk = (T + kWarpSize - 1) / kWarpSize;
  const int64_t lo = min(T, lane * chunk);
  const int64_t hi = min(T, lo + chunk);
  const int64_t base = row * T;

  // c -> a*c + b for this lane's chunk, walked forward.
  acc_t a = acc_t(1), b = acc_t(0);
  for (int64_t t = lo; t < hi; ++t) {
    if (!mask[base + t]) continue;
    const acc_t g = static_cast<acc_t>(grad_adv[base + t]) + static_cast<acc_t>(grad_ret[base + t]);
    a = gamma_lam * a;
    b = gamma_lam * b + g;
  }
  // Inclusive prefix scan: lane l ends with f_l o ... o f_0.
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const acc_t a_prev = __shfl_up_sync(kFullMask, a, offset);
    const acc_t b_prev = __shfl_up_sync(kFullMask, b, offset);
    if (lane >= offset) {
      b = a * b_prev + b;
      a = a * a_prev;
    }
  }
  acc_t carry = __shfl_up_sync(kFullMask, b, 1);
  if (lane == 0) carry = acc_t(0);

  for (int64_t t = lo; t < hi; ++t) {
    const acc_t gr = static_cast<acc_t>(grad_ret[base + t]);
    if (mask[base + t]) {
      const acc_t G = static_cast<acc_t>(grad_adv[base + t]) + gr + gamma_lam * carry;
      grad_rewards[base + t] = static_cast<scalar_t>(G);
      grad_values[base + t] = static_cast<scalar_t>(gr - G + gamma * carry);
      carry = G;
    } else {
      grad_rewards[base + t] = static_cast<scalar_t>(0);
      grad_values[base + t] = static_cast<scalar_t>(gr);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// group_advantages

enum GroupMode : int { kGrpo = 0, kDrGrpo = 1, kRloo = 2, kReinforcePP = 3 };

__device__ __forceinline__ uint64_t group_slot(const int64_t* __restrict__ ids, int64_t i, int* __restrict__ table,
                                               int shift, uint64_t cap_mask) {
  const int64_t id = ids[i];
  uint64_t h = (static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull) >> shift;
  while (true) {
    const int prev = atomicCAS(&table[h], 0, static_cast<int>(i + 1));
    if (prev == 0 || ids[prev - 1] == id) return h;
    h = (h + 1) & cap_mask;
  }
}

template <typename scalar_t>
__global__ void group_accumulate_kernel(const scalar_t* __restrict__ scores, const int64_t* __restrict__ ids,
                                        int64_t N, int* __restrict__ table, int shift, uint64_t cap_mask,
                                        int* __restrict__ slot_of, int* __restrict__ count,
                                        double* __restrict__ sum) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const uint64_t h = group_slot(ids, i, table, shift, cap_mask);
  slot_of[i] = static_cast<int>(h);
  atomicAdd(&count[h], 1);
  atomicAdd(&sum[h], static_cast<double>(scores[i]));
}

// Squared deviations per group; for reinforce_pp also the batch sums over grouped elements:
// batch[0] += d, batch[1] += d^2, batch[2] += 1 (one atomic per block after a block reduction).
template <typename scalar_t>
__global__ void group_deviation_kernel(const scalar_t* __restrict__ scores, int64_t N,
                                       const int* __restrict__ slot_of, const int* __restrict__ count,
                                       const double* __restrict__ sum, double* __restrict__ sq_dev,
                                       double* __restrict__ batch) {
  __shared__ double partial[3][kWarpSize];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  double d = 0.0, d2 = 0.0, member = 0.0;
  if (i < N) {
    const int h = slot_of[i];
    const int n = count[h];
    d = static_cast<double>(scores[i]) - sum[h] / n;
    d2 = d * d;
    atomicAdd(&sq_dev[h], d2);
    if (n > 1) {
      member = 1.0;
    } else {
      d = d2 = 0.0;
    }
  }
  if (batch == nullptr) return;
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    d += __shfl_down_sync(kFullMask, d, offset);
    d2 += __shfl_down_sync(kFullMask, d2, offset);
    member += __shfl_down_sync(kFullMask, member, offset);
  }
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) {
    partial[0][warp] = d;
    partial[1][warp] = d2;
    partial[2][warp] = member;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double s0 = 0.0, s1 = 0.0, s2 = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x) / kWarpSize; ++w) {
      s0 += partial[0][w];
      s1 += partial[1][w];
      s2 += partial[2][w];
    }
    atomicAdd(&batch[0], s0);
    atomicAdd(&batch[1], s1);
    atomicAdd(&batch[2], s2);
  }
}

template <typename scalar_t>
__global__ void group_output_kernel(const scalar_t* __restrict__ scores, int64_t N, const int* __restrict__ slot_of,
                                    const int* __restrict__ count, const double* __restrict__ sum,
                                    const double* __restrict__ sq_dev, const double* __restrict__ batch, int mode,
                                    double eps, scalar_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const int h = slot_of[i];
  const int n = count[h];
  double a = 0.0;
  if (n > 1) {
    const double d = static_cast<double>(scores[i]) - sum[h] / n;
    if (mode == kGrpo) {
      a = d / (sqrt(sq_dev[h] / (n - 1)) + eps);
    } else if (mode == kDrGrpo) {
      a = d;
    } else if (mode == kRloo) {
      a = d * n / (n - 1);
    } else {
      const double members = batch[2];  // >= n > 1
      const double mean = batch[0] / members;
      const double var = fmax(0.0, batch[1] - members * mean * mean) / (members - 1.0);
      a = (d - mean) / sqrt(var + eps);
    }
  }
  out[i] = static_cast<scalar_t>(a);
}

// ---------------------------------------------------------------------------------------------
// host side

unsigned rows_grid(int64_t B) { return static_cast<unsigned>((B + kRowsPerBlock - 1) / kRowsPerBlock); }

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam) {
  check_gae_inputs("megarl::gae", rewards, "rewards", values, "values", mask);
  const c10::cuda::CUDAGuard guard(rewards.device());
  auto r = rewards.contiguous();
  auto v = values.contiguous();
  auto m = mask.contiguous();
  auto adv = at::empty_like(r, at::MemoryFormat::Contiguous);
  auto ret = at::empty_like(r, at::MemoryFormat::Contiguous);
  const int64_t B = r.size(0), T = r.size(1);
  if (B == 0 || T == 0) return {adv, ret};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.scalar_type(), "megarl_gae_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gae_forward_kernel<scalar_t><<<rows_grid(B), kRowsPerBlock * kWarpSize, 0, stream>>>(
        r.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), m.const_data_ptr<bool>(),
        adv.mutable_data_ptr<scalar_t>(), ret.mutable_data_ptr<scalar_t>(), B, T, static_cast<acc_t>(gamma),
        static_cast<acc_t>(gamma * lam));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {adv, ret};
}

std::tuple<at::Tensor, at::Tensor> gae_backward_cuda(const at::Tensor& grad_advantages,
                                                     const at::Tensor& grad_returns, const at::Tensor& mask,
                                                     double gamma, double lam) {
  check_gae_inputs("megarl::gae_backward", grad_advantages, "grad_advantages", grad_returns, "grad_returns", mask);
  const c10::cuda::CUDAGuard guard(grad_advantages.device());
  auto ga = grad_advantages.contiguous();
  auto gr = grad_returns.contiguous();
  auto m = mask.contiguous();
  auto grad_rewards = at::empty_like(ga, at::MemoryFormat::Contiguous);
  auto grad_values = at::empty_like(ga, at::MemoryFormat::Contiguous);
  const int64_t B = ga.size(0), T = ga.size(1);
  if (B == 0 || T == 0) return {grad_rewards, grad_values};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ga.scalar_type(), "megarl_gae_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gae_backward_kernel<scalar_t><<<rows_grid(B), kRowsPerBlock * kWarpSize, 0, stream>>>(
        ga.const_data_ptr<scalar_t>(), gr.const_data_ptr<scalar_t>(), m.const_data_ptr<bool>(),
        grad_rewards.mutable_data_ptr<scalar_t>(), grad_values.mutable_data_ptr<scalar_t>(), B, T,
        static_cast<acc_t>(gamma), static_cast<acc_t>(gamma * lam));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_rewards, grad_values};
}

int parse_group_mode(c10::string_view mode) {
  if (mode == "grpo") return kGrpo;
  if (mode == "dr_grpo") return kDrGrpo;
  if (mode == "rloo") return kRloo;
  if (mode == "reinforce_pp") return kReinforcePP;
  TORCH_CHECK_VALUE(false, "megarl::group_advantages: unknown mode '", std::string(mode),
                    "', expected one of grpo, dr_grpo, rloo, reinforce_pp");
  return kGrpo;
}

at::Tensor group_advantages_cuda(const at::Tensor& scores, const at::Tensor& group_ids, c10::string_view mode_name,
                                 double eps) {
  const int mode = parse_group_mode(mode_name);
  check_group_advantages_inputs(scores, group_ids, eps);
  const c10::cuda::CUDAGuard guard(scores.device());
  auto s = scores.contiguous();
  auto ids = group_ids.contiguous();
  auto out = at::empty_like(s, at::MemoryFormat::Contiguous);
  const int64_t N = s.size(0);
  if (N == 0) return out;

  int shift = 64;
  int64_t cap = 1;
  while (cap < 2 * N) {
    cap <<= 1;
    --shift;
  }
  const auto int_opts = ids.options().dtype(at::kInt);
  const auto dbl_opts = ids.options().dtype(at::kDouble);
  auto table = at::zeros({cap}, int_opts);
  auto count = at::zeros({cap}, int_opts);
  auto stats = at::zeros({2, cap}, dbl_opts);  // row 0: sum, row 1: squared deviations
  auto batch = at::zeros({3}, dbl_opts);
  auto slot_of = at::empty({N}, int_opts);
  double* sum = stats.data_ptr<double>();
  double* sq_dev = sum + cap;

  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>((N + kThreads - 1) / kThreads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "megarl_group_advantages_cuda", [&] {
    const scalar_t* x = s.const_data_ptr<scalar_t>();
    group_accumulate_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        x, ids.const_data_ptr<int64_t>(), N, table.data_ptr<int>(), shift, static_cast<uint64_t>(cap - 1),
        slot_of.data_ptr<int>(), count.data_ptr<int>(), sum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (mode == kGrpo || mode == kReinforcePP) {
      group_deviation_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          x, N, slot_of.data_ptr<int>(), count.data_ptr<int>(), sum, sq_dev,
          mode == kReinforcePP ? batch.data_ptr<double>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    group_output_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        x, N, slot_of.data_ptr<int>(), count.data_ptr<int>(), sum, sq_dev, batch.data_ptr<double>(), mode, eps,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace megarl

TORCH_LIBRARY_IMPL(megarl, CUDA, m) {
  m.impl("gae", &megarl::gae_cuda);
  m.impl("gae_backward", &megarl::gae_backward_cuda);
  m.impl("group_advantages", &megarl::group_advantages_cuda);
}
