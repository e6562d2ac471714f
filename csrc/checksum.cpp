// Checksum of a tensor's exact bytes: the op schema and the CPU kernel (CUDA: cuda/checksum.cu).
//
//   megarl::checksum(t) -> int64 [2] = (sum, weighted)
//
// The bytes of t (contiguous order), zero-padded to whole 8-byte words w_1 .. w_n, give
//   sum = sum_i w_i,  weighted = sum_i i * swap(w_i)   (mod 2^64)
// with swap() exchanging a word's 32-bit halves (definition and reference, and why the swap:
// megarl/ops/checksum.py). One read of the tensor; only additions and shifts in the inner loop:
// for a run of words read in L interleaved lanes, each lane keeps the running sum u of its
// swapped words x and the sum t of those running sums, so after M steps
//   t = sum_m (M - m) x_m   and   sum_m m x_m = M u - t   (m = 0 .. M-1),
// which gives the index-weighted sum without a 64-bit multiply per word (SSE2 vectorises it).

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "checks.h"

namespace megarl {
namespace {

// Words per parallel task (256 KiB): a tensor below this runs on the calling thread. On the idle
// 2-core dev machine 256 KiB tasks checksummed SmolLM2-135M's 272 tensors (1-4 MiB each) in 26 ms
// against 42 ms with 4 MiB tasks (one thread for most tensors); torch's own copy_ splits at
// 128 KiB. On a machine whose cores other processes hold, every parallel region can wait for a
// core (earlier measurement there: 74-167 ms with 4 MiB tasks, 330-725 ms with 512 KiB ones):
// benchmarks are run idle.
constexpr int64_t kWordsPerTask = int64_t{1} << 15;
constexpr int kLanes = 8;
// Software prefetch distance: without it this loop read ~30% below a plain sum's bandwidth on
// the dev machine (measured 40 vs 27 ms per 256 MiB, one thread); 2-8 KiB ahead closes the gap.
constexpr int64_t kPrefetchBytes = 4096;

struct Sums {
  uint64_t sum = 0;
  uint64_t weighted = 0;
};

inline uint64_t swap_halves(uint64_t w) { return (w << 32) | (w >> 32); }

// Sums of words [begin, end) of p with global weights i + 1 (i = word index from 0).
// Compiled three times, picked at load time for the CPU at hand (GCC/Clang function clones): the
// loop is ALU-bound once its data is in cache (SSE2: ~21 GB/s per core on the dev machine, where
// a plain sum reads 120), and AVX2 / AVX-512 (a single rotate for swap) widen it.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__CUDACC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
Sums checksum_range(const unsigned char* p, int64_t begin, int64_t end) {
  const int64_t count = end - begin;
  const int64_t steps = count / kLanes;
  const unsigned char* q = p + begin * 8;
  // per lane: s = sum of words, u = sum of half-swapped words, t = sum of the running u
  uint64_t s[kLanes] = {0}, u[kLanes] = {0}, t[kLanes] = {0};
  for (int64_t m = 0; m < steps; ++m) {
    uint64_t w[kLanes];
#if defined(__GNUC__)
    __builtin_prefetch(q + m * (8 * kLanes) + kPrefetchBytes);  // never faults, even past the end
#endif
    std::memcpy(w, q + m * (8 * kLanes), 8 * kLanes);  // any alignment
    for (int l = 0; l < kLanes; ++l) {
      s[l] += w[l];
      u[l] += swap_halves(w[l]);
      t[l] += u[l];
    }
  }
  // local index j = l + L*m: sum_j j x_j = sum_l (l u_l + L (M u_l - t_l)), x = swapped words
  Sums out;
  uint64_t local_weighted = 0, swapped_sum = 0;
  const uint64_t M = static_cast<uint64_t>(steps);
  for (int l = 0; l < kLanes; ++l) {
    out.sum += s[l];
    swapped_sum += u[l];
    local_weighted += static_cast<uint64_t>(l) * u[l] + kLanes * (M * u[l] - t[l]);
  }
  for (int64_t j = steps * kLanes; j < count; ++j) {
    uint64_t w;
    std::memcpy(&w, q + j * 8, 8);
    out.sum += w;
    swapped_sum += swap_halves(w);
    local_weighted += static_cast<uint64_t>(j) * swap_halves(w);
  }
  // global weight of local index j is begin + 1 + j
  out.weighted = local_weighted + static_cast<uint64_t>(begin + 1) * swapped_sum;
  return out;
}

Sums add_parts(const std::vector<Sums>& parts) {
  Sums total;
  for (const Sums& x : parts) {
    total.sum += x.sum;
    total.weighted += x.weighted;
  }
  return total;
}

// Adds the last word of p's nbytes when it is partial (zero-padded; little-endian: the bytes are
// its low bytes) to the sums of the whole words, and returns them as int64 [2] (sum, weighted).
at::Tensor finish_sums(Sums total, const unsigned char* p, int64_t nbytes, const at::TensorOptions& options) {
  const int64_t whole = nbytes / 8, tail = nbytes % 8;
  if (tail > 0) {
    uint64_t w = 0;
    std::memcpy(&w, p + whole * 8, static_cast<size_t>(tail));
    total.sum += w;
    total.weighted += static_cast<uint64_t>(whole + 1) * swap_halves(w);
  }
  at::Tensor out = at::empty({2}, options.dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  o[0] = static_cast<int64_t>(total.sum);  // two's complement (defined in C++20)
  o[1] = static_cast<int64_t>(total.weighted);
  return out;
}

at::Tensor checksum_cpu(const at::Tensor& t_in) {
  check_checksum_input(t_in, "megarl::checksum");
  const at::Tensor t = t_in.resolve_conj().resolve_neg().contiguous();
  const int64_t nbytes = static_cast<int64_t>(t.nbytes());
  const int64_t whole = nbytes / 8;
  const auto* p = static_cast<const unsigned char*>(t.const_data_ptr());
  const int64_t num_tasks = (whole + kWordsPerTask - 1) / kWordsPerTask;
  std::vector<Sums> parts(num_tasks);
  at::parallel_for(0, num_tasks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      parts[k] = checksum_range(p, k * kWordsPerTask, std::min(whole, (k + 1) * kWordsPerTask));
  });
  return finish_sums(add_parts(parts), p, nbytes, t_in.options());
}

// ---- copy_checksum: dst.copy_(src), then checksum(dst), in one pass over memory ----------------
//
// dst is cut into blocks of whole 8-byte words; each block is copied from src and checksummed
// right away, while it is still in the core's cache, so the checksum costs no second read from
// memory (SmolLM2-135M's 272 tensors, dev machine: copy_ into fresh tensors 48 ms, copy_ then
// checksum 100 ms, this 57 ms). Same dtype with a src that is contiguous or 2-D with contiguous rows (what the weight
// bridge hands an engine: parameters, their row slices, gathered q/k/v): plain memcpy per
// block. Anything else (a dtype cast, other strides): ATen's copy_ on dim-0 slabs of rows.

// 64 KiB per block: the block is checksummed straight after its copy, from L1/L2.
constexpr int64_t kCopyBlockBytes = int64_t{1} << 16;
// Blocks per parallel task: 256 KiB, as kWordsPerTask.
constexpr int64_t kCopyBlocksPerTask = 4;

// Copies bytes [b0, b1) of the row-major image of src into dst (+ b0): src is `rows` rows of
// `row_bytes` bytes, `row_stride` bytes apart (rows == 1 for a contiguous src).
inline void copy_rows(unsigned char* d, const unsigned char* s, int64_t row_bytes, int64_t row_stride, int64_t b0,
                      int64_t b1) {
  while (b0 < b1) {
    const int64_t r = b0 / row_bytes, in_row = b0 - r * row_bytes;
    const int64_t n = std::min(b1 - b0, row_bytes - in_row);
    std::memcpy(d + b0, s + r * row_stride + in_row, static_cast<size_t>(n));
    b0 += n;
  }
}

at::Tensor copy_checksum_cpu(at::Tensor& dst, const at::Tensor& src) {
  check_copy_checksum_inputs(dst, src, "megarl::copy_checksum");
  const auto overlap = at::get_overlap_status(dst, src);  // TooHard: strides it cannot judge
  TORCH_CHECK_VALUE(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial,
                    "megarl::copy_checksum: src and dst share memory");
  const int64_t nbytes = static_cast<int64_t>(dst.nbytes());
  auto* d = static_cast<unsigned char*>(dst.data_ptr());
  const bool same = src.scalar_type() == dst.scalar_type() && !src.is_conj() && !src.is_neg();
  int64_t row_bytes = 0, row_stride = 0;  // 0: not a memcpy case
  if (same && src.is_contiguous()) {
    row_bytes = row_stride = std::max<int64_t>(nbytes, 1);
  } else if (same && src.dim() == 2 && src.stride(1) == 1 && src.stride(0) >= src.size(1)) {
    row_bytes = src.size(1) * src.element_size();
    row_stride = src.stride(0) * src.element_size();
  }
  std::vector<Sums> parts;
  if (nbytes > 0 && row_bytes > 0) {
    const auto* s = static_cast<const unsigned char*>(src.const_data_ptr());
    const int64_t blocks = (nbytes + kCopyBlockBytes - 1) / kCopyBlockBytes;
    parts.resize(blocks);
    at::parallel_for(0, blocks, kCopyBlocksPerTask, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t b0 = k * kCopyBlockBytes, b1 = std::min(nbytes, b0 + kCopyBlockBytes);
        copy_rows(d, s, row_bytes, row_stride, b0, b1);
        parts[k] = checksum_range(d, b0 / 8, b1 / 8);  // whole words; the tail word is added below
      }
    });
  } else if (nbytes > 0) {
    // ATen copy_ (casts, any strides) per slab of dim-0 rows whose bytes are whole words
    const at::Tensor d2 = dst.dim() == 0 ? dst.view({1}) : dst;
    const at::Tensor s2 = src.dim() == 0 ? src.view({1}) : src;
    const int64_t rows = d2.size(0), rb = nbytes / rows;
    int64_t step = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(rb, 1));  // ~1 MiB slabs
    const int64_t unit = 8 / std::gcd(rb, int64_t{8});  // rows per whole number of words
    step = (step + unit - 1) / unit * unit;
    const int64_t slabs = (rows + step - 1) / step;
    parts.resize(slabs);
    at::parallel_for(0, slabs, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * step, n = std::min(rows, r0 + step) - r0;
        d2.narrow(0, r0, n).copy_(s2.narrow(0, r0, n));
        parts[k] = checksum_range(d, r0 * rb / 8, (r0 + n) * rb / 8);
      }
    });
  }
  return finish_sums(add_parts(parts), d, nbytes, dst.options());
}

}  // namespace
}  // namespace megarl

TORCH_LIBRARY_FRAGMENT(megarl, m) {
  m.set_python_module("megarl.ops.checksum");
  m.def("checksum(Tensor t) -> Tensor");
  m.def("copy_checksum(Tensor(a!) dst, Tensor src) -> Tensor");
}

TORCH_LIBRARY_IMPL(megarl, CPU, m) {
  m.impl("checksum", &megarl::checksum_cpu);
  m.impl("copy_checksum", &megarl::copy_checksum_cpu);
}
