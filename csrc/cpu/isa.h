// Which build of the vectorised loops runs: the widest the CPU supports, or a narrower one
// (FASTRNN_FORCE_GENERIC_ISA=1, or fastrnn._C.set_isa("baseline" / "avx2") for tests).
#pragma once

#include <atomic>
#include <cstdlib>

namespace fastrnn {

enum class IsaOverride : int { Auto = 0, Baseline = 1, Avx2 = 2 };
inline std::atomic<int>& isa_override_flag() {
  static std::atomic<int> v{std::getenv("FASTRNN_FORCE_GENERIC_ISA") ? 1 : 0};
  return v;
}
inline IsaOverride isa_override() { return static_cast<IsaOverride>(isa_override_flag().load(std::memory_order_relaxed)); }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTRNN_NO_CLONES)
#define FASTRNN_ISA_BUILDS 1
#else
#define FASTRNN_ISA_BUILDS 0
#endif

// The vector width, in bytes, of the widest kernel build this CPU runs: 64 (x86-64-v4: AVX-512),
// 32 (x86-64-v3: AVX2, FMA) or 16 (the baseline build, and every non-x86 or non-GCC build).
inline int cpu_vector_bytes() {
#if FASTRNN_ISA_BUILDS
  static const int v = [] {
    __builtin_cpu_init();
#if __GNUC__ >= 12
    const bool v4 = __builtin_cpu_supports("x86-64-v4"), v3 = __builtin_cpu_supports("x86-64-v3");
#else  // (GCC 11 knows the target levels, not their names here: their features one by one)
    const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                    __builtin_cpu_supports("avx512vl");
#endif
    return v4 ? 64 : v3 ? 32 : 16;
  }();
  return v;
#else
  return 16;
#endif
}

// The build the kernels run: the CPU's widest, capped by the override (tests run each).
inline int kernel_vector_bytes() {
  const int cpu = cpu_vector_bytes();
  switch (isa_override()) {
    case IsaOverride::Baseline: return 16;
    case IsaOverride::Avx2: return cpu < 32 ? cpu : 32;
    default: return cpu;
  }
}

}  // namespace fastrnn
