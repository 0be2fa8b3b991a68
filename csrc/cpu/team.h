// Threads for the time loop: when splitting a step pays, and the persistent team's barrier.
// Shared by the recurrent and variant kernels.
#pragma once

#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include <algorithm>
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

// The time loop of a fused forward over steps [c0, c1): step_args(step) gives a step's kernel
// arguments (with its batch size .bs), kernel(args, p0, p1) runs panels [p0, p1) of it; a panel
// holds nr columns of a K-row weight. Where threads pay (split), one parallel region runs all
// the steps with a spin barrier between them; a fork/join per step costs as much as a B=1 step
// (the team's threads fall asleep between regions), a barrier ~1 us. Otherwise the calling thread
// runs every step.
template <typename StepArgs, typename Kernel>
void run_panel_steps(int64_t c0, int64_t c1, int64_t n_panels, int64_t k, int64_t nr, bool split,
                     const StepArgs& step_args, const Kernel& kernel) {
  const int64_t slices = split ? std::min<int64_t>(at::get_num_threads(), n_panels) : 1;
  if (slices <= 1) {
    for (int64_t step = c0; step < c1; ++step) kernel(step_args(step), 0, n_panels);
  } else if (use_persistent_team(slices, c1 - c0)) {
    StepBarrier barrier;
    at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t step = c0; step < c1; ++step) {
        const auto x = step_args(step);
        for (int64_t sl = s0; sl < s1; ++sl) kernel(x, sl * n_panels / slices, (sl + 1) * n_panels / slices);
        barrier.arrive_and_wait(s1 - s0, (step - c0 + 1) * slices);
      }
    });
  } else {
    for (int64_t step = c0; step < c1; ++step) {
      const auto x = step_args(step);
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, x.bs * k * nr));
      at::parallel_for(0, n_panels, grain, [&](int64_t p0, int64_t p1) { kernel(x, p0, p1); });
    }
  }
}

}  // namespace fastrnn
