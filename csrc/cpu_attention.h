// Prefix-augmented paged attention on CPU: what the op registration (cpu_attention.cpp) and the
// per-ISA builds of the kernel (cpu_attention_kernel.cpp) share.
//
// Reference: prefixserve.kernels.reference.paged_prefix_attention (the PyTorch oracle).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu_isa.h"

namespace prefixserve::cpu {

/// How a query tile treats its request's adapter prefix (column 3 of `query_tiles`).
enum PrefixMode : int32_t {
  kNoPrefix = 0,       ///< the request has no prefix
  kReadPrefix = 1,     ///< the tile reads the prefix itself (plain)
  kGroupedPrefix = 2,  ///< a prefix tile already did: continue from its partial softmax state
};

/// Columns of one row of `prefix_tiles` and of the partial state of one (token, query head).
constexpr int64_t kQueryTileCols = 4;   ///< request, first query, queries, PrefixMode
constexpr int64_t kPrefixTileCols = 3;  ///< prefix row, begin, end (into prefix_tokens)
constexpr int64_t kStateExtra = 2;      ///< running max and sum after the D accumulators

/// Raw views of one call's tensors, validated by the registration before any kernel runs.
struct AttentionArgs {
  c10::ScalarType dtype;         ///< of query, caches and output: float, bfloat16 or half
  const void* query;             ///< [T, Hq, D], unit stride in D
  int64_t query_token_stride;
  int64_t query_head_stride;
  void* out;                     ///< [T, Hq, D] contiguous
  const void* k_cache;           ///< [num_blocks, block_size, Hkv, D] contiguous
  const void* v_cache;
  const int32_t* cu_q_lens;      ///< [B + 1]
  const int32_t* own_lens;       ///< [B]
  const int32_t* block_tables;   ///< [B, block_table_stride]
  int64_t block_table_stride;
  const int32_t* prefix_index;   ///< [B], -1 for none
  const int32_t* prefix_lens;    ///< [NP]
  const int32_t* prefix_block_tables;  ///< [NP, prefix_table_stride]
  int64_t prefix_table_stride;
  const int32_t* query_tiles;    ///< [num_query_tiles, kQueryTileCols]
  int64_t num_query_tiles;
  const int32_t* prefix_tiles;   ///< [num_prefix_tiles, kPrefixTileCols]
  int64_t num_prefix_tiles;
  const int32_t* prefix_tokens;  ///< packed query tokens of the grouped requests
  float* state;                  ///< [T, Hq, D + kStateExtra] prefix tiles' partial results
  int64_t num_q_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t block_size;
  int64_t max_tile_tokens;       ///< most query tokens in one tile (sizes the scratch)
  float scale;
};

// One build of the kernel per instruction set, chosen at run time (run_isa_build, cpu_isa.h).
PREFIXSERVE_DECLARE_ISA_BUILDS(void paged_prefix_attention(const AttentionArgs& args))

}  // namespace prefixserve::cpu
