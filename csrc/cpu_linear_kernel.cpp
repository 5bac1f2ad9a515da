// The skinny linear kernel, compiled once per instruction set (kernels/cpu_build.py builds this
// file with -DPREFIXSERVE_ISA=<name> and that ISA's flags, as cpu_attention_kernel.cpp).
//
// y = x W^T + b for few rows of x (a decode step, a short prompt). With few rows a linear layer
// is bound by reading its weight once from memory, and a general GEMM that packs panels of W
// for many rows reads it at well under the machine's bandwidth. Here W stays in nn.Linear's
// [N, K] layout and is streamed once: the threads split the output features N; a tile of MR
// rows of x times NR rows of W keeps MR x NR dot products in vector registers along K (each
// W vector loaded once per tile serves MR rows, each x vector NR features), then reduces each
// across its lanes. For more rows than one tile, the tiles of x run over the same NR rows of
// W while they are in L1, so W still comes from memory once, and the next NR rows of W are
// prefetched meanwhile (at 38 rows this alone cuts the time by a third).
//
// Reference: torch.nn.functional.linear.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "cpu_linear.h"

#ifndef PREFIXSERVE_ISA
#error "compile once per instruction set with -DPREFIXSERVE_ISA=<name> (kernels/cpu_build.py)"
#endif

namespace prefixserve::cpu::PREFIXSERVE_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kFeaturesPerTask = 16;  ///< output features per unit of parallel work
constexpr int kToL2 = 2;                  ///< __builtin_prefetch locality (prefetcht1)

/// y[m, n] = x[m, :] . w[n, :] (+ bias[n]) for MR rows of x and NR rows of w.
template <int MR, int NR>
inline void tile(const LinearArgs& a, const float* x, const float* w, const float* bias,
                 float* y) {
  const int64_t k = a.k;
  Vec acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = Vec(0.f);
  int64_t d = 0;
  for (; d + kLanes <= k; d += kLanes) {
    Vec wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = Vec::loadu(w + j * k + d);
    for (int i = 0; i < MR; ++i) {
      const Vec xv = Vec::loadu(x + i * a.x_stride + d);
      for (int j = 0; j < NR; ++j) acc[i][j] = at::vec::fmadd(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float s = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, acc[i][j]);
      for (int64_t t = d; t < k; ++t) s += x[i * a.x_stride + t] * w[j * k + t];
      y[i * a.n + j] = bias ? s + bias[j] : s;
    }
  }
}

/// Every row of x times the NR features of W from n: MR rows at a time, then one at a time.
/// While the MR-row passes run over this tile's weights (from L1 after the first), the next
/// tile's weights are prefetched into L2, spread evenly over the passes: they come from memory,
/// and without this every tile would wait for its first pass to bring them in.
template <int MR, int NR>
inline void rows(const LinearArgs& a, int64_t n, int64_t n_end) {
  const float* w = a.weight + n * a.k;
  const float* b = a.bias ? a.bias + n : nullptr;
  const char* next = reinterpret_cast<const char*>(w + NR * a.k);
  // (A single row is one pass that streams W: the hardware prefetcher keeps up with it.)
  const bool prefetch = MR > 1 && n + 2 * NR <= n_end;
  const int64_t next_lines = prefetch ? NR * a.k * int64_t{sizeof(float)} / 64 : 0;
  const int64_t passes = a.m / MR;
  const int64_t lines_per_pass = passes > 0 ? (next_lines + passes - 1) / passes : 0;
  int64_t m = 0, line = 0;
  for (; m + MR <= a.m; m += MR) {
    for (const int64_t end = std::min(next_lines, line + lines_per_pass); line < end; ++line) {
      __builtin_prefetch(next + line * 64, 0, kToL2);
    }
    tile<MR, NR>(a, a.x + m * a.x_stride, w, b, a.y + m * a.n + n);
  }
  for (; m < a.m; ++m) tile<1, NR>(a, a.x + m * a.x_stride, w, b, a.y + m * a.n + n);
}

/// Every row of x times the features [n0, n1) of W, NR features at a time.
template <int MR, int NR>
void features(const LinearArgs& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) rows<MR, NR>(a, n, n1);
  for (; n < n1; ++n) rows<MR, 1>(a, n, n1);
}

}  // namespace

void skinny_linear(const LinearArgs& args) {
  const int64_t tasks = (args.n + kFeaturesPerTask - 1) / kFeaturesPerTask;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t n0 = begin * kFeaturesPerTask;
    const int64_t n1 = std::min(end * kFeaturesPerTask, args.n);
    // One row: 8 independent dot products keep both FMA pipes busy; more rows: 3 x 4 tiles
    // (12 accumulators, 4 + 1 loads: within AVX2's 16 registers).
    if (args.m == 1) {
      features<1, 8>(args, n0, n1);
    } else {
      features<3, 4>(args, n0, n1);
    }
  });
}

}  // namespace prefixserve::cpu::PREFIXSERVE_ISA
