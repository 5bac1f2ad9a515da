// The instruction sets this CPU runs, shared by the registrations of the native CPU ops: each
// kernel file is built once per ISA (kernels/cpu_build.py) and the op picks one at call time.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <string>
#include <vector>

namespace prefixserve::cpu {

/// Instruction sets this CPU runs, best first ("baseline" is plain x86-64 or the host's ISA);
/// detected once per process.
inline const std::vector<std::string>& cpu_isas() {
  static const std::vector<std::string> isas = [] {
    std::vector<std::string> found;
#if defined(__x86_64__)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      found.emplace_back("avx512");
    }
    if (avx2) found.emplace_back("avx2");
#endif
    found.emplace_back("baseline");
    return found;
  }();
  return isas;
}

/// Raises unless this CPU runs `isa`.
inline void check_isa(const char* op, c10::string_view isa) {
  const auto& supported = cpu_isas();
  TORCH_CHECK(std::find(supported.begin(), supported.end(), isa) != supported.end(), op,
              ": instruction set '", isa, "' is not one of this CPU's (",
              c10::Join(", ", supported), ")");
}

}  // namespace prefixserve::cpu
