// The instruction sets this CPU runs and the choice of a kernel's build by ISA, shared by the
// registrations of the native CPU ops: each kernel file is built once per ISA
// (kernels/cpu_build.py), into the namespace of that ISA (baseline, avx2, avx512, avx512_bf16,
// amx), and the op runs the build its caller names. avx512_bf16 is AVX-512 plus the bf16 dot
// product vdpbf16ps (Intel Cooper Lake and Sapphire Rapids on, AMD Zen 4 on): its fp32 code is
// avx512's, its bf16 code multiplies bf16 pairs in one instruction instead of widening them.
// amx is avx512_bf16 plus AMX's bf16 tiles (Intel Sapphire Rapids on), listed only where the
// kernel grants the process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM).
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace prefixserve::cpu {

/// Whether this process may use AMX tiles: Linux grants the tile data state on request.
inline bool amx_permitted() {
#if defined(__x86_64__) && defined(__linux__)
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

/// Instruction sets this CPU runs, best first ("baseline" is plain x86-64 or the host's ISA);
/// detected once per process.
inline const std::vector<std::string>& cpu_isas() {
  static const std::vector<std::string> isas = [] {
    std::vector<std::string> found;
#if defined(__x86_64__)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    const bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
    if (bf16 && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
        amx_permitted()) {
      found.emplace_back("amx");
    }
    if (bf16) found.emplace_back("avx512_bf16");
    if (avx512) found.emplace_back("avx512");
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

/// The builds of one kernel `void kernel(const Args&)`, one per ISA this library holds; list
/// them with PREFIXSERVE_ISA_BUILDS(kernel).
template <typename Args>
struct IsaBuilds {
  void (*baseline)(const Args&);
#if defined(__x86_64__)
  void (*avx2)(const Args&);
  void (*avx512)(const Args&);
  void (*avx512_bf16)(const Args&);
  void (*amx)(const Args&);
#endif
};

/// Declares `decl` (one kernel, `void kernel(const Args& args)`) in the namespace of every ISA
/// build this library holds, as PREFIXSERVE_ISA_BUILDS lists them.
#if defined(__x86_64__)
#define PREFIXSERVE_DECLARE_ISA_BUILDS(decl) \
  namespace baseline {                       \
  decl;                                      \
  }                                          \
  namespace avx2 {                           \
  decl;                                      \
  }                                          \
  namespace avx512 {                         \
  decl;                                      \
  }                                          \
  namespace avx512_bf16 {                    \
  decl;                                      \
  }                                          \
  namespace amx {                            \
  decl;                                      \
  }
#else
#define PREFIXSERVE_DECLARE_ISA_BUILDS(decl) \
  namespace baseline {                       \
  decl;                                      \
  }
#endif

#if defined(__x86_64__)
#define PREFIXSERVE_ISA_BUILDS(kernel) \
  {&baseline::kernel, &avx2::kernel, &avx512::kernel, &avx512_bf16::kernel, &amx::kernel}
#else
#define PREFIXSERVE_ISA_BUILDS(kernel) {&baseline::kernel}
#endif

/// Runs the build of a kernel for `isa`, which the caller has checked (check_isa).
template <typename Args>
void run_isa_build(c10::string_view isa, const IsaBuilds<Args>& builds, const Args& args) {
#if defined(__x86_64__)
  if (isa == "amx") return builds.amx(args);
  if (isa == "avx512_bf16") return builds.avx512_bf16(args);
  if (isa == "avx512") return builds.avx512(args);
  if (isa == "avx2") return builds.avx2(args);
#endif
  builds.baseline(args);
}

}  // namespace prefixserve::cpu
