// Linear layers on CPU: what the ops' registration (cpu_linear.cpp) and the per-ISA builds of
// their kernels share: on nn.Linear's own weight for few rows (cpu_linear_kernel.cpp), and on a
// weight packed as panels for any number of rows (cpu_linear_panels.cpp).
//
// Reference: torch.nn.functional.linear.
#pragma once

#include <cstdint>

namespace prefixserve::cpu {

/// Rows up to which the op runs its own kernel; above, ATen's GEMM (MKL) is faster.
constexpr int64_t kMaxSkinnyRows = 64;

/// Output features per panel of a packed weight (``linear_packed``): panels [ceil(N / kPanel),
/// K, kPanel] hold W^T in slices of kPanel features, zeros past N.
constexpr int64_t kPanel = 16;

/// Raw views of one call's fp32 tensors, validated by the registration.
struct LinearArgs {
  const float* x;       ///< [M, K], unit stride in K
  int64_t x_stride;     ///< between rows of x
  const float* weight;  ///< [N, K] contiguous (nn.Linear's layout), or panels for panel_linear
  const float* bias;    ///< [N] or nullptr
  float* y;             ///< [M, N] contiguous
  int64_t m;
  int64_t n;
  int64_t k;
};

// One build of the kernel per instruction set, chosen at run time (cpu_linear.cpp).
namespace baseline {
void skinny_linear(const LinearArgs& args);
void panel_linear(const LinearArgs& args);
}
#if defined(__x86_64__)
namespace avx2 {
void skinny_linear(const LinearArgs& args);
void panel_linear(const LinearArgs& args);
}
namespace avx512 {
void skinny_linear(const LinearArgs& args);
void panel_linear(const LinearArgs& args);
}
#endif

}  // namespace prefixserve::cpu
