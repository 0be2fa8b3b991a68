// Threads for the time loop: when splitting a step pays, and the persistent team's barrier.
// Shared by the recurrent and variant kernels.
#pragma once

#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>
#include <utility>

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
// Row split. A row of the batch depends only on its own row of the previous step, so threads
// that each own a fixed range of rows run every step of a chunk with no barrier at all; each
// reads the whole W_hh, so this pays where W_hh stays in a core's L2 beside its rows, and each
// thread gets rows enough to share a weight load among (the micro-kernel's blocks of 4 rows and
// up). It replaces the panel split there: no barrier per step (~1 us), and a W_hh of a few panels
// (H = 16 or 32) no longer leaves threads idle. FASTRNN_ROW_SPLIT=0 / 1 turns it off / forces it
// wherever the batch allows (tests and measurements).
// ---------------------------------------------------------------------------------------
constexpr double kRowSplitMaxWeightBytes = 384.0 * 1024;
constexpr int64_t kRowSplitMinRows = 4;
constexpr double kRowSplitMinMacs = 1024.0 * 1024;  // a chunk's work, against one fork and join

inline int row_split_override() {
  static const int o = [] {
    const char* e = std::getenv("FASTRNN_ROW_SPLIT");
    return e && *e ? std::atoi(e) : -1;
  }();
  return o;
}

// How many row slices a chunk of steps runs on (1: not split by rows); B rows, weight_bytes of
// the weights each thread reads every step (W_hh, or W_ih and W_hh where the input product is
// fused into the steps), chunk_macs multiply-adds in the chunk's products, max_weight_bytes the
// most that stays in a core's L2 beside the rows.
inline int64_t row_slices(int64_t B, double weight_bytes, double chunk_macs,
                          double max_weight_bytes = kRowSplitMaxWeightBytes) {
  const int64_t threads = at::get_num_threads();
  const int o = row_split_override();
  if (threads < 2 || o == 0 || at::in_parallel_region()) return 1;
  if (o == 1) return std::max<int64_t>(1, std::min(threads, B));
  if (weight_bytes > max_weight_bytes || chunk_macs < kRowSplitMinMacs) return 1;
  return std::max<int64_t>(1, std::min(threads, B / kRowSplitMinRows));
}

// Runs rows(r0, r1) for `slices` near-equal ranges of [0, B), each on its own thread.
template <typename Rows>
void run_row_slices(int64_t B, int64_t slices, const Rows& rows) {
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) { rows(B * s0 / slices, B * s1 / slices); });
}

// A fused forward step's arguments (.bs rows from .off; .hcur, .hnext, .c: [B, H] rows) narrowed
// to its rows [r0, r1) (.bs <= 0: none).
template <typename Step>
Step narrow_rows(Step x, int64_t r0, int64_t r1, int64_t H) {
  x.bs = std::min<int64_t>(x.bs, r1) - r0;
  x.off += r0;
  x.hcur += r0 * H;
  x.hnext += r0 * H;
  if (x.c) x.c += r0 * H;
  return x;
}

// The row split of a fused forward's steps [c0, c1) (B rows, H wide): step_args(step) gives a
// step's arguments for all its rows, kernel(args) runs every panel of them. Each thread narrows
// them to its own rows.
template <typename StepArgs, typename Kernel>
void run_row_split_steps(int64_t c0, int64_t c1, int64_t B, int64_t H, int64_t slices, const StepArgs& step_args,
                         const Kernel& kernel) {
  run_row_slices(B, slices, [&](int64_t r0, int64_t r1) {
    for (int64_t step = c0; step < c1; ++step) {
      const auto x = narrow_rows(step_args(step), r0, r1, H);
      if (x.bs > 0) kernel(x);
    }
  });
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

// The work units [0, n) of one step of a team: slice sl owns units [n * sl / slices,
// n * (sl + 1) / slices) and runs them in order, then takes the next unclaimed units of the other
// slices. A static split waits every step for its slowest thread; a core slower than its peer
// (a VM's busy vCPU, an SMT sibling at work, an efficiency core) held up every step. Measured on
// the 2-vCPU Zen 3 VM: the same product ran at 96 GFLOP/s on one vCPU and 71-84 on the other.
// A unit runs on one thread, whichever, and computes the same either way. A slice's counter holds
// (epoch, next unit): a count from an earlier step reads as the slice's first unit, so nothing is
// reset between steps (the barrier orders the steps).
class StepUnits {
 public:
  // (Counters for up to kInline slices live in the object: a per-step product that builds one
  // makes no allocation in the time loop.)
  explicit StepUnits(int64_t slices)
      : slices_(slices),
        heap_(slices > kInline ? new Counter[slices] : nullptr),
        next_(heap_ ? heap_.get() : inline_) {}
  StepUnits(const StepUnits&) = delete;
  StepUnits& operator=(const StepUnits&) = delete;
  // Runs run(u) for units of step `epoch` (>= 1, rising step by step) until none is left.
  template <typename Run>
  void run(int64_t sl, int64_t n, uint32_t epoch, const Run& run) {
    for (int64_t k = 0; k < slices_; ++k)
      for (int64_t u, o = (sl + k) % slices_; (u = claim(o, n, epoch)) >= 0;) run(u);
  }

 private:
  struct alignas(64) Counter {
    std::atomic<uint64_t> v{0};
  };
  int64_t claim(int64_t o, int64_t n, uint32_t epoch) {
    const int64_t begin = n * o / slices_, end = n * (o + 1) / slices_;
    std::atomic<uint64_t>& c = next_[o].v;
    uint64_t v = c.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t u = uint32_t(v >> 32) == epoch ? int64_t(v & 0xffffffffu) : begin;
      if (u >= end) return -1;
      if (c.compare_exchange_weak(v, (uint64_t(epoch) << 32) | uint64_t(u + 1), std::memory_order_relaxed))
        return u;
    }
  }
  static constexpr int64_t kInline = 8;
  int64_t slices_;
  Counter inline_[kInline];
  std::unique_ptr<Counter[]> heap_;
  Counter* next_;
};

// Units a panel of a step's product is cut into for StepUnits: whole panels where there are
// enough to even out the threads (each unit then reads its panel once), else half panels (the
// rows halved).
inline int64_t panel_pieces(int64_t n_panels, int64_t slices) { return n_panels >= 8 * slices ? 1 : 2; }

// The time loop of a fused forward over steps [c0, c1): step_args(step) gives a step's kernel
// arguments (with its batch size .bs), kernel(args, p0, p1) runs panels [p0, p1) of it; a panel
// holds nr columns of a k-row weight (k = H, the width of the rows of h). Where threads pay (split), one parallel region runs all
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
    StepUnits units(slices);
    const int64_t pieces = panel_pieces(n_panels, slices), n = n_panels * pieces;
    at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t step = c0; step < c1; ++step) {
        const auto x = step_args(step);
        for (int64_t sl = s0; sl < s1; ++sl)
          units.run(sl, n, uint32_t(step - c0 + 1), [&](int64_t u) {
            const int64_t p = u / pieces, r0 = x.bs * (u % pieces) / pieces, r1 = x.bs * (u % pieces + 1) / pieces;
            if (r1 > r0) kernel(narrow_rows(x, r0, r1, k), p, p + 1);
          });
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
