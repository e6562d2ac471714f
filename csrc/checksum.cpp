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
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "checks.h"

namespace megarl {
namespace {

// Words per parallel task (4 MiB): a tensor below this runs on the calling thread without
// waking the pool. Memory-bound work gains little from a second thread on small tensors, and a
// parallel region per tensor stalls when other processes hold the cores: checksumming
// SmolLM2-135M's 272 tensors one by one took 330-725 ms with 512 KiB tasks on two threads of the
// loaded dev machine, 74-167 ms with 4 MiB tasks, 65-130 ms on one thread.
constexpr int64_t kWordsPerTask = int64_t{1} << 19;
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

at::Tensor checksum_cpu(const at::Tensor& t_in) {
  check_checksum_input(t_in, "megarl::checksum");
  const at::Tensor t = t_in.resolve_conj().resolve_neg().contiguous();
  const int64_t nbytes = static_cast<int64_t>(t.nbytes());
  const int64_t whole = nbytes / 8;
  const int64_t tail = nbytes % 8;
  const auto* p = static_cast<const unsigned char*>(t.const_data_ptr());
  Sums total;
  if (whole > 0) {
    const int64_t num_tasks = (whole + kWordsPerTask - 1) / kWordsPerTask;
    std::vector<Sums> parts(num_tasks);
    at::parallel_for(0, num_tasks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        parts[k] = checksum_range(p, k * kWordsPerTask, std::min(whole, (k + 1) * kWordsPerTask));
    });
    for (const Sums& x : parts) {
      total.sum += x.sum;
      total.weighted += x.weighted;
    }
  }
  if (tail > 0) {  // the last word, zero-padded (little-endian: the bytes are its low bytes)
    uint64_t w = 0;
    std::memcpy(&w, p + whole * 8, static_cast<size_t>(tail));
    total.sum += w;
    total.weighted += static_cast<uint64_t>(whole + 1) * swap_halves(w);
  }
  at::Tensor out = at::empty({2}, t_in.options().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  o[0] = static_cast<int64_t>(total.sum);  // two's complement (defined in C++20)
  o[1] = static_cast<int64_t>(total.weighted);
  return out;
}

}  // namespace
}  // namespace megarl

TORCH_LIBRARY_FRAGMENT(megarl, m) {
  m.set_python_module("megarl.ops.checksum");
  m.def("checksum(Tensor t) -> Tensor");
}

TORCH_LIBRARY_IMPL(megarl, CPU, m) { m.impl("checksum", &megarl::checksum_cpu); }
