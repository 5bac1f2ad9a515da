// The AMX tile instructions csrc/cpu_linear_kernel.cpp uses, in software, for tests on CPUs
// without AMX: the kernel file built with -DPREFIXSERVE_AMX_EMULATE='"amx_emulation.h"' runs
// its AMX blocking (tile addressing, blocks, remainders, bias, rounding) on these instead.
//
// Semantics after Intel's SDM (TILELOADD, TILESTORED, TILEZERO, TDPBF16PS, LDTILECFG,
// TILERELEASE): eight tiles of up to 16 rows x 64 bytes, shaped by the loaded configuration;
// TDPBF16PS C[m][n] += sum over k of A[m][2k] B[k][2n] + A[m][2k + 1] B[k][2n + 1], bf16
// products in fp32. Every use checks that the tiles are configured and their shapes agree
// (an abort with a message otherwise), so a blocking error cannot pass silently.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace prefixserve_amx_emulation {

extern std::atomic<int64_t> products;  ///< tile dot products run (amx_emulated_op.cpp)

struct Tiles {
  bool configured = false;
  uint8_t rows[8] = {};
  uint16_t colsb[8] = {};
  alignas(64) uint8_t data[8][16][64] = {};
};

inline Tiles& tiles() {
  static thread_local Tiles t;
  return t;
}

inline void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "amx emulation: %s\n", what);
    std::abort();
  }
}

inline void loadconfig(const void* config) {
  const auto* c = static_cast<const uint8_t*>(config);
  require(c[0] == 1, "palette must be 1");
  Tiles& t = tiles();
  for (int i = 0; i < 8; ++i) {
    std::memcpy(&t.colsb[i], c + 16 + 2 * i, 2);
    t.rows[i] = c[48 + i];
    require(t.rows[i] <= 16 && t.colsb[i] <= 64 && t.colsb[i] % 4 == 0, "bad tile shape");
  }
  t.configured = true;
}

inline void release() { tiles() = Tiles{}; }

inline uint8_t* tile(int i) {
  require(tiles().configured && i >= 0 && i < 8, "tile used before ldtilecfg");
  return &tiles().data[i][0][0];
}

inline void zero(int i) { std::memset(tile(i), 0, 16 * 64); }

inline void loadd(int i, const void* base, long stride) {
  uint8_t* t = tile(i);
  for (int r = 0; r < tiles().rows[i]; ++r)
    std::memcpy(t + 64 * r, static_cast<const uint8_t*>(base) + r * stride, tiles().colsb[i]);
}

inline void stored(int i, void* base, long stride) {
  const uint8_t* t = tile(i);
  for (int r = 0; r < tiles().rows[i]; ++r)
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, t + 64 * r, tiles().colsb[i]);
}

inline float bf16(const uint8_t* p) {
  uint32_t bits = static_cast<uint32_t>(p[0] | (p[1] << 8)) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline void dpbf16ps(int c, int a, int b) {
  const Tiles& t = tiles();
  const int m_rows = t.rows[c], n_cols = t.colsb[c] / 4, k_pairs = t.colsb[a] / 4;
  require(t.rows[a] == m_rows && t.rows[b] == k_pairs && t.colsb[b] / 4 == n_cols,
          "tdpbf16ps: tile shapes do not agree");
  products.fetch_add(1, std::memory_order_relaxed);
  uint8_t* cc = tile(c);
  const uint8_t* aa = tile(a);
  const uint8_t* bb = tile(b);
  for (int m = 0; m < m_rows; ++m) {
    for (int n = 0; n < n_cols; ++n) {
      float acc;
      std::memcpy(&acc, cc + 64 * m + 4 * n, 4);
      for (int k = 0; k < k_pairs; ++k) {
        acc += bf16(aa + 64 * m + 4 * k) * bf16(bb + 64 * k + 4 * n);
        acc += bf16(aa + 64 * m + 4 * k + 2) * bf16(bb + 64 * k + 4 * n + 2);
      }
      std::memcpy(cc + 64 * m + 4 * n, &acc, 4);
    }
  }
}

}  // namespace prefixserve_amx_emulation

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#define _tile_loadconfig(config) prefixserve_amx_emulation::loadconfig(config)
#define _tile_release() prefixserve_amx_emulation::release()
#define _tile_zero(t) prefixserve_amx_emulation::zero(t)
#define _tile_loadd(t, base, stride) prefixserve_amx_emulation::loadd(t, base, stride)
#define _tile_stored(t, base, stride) prefixserve_amx_emulation::stored(t, base, stride)
#define _tile_dpbf16ps(c, a, b) prefixserve_amx_emulation::dpbf16ps(c, a, b)
