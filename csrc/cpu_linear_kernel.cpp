// The skinny linear kernels, compiled once per instruction set (kernels/cpu_build.py builds this
// file with -DPREFIXSERVE_ISA=<name> and that ISA's flags, as cpu_attention_kernel.cpp).
//
// y = x W^T + b for few rows of x (a decode step, a short prompt). With few rows a linear layer
// is bound by reading its weight once from memory, and a general GEMM that packs panels of W
// for many rows reads it at well under the machine's bandwidth. Here W stays in nn.Linear's
// [N, K] layout, nothing is repacked, and the threads split the output features N. Two kinds
// of register tile:
//
// - Dot products (any ISA; up to 11 rows on AVX-512, every row count elsewhere): a tile of MR
//   rows of x times NR rows of W keeps MR x NR dot products in vector registers along K (each
//   W vector loaded once per tile serves MR rows, each x vector NR features), then reduces each
//   across its lanes. For more rows than one tile, the tiles of x run over the same NR rows of
//   W while they are in L1, so W still comes from memory once, and the next NR rows of W are
//   prefetched meanwhile (at 38 rows this alone cuts the time by a third).
// - Outer products (AVX-512, from 12 rows): with more rows the lane reductions of the dot
//   products, 16 lanes wide, cost a growing share. Instead x, which is small, is packed once per
//   call transposed, xt [K, MP] (MP = M rounded up to whole vectors, zeros beyond M), and a tile
//   of MV vectors of rows times 8 features accumulates along K: per k, MV vectors of xt[k] times
//   8 weights W[n, k] broadcast, MV x 8 FMAs and nothing to reduce. Each of the tile's 8 rows of
//   W is a sequential stream, read once per 48 rows. With AVX2's 16 registers the tile would be
//   3 x 4 and measured slower than the dot products (128 vs 167 GFLOP/s at 38 rows, Zen 5).
//
// Reference: torch.nn.functional.linear.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <memory>

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
constexpr int kRegisters = kLanes >= 16 ? 32 : 16;  ///< vector registers of the ISA
/// Rows from which the outer-product tiles run (AVX-512 only; both kinds tie at 10-12 rows).
constexpr int64_t kOuterMinRows = kRegisters >= 32 ? 12 : kMaxSkinnyRows + 1;
/// Dot-product tile widths: 8 features for one row; for two rows as many as the registers hold
/// (2 x NR accumulators, NR weight vectors and 2 of x); 3 x 4 for more.
constexpr int kPairFeatures = kRegisters >= 32 ? 8 : 4;

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
  if constexpr (MR > 2) {
    if (m + 2 <= a.m) {
      tile<2, NR>(a, a.x + m * a.x_stride, w, b, a.y + m * a.n + n);
      m += 2;
    }
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

// ---- Outer-product tiles (see the top of the file) ---------------------------------------------

constexpr int kOuterFeatures = 8;  ///< NR: features per outer-product tile
constexpr int kMaxRowVectors = 3;  ///< MV of a full pass: 24 accumulators, 3 of xt, 1 broadcast

/// y[rows m0.., features of w] = xt[:, m0 : m0 + MV * L]^T w^T (+ bias): acc[j][v] += xt[d, v]
/// * w[j, d] along d.
template <int MV, int NR>
inline void outer_tile(const LinearArgs& a, const float* xt, int64_t mp, int64_t m0,
                       const float* w, const float* bias, float* y) {
  const int64_t k = a.k;
  Vec acc[NR][MV];
  for (int j = 0; j < NR; ++j)
    for (int v = 0; v < MV; ++v) acc[j][v] = Vec(0.f);
  const float* xd = xt + m0;
  for (int64_t d = 0; d < k; ++d, xd += mp) {
    Vec xv[MV];
    for (int v = 0; v < MV; ++v) xv[v] = Vec::loadu(xd + v * kLanes);
    for (int j = 0; j < NR; ++j) {
      const Vec wb(w[j * k + d]);
      for (int v = 0; v < MV; ++v) acc[j][v] = at::vec::fmadd(xv[v], wb, acc[j][v]);
    }
  }
  // acc[j][v] holds feature j of MV * L rows: stored through a buffer, one row at a time.
  alignas(64) float lanes[kLanes];
  const int64_t rows = std::min<int64_t>(MV * kLanes, a.m - m0);
  for (int j = 0; j < NR; ++j) {
    const float b = bias ? bias[j] : 0.f;
    for (int v = 0; v < MV && v * kLanes < rows; ++v) {
      acc[j][v].store(lanes);
      const int64_t valid = std::min<int64_t>(kLanes, rows - v * kLanes);
      for (int64_t l = 0; l < valid; ++l) y[(v * kLanes + l) * a.n + j] = lanes[l] + b;
    }
  }
}

/// Every row times the NR features of W from n: passes of kMaxRowVectors vectors of rows over
/// the same NR rows of W (from L1 after the first), the last pass with what remains.
template <int NR>
inline void outer_rows(const LinearArgs& a, const float* xt, int64_t mp, int64_t n) {
  const float* w = a.weight + n * a.k;
  const float* b = a.bias ? a.bias + n : nullptr;
  int64_t m = 0;
  for (; m + kMaxRowVectors * kLanes <= mp; m += kMaxRowVectors * kLanes) {
    outer_tile<kMaxRowVectors, NR>(a, xt, mp, m, w, b, a.y + m * a.n + n);
  }
  const int64_t left = (mp - m) / kLanes;
  if (left == 2) outer_tile<2, NR>(a, xt, mp, m, w, b, a.y + m * a.n + n);
  if (left == 1) outer_tile<1, NR>(a, xt, mp, m, w, b, a.y + m * a.n + n);
  static_assert(kMaxRowVectors == 3, "the passes above cover at most 2 vectors left over");
}

/// Every row times the features [n0, n1) of W, NR features at a time.
void outer_features(const LinearArgs& a, const float* xt, int64_t mp, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kOuterFeatures <= n1; n += kOuterFeatures) outer_rows<kOuterFeatures>(a, xt, mp, n);
  for (; n < n1; ++n) outer_rows<1>(a, xt, mp, n);
}

/// xt [K, MP] <- x [M, K] transposed, rows M..MP zero; threads split K.
void pack_transposed(const LinearArgs& a, int64_t mp, float* xt) {
  at::parallel_for(0, a.k, 64, [&](int64_t d0, int64_t d1) {
    for (int64_t d = d0; d < d1; ++d) {
      float* row = xt + d * mp;
      for (int64_t m = 0; m < a.m; ++m) row[m] = a.x[m * a.x_stride + d];
      std::fill(row + a.m, row + mp, 0.f);
    }
  });
}

/// Threads split the output features in tasks of kFeaturesPerTask; body(n0, n1) does [n0, n1).
template <typename Body>
void for_features(const LinearArgs& a, const Body& body) {
  const int64_t tasks = (a.n + kFeaturesPerTask - 1) / kFeaturesPerTask;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    body(begin * kFeaturesPerTask, std::min(end * kFeaturesPerTask, a.n));
  });
}

}  // namespace

void skinny_linear(const LinearArgs& args) {
  if (args.m == 1) {
    for_features(args, [&](int64_t n0, int64_t n1) { features<1, 8>(args, n0, n1); });
  } else if (args.m == 2) {
    for_features(args, [&](int64_t n0, int64_t n1) { features<2, kPairFeatures>(args, n0, n1); });
  } else if (args.m < kOuterMinRows) {
    for_features(args, [&](int64_t n0, int64_t n1) { features<3, 4>(args, n0, n1); });
  } else {
    if constexpr (kOuterMinRows <= kMaxSkinnyRows) {
      const int64_t mp = (args.m + kLanes - 1) / kLanes * kLanes;
      const std::unique_ptr<float[]> xt(new float[args.k * mp]);
      pack_transposed(args, mp, xt.get());
      for_features(args, [&](int64_t n0, int64_t n1) {
        outer_features(args, xt.get(), mp, n0, n1);
      });
    }
  }
}

}  // namespace prefixserve::cpu::PREFIXSERVE_ISA
