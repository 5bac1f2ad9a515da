// The greedy argmax kernel, compiled once per instruction set (kernels/cpu_build.py, as
// cpu_attention_kernel.cpp).
//
// out[r] = the first index of the largest value of logits[r] (of the first NaN where the row
// has one), as torch.argmax. A greedy decode step of 64 requests over a 49,152-token vocabulary
// reads 6 MB of bf16 logits: ATen's argmax takes ~6 ms for that on 2 cores (2.5 ms in fp32,
// after a 3 ms conversion), this ~0.5 ms. Each row is read twice, the second time from L2: one
// vectorized pass for its maximum (NaN-propagating), one for the first index holding it. bf16 is
// widened in registers (exact), so the order is the values' own.
//
// Reference: torch.argmax(logits, dim=1).

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <limits>

#include "cpu_sampling.h"

#ifndef PREFIXSERVE_ISA
#error "compile once per instruction set with -DPREFIXSERVE_ISA=<name> (kernels/cpu_build.py)"
#endif

namespace prefixserve::cpu::PREFIXSERVE_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

/// Applies f(first index, vector of kLanes values) over a row's whole vectors; returns where
/// the tail (fewer than kLanes values) starts.
template <typename T, typename F>
int64_t for_vectors(const T* row, int64_t vocab, const F& f) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + kLanes <= vocab; i += kLanes) f(i, Vec::loadu(row + i));
  } else {
    using VecT = at::vec::Vectorized<T>;
    for (; i + VecT::size() <= vocab; i += VecT::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VecT::loadu(row + i));
      f(i, lo);
      f(i + kLanes, hi);
    }
  }
  return i;
}

template <typename T>
int64_t argmax_row(const T* row, int64_t vocab) {
  // Pass 1: the maximum; NaN wins (at::vec::maximum propagates it).
  Vec best(-std::numeric_limits<float>::infinity());
  const int64_t tail =
      for_vectors(row, vocab, [&](int64_t, const Vec& v) { best = at::vec::maximum(best, v); });
  float top = at::vec::vec_reduce_all<float>(
      [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, best);
  for (int64_t i = tail; i < vocab; ++i) {
    const float v = static_cast<float>(row[i]);
    if (std::isnan(v) || v > top) top = v;
  }
  // Pass 2: its first index (a NaN is found by v != v).
  const bool nan = std::isnan(top);
  int64_t found = -1;
  auto hit = [&](int64_t first, const Vec& v) {
    if (found >= 0) return;
    const Vec eq = nan ? (v != v) : (v == Vec(top));
    if (eq.zero_mask() == (1 << kLanes) - 1) return;  // no lane equal
    alignas(64) float lanes[kLanes];
    v.store(lanes);
    for (int64_t j = 0; j < kLanes; ++j) {
      if (nan ? std::isnan(lanes[j]) : lanes[j] == top) {
        found = first + j;
        return;
      }
    }
  };
  for_vectors(row, vocab, hit);
  if (found >= 0) return found;
  for (int64_t i = tail; i < vocab; ++i) {
    const float v = static_cast<float>(row[i]);
    if (nan ? std::isnan(v) : v == top) return i;
  }
  return 0;  // unreachable: the maximum is one of the values
}

template <typename T>
void run(const ArgmaxArgs& a) {
  const T* logits = static_cast<const T*>(a.logits);
  at::parallel_for(0, a.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) a.out[r] = argmax_row(logits + r * a.stride, a.vocab);
  });
}

}  // namespace

void argmax_rows(const ArgmaxArgs& args) {
  if (args.bf16) return run<c10::BFloat16>(args);
  run<float>(args);
}

}  // namespace prefixserve::cpu::PREFIXSERVE_ISA
