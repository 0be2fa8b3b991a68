// Which build of the vectorised loops runs: the widest the CPU supports, or the baseline one
// (FASTRNN_FORCE_GENERIC_ISA=1, or fastrnn._C.set_isa("baseline") for tests).
#pragma once

#include <atomic>
#include <cstdlib>

namespace fastrnn {

enum class IsaOverride : int { Auto = 0, Baseline = 1 };
inline std::atomic<int>& isa_override_flag() {
  static std::atomic<int> v{std::getenv("FASTRNN_FORCE_GENERIC_ISA") ? 1 : 0};
  return v;
}
inline IsaOverride isa_override() { return static_cast<IsaOverride>(isa_override_flag().load(std::memory_order_relaxed)); }

}  // namespace fastrnn
