// The CPU attention kernel, compiled once per instruction set: kernels/cpu_build.py builds this
// file with -DPREFIXSERVE_ISA=<name> -DCPU_CAPABILITY=<...> and that ISA's -m flags, so
// at::vec::Vectorized<float> is 8 lanes of plain x86-64 code, AVX2 or 16 lanes of AVX-512.
//
// Work comes as tiles (planned once per step by prefixserve.kernels.cpu_plan), each run for
// every kv head h:
//   * prefix tile: the queries of several requests that share one adapter prefix, times the
//     query heads of h, against the prefix keys (all visible); it leaves its partial softmax
//     state (running max, sum and unnormalized output) per (token, head) in `state`;
//   * query tile: up to 32 queries of one request, times the query heads of h, against its
//     prefix (unless a prefix tile did that: it then continues from that state, which is the
//     log-sum-exp merge of the two partial results) and its own keys (causal).
// Keys and values are read where they lie in the paged pool; only the keys a request may see
// are ever loaded (never a padded block-table entry, never past a prefix or own length).
//
// Layout: a tile keeps its rows (token x head pairs) as the fast dimension of every buffer, so
// each vector instruction serves kLanes rows: S^T = K Q^T is a broadcast of one key element
// times a vector of rows, the softmax runs across rows, and O^T += V^T P^T likewise.
//
// Few rows (a decode's query heads of one kv head, GQA 3 in the default model, would fill 3 of
// 16 lanes) of bf16 caches on AVX512-BF16 run row by row instead (attend_rowwise): a score
// is a dot product along the head dimension by vdpbf16ps on the K row where it lies (no fp32
// staging), 16 keys' partial sums are reduced by one transpose-add; values accumulate in fp32
// with the head dimension as lanes. fp32 accumulation throughout; probabilities stay fp32.
// Larger tiles of bf16 caches there (prefix tiles, prefill) keep the row-vector layout with
// their scores by vdpbf16ps on pairs of head dims (attend_pairs): K is read where it lies.
//
// Reference: prefixserve.kernels.reference.paged_prefix_attention.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_attention.h"

#ifndef PREFIXSERVE_ISA
#error "compile once per instruction set with -DPREFIXSERVE_ISA=<name> (kernels/cpu_build.py)"
#endif

namespace prefixserve::cpu::PREFIXSERVE_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kChunk = 32;  ///< keys per online-softmax step
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kAllVisible = std::numeric_limits<float>::infinity();
constexpr int kToL2 = 2;             ///< __builtin_prefetch locality (prefetcht1)
constexpr int64_t kTaskPrefetch = 128;  ///< keys of the next task prefetched ahead of it

/// The working set of one tile. Rows are (query token, query head) pairs of one kv head,
/// `group` consecutive rows per token, padded to whole vectors; row-minor layouts throughout.
struct Tile {
  int64_t rows;
  int64_t padded;
  int64_t min_limit;  ///< smallest causal limit of a real row
  float* q;           ///< [D][padded] queries times the softmax scale
  float* acc;         ///< [D][padded] unnormalized outputs
  float* max;         ///< [padded] running maxima
  float* sum;         ///< [padded] running denominators
  float* alpha;       ///< [padded] rescale of the accumulators for the current chunk
  float* limit;       ///< [padded] own keys each row may see (causal)
  float* scores;      ///< [kChunk][padded] scores, then probabilities, of the current chunk
  float* stage;       ///< [2][kChunk][D] fp32 copies of a chunk's K, V rows (16-bit caches)
  int32_t* tokens;    ///< query token of each group of `group` rows
  float scale;        ///< applied to scores in softmax_step (1 where q holds it already)
};

/// Per-thread scratch, sized once per call for the largest tile.
class Scratch {
 public:
  Scratch(int64_t max_rows, int64_t dim)
      : dim_(dim),
        floats_(static_cast<size_t>(
            (2 * dim + kChunk + 4) * padded(max_rows) + 2 * kChunk * dim)),
        tokens_(static_cast<size_t>(padded(max_rows))) {}

  static int64_t padded(int64_t rows) { return (rows + kLanes - 1) / kLanes * kLanes; }

  Tile tile(int64_t rows) {
    const int64_t p = padded(rows);
    float* f = floats_.data();
    Tile t;
    t.rows = rows;
    t.padded = p;
    t.min_limit = 0;
    t.q = f;
    t.acc = t.q + dim_ * p;
    t.max = t.acc + dim_ * p;
    t.sum = t.max + p;
    t.alpha = t.sum + p;
    t.limit = t.alpha + p;
    t.scores = t.limit + p;
    t.stage = t.scores + kChunk * p;
    t.tokens = tokens_.data();
    t.scale = 1.f;
    return t;
  }

 private:
  int64_t dim_;
  std::vector<float> floats_;
  std::vector<int32_t> tokens_;
};

/// Runs tasks 0..n-1 on the intra-op threads. Each thread takes the next index as it finishes a
/// task (tiles are planned longest first) and claims its following task one ahead, so that
/// `prefetch(following)` can bring that task's first keys towards the core meanwhile.
template <typename Prefetch, typename Run>
void for_each_task(int64_t n, int64_t max_rows, int64_t dim, const Prefetch& prefetch,
                   const Run& run) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch scratch(max_rows, dim);
    for (int64_t i = next++; i < n;) {
      const int64_t following = next++;
      if (following < n) prefetch(following);
      run(i, scratch);
      i = following;
    }
  });
}

template <typename T>
void to_float(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (!std::is_same_v<T, float>) {
    using VecT = at::vec::Vectorized<T>;
    for (; i + VecT::size() <= n; i += VecT::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VecT::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + kLanes);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// ---- Micro-kernels: NK keys (or ND head dims) by NR vectors of rows, held in registers. ----
// Eight accumulators keep both FMA pipes busy; callers guarantee dim >= 1 and n >= 1.

/// scores[k][r] = sum_d keys[k][d] * q[d][r] for NK keys and NR * kLanes rows.
template <int NK, int NR>
inline void score_block(const float* const* keys, const float* q, int64_t stride, int64_t dim,
                        float* scores) {
  Vec acc[NK][NR];
  for (int k = 0; k < NK; ++k)
    for (int r = 0; r < NR; ++r) acc[k][r] = Vec(0.f);
  int64_t d = 0;
  do {
    Vec qv[NR];
    for (int r = 0; r < NR; ++r) qv[r] = Vec::loadu(q + d * stride + r * kLanes);
    for (int k = 0; k < NK; ++k) {
      const Vec kd(keys[k][d]);
      for (int r = 0; r < NR; ++r) acc[k][r] = at::vec::fmadd(kd, qv[r], acc[k][r]);
    }
  } while (++d < dim);
  for (int k = 0; k < NK; ++k)
    for (int r = 0; r < NR; ++r) acc[k][r].store(scores + k * stride + r * kLanes);
}

/// acc[d][r] = alpha[r] * acc[d][r] + sum_j values[j][d0 + d] * probs[j][r], ND dims by NR
/// vectors of rows.
template <int ND, int NR>
inline void value_block(const float* const* values, int64_t n, const float* probs,
                        const float* alpha, int64_t stride, int64_t d0, float* acc) {
  Vec out[ND][NR];
  for (int r = 0; r < NR; ++r) {
    const Vec a = Vec::loadu(alpha + r * kLanes);
    for (int d = 0; d < ND; ++d) out[d][r] = Vec::loadu(acc + d * stride + r * kLanes) * a;
  }
  int64_t j = 0;
  do {
    Vec p[NR];
    for (int r = 0; r < NR; ++r) p[r] = Vec::loadu(probs + j * stride + r * kLanes);
    for (int d = 0; d < ND; ++d) {
      const Vec vd(values[j][d0 + d]);
      for (int r = 0; r < NR; ++r) out[d][r] = at::vec::fmadd(vd, p[r], out[d][r]);
    }
  } while (++j < n);
  for (int d = 0; d < ND; ++d)
    for (int r = 0; r < NR; ++r) out[d][r].store(acc + d * stride + r * kLanes);
}

/// One strip of NR vectors of rows (starting at row r) against all n keys of the chunk: the
/// strip's queries and the chunk's keys stay in L1 across the whole strip.
template <int NK, int NR>
void score_strip(const Tile& t, const float* const* keys, int64_t n, int64_t dim, int64_t r) {
  int64_t j = 0;
  for (; j + NK <= n; j += NK)
    score_block<NK, NR>(keys + j, t.q + r, t.padded, dim, t.scores + j * t.padded + r);
  for (; j < n; ++j)
    score_block<1, NR>(keys + j, t.q + r, t.padded, dim, t.scores + j * t.padded + r);
}

/// S^T[j][r] = k_j . q_r for the chunk's n keys.
void compute_scores(const Tile& t, const float* const* keys, int64_t n, int64_t dim) {
  int64_t r = 0;
  for (; r + 3 * kLanes <= t.padded; r += 3 * kLanes) score_strip<4, 3>(t, keys, n, dim, r);
  for (; r < t.padded; r += kLanes) score_strip<8, 1>(t, keys, n, dim, r);
}

template <int ND, int NR>
void value_strip(const Tile& t, const float* const* values, int64_t n, int64_t dim, int64_t r) {
  const float* probs = t.scores + r;
  const float* alpha = t.alpha + r;
  int64_t d = 0;
  for (; d + ND <= dim; d += ND)
    value_block<ND, NR>(values, n, probs, alpha, t.padded, d, t.acc + d * t.padded + r);
  for (; d < dim; ++d)
    value_block<1, NR>(values, n, probs, alpha, t.padded, d, t.acc + d * t.padded + r);
}

/// O^T = alpha * O^T + V^T P^T for the chunk's n values.
void accumulate_values(const Tile& t, const float* const* values, int64_t n, int64_t dim) {
  int64_t r = 0;
  for (; r + 3 * kLanes <= t.padded; r += 3 * kLanes) value_strip<4, 3>(t, values, n, dim, r);
  for (; r < t.padded; r += kLanes) value_strip<8, 1>(t, values, n, dim, r);
}

/// Scores of own keys first..first+n-1 beyond a row's causal limit become -inf. A select, not
/// a multiplication: whatever a score holds, the masked probability is exactly 0.
void mask_causal(const Tile& t, int64_t first, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const Vec key(static_cast<float>(first + j));
    float* s = t.scores + j * t.padded;
    for (int64_t r = 0; r < t.padded; r += kLanes) {
      const Vec hidden = key >= Vec::loadu(t.limit + r);
      Vec::blendv(Vec::loadu(s + r), Vec(kNegInf), hidden).store(s + r);
    }
  }
}

/// One online-softmax step across rows: new maxima, scores -> probabilities, sums, and the
/// factor alpha = exp(old max - new max) that rescales the accumulators.
void softmax_step(const Tile& t, int64_t n) {
  if (t.scale != 1.f) {  // bf16 pair tiles: q . k unscaled (masked -inf stays -inf)
    const Vec scale(t.scale);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t r = 0; r < t.padded; r += kLanes) {
        float* s = t.scores + j * t.padded + r;
        (Vec::loadu(s) * scale).store(s);
      }
  }
  for (int64_t r = 0; r < t.padded; r += kLanes) {
    const Vec old_max = Vec::loadu(t.max + r);
    Vec m = old_max;
    for (int64_t j = 0; j < n; ++j) m = at::vec::maximum(m, Vec::loadu(t.scores + j * t.padded + r));
    // A row that has seen no visible key yet keeps -inf; subtracting 0 keeps its exp at 0.
    const Vec base = Vec::blendv(m, Vec(0.f), m == Vec(kNegInf));
    Vec sum(0.f);
    for (int64_t j = 0; j < n; ++j) {
      float* s = t.scores + j * t.padded + r;
      const Vec p = (Vec::loadu(s) - base).exp_u20();
      p.store(s);
      sum = sum + p;
    }
    const Vec alpha = (old_max - base).exp_u20();
    at::vec::fmadd(Vec::loadu(t.sum + r), alpha, sum).store(t.sum + r);
    m.store(t.max + r);
    alpha.store(t.alpha + r);
  }
}

#if defined(__AVX512BF16__)
constexpr int64_t kRowwiseRows = 8;  ///< tiles of up to this many rows run row by row

/// The 16 lanes of out[j] = sum of v[j]'s lanes, for 16 vectors: one transpose-add (45
/// shuffles and adds) instead of 16 horizontal reductions.
inline __m512 sum_lanes16(const __m512 (&v)[16]) {
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit block: [a0+a2, b0+b2, a1+a3, b1+b3]
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per block: the four keys 4i..4i+3, partial over the block
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)  // blocks: [y0 b0+b2, y0 b1+b3, y1 b0+b2, y1 b1+b3]
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88),
                       _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

/// out[j] = q . k_j for n <= kChunk keys (bf16 rows of dim % 32 == 0), 0 past n.
inline void dot_scores(const c10::BFloat16* q, const c10::BFloat16* const* keys, int64_t n,
                       int64_t dim, float* out) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    __m512 acc[16];
    for (int jj = 0; jj < 16; ++jj) {
      acc[jj] = _mm512_setzero_ps();
      if (j0 + jj >= n) continue;
      const c10::BFloat16* k = keys[j0 + jj];
      for (int64_t d = 0; d < dim; d += 32) {
        acc[jj] = _mm512_dpbf16_ps(acc[jj], (__m512bh)_mm512_loadu_si512(q + d),
                                   (__m512bh)_mm512_loadu_si512(k + d));
      }
    }
    _mm512_storeu_ps(out + j0, sum_lanes16(acc));
  }
}

/// 16 bf16 -> 16 fp32 (exact).
inline __m512 widen16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

/// acc[i][d0 .. d0 + 64) = alpha_i acc[i][...] + sum_j probs[i][j] v_j[d0 .. d0 + 64) for RB
/// rows; acc row-major [rows][dim], probs [rows][kChunk].
template <int RB>
inline void value_rows(const c10::BFloat16* const* values, int64_t n, const float* probs,
                       const float* alpha, int64_t dim, int64_t d0, float* acc) {
  __m512 out[RB][4];
  for (int i = 0; i < RB; ++i) {
    const __m512 a = _mm512_set1_ps(alpha[i]);
    for (int v = 0; v < 4; ++v)
      out[i][v] = _mm512_mul_ps(_mm512_loadu_ps(acc + i * dim + d0 + 16 * v), a);
  }
  for (int64_t j = 0; j < n; ++j) {
    __m512 vv[4];
    for (int v = 0; v < 4; ++v) vv[v] = widen16(values[j] + d0 + 16 * v);
    for (int i = 0; i < RB; ++i) {
      const __m512 p = _mm512_set1_ps(probs[i * kChunk + j]);
      for (int v = 0; v < 4; ++v) out[i][v] = _mm512_fmadd_ps(p, vv[v], out[i][v]);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(acc + i * dim + d0 + 16 * v, out[i][v]);
}
#else
constexpr int64_t kRowwiseRows = 0;
#endif

#if defined(__AVX512BF16__)
// ---- bf16 pair tiles (row-vector tiles of bf16 caches on AVX512-BF16): scores by vdpbf16ps
// on pairs of head dims, K read where it lies; values as in fp32. ----

/// scores[k][r] = sum_i qp[i][r] . (keys[k][2i], keys[k][2i + 1]) for NK keys and NR vectors of
/// rows; qp [dim / 2][stride] bf16 pairs of the queries' head dims.
template <int NK, int NR>
inline void score_block_pairs(const c10::BFloat16* const* keys, const int32_t* qp, int64_t stride,
                              int64_t pairs, float* scores) {
  __m512 acc[NK][NR];
  for (int k = 0; k < NK; ++k)
    for (int r = 0; r < NR; ++r) acc[k][r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < pairs; ++i) {
    __m512bh qv[NR];
    for (int r = 0; r < NR; ++r) qv[r] = (__m512bh)_mm512_loadu_si512(qp + i * stride + 16 * r);
    for (int k = 0; k < NK; ++k) {
      int32_t bits;
      std::memcpy(&bits, keys[k] + 2 * i, sizeof(bits));
      const __m512bh kb = (__m512bh)_mm512_set1_epi32(bits);
      for (int r = 0; r < NR; ++r) acc[k][r] = _mm512_dpbf16_ps(acc[k][r], qv[r], kb);
    }
  }
  for (int k = 0; k < NK; ++k)
    for (int r = 0; r < NR; ++r) _mm512_storeu_ps(scores + k * stride + 16 * r, acc[k][r]);
}
#endif

template <typename T>
class Attention {
 public:
  explicit Attention(const AttentionArgs& a)
      : a_(a),
        group_(a.num_q_heads / a.num_kv_heads),
        dim_(a.head_dim),
        token_stride_(a.num_kv_heads * a.head_dim),
        block_stride_(a.block_size * a.num_kv_heads * a.head_dim),
        k_(static_cast<const T*>(a.k_cache)),
        v_(static_cast<const T*>(a.v_cache)) {}

  void run() const {
    const int64_t heads = a_.num_kv_heads;
    const int64_t rows = a_.max_tile_tokens * group_;
    for_each_task(
        a_.num_prefix_tiles * heads, rows, dim_,
        [&](int64_t i) { prefetch_prefix_tile(i / heads, i % heads); },
        [&](int64_t i, Scratch& s) { prefix_tile(s, i / heads, i % heads); });
    for_each_task(
        a_.num_query_tiles * heads, rows, dim_,
        [&](int64_t i) { prefetch_query_tile(i / heads, i % heads); },
        [&](int64_t i, Scratch& s) { query_tile(s, i / heads, i % heads); });
  }

 private:
  /// Queries of several requests against their shared prefix; leaves the partial state.
  void prefix_tile(Scratch& scratch, int64_t index, int64_t kv_head) const {
    const int32_t* tile = a_.prefix_tiles + index * kPrefixTileCols;
    const int64_t prefix = tile[0], begin = tile[1], end = tile[2];
    Tile t = scratch.tile((end - begin) * group_);
    std::copy(a_.prefix_tokens + begin, a_.prefix_tokens + end, t.tokens);
    std::fill(t.limit, t.limit + t.padded, kAllVisible);
    load_queries(t, kv_head);
    reset_state(t);
    attend(t, prefix_table(prefix), a_.prefix_lens[prefix], kv_head, false);
    store_state(t, kv_head);
  }

  /// Up to a tile of one request's queries against its prefix (or the group's state) and its
  /// own keys, causally; writes the output.
  void query_tile(Scratch& scratch, int64_t index, int64_t kv_head) const {
    const int32_t* tile = a_.query_tiles + index * kQueryTileCols;
    const int64_t request = tile[0], first = tile[1], count = tile[2];
    const int64_t q_start = a_.cu_q_lens[request];
    const int64_t q_len = a_.cu_q_lens[request + 1] - q_start;
    // Own index of the tile's first query; query i sees own keys 0 .. first_own + i.
    const int64_t first_own = a_.own_lens[request] - q_len + first;
    Tile t = scratch.tile(count * group_);
    t.min_limit = first_own + 1;
    for (int64_t i = 0; i < count; ++i) t.tokens[i] = static_cast<int32_t>(q_start + first + i);
    for (int64_t r = 0; r < t.padded; ++r)
      t.limit[r] = r < t.rows ? static_cast<float>(first_own + r / group_ + 1) : kAllVisible;
    const int32_t* own_table = a_.block_tables + request * a_.block_table_stride;
    // The same order in either layout: the group's state or a fresh one, the prefix unless a
    // prefix tile read it, the own keys (causal), the output.
    auto run = [&](const auto& load_state_of, const auto& attend_over, const auto& store) {
      if (tile[3] == kGroupedPrefix) {
        load_state_of(t);
      } else {
        reset_state(t);
      }
      if (tile[3] == kReadPrefix) {
        const int64_t prefix = a_.prefix_index[request];
        attend_over(prefix_table(prefix), a_.prefix_lens[prefix], false);
      }
      attend_over(own_table, first_own + count, true);
      store(t);
    };
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (rowwise(t)) {
        const c10::BFloat16* q[kRowwiseRows];
        for (int64_t r = 0; r < t.rows; ++r) q[r] = query_row(r, t, kv_head);
        return run(
            [&](const Tile& s) { load_state_rowwise(s, kv_head); },
            [&](const int32_t* table, int64_t len, bool causal) {
              attend_rowwise(t, q, table, len, kv_head, causal);
            },
            [&](const Tile& s) { store_output_rowwise(s, kv_head); });
      }
    }
#endif
    load_queries(t, kv_head);
    run([&](const Tile& s) { load_state(s, kv_head); },
        [&](const int32_t* table, int64_t len, bool causal) {
          attend(t, table, len, kv_head, causal);
        },
        [&](const Tile& s) { store_output(s, kv_head); });
  }

#if defined(__AVX512BF16__)
  /// Whether a query tile runs row by row: bf16 caches, few rows, whole 64-dim slices.
  bool rowwise(const Tile& t) const {
    return t.rows <= kRowwiseRows && dim_ % 64 == 0;
  }

  /// attend() for a row-by-row tile: acc [rows][dim], scores [rows][kChunk].
  void attend_rowwise(Tile& t, const c10::BFloat16* const* q, const int32_t* table, int64_t len,
                      int64_t kv_head, bool causal) const {
    for_each_chunk(table, len, kv_head, [&](int64_t first, int64_t n, const int64_t* offsets) {
      const T* keys[kChunk];
      const T* values[kChunk];
      rows_in_pool(offsets, n, keys, values);
      for (int64_t r = 0; r < t.rows; ++r) dot_scores(q[r], keys, n, dim_, t.scores + r * kChunk);
      softmax_rows(t, first, n, causal);
      for (int64_t d0 = 0; d0 < dim_; d0 += 64) {
        for (int64_t r = 0; r < t.rows; r += 4) {
          const float* probs = t.scores + r * kChunk;
          float* acc = t.acc + r * dim_;
          switch (std::min<int64_t>(4, t.rows - r)) {
            case 4: value_rows<4>(values, n, probs, t.alpha + r, dim_, d0, acc); break;
            case 3: value_rows<3>(values, n, probs, t.alpha + r, dim_, d0, acc); break;
            case 2: value_rows<2>(values, n, probs, t.alpha + r, dim_, d0, acc); break;
            default: value_rows<1>(values, n, probs, t.alpha + r, dim_, d0, acc);
          }
        }
      }
    });
  }

  /// softmax_step() per row: scale, keys past n or (causal) past a row's limit to -inf, the
  /// new maxima, probabilities, sums and rescale factors.
  void softmax_rows(const Tile& t, int64_t first, int64_t n, bool causal) const {
    const Vec scale(a_.scale);
    for (int64_t r = 0; r < t.rows; ++r) {
      float* s = t.scores + r * kChunk;
      const float limit = causal ? std::min<float>(t.limit[r], first + n) : first + n;
      Vec m(t.max[r]);
      for (int64_t j = 0; j < kChunk; j += kLanes) {
        Vec key = Vec::arange(static_cast<float>(first + j), 1.f);
        Vec v = Vec::blendv(Vec::loadu(s + j) * scale, Vec(kNegInf), key >= Vec(limit));
        v.store(s + j);
        m = at::vec::maximum(m, v);
      }
      const float row_max = at::vec::vec_reduce_all<float>(
          [](const Vec& x, const Vec& y) { return at::vec::maximum(x, y); }, m);
      const float base = row_max == kNegInf ? 0.f : row_max;
      Vec sum(0.f);
      for (int64_t j = 0; j < kChunk; j += kLanes) {
        const Vec p = (Vec::loadu(s + j) - Vec(base)).exp_u20();
        p.store(s + j);
        sum = sum + p;
      }
      const float alpha = std::exp(t.max[r] - base);
      const float chunk_sum = at::vec::vec_reduce_all<float>(
          [](const Vec& x, const Vec& y) { return x + y; }, sum);
      t.sum[r] = t.sum[r] * alpha + chunk_sum;
      t.max[r] = row_max;
      t.alpha[r] = alpha;
    }
  }

  void load_state_rowwise(const Tile& t, int64_t kv_head) const {
    for (int64_t r = 0; r < t.rows; ++r) {
      const float* s = state_row(r, t, kv_head);
      std::copy(s, s + dim_, t.acc + r * dim_);
      t.max[r] = s[dim_];
      t.sum[r] = s[dim_ + 1];
    }
  }

  void store_output_rowwise(const Tile& t, int64_t kv_head) const {
    float* row = t.stage;
    for (int64_t r = 0; r < t.rows; ++r) {
      const Vec inv(1.f / t.sum[r]);
      for (int64_t d = 0; d < dim_; d += kLanes)
        (Vec::loadu(t.acc + r * dim_ + d) * inv).store(row + d);
      const int64_t token = t.tokens[r / group_], head = kv_head * group_ + r % group_;
      T* out = static_cast<T*>(a_.out) + (token * a_.num_q_heads + head) * dim_;
      at::vec::convert(row, out, dim_);
    }
  }
#endif

  const int32_t* prefix_table(int64_t prefix) const {
    return a_.prefix_block_tables + prefix * a_.prefix_table_stride;
  }

  /// Online softmax over keys 0..len-1 of the blocks in `table`, one chunk at a time; the
  /// next chunk's rows are prefetched while this one is computed.
  void attend(Tile& t, const int32_t* table, int64_t len, int64_t kv_head, bool causal) const {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (pair_tiles()) return attend_pairs(t, table, len, kv_head, causal);
    }
#endif
    for_each_chunk(table, len, kv_head, [&](int64_t first, int64_t n, const int64_t* offsets) {
      const float* keys[kChunk];
      const float* values[kChunk];
      load_rows(t, offsets, n, keys, values);
      compute_scores(t, keys, n, dim_);
      if (causal && first + n > t.min_limit) mask_causal(t, first, n);
      softmax_step(t, n);
      accumulate_values(t, values, n, dim_);
    });
  }

#if defined(__AVX512BF16__)
  /// Whether row-vector tiles of this call run on bf16 pairs: bf16 caches, an even head_dim.
  bool pair_tiles() const { return std::is_same_v<T, c10::BFloat16> && dim_ % 2 == 0; }

  /// attend() on bf16 pairs: scores by vdpbf16ps on query pairs (load_queries) and the K rows
  /// where they lie (no K staging; half the instructions of fp32 FMAs), scaled in softmax_step;
  /// values widened per chunk and accumulated as in fp32, so probabilities are never rounded
  /// to bf16 (rounding them, as GPU kernels do for P @ V, measured 8% faster here and 1.3 bf16
  /// ulps off float64 instead of 0.77).
  void attend_pairs(Tile& t, const int32_t* table, int64_t len, int64_t kv_head,
                    bool causal) const {
    for_each_chunk(table, len, kv_head, [&](int64_t first, int64_t n, const int64_t* offsets) {
      const T* keys[kChunk];
      const T* values[kChunk];
      rows_in_pool(offsets, n, keys, values);
      const int32_t* qp = reinterpret_cast<const int32_t*>(t.q);
      const int64_t dim_pairs = dim_ / 2;
      int64_t r = 0;
      auto strip = [&]<int NK, int NR>() {
        int64_t j = 0;
        for (; j + NK <= n; j += NK)
          score_block_pairs<NK, NR>(keys + j, qp + r, t.padded, dim_pairs,
                                    t.scores + j * t.padded + r);
        for (; j < n; ++j)
          score_block_pairs<1, NR>(keys + j, qp + r, t.padded, dim_pairs,
                                   t.scores + j * t.padded + r);
      };
      for (; r + 3 * kLanes <= t.padded; r += 3 * kLanes) strip.template operator()<4, 3>();
      for (; r < t.padded; r += kLanes) strip.template operator()<8, 1>();
      if (causal && first + n > t.min_limit) mask_causal(t, first, n);
      softmax_step(t, n);
      const float* rows[kChunk];  // values in fp32: probabilities stay fp32 (exact products)
      widen_rows(t, values, n, 1, rows);
      accumulate_values(t, rows, n, dim_);
    });
  }
#endif

  /// chunk(first, n, offsets) for keys 0..len-1 of `table` in chunks of kChunk, `offsets` the
  /// pool offsets of the chunk's K/V rows; the next chunk's rows are located and prefetched
  /// into L2 before this one runs.
  template <typename Chunk>
  void for_each_chunk(const int32_t* table, int64_t len, int64_t kv_head,
                      const Chunk& chunk) const {
    int64_t offsets[2][kChunk];
    locate_rows(table, 0, std::min(kChunk, len), kv_head, offsets[0]);
    for (int64_t first = 0, buf = 0; first < len; first += kChunk, buf ^= 1) {
      const int64_t n = std::min(kChunk, len - first);
      const int64_t next = std::min(kChunk, len - first - n);
      if (next > 0) {
        locate_rows(table, first + n, next, kv_head, offsets[buf ^ 1]);
        prefetch_rows(offsets[buf ^ 1], next);
      }
      chunk(first, n, offsets[buf]);
    }
  }

  /// Pool offsets of the K/V rows of keys first..first+n-1 of `table` for `kv_head`. Reads only
  /// the table entries that hold these keys.
  void locate_rows(const int32_t* table, int64_t first, int64_t n, int64_t kv_head,
                   int64_t* offsets) const {
    int64_t block = first / a_.block_size;
    int64_t offset = first % a_.block_size;
    for (int64_t j = 0; j < n; ++j) {
      offsets[j] = table[block] * block_stride_ + offset * token_stride_ + kv_head * dim_;
      if (++offset == a_.block_size) {
        offset = 0;
        ++block;
      }
    }
  }

  /// Into L2: the current chunk and the strips' own data keep L1.
  void prefetch_rows(const int64_t* offsets, int64_t n) const {
    constexpr int64_t kLine = 64 / sizeof(T);
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t d = 0; d < dim_; d += kLine) {
        __builtin_prefetch(k_ + offsets[j] + d, 0, kToL2);
        __builtin_prefetch(v_ + offsets[j] + d, 0, kToL2);
      }
    }
  }

  /// Prefetch the first kTaskPrefetch keys 0..len-1 of `table` (a decode's whole own part).
  void prefetch_start(const int32_t* table, int64_t len, int64_t kv_head) const {
    int64_t offsets[kChunk];
    for (int64_t first = 0; first < std::min(len, kTaskPrefetch); first += kChunk) {
      const int64_t n = std::min(kChunk, len - first);
      locate_rows(table, first, n, kv_head, offsets);
      prefetch_rows(offsets, n);
    }
  }

  void prefetch_prefix_tile(int64_t index, int64_t kv_head) const {
    const int64_t prefix = a_.prefix_tiles[index * kPrefixTileCols];
    prefetch_start(prefix_table(prefix), a_.prefix_lens[prefix], kv_head);
  }

  void prefetch_query_tile(int64_t index, int64_t kv_head) const {
    const int32_t* tile = a_.query_tiles + index * kQueryTileCols;
    const int64_t request = tile[0];
    if (tile[3] == kReadPrefix) {
      const int64_t prefix = a_.prefix_index[request];
      prefetch_start(prefix_table(prefix), a_.prefix_lens[prefix], kv_head);
    }
    prefetch_start(a_.block_tables + request * a_.block_table_stride, a_.own_lens[request],
                   kv_head);
  }

  /// fp32 rows of the chunk: the pool itself for fp32 caches, the tile's stage (converted) for
  /// 16-bit ones.
  void load_rows(const Tile& t, const int64_t* offsets, int64_t n, const float** keys,
                 const float** values) const {
    if constexpr (std::is_same_v<T, float>) {
      rows_in_pool(offsets, n, keys, values);
    } else {
      const T* k[kChunk];
      const T* v[kChunk];
      rows_in_pool(offsets, n, k, v);
      widen_rows(t, k, n, 0, keys);
      widen_rows(t, v, n, 1, values);
    }
  }

  /// keys[j], values[j]: the chunk's K/V rows where they lie in the pool.
  void rows_in_pool(const int64_t* offsets, int64_t n, const T** keys, const T** values) const {
    for (int64_t j = 0; j < n; ++j) {
      keys[j] = k_ + offsets[j];
      values[j] = v_ + offsets[j];
    }
  }

  /// out[j]: fp32 copies of n rows in the tile's stage, half `slot` (0 for K, 1 for V).
  void widen_rows(const Tile& t, const T* const* rows, int64_t n, int slot,
                  const float** out) const {
    for (int64_t j = 0; j < n; ++j) {
      float* row = t.stage + (slot * kChunk + j) * dim_;
      to_float(rows[j], row, dim_);
      out[j] = row;
    }
  }

  const T* query_row(int64_t row, const Tile& t, int64_t kv_head) const {
    const int64_t token = t.tokens[row / group_], head = kv_head * group_ + row % group_;
    return static_cast<const T*>(a_.query) + token * a_.query_token_stride +
           head * a_.query_head_stride;
  }

  /// q[d][r] = scale * query[token_r, head_r, d]; padding rows are 0 (finite scores).
  void load_queries(Tile& t, int64_t kv_head) const {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (pair_tiles()) {  // qp[i][r] = (q_r[2i], q_r[2i + 1]) as they are; scaled in softmax
        int32_t* qp = reinterpret_cast<int32_t*>(t.q);
        std::fill(qp, qp + dim_ / 2 * t.padded, 0);
        for (int64_t r = 0; r < t.rows; ++r) {
          const T* row = query_row(r, t, kv_head);
          for (int64_t i = 0; i < dim_ / 2; ++i) std::memcpy(qp + i * t.padded + r, row + 2 * i, 4);
        }
        t.scale = a_.scale;
        return;
      }
    }
#endif
    std::fill(t.q, t.q + dim_ * t.padded, 0.f);
    float* row = t.stage;  // free until the first chunk
    for (int64_t r = 0; r < t.rows; ++r) {
      to_float(query_row(r, t, kv_head), row, dim_);
      for (int64_t d = 0; d < dim_; ++d) t.q[d * t.padded + r] = row[d] * a_.scale;
    }
  }

  void reset_state(const Tile& t) const {
    std::fill(t.acc, t.acc + dim_ * t.padded, 0.f);
    std::fill(t.max, t.max + t.padded, kNegInf);
    std::fill(t.sum, t.sum + t.padded, 0.f);
  }

  float* state_row(int64_t row, const Tile& t, int64_t kv_head) const {
    const int64_t token = t.tokens[row / group_], head = kv_head * group_ + row % group_;
    return a_.state + (token * a_.num_q_heads + head) * (dim_ + kStateExtra);
  }

  void store_state(const Tile& t, int64_t kv_head) const {
    for (int64_t r = 0; r < t.rows; ++r) {
      float* s = state_row(r, t, kv_head);
      for (int64_t d = 0; d < dim_; ++d) s[d] = t.acc[d * t.padded + r];
      s[dim_] = t.max[r];
      s[dim_ + 1] = t.sum[r];
    }
  }

  void load_state(const Tile& t, int64_t kv_head) const {
    reset_state(t);  // padding rows
    for (int64_t r = 0; r < t.rows; ++r) {
      const float* s = state_row(r, t, kv_head);
      for (int64_t d = 0; d < dim_; ++d) t.acc[d * t.padded + r] = s[d];
      t.max[r] = s[dim_];
      t.sum[r] = s[dim_ + 1];
    }
  }

  /// out[token_r, head_r, :] = acc[:, r] / sum[r], in the output dtype.
  void store_output(const Tile& t, int64_t kv_head) const {
    float* row = t.stage;
    for (int64_t r = 0; r < t.rows; ++r) {
      const float inv = 1.f / t.sum[r];
      for (int64_t d = 0; d < dim_; ++d) row[d] = t.acc[d * t.padded + r] * inv;
      const int64_t token = t.tokens[r / group_], head = kv_head * group_ + r % group_;
      T* out = static_cast<T*>(a_.out) + (token * a_.num_q_heads + head) * dim_;
      at::vec::convert(row, out, dim_);
    }
  }

  const AttentionArgs& a_;
  int64_t group_;
  int64_t dim_;
  int64_t token_stride_;
  int64_t block_stride_;
  const T* k_;
  const T* v_;
};

}  // namespace

void paged_prefix_attention(const AttentionArgs& args) {
  switch (args.dtype) {
    case c10::ScalarType::Float:
      return Attention<float>(args).run();
    case c10::ScalarType::BFloat16:
      return Attention<c10::BFloat16>(args).run();
    case c10::ScalarType::Half:
      return Attention<c10::Half>(args).run();
    default:
      TORCH_CHECK(false, "paged_prefix_attention: unsupported dtype ", args.dtype);
  }
}

}  // namespace prefixserve::cpu::PREFIXSERVE_ISA
