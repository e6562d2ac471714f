// Fused advantage estimators: schemas and CPU kernels.
//
//   megarl::gae(rewards[B,T], values[B,T], mask[B,T] bool, gamma, lam) -> (advantages, returns)
//   megarl::gae_backward(grad_advantages, grad_returns, mask, gamma, lam) -> (grad_rewards, grad_values)
//   megarl::group_advantages(scores[N], group_ids[N] int64, mode, eps) -> advantages[N]
//
// The equations are in the docstrings of megarl/ops/advantages.py (gae_reference,
// group_advantages_reference); this file must compute exactly those. Autograd and fake kernels
// are registered from that Python module (set_python_module below tells torch where).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "checks.h"

namespace megarl {
namespace {

// Elements per parallel task (~0.3-1 ms of work): finer tasks cost more in thread wake-ups
// than they save, and stall badly when ranks oversubscribe the cores (the CPU demo runs several
// ranks per core pair).
constexpr int64_t kElementsPerTask = 1 << 18;

int64_t row_grain(int64_t T) { return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(T, 1)); }

// Backward over t. At masked positions the running advantage and the next value carry through
// unchanged (verl's compute_gae_advantage_return) and the reported advantage is 0.
template <typename scalar_t>
void gae_forward_kernel(const scalar_t* rewards, const scalar_t* values, const bool* mask, scalar_t* adv,
                        scalar_t* ret, int64_t B, int64_t T, double gamma, double lam) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t g = static_cast<acc_t>(gamma);
  const acc_t gl = static_cast<acc_t>(gamma * lam);
  at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = b * T;
      acc_t next_value = 0;
      acc_t last_adv = 0;
      for (int64_t t = T - 1; t >= 0; --t) {
        const acc_t v = static_cast<acc_t>(values[row + t]);
        if (mask[row + t]) {
          const acc_t delta = static_cast<acc_t>(rewards[row + t]) + g * next_value - v;
          last_adv = delta + gl * last_adv;
          next_value = v;
          adv[row + t] = static_cast<scalar_t>(last_adv);
          ret[row + t] = static_cast<scalar_t>(last_adv + v);
        } else {
          adv[row + t] = static_cast<scalar_t>(0);
          ret[row + t] = static_cast<scalar_t>(v);
        }
      }
    }
  });
}

// Adjoint of gae_forward_kernel, forward over t. With G the gradient reaching delta at a valid
// position (the advantage's own gradient plus what flows back from earlier advantages):
//   G_t = grad_adv_t + grad_ret_t + gamma*lam*G_prev
//   grad_rewards_t = G_t,  grad_values_t = grad_ret_t - G_t + gamma*G_prev
// (G_prev: G at the previous valid position, whose delta read v_t as its next value).
template <typename scalar_t>
void gae_backward_kernel(const scalar_t* grad_adv, const scalar_t* grad_ret, const bool* mask,
                         scalar_t* grad_rewards, scalar_t* grad_values, int64_t B, int64_t T, double gamma,
                         double lam) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t g = static_cast<acc_t>(gamma);
  const acc_t gl = static_cast<acc_t>(gamma * lam);
  at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = b * T;
      acc_t carry = 0;
      for (int64_t t = 0; t < T; ++t) {
        const acc_t gr = static_cast<acc_t>(grad_ret[row + t]);
        if (mask[row + t]) {
          const acc_t G = static_cast<acc_t>(grad_adv[row + t]) + gr + gl * carry;
          grad_rewards[row + t] = static_cast<scalar_t>(G);
          grad_values[row + t] = static_cast<scalar_t>(gr - G + g * carry);
          carry = G;
        } else {
          grad_rewards[row + t] = static_cast<scalar_t>(0);
          grad_values[row + t] = static_cast<scalar_t>(gr);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam) {
  check_gae_inputs("megarl::gae", rewards, "rewards", values, "values", mask);
  auto r = rewards.contiguous();
  auto v = values.contiguous();
  auto m = mask.contiguous();
  auto adv = at::empty_like(r, at::MemoryFormat::Contiguous);
  auto ret = at::empty_like(r, at::MemoryFormat::Contiguous);
  const int64_t B = r.size(0), T = r.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.scalar_type(), "megarl_gae_cpu", [&] {
    gae_forward_kernel<scalar_t>(r.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                 m.const_data_ptr<bool>(), adv.mutable_data_ptr<scalar_t>(),
                                 ret.mutable_data_ptr<scalar_t>(), B, T, gamma, lam);
  });
  return {adv, ret};
}

std::tuple<at::Tensor, at::Tensor> gae_backward_cpu(const at::Tensor& grad_advantages,
                                                    const at::Tensor& grad_returns, const at::Tensor& mask,
                                                    double gamma, double lam) {
  check_gae_inputs("megarl::gae_backward", grad_advantages, "grad_advantages", grad_returns, "grad_returns",
                    mask);
  auto ga = grad_advantages.contiguous();
  auto gr = grad_returns.contiguous();
  auto m = mask.contiguous();
  auto grad_rewards = at::empty_like(ga, at::MemoryFormat::Contiguous);
  auto grad_values = at::empty_like(ga, at::MemoryFormat::Contiguous);
  const int64_t B = ga.size(0), T = ga.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ga.scalar_type(), "megarl_gae_backward_cpu", [&] {
    gae_backward_kernel<scalar_t>(ga.const_data_ptr<scalar_t>(), gr.const_data_ptr<scalar_t>(),
                                  m.const_data_ptr<bool>(), grad_rewards.mutable_data_ptr<scalar_t>(),
                                  grad_values.mutable_data_ptr<scalar_t>(), B, T, gamma, lam);
  });
  return {grad_rewards, grad_values};
}

// ---------------------------------------------------------------------------------------------
// group_advantages

enum class GroupMode { kGrpo, kDrGrpo, kRloo, kReinforcePP };

GroupMode parse_group_mode(c10::string_view mode) {
  if (mode == "grpo") return GroupMode::kGrpo;
  if (mode == "dr_grpo") return GroupMode::kDrGrpo;
  if (mode == "rloo") return GroupMode::kRloo;
  if (mode == "reinforce_pp") return GroupMode::kReinforcePP;
  TORCH_CHECK_VALUE(false, "megarl::group_advantages: unknown mode '", std::string(mode),
                    "', expected one of grpo, dr_grpo, rloo, reinforce_pp");
  return GroupMode::kGrpo;  // unreachable
}

// Dense group index in [0, G) for every element, by open addressing with linear probing over a
// power-of-two table of at least 2N slots: O(N) for ids in any order, sorted or not.
int64_t dense_group_index(const int64_t* ids, int64_t N, int32_t* group_of) {
  int shift = 64;
  int64_t cap = 1;
  while (cap < 2 * N) {
    cap <<= 1;
    --shift;
  }
  const uint64_t cap_mask = static_cast<uint64_t>(cap - 1);
  std::vector<int64_t> keys(cap);
  std::vector<int32_t> slot_group(cap, -1);
  int32_t num_groups = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t id = ids[i];
    // Fibonacci hashing: the multiply spreads consecutive ids over the high bits we keep.
    uint64_t h = shift >= 64 ? 0 : (static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull) >> shift;
    while (true) {
      const int32_t gslot = slot_group[h];
      if (gslot < 0) {
        slot_group[h] = num_groups;
        keys[h] = id;
        group_of[i] = num_groups++;
        break;
      }
      if (keys[h] == id) {
        group_of[i] = gslot;
        break;
      }
      h = (h + 1) & cap_mask;
    }
  }
  return num_groups;
}

template <typename scalar_t>
void group_advantages_kernel(const scalar_t* scores, const int64_t* ids, scalar_t* out, int64_t N,
                             GroupMode mode, double eps) {
  std::vector<int32_t> group_of(N);
  const int64_t G = dense_group_index(ids, N, group_of.data());
  // Statistics accumulate in double whatever the score dtype: group sizes are unbounded.
  std::vector<int64_t> count(G, 0);
  std::vector<double> mean(G, 0.0);
  std::vector<double> sq_dev(G, 0.0);
  for (int64_t i = 0; i < N; ++i) {
    const int32_t g = group_of[i];
    ++count[g];
    mean[g] += static_cast<double>(scores[i]);
  }
  for (int64_t g = 0; g < G; ++g) mean[g] /= static_cast<double>(count[g]);
  // Two passes (mean, then squared deviations) rather than sum of squares: no cancellation.
  if (mode == GroupMode::kGrpo || mode == GroupMode::kReinforcePP) {
    for (int64_t i = 0; i < N; ++i) {
      const int32_t g = group_of[i];
      const double d = static_cast<double>(scores[i]) - mean[g];
      sq_dev[g] += d * d;
    }
  }
  // reinforce_pp whitens the group-centred scores over the batch (singletons excluded).
  double batch_mean = 0.0, batch_inv_std = 0.0;
  if (mode == GroupMode::kReinforcePP) {
    double sum_d = 0.0, sum_sq = 0.0;
    int64_t members = 0;
    for (int64_t i = 0; i < N; ++i) {
      const int32_t g = group_of[i];
      if (count[g] > 1) {
        sum_d += static_cast<double>(scores[i]) - mean[g];
        ++members;
      }
    }
    for (int64_t g = 0; g < G; ++g)
      if (count[g] > 1) sum_sq += sq_dev[g];
    if (members > 1) {
      batch_mean = sum_d / static_cast<double>(members);
      // sum over members of (d - batch_mean)^2 = sum d^2 - members * batch_mean^2
      const double var = std::max(0.0, sum_sq - static_cast<double>(members) * batch_mean * batch_mean) /
                         static_cast<double>(members - 1);
      batch_inv_std = 1.0 / std::sqrt(var + eps);
    }
  }
  at::parallel_for(0, N, kElementsPerTask, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int32_t g = group_of[i];
      const int64_t n = count[g];
      double a = 0.0;
      if (n > 1) {
        const double d = static_cast<double>(scores[i]) - mean[g];
        switch (mode) {
          case GroupMode::kGrpo:
            a = d / (std::sqrt(sq_dev[g] / static_cast<double>(n - 1)) + eps);
            break;
          case GroupMode::kDrGrpo:
            a = d;
            break;
          case GroupMode::kRloo:
            a = d * static_cast<double>(n) / static_cast<double>(n - 1);
            break;
          case GroupMode::kReinforcePP:
            a = (d - batch_mean) * batch_inv_std;
            break;
        }
      }
      out[i] = static_cast<scalar_t>(a);
    }
  });
}

at::Tensor group_advantages_cpu(const at::Tensor& scores, const at::Tensor& group_ids, c10::string_view mode,
                                double eps) {
  const GroupMode m = parse_group_mode(mode);
  check_group_advantages_inputs(scores, group_ids, eps);
  auto s = scores.contiguous();
  auto ids = group_ids.contiguous();
  auto out = at::empty_like(s, at::MemoryFormat::Contiguous);
  const int64_t N = s.size(0);
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "megarl_group_advantages_cpu", [&] {
    group_advantages_kernel<scalar_t>(s.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
                                      out.mutable_data_ptr<scalar_t>(), N, m, eps);
  });
  return out;
}

}  // namespace
}  // namespace megarl

TORCH_LIBRARY_FRAGMENT(megarl, m) {
  m.set_python_module("megarl.ops.advantages");
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def(
      "gae_backward(Tensor grad_advantages, Tensor grad_returns, Tensor mask, float gamma, float lam) "
      "-> (Tensor, Tensor)");
  m.def("group_advantages(Tensor scores, Tensor group_ids, str mode, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(megarl, CPU, m) {
  m.impl("gae", &megarl::gae_cpu);
  m.impl("gae_backward", &megarl::gae_backward_cpu);
  m.impl("group_advantages", &megarl::group_advantages_cpu);
}
