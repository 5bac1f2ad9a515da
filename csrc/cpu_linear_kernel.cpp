// The linear kernel, compiled once per instruction set (kernels/cpu_build.py builds this file
// with -DPREFIXSERVE_ISA=<name> and that ISA's flags, as cpu_attention_kernel.cpp).
//
// y = x W^T + b with W packed once, at load, as panels [ceil(N / 16), K, 16]: panel p holds
// W^T[:, 16p : 16p + 16], each k's 16 weights contiguous (zeros past N). A register tile of MR
// rows of x times NP panels accumulates outer products along K: per k, the NP panels' weights
// are loaded as vectors, each row's x[m, k] is broadcast, and MR x NP x (16 / lanes) FMAs add
// into accumulators that already hold outputs in y's own layout. Nothing is reduced across
// lanes and no lane is padding (the rows are not vectorized). On nn.Linear's own [N, K] layout
// a kernel must either end its dot products in lane reductions or pack the rows transposed and
// pad them to whole vectors: both measured slower (at 38 rows on AVX-512, Zen 5: about 160-190
// and 225 GFLOP/s against 307 here; 64 rows x 49152 features of an LM head 2.5x slower). Each
// panel's weights stream from memory once per chunk of rows (below); the tiles of further rows
// find them in L2 while a pair of panels fits there (K up to ~8k).
//
// Tiles: AVX-512 12 rows x 2 panels (24 of its 32 registers accumulate); with AVX2's 16
// registers 3 rows x 2 panels (12 accumulators), which measured faster than 6 rows x 1 panel.
// Threads split the panels in pairs, and the rows in chunks when there are many.
//
// Reference: torch.nn.functional.linear (with W = the panels unpacked).

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
constexpr int kLanes = Vec::size();
constexpr int kPanelVectors = kPanel / kLanes;  ///< vectors per panel (1 on AVX-512, 2 on AVX2)
static_assert(kPanel % kLanes == 0, "a panel is whole vectors");
constexpr int kTilePanels = 2;                  ///< NP of a full tile
constexpr bool kManyRegisters = kLanes >= 16;   ///< AVX-512's 32 vector registers
constexpr int kTileRows = kManyRegisters ? 12 : 3;  ///< MR of a full tile
constexpr int64_t kRowChunk = 20 * kTileRows;   ///< rows per task once there are more

/// y[MR rows, NP panels' features from panel] = x[MR rows] W^T (+ bias).
template <int MR, int NP>
inline void tile(const LinearArgs& a, const float* x, int64_t panel, float* y) {
  constexpr int NV = NP * kPanelVectors;
  const int64_t k = a.k;
  const float* w = a.panels + panel * k * kPanel;
  Vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = Vec(0.f);
  for (int64_t d = 0; d < k; ++d) {
    Vec wv[NV];
    for (int p = 0; p < NP; ++p)
      for (int v = 0; v < kPanelVectors; ++v)
        wv[p * kPanelVectors + v] = Vec::loadu(w + (p * k + d) * kPanel + v * kLanes);
    for (int i = 0; i < MR; ++i) {
      const Vec xb(x[i * a.x_stride + d]);
      for (int v = 0; v < NV; ++v) acc[i][v] = at::vec::fmadd(xb, wv[v], acc[i][v]);
    }
  }
  const int64_t n0 = panel * kPanel;
  const int64_t valid = std::min<int64_t>(NP * kPanel, a.n - n0);
  for (int i = 0; i < MR; ++i) {
    float* row = y + i * a.n;
    if (valid == NP * kPanel) {
      for (int v = 0; v < NV; ++v) {
        Vec out = acc[i][v];
        if (a.bias) out = out + Vec::loadu(a.bias + n0 + v * kLanes);
        out.store(row + v * kLanes);
      }
    } else {  // the last panel runs past N: through a buffer
      alignas(64) float lanes[NP * kPanel];
      for (int v = 0; v < NV; ++v) acc[i][v].store(lanes + v * kLanes);
      for (int64_t j = 0; j < valid; ++j) row[j] = lanes[j] + (a.bias ? a.bias[n0 + j] : 0.f);
    }
  }
}

/// Rows [m0, m1) times NP panels from panel: full tiles, then the rest in halving tiles.
template <int NP>
void rows(const LinearArgs& a, int64_t panel, int64_t m0, int64_t m1) {
  const int64_t n0 = panel * kPanel;
  int64_t m = m0;
  auto run = [&]<int MR>() {
    tile<MR, NP>(a, a.x + m * a.x_stride, panel, a.y + m * a.n + n0);
    m += MR;
  };
  while (m + kTileRows <= m1) run.template operator()<kTileRows>();
  if constexpr (kTileRows > 8) {
    if (m + 8 <= m1) run.template operator()<8>();
  }
  if constexpr (kTileRows > 4) {
    if (m + 4 <= m1) run.template operator()<4>();
  }
  if (m + 2 <= m1) run.template operator()<2>();
  if (m < m1) run.template operator()<1>();
}

}  // namespace

void panel_linear(const LinearArgs& args) {
  const int64_t panels = (args.n + kPanel - 1) / kPanel;
  const int64_t groups = (panels + kTilePanels - 1) / kTilePanels;
  const int64_t chunks = (args.m + kRowChunk - 1) / kRowChunk;
  // Task t: panel group t / chunks, row chunk t % chunks (a thread's tasks share panels).
  at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t panel = t / chunks * kTilePanels;
      const int64_t m0 = t % chunks * kRowChunk;
      const int64_t m1 = std::min(args.m, m0 + kRowChunk);
      if (panel + kTilePanels <= panels) {
        rows<kTilePanels>(args, panel, m0, m1);
      } else {
        rows<1>(args, panel, m0, m1);  // an odd panel out
      }
    }
  });
}

}  // namespace prefixserve::cpu::PREFIXSERVE_ISA
