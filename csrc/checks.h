// Input checks shared by the CPU kernels (csrc/*.cpp) and the CUDA kernels (csrc/cuda/*.cu):
// one message per mistake, naming the op and the argument. The Python dispatch functions in
// megarl/ops validate first (ValueError); these guard direct torch.ops.megarl calls.
// Kept to ATen/core headers so nvcc compiles it quickly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace megarl {

inline void check_checksum_input(const at::Tensor& t, const char* op) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": t must be a dense (strided) tensor, got layout ", t.layout());
}

}  // namespace megarl
