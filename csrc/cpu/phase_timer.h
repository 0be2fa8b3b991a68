// FASTRNN_PROFILE=1 makes the CPU kernels print where a call spends its time (stderr).
#pragma once

#include <chrono>
#include <cstdio>
#include <cstdlib>

namespace fastrnn {

// Prints, when FASTRNN_PROFILE is set, the time since the last mark, phase by phase.
class PhaseTimer {
 public:
  explicit PhaseTimer(const char* what) : what_(what), on_(std::getenv("FASTRNN_PROFILE") != nullptr) {
    last_ = std::chrono::steady_clock::now();
  }
  void mark(const char* phase) {
    if (!on_) return;
    auto now = std::chrono::steady_clock::now();
    std::fprintf(stderr, "fastrnn %s: %-12s %9.3f ms\n", what_, phase,
                 std::chrono::duration<double, std::milli>(now - last_).count());
    last_ = now;
  }

 private:
  const char* what_;
  bool on_;
  std::chrono::steady_clock::time_point last_;
};

}  // namespace fastrnn
