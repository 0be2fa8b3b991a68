// The time-step schedule over packed rows, shared by the recurrent and variant kernels.
//
// Sequences are laid out "packed": the rows of step t are input[off_t : off_t + bs_t]; a dense
// [T, B, I] input is the case bs_t = B. Batch sizes never grow with t (PackedSequence order), so
// the rows alive at a step are a prefix of the state buffers.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "checks.h"

namespace fastrnn {

struct Schedule {
  int64_t T = 0, B = 0, N = 0;
  bool reverse = false;
  std::vector<int64_t> bs, off;
  std::vector<int64_t> lead;  // leading shape of input/output: [T, B] dense, [N] packed

  int64_t time_at(int64_t s) const { return reverse ? T - 1 - s : s; }
  // Row (into the [N, *] layout) holding the state that step t of row b starts from, or -1 for
  // the initial state.
  int64_t prev_row(int64_t t, int64_t b) const {
    if (!reverse) return t == 0 ? -1 : off[t - 1] + b;
    return (t + 1 < T && b < bs[t + 1]) ? off[t + 1] + b : -1;
  }
  // lead + [last]: the shape of an output (or its gradient) whose rows are the input's.
  std::vector<int64_t> lead_with(int64_t last) const {
    std::vector<int64_t> s = lead;
    s.push_back(last);
    return s;
  }
};

// Sizes (T * B or N rows, G * H, I) the kernels take: they index with 32-bit ints in places.
constexpr int64_t kMaxRows = std::numeric_limits<int>::max();

// The schedule of an input ([T, B, I] dense, or [N, I] packed with batch_sizes [T]); input's rank
// is checked by the caller. Only batch_sizes' memory is read, and its contents are validated:
// positive, non-increasing, summing to the packed input's rows. The size limit is checked
// before the per-step vectors are built.
inline Schedule make_schedule(const char* op, const at::Tensor& input, const c10::optional<at::Tensor>& batch_sizes,
                              bool reverse) {
  Schedule s;
  s.reverse = reverse;
  if (batch_sizes.has_value() && batch_sizes->defined()) {
    const at::Tensor& bsz = *batch_sizes;
    check_cpu(bsz, op, "batch_sizes");
    TORCH_CHECK(bsz.scalar_type() == at::kLong, op, ": batch_sizes must be an int64 tensor, got ", bsz.scalar_type());
    check_dim(bsz, op, "batch_sizes", 1);
    s.T = bsz.size(0);
    TORCH_CHECK(s.T > 0, op, ": batch_sizes must have at least one time step (zero-length sequence)");
    // Before the per-step vectors are built (an expanded input of 2^40 rows must fail here, not
    // in the allocator): each step has at least one row, so T <= N.
    TORCH_CHECK(input.size(0) < kMaxRows, op, ": sizes beyond 2^31 are not supported, got a packed input of ",
                input.size(0), " rows");
    TORCH_CHECK(s.T <= input.size(0), op, ": packed input must have sum(batch_sizes) rows, got ", input.size(0),
                " rows and ", s.T, " steps in batch_sizes (each of at least one row)");
    at::Tensor bc = bsz.contiguous();
    const int64_t* p = bc.data_ptr<int64_t>();
    s.bs.assign(p, p + s.T);
    int64_t total = 0;
    for (int64_t t = 0; t < s.T; ++t) {
      TORCH_CHECK(s.bs[t] > 0 && (t == 0 || s.bs[t] <= s.bs[t - 1]), op,
                  ": batch_sizes must be positive and non-increasing (as in a PackedSequence), got ", s.bs[t],
                  " at step ", t);
      TORCH_CHECK(s.bs[t] <= input.size(0) - total, op, ": packed input must have sum(batch_sizes) rows, got ",
                  input.size(0), " rows and batch_sizes summing to more");
      total += s.bs[t];
    }
    s.B = s.bs[0];
    TORCH_CHECK(total == input.size(0), op, ": packed input must have sum(batch_sizes) = ", total, " rows, got ",
                input.size(0));
    s.lead = {input.size(0)};
  } else {
    s.T = input.size(0);
    s.B = input.size(1);
    TORCH_CHECK(s.T > 0, op, ": input must have at least one time step (zero-length sequence), got shape ",
                shape_str(input.sizes()));
    TORCH_CHECK(s.T < kMaxRows && s.B < kMaxRows && (s.B == 0 || s.T <= (kMaxRows - 1) / s.B), op,
                ": sizes beyond 2^31 are not supported, got input of shape ", shape_str(input.sizes()));
    s.bs.assign(s.T, s.B);
    s.lead = {s.T, s.B};
  }
  s.off.resize(s.T);
  int64_t acc = 0;
  for (int64_t t = 0; t < s.T; ++t) {
    s.off[t] = acc;
    acc += s.bs[t];
  }
  s.N = acc;
  return s;
}

}  // namespace fastrnn
