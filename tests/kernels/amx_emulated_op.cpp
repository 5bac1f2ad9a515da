// Test-only ops over csrc/cpu_linear_kernel.cpp built with software AMX tiles
// (amx_emulation.h): prefixserve_amx_emulated::linear runs the kernel's amx_emulated build on
// bf16 panels; tile_products counts the tile dot products run so far (so a test can tell the
// AMX blocks ran).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>

#include "cpu_linear.h"

namespace prefixserve_amx_emulation {
std::atomic<int64_t> products{0};
}

namespace prefixserve::cpu::amx_emulated {
void panel_linear(const LinearArgs& args);
}

namespace {

at::Tensor linear(const at::Tensor& x, const at::Tensor& panels,
                  const std::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kBFloat16 &&
                  panels.is_contiguous() && panels.scalar_type() == at::kBFloat16,
              "linear: bf16 rows with unit stride and contiguous bf16 panels");
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  prefixserve::cpu::LinearArgs args{};
  args.x = x.const_data_ptr();
  args.x_stride = x.stride(0);
  args.panels = panels.const_data_ptr();
  const bool has_bias = bias.has_value() && bias->defined();
  args.bias = has_bias ? bias->const_data_ptr() : nullptr;
  args.y = y.mutable_data_ptr();
  args.m = x.size(0);
  args.n = n;
  args.k = x.size(1);
  args.bf16 = true;
  prefixserve::cpu::amx_emulated::panel_linear(args);
  return y;
}

int64_t tile_products() { return prefixserve_amx_emulation::products.load(); }

}  // namespace

TORCH_LIBRARY(prefixserve_amx_emulated, m) {
  m.def("linear(Tensor x, Tensor panels, Tensor? bias, int n) -> Tensor", &linear);
  m.def("tile_products() -> int", &tile_products);
}
