// What the CPU and CUDA kernels of the recurrent ops (lstm/gru/rnn _forward and _backward) share:
// argument validation (every tensor's presence, device, dtype, rank and shape, and the step
// schedule; nothing is read from tensor memory except batch_sizes (CPU), whose contents are
// themselves validated) and the bias folding of the input projection.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <limits>
#include <utility>
#include <vector>

#include "checks.h"
#include "schedule.h"

namespace fastrnn {

enum class Cell { LSTM, GRU, RNN };

inline int64_t gates_of(Cell c) { return c == Cell::LSTM ? 4 : (c == Cell::GRU ? 3 : 1); }

// A backward op's output_mask (csrc/registration.cpp): which gradients to compute.
struct GradMask {
  bool input = true, weights = true, state = true;
  GradMask() = default;
  explicit GradMask(std::array<bool, 3> m) : input(m[0]), weights(m[1]), state(m[2]) {}
};

// Replaces the gradients `m` leaves out with empty tensors (G: a kernel's BackwardOut). The
// kernels skip their work; this makes what they return say so whatever they skipped.
template <typename G>
void drop_unmasked(G& g, GradMask m, const at::TensorOptions& opts) {
  // (a fresh one each: an op's outputs must not alias each other)
  auto none = [&](std::initializer_list<at::Tensor*> ts) {
    for (at::Tensor* t : ts) *t = at::empty({0}, opts);
  };
  if (!m.input) none({&g.grad_input});
  if (!m.weights) none({&g.grad_w_ih, &g.grad_w_hh, &g.grad_b_ih, &g.grad_b_hh, &g.grad_w_hr});
  if (!m.state) none({&g.grad_hx, &g.grad_cx});
}

struct RecurrentShape {
  int64_t I = 0, H = 0, P = 0, G = 0;  // input, hidden, state (proj_size or H) sizes; gates per unit
  Schedule sched;
};

// device: where the kernel runs (every tensor but batch_sizes must be there). allow_half: the
// kernel takes float16 (CUDA); bfloat16 is taken everywhere.
inline RecurrentShape validate_recurrent(const char* op, Cell cell, const at::Tensor& input, const at::Tensor& w_ih,
                                         const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                         const c10::optional<at::Tensor>& b_hh,
                                         const c10::optional<at::Tensor>& w_hr, const at::Tensor& hx,
                                         const c10::optional<at::Tensor>& cx,
                                         const c10::optional<at::Tensor>& batch_sizes, bool reverse,
                                         const at::Device& device, bool allow_half = false) {
  RecurrentShape a;
  a.G = gates_of(cell);
  check_operands(op, {{input, "input", -1}, {w_ih, "w_ih", 2}, {w_hh, "w_hh", 2}, {hx, "hx", 2}},
                 /*allow_bf16=*/true, device, allow_half);

  const bool packed = batch_sizes.has_value() && batch_sizes->defined();
  if (packed) {
    check_dim(input, op, "input (packed, with batch_sizes)", 2);
  } else {
    check_dim(input, op, "input", 3);
  }
  a.I = input.size(-1);
  TORCH_CHECK(w_ih.size(0) % a.G == 0 && w_ih.size(0) > 0, op, ": w_ih must have shape [", a.G,
              "*hidden_size, input_size] with hidden_size > 0, got ", shape_str(w_ih.sizes()));
  a.H = w_ih.size(0) / a.G;
  const bool has_proj = w_hr.has_value() && w_hr->defined();
  TORCH_CHECK(!has_proj || cell == Cell::LSTM, op, ": w_hr (projection) is only supported by the LSTM");
  if (has_proj) {
    check_device(*w_hr, op, "w_hr", device);
    check_dtype(*w_hr, op, "w_hr", input, "input");
    check_dim(*w_hr, op, "w_hr", 2);
    a.P = w_hr->size(0);
    TORCH_CHECK(a.P > 0 && a.P < a.H, op, ": w_hr must have shape [proj_size, hidden_size] with 0 < proj_size < ",
                "hidden_size = ", a.H, ", got ", shape_str(w_hr->sizes()));
    check_shape(*w_hr, op, "w_hr", {a.P, a.H}, "[proj_size, hidden_size]");
  } else {
    a.P = a.H;
  }
  check_shape(w_ih, op, "w_ih", {a.G * a.H, a.I}, "[gates*hidden_size, input.size(-1)]");
  check_shape(w_hh, op, "w_hh", {a.G * a.H, a.P}, "[gates*hidden_size, proj_size or hidden_size]");
  using NamedOpt = std::pair<const c10::optional<at::Tensor>*, const char*>;
  for (const NamedOpt& n : std::initializer_list<NamedOpt>{{&b_ih, "b_ih"}, {&b_hh, "b_hh"}}) {
    if (n.first->has_value() && (*n.first)->defined()) {
      check_device(**n.first, op, n.second, device);
      check_dtype(**n.first, op, n.second, input, "input");
      check_shape(**n.first, op, n.second, {a.G * a.H}, "[gates*hidden_size]");
    }
  }
  TORCH_CHECK((b_ih.has_value() && b_ih->defined()) == (b_hh.has_value() && b_hh->defined()), op,
              ": b_ih and b_hh must be given together or both be None");

  a.sched = make_schedule(op, input, batch_sizes, reverse);
  const Schedule& s = a.sched;
  check_shape(hx, op, "hx", {s.B, a.P}, "[batch, proj_size or hidden_size]");
  if (cell == Cell::LSTM) {
    TORCH_CHECK(cx.has_value() && cx->defined(), op, ": cx must be a tensor for the LSTM");
    check_device(*cx, op, "cx", device);
    check_dtype(*cx, op, "cx", input, "input");
    check_shape(*cx, op, "cx", {s.B, a.H}, "[batch, hidden_size]");
  }
  TORCH_CHECK(s.N < kMaxRows && a.G * a.H < kMaxRows && a.I < kMaxRows, op, ": sizes beyond 2^31 are not supported");
  return a;
}

// The biases folded into the input projection (b_ih + b_hh); the GRU keeps b_hn apart (returned
// in b_hn): it sits inside r * (W_hn h + b_hn). Undefined without biases.
inline at::Tensor folded_bias(Cell cell, int64_t H, const at::Tensor& b_ih, const at::Tensor& b_hh, at::Tensor& b_hn) {
  if (!b_ih.defined()) return at::Tensor();
  at::Tensor bias = b_ih.clone();
  if (cell == Cell::GRU) {
    bias.narrow(0, 0, 2 * H).add_(b_hh.narrow(0, 0, 2 * H));
    b_hn = b_hh.narrow(0, 2 * H, H).contiguous();
  } else {
    bias.add_(b_hh);
  }
  return bias;
}

// The backward ops' other tensors: gradients and the forward's output in input's dtype, the
// workspace the forward saved in the compute dtype `ws_dtype` (float32 for bfloat16/float16
// input), all on `device`; an empty workspace means the forward ran with train=False.
inline void validate_recurrent_backward(const char* op, Cell cell, const RecurrentShape& a, const at::Tensor& input,
                                        const at::Device& device, at::ScalarType ws_dtype, bool has_proj,
                                        const at::Tensor& grad_output, const at::Tensor& grad_hy,
                                        const c10::optional<at::Tensor>& grad_cy, const at::Tensor& output,
                                        const at::Tensor& ws0, const at::Tensor& ws1, const at::Tensor& ws2) {
  const Schedule& s = a.sched;
  auto like = [&](const at::Tensor& t, const char* name, std::vector<int64_t> shape, const char* meaning) {
    check_defined(t, op, name);
    check_device(t, op, name, device);
    check_dtype(t, op, name, input, "input");
    check_shape(t, op, name, std::move(shape), meaning);
  };
  auto workspace = [&](const at::Tensor& t, const char* name, std::vector<int64_t> shape, const char* meaning) {
    check_defined(t, op, name);
    check_device(t, op, name, device);
    TORCH_CHECK_VALUE(t.scalar_type() == ws_dtype, op, ": ", name, " must be ", ws_dtype, " for ",
                      input.scalar_type(), " input (the forward's workspace), got ", t.scalar_type());
    check_shape(t, op, name, std::move(shape), meaning);
  };
  like(grad_output, "grad_output", s.lead_with(a.P), "output.shape");
  like(output, "output", s.lead_with(a.P), "output.shape");
  like(grad_hy, "grad_hy", {s.B, a.P}, "hx.shape");
  if (cell == Cell::LSTM) {
    TORCH_CHECK(grad_cy.has_value() && grad_cy->defined(), op, ": grad_cy must be a tensor");
    like(*grad_cy, "grad_cy", {s.B, a.H}, "cx.shape");
  }
  const char* nosave = ": the forward was run with train=False, so nothing was saved for backward";
  if (cell != Cell::RNN) {
    TORCH_CHECK(ws0.numel() == s.N * a.G * a.H && ws1.numel() == s.N * a.H, op, nosave);
    workspace(ws0, "gates", {s.N, a.G * a.H}, "[rows, gates*hidden_size]");
    workspace(ws1, cell == Cell::LSTM ? "cells" : "hn", {s.N, a.H}, "[rows, hidden_size]");
  }
  if (has_proj) {
    TORCH_CHECK(ws2.numel() == s.N * a.H, op, nosave);
    workspace(ws2, "proj_input", {s.N, a.H}, "[rows, hidden_size]");
  } else if (cell == Cell::LSTM) {
    workspace(ws2, "proj_input", {0}, "(0,): empty without w_hr, as the forward returns it");
  }
}

}  // namespace fastrnn
