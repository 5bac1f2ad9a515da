// Greedy sampling on CPU: what the op's registration (cpu_sampling.cpp) and the per-ISA builds
// of its kernel (cpu_sampling_kernel.cpp) share.
//
// Reference: torch.argmax(logits, dim=1).
#pragma once

#include <cstdint>

#include "cpu_isa.h"

namespace prefixserve::cpu {

/// Raw views of one call's tensors, validated by the registration.
struct ArgmaxArgs {
  const void* logits;  ///< [rows, vocab], unit stride in vocab
  int64_t stride;      ///< between rows, in elements
  int64_t rows;
  int64_t vocab;       ///< >= 1
  bool bf16;           ///< bfloat16 logits, else float32
  int64_t* out;        ///< [rows]
};

// One build of the kernel per instruction set, chosen at run time (run_isa_build, cpu_isa.h).
PREFIXSERVE_DECLARE_ISA_BUILDS(void argmax_rows(const ArgmaxArgs& args))

}  // namespace prefixserve::cpu
