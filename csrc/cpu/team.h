// Threads for the time loop: when splitting a step pays, and the persistent team's barrier.
// Shared by the recurrent and variant kernels.
#pragma once

#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <thread>

namespace fastrnn {

// Two threads pay for a step only with enough work to split (a barrier costs ~1 us) or a W_hh
// too large for one core's L2 (each thread then keeps its slice in its own cache). Below both,
// the time loop runs on the calling thread: faster, and no barrier to stall on when the machine
// is oversubscribed (a descheduled peer holds up every step).
constexpr double kTeamMinStepMacs = 256.0 * 1024;
constexpr double kTeamMinWeightBytes = 512.0 * 1024;
inline bool threads_pay(double step_macs, double weight_bytes) {
  return step_macs >= kTeamMinStepMacs || weight_bytes >= kTeamMinWeightBytes;
}

// ---------------------------------------------------------------------------------------
// A persistent team for the time loop. With ATen's OpenMP backend every chunk of a
// parallel_for runs on its own thread of one team, all at once, so the chunks can meet at a
// barrier between steps. Work is counted in slices (the chunks' index ranges), so the barrier
// is right however OpenMP splits the range. Other backends (a task pool gives no such
// guarantee) and nested calls take a parallel_for per step.
// ---------------------------------------------------------------------------------------
inline bool use_persistent_team(int64_t slices, int64_t steps) {
#if AT_PARALLEL_OPENMP
  return slices > 1 && steps > 1 && !at::in_parallel_region() && !std::getenv("FASTRNN_NO_TEAM");
#else
  return false;
#endif
}

class StepBarrier {
 public:
  // Adds this thread's finished slices and waits until `target` slices in all have finished.
  void arrive_and_wait(int64_t slices, int64_t target) {
    done_.fetch_add(slices, std::memory_order_acq_rel);
    for (uint64_t spin = 0; done_.load(std::memory_order_acquire) < target; ++spin) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      // Spin briefly (a step is microseconds), then yield: when the machine is oversubscribed a
      // peer may be descheduled, and spinning would only keep it off the core longer.
      if (spin > 256) std::this_thread::yield();
    }
  }

 private:
  std::atomic<int64_t> done_{0};
};

}  // namespace fastrnn
