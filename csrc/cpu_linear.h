// Linear layers on CPU: what the op's registration (cpu_linear.cpp) and the per-ISA builds of
// its kernel (cpu_linear_kernel.cpp) share.
//
// Reference: torch.nn.functional.linear.
#pragma once

#include <cstdint>

namespace prefixserve::cpu {

/// Output features per panel of a packed weight: panels [ceil(N / kPanel), K, kPanel] hold W^T
/// in slices of kPanel features, zeros past N.
constexpr int64_t kPanel = 16;

/// Raw views of one call's fp32 tensors, validated by the registration.
struct LinearArgs {
  const float* x;       ///< [M, K], unit stride in K
  int64_t x_stride;     ///< between rows of x
  const float* panels;  ///< [ceil(N / kPanel), K, kPanel] contiguous
  const float* bias;    ///< [N] or nullptr
  float* y;             ///< [M, N] contiguous
  int64_t m;
  int64_t n;
  int64_t k;
};

// One build of the kernel per instruction set, chosen at run time (run_isa_build, cpu_isa.h).
namespace baseline {
void panel_linear(const LinearArgs& args);
}
#if defined(__x86_64__)
namespace avx2 {
void panel_linear(const LinearArgs& args);
}
namespace avx512 {
void panel_linear(const LinearArgs& args);
}
#endif

}  // namespace prefixserve::cpu
