// torch.ops.prefixserve.argmax_rows: the greedy token of each row of float32 or bfloat16 logits
// on CPU, as torch.argmax(logits, dim=1).
//
// Registration, input validation and the choice of the ISA's build of the kernel
// (cpu_sampling_kernel.cpp). Python wrapper: prefixserve.kernels.cpu_sampling.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "cpu_sampling.h"

namespace prefixserve::cpu {
namespace {

at::Tensor argmax_rows(const at::Tensor& logits, c10::string_view isa) {
  check_isa("argmax_rows", isa);
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "argmax_rows: expected [rows, vocab] ",
              "logits with vocab >= 1, got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "argmax_rows: logits must be float32 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(logits.is_cpu(), "argmax_rows: runs on CPU tensors");
  const at::Tensor rows = logits.stride(1) == 1 ? logits : logits.contiguous();
  at::Tensor out = at::empty({rows.size(0)}, rows.options().dtype(at::kLong));
  if (rows.size(0) == 0) return out;
  ArgmaxArgs args{};
  args.logits = rows.const_data_ptr();
  args.stride = rows.stride(0);
  args.rows = rows.size(0);
  args.vocab = rows.size(1);
  args.bf16 = rows.scalar_type() == at::kBFloat16;
  args.out = out.mutable_data_ptr<int64_t>();
  run_isa_build(isa, PREFIXSERVE_ISA_BUILDS(argmax_rows), args);
  return out;
}

}  // namespace
}  // namespace prefixserve::cpu

TORCH_LIBRARY_FRAGMENT(prefixserve, m) { m.def("argmax_rows(Tensor logits, str isa) -> Tensor"); }

TORCH_LIBRARY_IMPL(prefixserve, CPU, m) { m.impl("argmax_rows", &prefixserve::cpu::argmax_rows); }
