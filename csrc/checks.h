// Input checks shared by the CPU kernels (csrc/*.cpp) and the CUDA kernels (csrc/cuda/*.cu), so
// both sides of an op reject the same inputs with the same message (a ValueError naming the op
// and the argument). The Python dispatch functions in megarl/ops validate first; these guard
// direct torch.ops.megarl calls. Device type needs no check: the dispatcher picks the kernel
// from the inputs' devices, so "all on one device" is what is left to check.
// ATen/core headers only, so nvcc compiles it quickly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

namespace megarl {

// gae / gae_backward: a and b [B, T] of one floating dtype, mask [B, T] bool.
inline void check_gae_inputs(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name, const at::Tensor& mask) {
  TORCH_CHECK_VALUE(a.dim() == 2, op, ": ", a_name, " must be 2-D [B, T], got shape ", a.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(a.scalar_type()), op, ": ", a_name,
                    " must be a floating-point tensor, got ", a.scalar_type());
  TORCH_CHECK_VALUE(b.sizes() == a.sizes(), op, ": ", b_name, " shape ", b.sizes(), " does not match ", a_name,
                    " shape ", a.sizes());
  TORCH_CHECK_VALUE(b.scalar_type() == a.scalar_type(), op, ": ", b_name, " dtype ", b.scalar_type(),
                    " does not match ", a_name, " dtype ", a.scalar_type());
  TORCH_CHECK_VALUE(mask.sizes() == a.sizes(), op, ": mask shape ", mask.sizes(), " does not match ", a_name,
                    " shape ", a.sizes());
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(b.device() == a.device() && mask.device() == a.device(), op,
                    ": all inputs must be on one device, got ", a_name, " on ", a.device(), ", ", b_name, " on ",
                    b.device(), ", mask on ", mask.device());
}

// group_advantages: scores [N] floating, group_ids [N] int64, eps finite >= 0.
inline void check_group_advantages_inputs(const at::Tensor& scores, const at::Tensor& group_ids, double eps) {
  TORCH_CHECK_VALUE(scores.dim() == 1 && at::isFloatingType(scores.scalar_type()),
                    "megarl::group_advantages: scores must be a 1-D floating-point tensor, got shape ", scores.sizes(),
                    " dtype ", scores.scalar_type());
  TORCH_CHECK_VALUE(group_ids.dim() == 1 && group_ids.scalar_type() == at::kLong,
                    "megarl::group_advantages: group_ids must be a 1-D int64 tensor, got shape ", group_ids.sizes(),
                    " dtype ", group_ids.scalar_type());
  TORCH_CHECK_VALUE(group_ids.size(0) == scores.size(0), "megarl::group_advantages: group_ids has ",
                    group_ids.size(0), " elements, scores has ", scores.size(0));
  TORCH_CHECK_VALUE(group_ids.device() == scores.device(),
                    "megarl::group_advantages: scores and group_ids must be on one device, got ", scores.device(),
                    " and ", group_ids.device());
  TORCH_CHECK_VALUE(scores.size(0) < std::numeric_limits<int32_t>::max() / 2,
                    "megarl::group_advantages: at most 2^30 scores, got ", scores.size(0));
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "megarl::group_advantages: eps must be finite and >= 0, got ",
                    eps);
}

// logprob_entropy_*: logits [T, V >= 1], targets [T] int64 on the same device, temperature > 0.
inline void check_logprob_inputs(const at::Tensor& logits, const at::Tensor& targets, double temperature,
                                 const char* op) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be [T, V], got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, op, ": logits need at least one vocabulary column");
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == logits.size(0), op, ": targets must be [T] with T = ",
                    logits.size(0), ", got ", targets.sizes());
  TORCH_CHECK_VALUE(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), op,
                    ": temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(targets.device() == logits.device(), op, ": targets (", targets.device(), ") and logits (",
                    logits.device(), ") must be on one device");
}

// logprob_entropy_bwd: the saved per-row statistics, float32 on the logits' device.
inline void check_logprob_bwd_saved(const at::Tensor& grad_logprobs, const at::Tensor& grad_entropy,
                                    const at::Tensor& lse_stats, const at::Tensor& entropy, const at::Tensor& logits,
                                    const char* op) {
  const int64_t T = logits.size(0);
  for (const at::Tensor* t : {&grad_logprobs, &grad_entropy, &entropy}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == T && t->scalar_type() == at::kFloat &&
                          t->device() == logits.device(),
                      op, ": grads and entropy must be float32 [T] on the logits' device, got ", t->scalar_type(),
                      " ", t->sizes(), " on ", t->device());
  }
  TORCH_CHECK_VALUE(lse_stats.dim() == 2 && lse_stats.size(0) == T && lse_stats.size(1) == 2 &&
                        lse_stats.scalar_type() == at::kFloat && lse_stats.device() == logits.device(),
                    op, ": lse_stats must be float32 [T, 2] on the logits' device, got ", lse_stats.scalar_type(), " ",
                    lse_stats.sizes(), " on ", lse_stats.device());
}

// checksum: any dense tensor.
inline void check_checksum_input(const at::Tensor& t, const char* op) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": t must be a dense (strided) tensor, got layout ", t.layout());
}

// "[2, 3]": a shape for messages, built without ostream operators (a raw copy_checksum call with
// mismatched shapes crashed the device image's torch 2.11 when the message streamed sizes()).
inline std::string shape_str(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + "]";
}

// copy_checksum: dst dense and contiguous (what it checksums is its memory), src dense, same
// shape, one device.
inline void check_copy_checksum_inputs(const at::Tensor& dst, const at::Tensor& src, const char* op) {
  TORCH_CHECK_VALUE(dst.layout() == at::kStrided && src.layout() == at::kStrided, op,
                    ": dst and src must be dense (strided) tensors, got layouts ", dst.layout(), " and ", src.layout());
  TORCH_CHECK_VALUE(dst.is_contiguous(), op, ": dst must be contiguous (its memory is what gets checksummed)");
  TORCH_CHECK_VALUE(dst.sizes() == src.sizes(), op, ": src shape ", shape_str(src), " does not match dst shape ",
                    shape_str(dst));
  TORCH_CHECK_VALUE(dst.device() == src.device(), op, ": dst (", dst.device(), ") and src (", src.device(),
                    ") must be on one device");
  TORCH_CHECK_VALUE(!dst.is_conj() && !dst.is_neg(), op, ": dst must not be a conjugate or negative view");
}

}  // namespace megarl
