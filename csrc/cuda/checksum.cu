// CUDA kernel of megarl::checksum (schema and CPU kernel: csrc/checksum.cpp; definition:
// megarl/ops/checksum.py): sum_i w_i and sum_i i * swap(w_i), mod 2^64, of the tensor's bytes
// read as int64 words w_1 .. w_n (the last one zero-padded; swap exchanges the 32-bit halves).
//
// Grid-stride loop, each thread summing w and i*w over its words; a warp-shuffle then shared
// memory reduction per block; one pair of 64-bit atomicAdds per block into the [2] output.
// Integer addition mod 2^64 is associative and commutative, so the result does not depend on the
// launch shape or on the order the atomics land: bit-identical to the CPU kernel.
// 16-byte aligned data (every caching-allocator block; a view may start elsewhere) is read with
// 16-byte loads; other data with byte loads (slow, correct).

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "checks.h"

namespace megarl {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ uint64_t swap_halves(uint64_t w) { return (w << 32) | (w >> 32); }

__device__ __forceinline__ uint64_t load_word_bytes(const unsigned char* p, int64_t nbytes, int64_t word) {
  uint64_t w = 0;
  const int64_t first = word * 8;
  const int64_t last = first + 8 < nbytes ? first + 8 : nbytes;
  for (int64_t b = first; b < last; ++b) w |= static_cast<uint64_t>(p[b]) << (8 * (b - first));  // little-endian
  return w;
}

// out[0] += sum_i w_i, out[1] += sum_i (i + 1) swap(w_i) over the words this block's threads visit.
// kCopy (copy_checksum; needs kAligned16 and dst 16-byte aligned too): every word read is also
// stored to dst, so the bytes are checksummed on their way into dst, in one pass.
template <bool kAligned16, bool kCopy = false>
__global__ void checksum_kernel(const unsigned char* __restrict__ p, int64_t nbytes,
                                unsigned long long* __restrict__ out, unsigned char* __restrict__ dst = nullptr) {
  const int64_t num_words = (nbytes + 7) / 8;  // the last one zero-padded
  const int64_t whole = nbytes / 8;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  uint64_t sum = 0, weighted = 0;
  if (kAligned16) {
    // pairs of whole words by 16-byte loads, then the odd whole word and the padded tail
    const int64_t pairs = whole / 2;
    const ulonglong2* p2 = reinterpret_cast<const ulonglong2*>(p);
    for (int64_t k = tid; k < pairs; k += stride) {
      const ulonglong2 v = __ldg(p2 + k);
      if (kCopy) reinterpret_cast<ulonglong2*>(dst)[k] = v;
      const uint64_t i = static_cast<uint64_t>(2 * k);
      sum += v.x + v.y;
      weighted += (i + 1) * swap_halves(v.x) + (i + 2) * swap_halves(v.y);
    }
    for (int64_t i = 2 * pairs + tid; i < num_words; i += stride) {
      const uint64_t w = load_word_bytes(p, nbytes, i);
      if (kCopy) {
        for (int64_t b = i * 8; b < i * 8 + 8 && b < nbytes; ++b) dst[b] = p[b];
      }
      sum += w;
      weighted += static_cast<uint64_t>(i + 1) * swap_halves(w);
    }
  } else {
    for (int64_t i = tid; i < num_words; i += stride) {
      const uint64_t w = load_word_bytes(p, nbytes, i);
      sum += w;
      weighted += static_cast<uint64_t>(i + 1) * swap_halves(w);
    }
  }
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    sum += __shfl_down_sync(kFullMask, sum, offset);
    weighted += __shfl_down_sync(kFullMask, weighted, offset);
  }
  __shared__ uint64_t warp_sum[kThreads / kWarpSize], warp_weighted[kThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) {
    warp_sum[warp] = sum;
    warp_weighted[warp] = weighted;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    uint64_t s = 0, w = 0;
    for (int k = 0; k < kThreads / kWarpSize; ++k) {
      s += warp_sum[k];
      w += warp_weighted[k];
    }
    atomicAdd(out, static_cast<unsigned long long>(s));
    atomicAdd(out + 1, static_cast<unsigned long long>(w));
  }
}

// Blocks for nbytes on the device: enough to fill it a few times over; a small tensor gets what
// it needs.
unsigned grid_blocks(int64_t nbytes, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t words = (nbytes + 7) / 8;
  const int64_t wanted = (words + kThreads - 1) / kThreads;
  return static_cast<unsigned>(wanted < 4 * sms ? wanted : 4 * sms);
}

at::Tensor checksum_cuda(const at::Tensor& t_in) {
  check_checksum_input(t_in, "megarl::checksum");
  const c10::cuda::CUDAGuard guard(t_in.device());
  const at::Tensor t = t_in.resolve_conj().resolve_neg().contiguous();
  at::Tensor out = at::zeros({2}, t_in.options().dtype(at::kLong));
  const int64_t nbytes = static_cast<int64_t>(t.nbytes());
  if (nbytes == 0) return out;
  const auto* p = static_cast<const unsigned char*>(t.const_data_ptr());
  const unsigned blocks = grid_blocks(nbytes, t.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* o = reinterpret_cast<unsigned long long*>(out.mutable_data_ptr<int64_t>());
  if (reinterpret_cast<uintptr_t>(p) % 16 == 0) {
    checksum_kernel<true><<<blocks, kThreads, 0, stream>>>(p, nbytes, o);
  } else {
    checksum_kernel<false><<<blocks, kThreads, 0, stream>>>(p, nbytes, o);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// copy_checksum: dst.copy_(src) and checksum(dst). Same dtype, src contiguous, both 16-byte
// aligned (the usual case: whole tensors from the caching allocator): one fused pass, every word
// stored as it is summed. Anything else (a cast, strides, a misaligned view): copy_, then the
// checksum kernel over dst.
at::Tensor copy_checksum_cuda(at::Tensor& dst, const at::Tensor& src) {
  check_copy_checksum_inputs(dst, src, "megarl::copy_checksum");
  const c10::cuda::CUDAGuard guard(dst.device());
  const int64_t nbytes = static_cast<int64_t>(dst.nbytes());
  const bool fused = src.scalar_type() == dst.scalar_type() && src.is_contiguous() && !src.is_conj() &&
                     !src.is_neg() && reinterpret_cast<uintptr_t>(src.const_data_ptr()) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(dst.data_ptr()) % 16 == 0;
  if (!fused || nbytes == 0) {
    dst.copy_(src);
    return checksum_cuda(dst);
  }
  const auto* sp = static_cast<const unsigned char*>(src.const_data_ptr());
  auto* dp = static_cast<unsigned char*>(dst.data_ptr());
  TORCH_CHECK_VALUE(sp + nbytes <= dp || dp + nbytes <= sp, "megarl::copy_checksum: src and dst share memory");
  at::Tensor out = at::zeros({2}, dst.options().dtype(at::kLong));
  const unsigned blocks = grid_blocks(nbytes, dst.get_device());
  auto* o = reinterpret_cast<unsigned long long*>(out.mutable_data_ptr<int64_t>());
  checksum_kernel<true, true><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(sp, nbytes, o, dp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace megarl

TORCH_LIBRARY_IMPL(megarl, CUDA, m) {
  m.impl("checksum", &megarl::checksum_cuda);
  m.impl("copy_checksum", &megarl::copy_checksum_cuda);
}
