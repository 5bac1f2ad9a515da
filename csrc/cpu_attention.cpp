// torch.ops.prefixserve.paged_prefix_attention: prefix-augmented paged attention on CPU.
//
// Registration, input validation and the choice of instruction set; the kernel itself is
// cpu_attention_kernel.cpp, built once per ISA. Python wrapper and shapes:
// prefixserve.kernels.cpu_attention; reference: prefixserve.kernels.reference.
//
// Every index the kernel will follow is checked here first (block tables, lengths, tiles), so
// no input can make it read outside the pool, read a slot the request may not see, or leave an
// output row unwritten.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu_attention.h"
#include "cpu_isa.h"

namespace prefixserve::cpu {
namespace {

void check_index(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.dim() == dim &&
                  t.is_contiguous(),
              "paged_prefix_attention: ", name, " must be a contiguous ", dim,
              "-d int32 CPU tensor, got ", t.scalar_type(), " of shape ", t.sizes(), " on ",
              t.device());
}

/// Blocks holding `len` tokens, each entry a block of the pool.
void check_table(const int32_t* table, int64_t width, int64_t len, int64_t block_size,
                 int64_t num_blocks, const char* what, int64_t row) {
  const int64_t used = (len + block_size - 1) / block_size;
  TORCH_CHECK(len >= 0 && used <= width, "paged_prefix_attention: ", what, " ", row, " has ",
              len, " tokens but its block table holds ", width, " blocks of ", block_size);
  for (int64_t i = 0; i < used; ++i) {
    TORCH_CHECK(table[i] >= 0 && table[i] < num_blocks, "paged_prefix_attention: ", what, " ",
                row, " lists block ", table[i], " of a pool of ", num_blocks);
  }
}

struct Tensors {
  const at::Tensor& query;
  const at::Tensor& k_cache;
  const at::Tensor& v_cache;
  const at::Tensor& cu_q_lens;
  const at::Tensor& own_lens;
  const at::Tensor& block_tables;
  const at::Tensor& prefix_index;
  const at::Tensor& prefix_lens;
  const at::Tensor& prefix_block_tables;
  const at::Tensor& query_tiles;
  const at::Tensor& prefix_tiles;
  const at::Tensor& prefix_tokens;
};

void check_shapes(const Tensors& in) {
  const auto& q = in.query;
  const auto& k = in.k_cache;
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && q.stride(2) == 1,
              "paged_prefix_attention: query must be a [T, Hq, D] CPU tensor with unit stride in "
              "D, got shape ", q.sizes(), " strides ", q.strides(), " on ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 ||
                  q.scalar_type() == at::kHalf,
              "paged_prefix_attention: query must be float32, bfloat16 or float16, got ",
              q.scalar_type());
  TORCH_CHECK(k.dim() == 4 && k.sizes() == in.v_cache.sizes() && k.is_contiguous() &&
                  in.v_cache.is_contiguous() && k.device().is_cpu() &&
                  in.v_cache.device().is_cpu(),
              "paged_prefix_attention: k_cache and v_cache must be contiguous CPU tensors of one "
              "shape [num_blocks, block_size, Hkv, D], got ", k.sizes(), " and ",
              in.v_cache.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && in.v_cache.scalar_type() == q.scalar_type(),
              "paged_prefix_attention: query and caches must share a dtype, got ",
              q.scalar_type(), ", ", k.scalar_type(), ", ", in.v_cache.scalar_type());
  TORCH_CHECK(k.size(3) == q.size(2) && k.size(2) > 0 && q.size(1) % k.size(2) == 0,
              "paged_prefix_attention: query ", q.sizes(), " does not fit a cache ", k.sizes(),
              " (head_dim must match and Hq be a multiple of Hkv)");
  check_index(in.cu_q_lens, "cu_q_lens", 1);
  check_index(in.own_lens, "own_lens", 1);
  check_index(in.block_tables, "block_tables", 2);
  check_index(in.prefix_index, "prefix_index", 1);
  check_index(in.prefix_lens, "prefix_lens", 1);
  check_index(in.prefix_block_tables, "prefix_block_tables", 2);
  check_index(in.query_tiles, "query_tiles", 2);
  check_index(in.prefix_tiles, "prefix_tiles", 2);
  check_index(in.prefix_tokens, "prefix_tokens", 1);
  const int64_t batch = in.own_lens.size(0);
  TORCH_CHECK(in.cu_q_lens.size(0) == batch + 1 && in.block_tables.size(0) == batch &&
                  in.prefix_index.size(0) == batch &&
                  in.prefix_block_tables.size(0) == in.prefix_lens.size(0),
              "paged_prefix_attention: metadata sizes disagree (", batch, " requests)");
  TORCH_CHECK(in.query_tiles.size(1) == kQueryTileCols &&
                  in.prefix_tiles.size(1) == kPrefixTileCols,
              "paged_prefix_attention: query_tiles must be [N, 4] and prefix_tiles [N, 3]");
}

/// Requests and prefixes: lengths within their block tables, blocks within the pool.
void check_requests(const Tensors& in) {
  const int64_t num_blocks = in.k_cache.size(0), block_size = in.k_cache.size(1);
  const int32_t* cu = in.cu_q_lens.data_ptr<int32_t>();
  const int32_t* own = in.own_lens.data_ptr<int32_t>();
  const int32_t* pidx = in.prefix_index.data_ptr<int32_t>();
  const int64_t num_prefixes = in.prefix_lens.size(0);
  TORCH_CHECK(cu[0] == 0 && cu[in.own_lens.size(0)] == in.query.size(0),
              "paged_prefix_attention: cu_q_lens must run from 0 to the ", in.query.size(0),
              " query tokens");
  for (int64_t b = 0; b < in.own_lens.size(0); ++b) {
    const int64_t q_len = cu[b + 1] - cu[b];
    TORCH_CHECK(q_len >= 1 && q_len <= own[b], "paged_prefix_attention: request ", b, " has ",
                q_len, " queries and ", own[b], " own tokens (need 1 <= queries <= own)");
    TORCH_CHECK(pidx[b] >= -1 && pidx[b] < num_prefixes, "paged_prefix_attention: request ", b,
                " has prefix_index ", pidx[b], " with ", num_prefixes, " prefixes");
    check_table(in.block_tables.data_ptr<int32_t>() + b * in.block_tables.size(1),
                in.block_tables.size(1), own[b], block_size, num_blocks, "request", b);
  }
  for (int64_t p = 0; p < num_prefixes; ++p) {
    check_table(in.prefix_block_tables.data_ptr<int32_t>() + p * in.prefix_block_tables.size(1),
                in.prefix_block_tables.size(1), in.prefix_lens.data_ptr<int32_t>()[p],
                block_size, num_blocks, "prefix", p);
  }
}

/// Tiles: every query token in exactly one query tile, every grouped one in exactly one prefix
/// tile of its own prefix. Returns the most tokens in one tile.
int64_t check_tiles(const Tensors& in) {
  const int64_t num_tokens = in.query.size(0);
  const int32_t* cu = in.cu_q_lens.data_ptr<int32_t>();
  const int32_t* pidx = in.prefix_index.data_ptr<int32_t>();
  const int32_t* tokens = in.prefix_tokens.data_ptr<int32_t>();
  std::vector<int32_t> request_of(num_tokens), grouped_in(num_tokens, -1), outputs(num_tokens);
  for (int64_t b = 0; b < in.own_lens.size(0); ++b)
    std::fill(request_of.begin() + cu[b], request_of.begin() + cu[b + 1], b);
  int64_t max_tokens = 1;
  for (int64_t i = 0; i < in.prefix_tiles.size(0); ++i) {
    const int32_t* t = in.prefix_tiles.data_ptr<int32_t>() + i * kPrefixTileCols;
    TORCH_CHECK(t[0] >= 0 && t[0] < in.prefix_lens.size(0) && 0 <= t[1] && t[1] < t[2] &&
                    t[2] <= in.prefix_tokens.size(0),
                "paged_prefix_attention: bad prefix tile ", i);
    for (int64_t j = t[1]; j < t[2]; ++j) {
      TORCH_CHECK(tokens[j] >= 0 && tokens[j] < num_tokens && grouped_in[tokens[j]] == -1 &&
                      pidx[request_of[tokens[j]]] == t[0],
                  "paged_prefix_attention: prefix tile ", i, " lists token ", tokens[j],
                  " twice, out of range or of another prefix");
      grouped_in[tokens[j]] = t[0];
    }
    max_tokens = std::max<int64_t>(max_tokens, t[2] - t[1]);
  }
  for (int64_t i = 0; i < in.query_tiles.size(0); ++i) {
    const int32_t* t = in.query_tiles.data_ptr<int32_t>() + i * kQueryTileCols;
    const int64_t b = t[0];
    TORCH_CHECK(b >= 0 && b < in.own_lens.size(0) && t[1] >= 0 && t[2] >= 1 &&
                    t[1] + t[2] <= cu[b + 1] - cu[b],
                "paged_prefix_attention: bad query tile ", i);
    const bool has_prefix = pidx[b] >= 0;
    TORCH_CHECK(has_prefix ? (t[3] == kReadPrefix || t[3] == kGroupedPrefix) : t[3] == kNoPrefix,
                "paged_prefix_attention: query tile ", i, " has prefix mode ", t[3],
                " for a request with prefix_index ", pidx[b]);
    for (int64_t tok = cu[b] + t[1]; tok < cu[b] + t[1] + t[2]; ++tok) {
      TORCH_CHECK(t[3] != kGroupedPrefix || grouped_in[tok] == pidx[b],
                  "paged_prefix_attention: query tile ", i, " continues a prefix tile that "
                  "does not cover its token ", tok);
      ++outputs[tok];
    }
    max_tokens = std::max<int64_t>(max_tokens, t[2]);
  }
  for (int64_t tok = 0; tok < num_tokens; ++tok) {
    TORCH_CHECK(outputs[tok] == 1, "paged_prefix_attention: token ", tok, " is in ",
                outputs[tok], " query tiles (must be exactly one)");
  }
  return max_tokens;
}

at::Tensor paged_prefix_attention(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cu_q_lens, const at::Tensor& own_lens, const at::Tensor& block_tables,
    const at::Tensor& prefix_index, const at::Tensor& prefix_lens,
    const at::Tensor& prefix_block_tables, const at::Tensor& query_tiles,
    const at::Tensor& prefix_tiles, const at::Tensor& prefix_tokens, double scale,
    c10::string_view isa) {
  const Tensors in{query,        k_cache,     v_cache,     cu_q_lens,
                   own_lens,     block_tables, prefix_index, prefix_lens,
                   prefix_block_tables, query_tiles, prefix_tiles, prefix_tokens};
  check_shapes(in);
  check_requests(in);
  const int64_t max_tile_tokens = check_tiles(in);

  const int64_t num_tokens = query.size(0), num_q_heads = query.size(1), dim = query.size(2);
  at::Tensor out = at::empty({num_tokens, num_q_heads, dim}, query.options());
  at::Tensor state;
  if (prefix_tiles.size(0) > 0) {
    state = at::empty({num_tokens, num_q_heads, dim + kStateExtra}, query.options().dtype(at::kFloat));
  }
  AttentionArgs args{};
  args.dtype = query.scalar_type();
  args.query = query.data_ptr();
  args.query_token_stride = query.stride(0);
  args.query_head_stride = query.stride(1);
  args.out = out.data_ptr();
  args.k_cache = k_cache.data_ptr();
  args.v_cache = v_cache.data_ptr();
  args.cu_q_lens = cu_q_lens.data_ptr<int32_t>();
  args.own_lens = own_lens.data_ptr<int32_t>();
  args.block_tables = block_tables.data_ptr<int32_t>();
  args.block_table_stride = block_tables.size(1);
  args.prefix_index = prefix_index.data_ptr<int32_t>();
  args.prefix_lens = prefix_lens.data_ptr<int32_t>();
  args.prefix_block_tables = prefix_block_tables.data_ptr<int32_t>();
  args.prefix_table_stride = prefix_block_tables.size(1);
  args.query_tiles = query_tiles.data_ptr<int32_t>();
  args.num_query_tiles = query_tiles.size(0);
  args.prefix_tiles = prefix_tiles.data_ptr<int32_t>();
  args.num_prefix_tiles = prefix_tiles.size(0);
  args.prefix_tokens = prefix_tokens.data_ptr<int32_t>();
  args.state = state.defined() ? state.data_ptr<float>() : nullptr;
  args.num_q_heads = num_q_heads;
  args.num_kv_heads = k_cache.size(2);
  args.head_dim = dim;
  args.block_size = k_cache.size(1);
  args.max_tile_tokens = max_tile_tokens;
  args.scale = static_cast<float>(scale);
  check_isa("paged_prefix_attention", isa);
  run_isa_build(isa, PREFIXSERVE_ISA_BUILDS(paged_prefix_attention), args);
  return out;
}

}  // namespace
}  // namespace prefixserve::cpu

TORCH_LIBRARY(prefixserve, m) {
  m.def(
      "paged_prefix_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor cu_q_lens, "
      "Tensor own_lens, Tensor block_tables, Tensor prefix_index, Tensor prefix_lens, "
      "Tensor prefix_block_tables, Tensor query_tiles, Tensor prefix_tiles, "
      "Tensor prefix_tokens, float scale, str isa) -> Tensor");
  m.def("cpu_isas() -> str[]", [] { return prefixserve::cpu::cpu_isas(); });
}

TORCH_LIBRARY_IMPL(prefixserve, CPU, m) {
  m.impl("paged_prefix_attention", &prefixserve::cpu::paged_prefix_attention);
}
