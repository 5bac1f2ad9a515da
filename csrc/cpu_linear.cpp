// torch.ops.prefixserve.linear_packed: y = x W^T + b on CPU, fp32 or bf16, W packed as panels
// (kPanel; cpu_linear.h).
//
// Registration, input validation and the choice of the ISA's build of the kernel
// (cpu_linear_kernel.cpp). Python wrapper and packing: prefixserve.kernels.cpu_linear;
// reference: torch.nn.functional.linear.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "cpu_linear.h"

namespace prefixserve::cpu {
namespace {

/// y [..., N] (x's leading sizes) for x [..., K].
at::Tensor output_for(const at::Tensor& input, int64_t n) {
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end());
  sizes.back() = n;
  return at::empty(sizes, input.options());
}

at::Tensor linear_packed(const at::Tensor& input, const at::Tensor& panels,
                         const std::optional<at::Tensor>& bias, int64_t out_features,
                         c10::string_view isa) {
  check_isa("linear_packed", isa);
  const bool bf16 = panels.scalar_type() == at::kBFloat16;
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK((panels.scalar_type() == at::kFloat || bf16) &&
                  input.scalar_type() == panels.scalar_type() &&
                  (!has_bias || bias->scalar_type() == panels.scalar_type()),
              "linear_packed: input, panels and bias must all be float32 or all bfloat16, got "
              "input ",
              input.scalar_type(), ", panels ", panels.scalar_type(), " and bias ",
              has_bias ? c10::toString(bias->scalar_type()) : "none");
  TORCH_CHECK(input.dim() >= 1, "linear_packed: input must have a feature dimension");
  const int64_t k = input.size(-1);
  const int64_t n_panels = (out_features + kPanel - 1) / kPanel;
  if (bf16) {
    TORCH_CHECK(out_features > 0 && panels.dim() == 4 && panels.size(0) == n_panels &&
                    panels.size(1) == (k + 1) / 2 && panels.size(2) == kPanel &&
                    panels.size(3) == 2,
                "linear_packed: bf16 panels ", panels.sizes(), " are not those of ",
                out_features, " output features and ", k, " inputs (expected [", n_panels,
                ", ", (k + 1) / 2, ", ", kPanel, ", 2])");
  } else {
    TORCH_CHECK(out_features > 0 && panels.dim() == 3 && panels.size(2) == kPanel &&
                    panels.size(0) == n_panels,
                "linear_packed: panels ", panels.sizes(), " are not those of ", out_features,
                " output features (expected [ceil(N / ", kPanel, "), K, ", kPanel, "])");
    TORCH_CHECK(k == panels.size(1), "linear_packed: input ", input.sizes(),
                " does not match panels ", panels.sizes());
  }
  TORCH_CHECK(input.is_cpu() && panels.is_cpu() && (!has_bias || bias->is_cpu()),
              "linear_packed: runs on CPU tensors");
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == out_features),
              "linear_packed: bias ", bias->sizes(), " does not match ", out_features,
              " output features");
  const int64_t m = c10::multiply_integers(input.sizes().begin(), input.sizes().end() - 1);
  at::Tensor y = output_for(input, out_features);
  if (m == 0) return y;
  if (k == 0) return has_bias ? y.copy_(bias->expand_as(y)) : y.zero_();  // empty sums

  const at::Tensor x = input.reshape({m, k});
  const at::Tensor x_rows = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor w = panels.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  LinearArgs args{};
  args.x = x_rows.const_data_ptr();
  args.x_stride = x_rows.stride(0);
  args.panels = w.const_data_ptr();
  args.bias = has_bias ? b.const_data_ptr() : nullptr;
  args.y = y.mutable_data_ptr();
  args.m = m;
  args.n = out_features;
  args.k = k;
  args.bf16 = bf16;
  run_isa_build(isa, PREFIXSERVE_ISA_BUILDS(panel_linear), args);
  return y;
}

}  // namespace
}  // namespace prefixserve::cpu

TORCH_LIBRARY_FRAGMENT(prefixserve, m) {
  m.def(
      "linear_packed(Tensor input, Tensor panels, Tensor? bias, int out_features, str isa) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(prefixserve, CPU, m) {
  m.impl("linear_packed", &prefixserve::cpu::linear_packed);
}
