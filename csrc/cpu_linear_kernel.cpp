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
// bf16 runs the same tiles on panels of input pairs (cpu_linear.h), so a decode step streams
// half the bytes of fp32. With AVX512-BF16, one vdpbf16ps per panel and row multiplies a pair
// of bf16 inputs (one 32-bit broadcast of x, read as bf16 where it lies) by the panel's 16
// weight pairs and adds both products to fp32 accumulators. Elsewhere the rows are widened to
// fp32 once per call and each weight vector is widened in registers (a bf16 is the top half
// of an fp32: a shift or a mask), two FMAs per pair. Outputs are rounded to bf16 once, after
// the bias, as F.linear's.
//
// With AMX (the amx build), bf16 rows in blocks of 16 or 32 times one or two panels run on
// tiles: a panel's 16 pair-rows of 64 bytes are exactly the B operand of tdpbf16ps (no
// repacking), x's rows the A operand where they lie, and up to four 16 x 16 fp32 accumulator
// tiles stay in the tile registers along K. Rows past the last full block, and K not a multiple
// of 32, run on the vdpbf16ps tiles. The AMX blocking is tested on any AVX2 CPU by building
// this file against a software emulation of the tile instructions (tests/kernels/
// test_cpu_linear.py, amx_emulation.h); the instructions themselves run only where a CPU has
// them.
//
// Reference: torch.nn.functional.linear (with W = the panels unpacked).

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_linear.h"

#if defined(PREFIXSERVE_AMX_EMULATE)
#include PREFIXSERVE_AMX_EMULATE  // tests: the tile instructions in software
#endif

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
#if defined(__AMX_BF16__) || defined(PREFIXSERVE_AMX_EMULATE)
constexpr int64_t kRowChunk = 256;  ///< rows per task once there are more: whole AMX blocks
#else
constexpr int64_t kRowChunk = 20 * kTileRows;  ///< rows per task once there are more
#endif
#if defined(__AVX512BF16__)
constexpr bool kDotBf16 = true;  ///< vdpbf16ps: x stays bf16
#else
constexpr bool kDotBf16 = false;  ///< x widened to fp32 once per call
#endif

/// The rows of x a tile reads: x itself (fp32, or bf16 for vdpbf16ps), or its fp32 copy (bf16
/// without vdpbf16ps).
struct Rows {
  const void* x;
  int64_t stride;
};

/// acc[MR][NP * kPanelVectors] = x[MR rows] W^T over all K, fp32 panels.
template <int MR, int NP>
inline void accumulate(const LinearArgs& a, const float* x, int64_t stride, int64_t panel,
                       Vec (&acc)[MR][NP * kPanelVectors]) {
  constexpr int NV = NP * kPanelVectors;
  const int64_t k = a.k;
  const float* w = static_cast<const float*>(a.panels) + panel * k * kPanel;
  Vec sums[MR][NV];  // local, so that they live in registers whether or not this is inlined
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) sums[i][v] = acc[i][v];
  for (int64_t d = 0; d < k; ++d) {
    Vec wv[NV];
    for (int p = 0; p < NP; ++p)
      for (int v = 0; v < kPanelVectors; ++v)
        wv[p * kPanelVectors + v] = Vec::loadu(w + (p * k + d) * kPanel + v * kLanes);
    for (int i = 0; i < MR; ++i) {
      const Vec xb(x[i * stride + d]);
      for (int v = 0; v < NV; ++v) sums[i][v] = at::vec::fmadd(xb, wv[v], sums[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = sums[i][v];
}

/// Widens kLanes weight pairs (one vector of 32-bit lanes, each an (even, odd) pair of bf16
/// inputs' weights) to the even inputs' and the odd inputs' fp32 weights.
inline void widen_pairs(const uint16_t* pairs, Vec& even, Vec& odd) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i raw = _mm512_loadu_si512(pairs);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(0xFFFF0000)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(0xFFFF0000)));
#else
  alignas(64) float e[kLanes], o[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    e[j] = c10::detail::f32_from_bits(pairs[2 * j]);
    o[j] = c10::detail::f32_from_bits(pairs[2 * j + 1]);
  }
  even = Vec::loadu(e);
  odd = Vec::loadu(o);
#endif
}

/// acc[MR][NP * kPanelVectors] = x[MR rows] W^T over all K, bf16 panels, x widened to fp32.
template <int MR, int NP>
inline void accumulate_widened(const LinearArgs& a, const float* x, int64_t stride,
                               int64_t panel, Vec (&acc)[MR][NP * kPanelVectors]) {
  constexpr int NV = NP * kPanelVectors;
  const int64_t pairs = (a.k + 1) / 2, full = a.k / 2;
  const uint16_t* w = static_cast<const uint16_t*>(a.panels) + panel * pairs * 2 * kPanel;
  auto weights = [&](int64_t d, Vec (&even)[NV], Vec (&odd)[NV]) {
    for (int p = 0; p < NP; ++p)
      for (int v = 0; v < kPanelVectors; ++v)
        widen_pairs(w + ((p * pairs + d) * kPanel + v * kLanes) * 2, even[p * kPanelVectors + v],
                    odd[p * kPanelVectors + v]);
  };
  Vec sums[MR][NV];  // local, so that they live in registers whether or not this is inlined
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) sums[i][v] = acc[i][v];
  for (int64_t d = 0; d < full; ++d) {
    Vec even[NV], odd[NV];
    weights(d, even, odd);
    for (int i = 0; i < MR; ++i) {
      const Vec xe(x[i * stride + 2 * d]), xo(x[i * stride + 2 * d + 1]);
      for (int v = 0; v < NV; ++v)
        sums[i][v] = at::vec::fmadd(xo, odd[v], at::vec::fmadd(xe, even[v], sums[i][v]));
    }
  }
  if (full < pairs) {  // odd K: the last input alone
    Vec even[NV], odd[NV];
    weights(full, even, odd);
    for (int i = 0; i < MR; ++i) {
      const Vec xe(x[i * stride + 2 * full]);
      for (int v = 0; v < NV; ++v) sums[i][v] = at::vec::fmadd(xe, even[v], sums[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = sums[i][v];
}

#if defined(__AVX512BF16__)
/// acc[MR][NP] = x[MR rows] W^T over all K, bf16 panels and bf16 x, by vdpbf16ps. Tiles of
/// one to four rows keep U > 1 partial sums per output, over interleaved pairs, so that the
/// instruction's latency is not the loop's (each sum's next vdpbf16ps waits for its last).
template <int MR, int NP>
inline void accumulate_dot(const LinearArgs& a, const uint16_t* x, int64_t stride,
                           int64_t panel, Vec (&acc)[MR][NP * kPanelVectors]) {
  static_assert(kPanelVectors == 1, "vdpbf16ps runs on AVX-512 vectors");
  constexpr int U = MR <= 2 ? 4 : MR <= 4 ? 2 : 1;
  const int64_t pairs = (a.k + 1) / 2, full = a.k / 2;
  const uint16_t* w = static_cast<const uint16_t*>(a.panels) + panel * pairs * 2 * kPanel;
  __m512 sums[U][MR][NP];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < MR; ++i)
      for (int p = 0; p < NP; ++p) sums[u][i][p] = _mm512_setzero_ps();
  auto step = [&](int u, int64_t d, auto&& pair_of_row) {
    __m512bh wv[NP];
    for (int p = 0; p < NP; ++p)
      wv[p] = (__m512bh)_mm512_loadu_si512(w + (p * pairs + d) * 2 * kPanel);
    for (int i = 0; i < MR; ++i) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair_of_row(i, d));
      for (int p = 0; p < NP; ++p) sums[u][i][p] = _mm512_dpbf16_ps(sums[u][i][p], xb, wv[p]);
    }
  };
  auto pair = [&](int i, int64_t d) {
    int32_t bits;
    std::memcpy(&bits, x + i * stride + 2 * d, sizeof(bits));
    return bits;
  };
  int64_t d = 0;
  for (; d + U <= full; d += U)
    for (int u = 0; u < U; ++u) step(u, d + u, pair);
  for (; d < full; ++d) step(0, d, pair);
  if (full < pairs) {  // odd K: the last input pairs with 0 (never with x's next element)
    step(0, full, [&](int i, int64_t) { return static_cast<int32_t>(x[i * stride + 2 * full]); });
  }
  for (int i = 0; i < MR; ++i) {
    for (int p = 0; p < NP; ++p) {
      __m512 total = sums[0][i][p];
      for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, sums[u][i][p]);
      acc[i][p] = total;
    }
  }
}
#endif

#if defined(__AMX_BF16__) || defined(PREFIXSERVE_AMX_EMULATE)
#define PREFIXSERVE_AMX 1

constexpr int64_t kAmxRows = 16;  ///< rows of an A or C tile
constexpr int64_t kAmxK = 32;     ///< inputs per A tile row (64 bytes of bf16)

/// Every tile 16 rows x 64 bytes: C 16 x 16 fp32, A 16 rows x 32 bf16, B 16 pair-rows x 16
/// features (a panel's rows).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

/// y[m .. m + 16, panel's features] = c (a stored 16 x 16 fp32 tile) + bias, rounded to bf16.
inline void store_tile(const LinearArgs& a, float* c, int64_t m, int64_t panel) {
  const int64_t n0 = panel * kPanel;
  const int64_t valid = std::min<int64_t>(kPanel, a.n - n0);
  const auto* bias = static_cast<const c10::BFloat16*>(a.bias);
  for (int64_t i = 0; i < kAmxRows; ++i) {
    float* row = c + i * kPanel;
    if (bias)
      for (int64_t j = 0; j < valid; ++j) row[j] += static_cast<float>(bias[n0 + j]);
    at::vec::convert(row, static_cast<c10::BFloat16*>(a.y) + (m + i) * a.n + n0, valid);
  }
}

/// Rows [m, m + 16 MB) times panels [panel, panel + NB) on AMX tiles (MB, NB in {1, 2}; tiles
/// configured; K % 32 == 0). Tiles: C 0-3 (row block i, panel j: 2i + j), A 4-5, B 6-7.
template <int MB, int NB>
void amx_block(const LinearArgs& a, int64_t m, int64_t panel) {
  const int64_t pairs = a.k / 2;
  const long x_bytes = static_cast<long>(a.x_stride * 2);
  const uint16_t* x0 = static_cast<const uint16_t*>(a.x) + m * a.x_stride;
  const uint16_t* x1 = x0 + kAmxRows * a.x_stride;
  const uint16_t* w0 = static_cast<const uint16_t*>(a.panels) + panel * pairs * 2 * kPanel;
  const uint16_t* w1 = w0 + pairs * 2 * kPanel;
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (MB > 1) _tile_zero(2);
  if constexpr (MB > 1 && NB > 1) _tile_zero(3);
  for (int64_t k = 0; k < a.k; k += kAmxK) {  // a B tile: pair-rows k / 2 .. k / 2 + 15
    _tile_loadd(4, x0 + k, x_bytes);
    _tile_loadd(6, w0 + k * kPanel, 64);
    if constexpr (MB > 1) _tile_loadd(5, x1 + k, x_bytes);
    if constexpr (NB > 1) _tile_loadd(7, w1 + k * kPanel, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MB > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MB > 1 && NB > 1) _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float c[kAmxRows * kPanel];
  _tile_stored(0, c, 64);
  store_tile(a, c, m, panel);
  if constexpr (NB > 1) {
    _tile_stored(1, c, 64);
    store_tile(a, c, m, panel + 1);
  }
  if constexpr (MB > 1) {
    _tile_stored(2, c, 64);
    store_tile(a, c, m + kAmxRows, panel);
  }
  if constexpr (MB > 1 && NB > 1) {
    _tile_stored(3, c, 64);
    store_tile(a, c, m + kAmxRows, panel + 1);
  }
}

/// The rows of [m0, m1) in whole 16-row blocks on AMX; returns the first row left.
template <int NP>
int64_t amx_rows(const LinearArgs& a, int64_t panel, int64_t m0, int64_t m1) {
  if (!a.bf16 || a.k % kAmxK != 0 || m1 - m0 < kAmxRows) return m0;
  configure_tiles();
  int64_t m = m0;
  for (; m + 2 * kAmxRows <= m1; m += 2 * kAmxRows) amx_block<2, NP>(a, m, panel);
  if (m + kAmxRows <= m1) {
    amx_block<1, NP>(a, m, panel);
    m += kAmxRows;
  }
  _tile_release();
  return m;
}
#endif

/// y[MR rows, NP panels' features from panel] = x[MR rows] W^T (+ bias), in y's dtype.
template <int MR, int NP>
inline void tile(const LinearArgs& a, const Rows& x, int64_t panel, int64_t m) {
  constexpr int NV = NP * kPanelVectors;
  Vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = Vec(0.f);
  if (!a.bf16) {
    accumulate<MR, NP>(a, static_cast<const float*>(x.x) + m * x.stride, x.stride, panel, acc);
  } else if constexpr (kDotBf16) {
#if defined(__AVX512BF16__)
    accumulate_dot<MR, NP>(a, static_cast<const uint16_t*>(x.x) + m * x.stride, x.stride, panel,
                           acc);
#endif
  } else {
    accumulate_widened<MR, NP>(a, static_cast<const float*>(x.x) + m * x.stride, x.stride,
                               panel, acc);
  }
  const int64_t n0 = panel * kPanel;
  const int64_t valid = std::min<int64_t>(NP * kPanel, a.n - n0);
  for (int i = 0; i < MR; ++i) {
    alignas(64) float out[NP * kPanel];
    for (int v = 0; v < NV; ++v) acc[i][v].store(out + v * kLanes);
    const int64_t row = (m + i) * a.n + n0;
    if (!a.bf16) {
      float* y = static_cast<float*>(a.y) + row;
      const float* bias = a.bias ? static_cast<const float*>(a.bias) + n0 : nullptr;
      if (valid == NP * kPanel) {
        for (int v = 0; v < NV; ++v) {
          Vec o = Vec::loadu(out + v * kLanes);
          if (bias) o = o + Vec::loadu(bias + v * kLanes);
          o.store(y + v * kLanes);
        }
      } else {  // the last panel runs past N
        for (int64_t j = 0; j < valid; ++j) y[j] = out[j] + (bias ? bias[j] : 0.f);
      }
    } else {
      auto* y = static_cast<c10::BFloat16*>(a.y) + row;
      if (a.bias) {
        const auto* bias = static_cast<const c10::BFloat16*>(a.bias) + n0;
        for (int64_t j = 0; j < valid; ++j) out[j] += static_cast<float>(bias[j]);
      }
      at::vec::convert(out, y, valid);
    }
  }
}

/// Rows [m0, m1) times NP panels from panel: full tiles, then the rest in halving tiles.
template <int NP>
void rows(const LinearArgs& a, const Rows& x, int64_t panel, int64_t m0, int64_t m1) {
#if defined(PREFIXSERVE_AMX)
  int64_t m = amx_rows<NP>(a, panel, m0, m1);
#else
  int64_t m = m0;
#endif
  auto run = [&]<int MR>() {
    tile<MR, NP>(a, x, panel, m);
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

/// x as the tiles read it: fp32 as given, bf16 as given for vdpbf16ps, else widened into
/// `widened` ([M, K] fp32).
Rows rows_of(const LinearArgs& a, std::vector<float>& widened) {
  if (!a.bf16 || kDotBf16) return {a.x, a.x_stride};
  widened.resize(static_cast<size_t>(a.m * a.k));
  const auto* x = static_cast<const c10::BFloat16*>(a.x);
  at::parallel_for(0, a.m, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      at::vec::convert(x + i * a.x_stride, widened.data() + i * a.k, a.k);
  });
  return {widened.data(), a.k};
}

}  // namespace

void panel_linear(const LinearArgs& args) {
  std::vector<float> widened;
  const Rows x = rows_of(args, widened);
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
        rows<kTilePanels>(args, x, panel, m0, m1);
      } else {
        rows<1>(args, x, panel, m0, m1);  // an odd panel out
      }
    }
  });
}

}  // namespace prefixserve::cpu::PREFIXSERVE_ISA
