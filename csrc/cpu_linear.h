// Linear layers on CPU: what the op's registration (cpu_linear.cpp) and the per-ISA builds of
// its kernel (cpu_linear_kernel.cpp) share.
//
// Reference: torch.nn.functional.linear.
#pragma once

#include <cstdint>

#include "cpu_isa.h"

namespace prefixserve::cpu {

/// Output features per panel of a packed weight: panels [ceil(N / kPanel), K, kPanel] hold W^T
/// in slices of kPanel features, zeros past N.
constexpr int64_t kPanel = 16;

/// Raw views of one call's tensors, validated by the registration; all of one dtype, float32
/// or bfloat16 (`bf16`).
///
/// fp32 panels are [ceil(N / kPanel), K, kPanel]. bf16 panels are [ceil(N / kPanel),
/// ceil(K / 2), kPanel, 2]: each kPanel-feature row holds the weights of two consecutive
/// inputs, interleaved (zeros past N and K), which is the operand layout of vdpbf16ps (a
/// pair of bf16 products summed into each fp32 lane) and of an AMX tile's B operand. Outputs
/// accumulate in fp32 and are rounded to bf16 once.
struct LinearArgs {
  const void* x;       ///< [M, K], unit stride in K
  int64_t x_stride;    ///< between rows of x, in elements
  const void* panels;  ///< contiguous, as above
  const void* bias;    ///< [N] or nullptr
  void* y;             ///< [M, N] contiguous
  int64_t m;
  int64_t n;
  int64_t k;
  bool bf16;
};

// One build of the kernel per instruction set, chosen at run time (run_isa_build, cpu_isa.h).
PREFIXSERVE_DECLARE_ISA_BUILDS(void panel_linear(const LinearArgs& args))

}  // namespace prefixserve::cpu
