// CPU kernels for the LSTM, GRU and Elman RNN: one layer, one direction, a whole sequence.
//
// One driver serves the three cells; they differ only in the pointwise row functions of
// fastrnn/cells.h. Flow of a forward call:
//   1. xg = X W_ih^T + folded biases: large GEMMs over chunks of steps (outside the step loop).
//   2. per step: hg = h W_hh^T (packed BLAS, no dispatcher), one fused pointwise pass over the
//      active rows writing the new state, the output row, and (training only) what backward needs.
// Backward runs the steps in reverse with one pointwise pass and one GEMM per step; the weight
// gradients and the input gradient are single GEMMs over all steps after the loop.
//
// Sequences are laid out "packed": rows of step t are input[off_t : off_t + bs_t]; a dense
// [T, B, I] input is the special case bs_t = B. Batch sizes never grow with t (PackedSequence
// order), so the rows alive at a step are a prefix of the state buffers, finished rows keep
// their final state, and the reverse direction starts each row from its initial state.
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <atomic>
#include <thread>
#include <vector>

#include "checks.h"
#include "cpu/gemm.h"
#include "cpu/pack_cache.h"
#include "cpu/panel_step.h"
#include "cpu/team.h"
#include "cpu/transpose.h"
#include "cpu/phase_timer.h"
#include "schedule.h"
#include "cpu/workspace.h"
#include "recurrent_shape.h"
#include "fastrnn/cells.h"
#include "fastrnn/panel_gemm.h"

namespace fastrnn {
namespace {

using OptTensor = c10::optional<at::Tensor>;

struct Args {
  const char* op;
  Cell cell;
  bool relu = false;  // RNN nonlinearity
  at::Tensor x;       // [N, I]
  at::Tensor w_ih;    // [G*H, I]
  at::Tensor w_hh;    // [G*H, P]
  at::Tensor b_ih;    // [G*H] or undefined
  at::Tensor b_hh;    // [G*H] or undefined
  at::Tensor w_hr;    // [P, H] or undefined (LSTM projection)
  at::Tensor hx;      // [B, P]
  at::Tensor cx;      // [B, H] (LSTM) or undefined
  // bfloat16 input (lowp): x and w_ih stay bfloat16 for the large GEMMs (oneDNN, AVX512-BF16
  // with float32 accumulation where the CPU has it); everything else (W_hh, biases, states,
  // gate math, workspace) is float32, the compute dtype of opts. w_hh_src is W_hh as given: the
  // key of the packed-panel cache, and the source of the float32 copy taken where one is needed.
  bool lowp = false;
  bool bf16_rec = false;  // lowp, and the per-step recurrent product in bfloat16 (bf16_recurrent)
  at::TensorOptions opts;
  at::Tensor w_hh_src;
  Schedule sched;
  int64_t I = 0, H = 0, P = 0, G = 0;
};

// Validates every argument and builds the schedule; nothing is read from tensor memory
// except batch_sizes, whose contents are themselves validated.
Args prepare(const char* op, Cell cell, const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh,
             const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
             const c10::optional<at::Tensor>& w_hr, const at::Tensor& hx, const c10::optional<at::Tensor>& cx,
             const c10::optional<at::Tensor>& batch_sizes, bool reverse) {
  Args a;
  a.op = op;
  a.cell = cell;
  RecurrentShape shape = validate_recurrent(op, cell, input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, batch_sizes,
                                            reverse, at::Device(at::kCPU));
  a.I = shape.I;
  a.H = shape.H;
  a.P = shape.P;
  a.G = shape.G;
  a.sched = std::move(shape.sched);
  const Schedule& s = a.sched;
  const bool has_proj = w_hr.has_value() && w_hr->defined();
  a.x = input.reshape({s.N, a.I}).contiguous();
  a.w_ih = w_ih.contiguous();
  a.w_hh = w_hh.contiguous();
  if (b_ih.has_value() && b_ih->defined()) {
    a.b_ih = b_ih->contiguous();
    a.b_hh = b_hh->contiguous();
  }
  if (has_proj) a.w_hr = w_hr->contiguous();
  a.hx = hx.contiguous();
  if (cell == Cell::LSTM) a.cx = cx->contiguous();
  a.w_hh_src = a.w_hh;
  a.lowp = input.scalar_type() == at::kBFloat16;
  a.opts = a.x.options().dtype(a.lowp ? at::kFloat : input.scalar_type());
  if (a.lowp) {
    for (at::Tensor* t : {&a.b_ih, &a.b_hh, &a.w_hr, &a.hx, &a.cx})
      if (t->defined()) *t = t->to(at::kFloat);
  }
  return a;
}

// The float32 W_hh of a bfloat16 call, for the kernels that read W_hh as it lies (the fused
// forward packs from w_hh_src instead and caches the packing).
void convert_w_hh(Args& a) {
  if (a.lowp) a.w_hh = a.w_hh_src.to(at::kFloat);
}

// bfloat16 calls with large steps run the per-step recurrent product (forward h W_hh^T,
// backward dG W_hh) as a bfloat16 GEMM in oneDNN, as torch's oneDNN LSTM does in bfloat16: the
// product's operand (h or dG, float32) rounded to bfloat16, float32 accumulation, the result
// rounded to bfloat16 (torch's CPU mm has no float32 output for bfloat16) and widened for the
// float32 gate math. AVX512-BF16 runs it at twice the float32 rate, which beats the float32
// panel kernels once a step is large enough to amortise the per-step dispatch and conversions.
// Measured on this project's 2-core Zen 5 (LSTM, T=100, CPU time on one thread, a loaded machine;
// inference / training ms, float32 panels vs bfloat16 per-step GEMM): B=64 H=512 (64M
// multiply-adds a step) 96/287 vs 75/236; B=32 H=512 (32M) 49/137 vs 41/122; B=16 H=512 and
// B=64 H=256 (16M) 25/71 vs 24/68 and 26/76 vs 23/70; at 8M mixed (B=8 H=512 13/43 vs 17/49,
// B=32 H=256 even); B=16 H=256 (4M) 6.9/19.9 vs 7.3/21.0; B=1 H=256 1.2/4.5 vs 3.7/9.4.
// Smaller steps keep the float32 panel kernels (W_hh packed to float32 once, cached).
constexpr double kBf16RecMinMacs = 16.0 * 1024 * 1024;

bool bf16_recurrent(const Args& a) {
  if (!a.lowp || !has_onednn_bf16()) return false;
  const int o = gemm_backend_override().load();
  if (o == 3) return true;  // "oneDNN for every GEMM": tests run this path at small sizes
  if (o != 0) return false;
  return double(a.sched.B) * double(a.G * a.H) * double(a.P) >= kBf16RecMinMacs;
}

// Whether a bfloat16 call runs its large GEMMs (projection, weight gradients, grad_input) in
// bfloat16. Without oneDNN's bfloat16 (AVX2 CPUs) torch's bfloat16 mm is a slow generic loop
// (measured, Zen 3: LSTM fastrnns-default training 19.8 s in bfloat16 against 0.63 s in float32;
// nn.LSTM in bfloat16 38 s), so the operands are widened and the GEMMs run in float32: the same
// products (bfloat16 times bfloat16 is exact in float32) with float32 accumulation, dG and the
// results not rounded to bfloat16 in between.
bool lowp_gemms(const Args& a) { return a.lowp && has_onednn_bf16(); }

// c[m, n] (=, or += when accumulate) bf16(a[m, k]) @ w_nk^T, w_nk a contiguous bfloat16 [n, k].
// oneDNN's linear takes the weight as it lies; at::mm on w_nk.t() ran 100 steps of B=64, H=512
// in 22-29 ms against 18 (2 threads, this machine).
void bf16_step_gemm(const float* a, int64_t m, int64_t k, const at::Tensor& w_nk, float* c, int64_t n,
                    bool accumulate) {
  if (m == 0) return;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor ab = at::from_blob(const_cast<float*>(a), {m, k}, f32).to(at::kBFloat16);
  TORCH_INTERNAL_ASSERT(has_onednn_bf16());  // (bf16_recurrent)
  const at::Tensor prod = onednn_linear(ab, w_nk, at::Tensor());
  at::Tensor cv = at::from_blob(c, {m, n}, f32);
  if (accumulate)
    cv.add_(prod);
  else
    cv.copy_(prod);
}

std::vector<int64_t> lead_with(const Args& a, int64_t last) { return a.sched.lead_with(last); }


// ---------------------------------------------------------------------------------------
// The pointwise pass of one step over rows [b0, b1). Compiled for AVX-512, AVX2+FMA and the
// baseline ISA (FASTRNN_ISA_KERNEL in cpu/gemm.h picks one by CPU features), so the gate loops of
// fastrnn/cells.h vectorise as wide as the machine allows while the build stays portable.
// FASTRNN_FORCE_GENERIC_ISA=1 in the environment pins the baseline build (for testing it here).
// ---------------------------------------------------------------------------------------
template <typename T>
struct FwdRows {
  Cell cell;
  bool save;
  Nonlinearity act;
  int64_t H, P, GH, off;
  const T* xg;   // input projections of rows [xg_row0, ...), GH wide (row off + b)
  int64_t xg_row0;
  const T* hg;   // [B, GH] recurrent products of this step
  T* h;          // [B, P] state, updated in place (GRU/RNN; LSTM writes r there when not projecting)
  T* c;          // [B, H] LSTM cell state, updated in place
  T* r;          // [B, r_ld] LSTM o * tanh(c)
  int64_t r_ld;
  T* ws0;        // [N, GH] saved gate activations
  T* ws1;        // [N, H] saved LSTM cells / GRU hn
  const T* bhn;  // [H] GRU b_hn or null
};

template <typename T, int NB>
FASTRNN_INLINE void forward_rows_impl(const FwdRows<T>& s, int64_t b0, int64_t b1) {
  const int64_t H = s.H, GH = s.GH;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t row = s.off + b;
    const T* xr = s.xg + (row - s.xg_row0) * GH;
    const T* hr = s.hg + b * GH;
    switch (s.cell) {
      case Cell::LSTM:
        if (s.save)
          lstm_forward_row<true, T>(H, xr, H, hr, H, s.c + b * H, s.r + b * s.r_ld, s.ws0 + row * GH, H,
                                    s.ws1 + row * H);
        else
          lstm_forward_row<false, T>(H, xr, H, hr, H, s.c + b * H, s.r + b * s.r_ld, nullptr, H, nullptr);
        break;
      case Cell::GRU:
        if (s.save)
          gru_forward_row<true, T>(H, xr, H, hr, H, s.bhn, s.h + b * H, s.h + b * H, s.ws0 + row * GH, H,
                                   s.ws1 + row * H);
        else
          gru_forward_row<false, T>(H, xr, H, hr, H, s.bhn, s.h + b * H, s.h + b * H, nullptr, H, nullptr);
        break;
      case Cell::RNN:
        rnn_forward_row<T>(H, s.act, xr, hr, s.h + b * H);
        break;
    }
  }
}

template <typename T>
struct BwdRows {
  Cell cell;
  Nonlinearity act;
  int64_t H, P, GH, off, t;
  const Schedule* sched;
  const T* ws0;   // [N, GH] gate activations
  const T* ws1;   // [N, H] LSTM cells / GRU hn
  const T* out;   // [N, P] layer output (h_t)
  const T* hx;    // [B, P] initial h
  const T* cx;    // [B, H] initial c
  const T* dr;    // [B, H] dL/d(o tanh c) (LSTM)
  T* dh;          // [B, P] dL/dh, updated in place
  T* dc;          // [B, H] dL/dc, updated in place
  T* dgx;         // [rows of the chunk, GH]: row r of the sequence at dgx[(r - dg_row0) * GH]
  T* dgh;         // [rows of the chunk, GH]
  int64_t dg_row0;
};

template <typename T, int NB>
FASTRNN_INLINE void backward_rows_impl(const BwdRows<T>& s, int64_t b0, int64_t b1) {
  const int64_t H = s.H, P = s.P, GH = s.GH;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t row = s.off + b, prev = s.sched->prev_row(s.t, b);
    T* dgx = s.dgx + (row - s.dg_row0) * GH;
    T* dgh = s.dgh + (row - s.dg_row0) * GH;
    switch (s.cell) {
      case Cell::LSTM: {
        const T* cprev = prev >= 0 ? s.ws1 + prev * H : s.cx + b * H;
        lstm_backward_row<T>(H, s.ws0 + row * GH, s.ws1 + row * H, cprev, s.dr + b * H, s.dc + b * H,
                             dgx);
        break;
      }
      case Cell::GRU: {
        const T* hprev = prev >= 0 ? s.out + prev * P : s.hx + b * P;
        gru_backward_row<T>(H, s.ws0 + row * GH, s.ws1 + row * H, hprev, s.dh + b * H, dgx, dgh);
        break;
      }
      case Cell::RNN:
        rnn_backward_row<T>(H, s.act, s.out + row * P, s.dh + b * H, dgx);
        break;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Fused forward (LSTM without projection, GRU, RNN). W_hh is packed once per call into panels of
// U = one vector of hidden units with all G gates of those units side by side. A step is one
// parallel region: each thread starts on its own range of panels every step (its slice of W_hh
// stays in its core's cache across steps; team.h's StepUnits: it then takes what the other
// threads have not reached), multiplies h by each panel and applies the gate math for those
// units at once. h is double-buffered because every thread reads all of h_{t-1}.
// ---------------------------------------------------------------------------------------
template <typename T>
struct FusedStep {
  Cell cell;
  bool save;
  Nonlinearity act;
  int64_t H, GH, U, n_panels, bs, off;
  const T* wp;     // [n_panels, H, G*U] packed W_hh^T (in stripes, panel::striped)
  const T* xg;     // input projections of rows [xg_row0, ...), xg_ld apart (xg_ld = 0: one bias row)
  int64_t xg_row0, xg_ld;
  // The input product fused into the step (LSTM and RNN; null: xg holds it): each row's
  // x W_ih^T is summed with h W_hh^T in one pass, and xg is the folded bias, xg_ld = 0.
  const T* wx;     // [n_panels, I, G*U] packed W_ih^T (in stripes)
  const T* x;      // [N, I] input rows
  int64_t I;
  const T* hcur;   // [B, H]
  T* hnext;        // [B, H]
  T* c;            // [B, H] LSTM
  T* out;          // [N, H]
  T* ws0;          // [N, GH]
  T* ws1;          // [N, H]
  const T* bhn;    // [H] or null
};

// The vector a full panel's gate math runs on: the build's compute vector for float; double
// runs the scalar loops.
template <typename T, int NB>
using GateVec = std::conditional_t<std::is_same_v<T, float>, typename panel::Native<T, NB>::type, T>;

// The LSTM gate math of one row of a panel (nu of its U units; xr and the saved gates: rows of
// 4H, gate k at k*H; hr: the row's 4*U products). A full
// panel of float units is one vector a gate, with no loop (measured, 16 rows x 8 panels: 3.9 ->
// 3.3 us a step); partial panels and double run the loop.
template <bool Save, typename T, int NB>
FASTRNN_INLINE void lstm_panel_row(int64_t nu, int64_t U, const T* xr, int64_t H, const T* hr, T* c, T* h,
                                   T* gates, T* cell) {
  using V = GateVec<T, NB>;
  if (nu == U)
    lstm_forward_row<Save, T, V>(U, xr, H, hr, U, c, h, gates, H, cell);
  else
    lstm_forward_row<Save, T>(nu, xr, H, hr, U, c, h, gates, H, cell);
}

// The GRU's, as lstm_panel_row (full float panels on vectors: T=1, B=128, I=8, H=100 inference,
// where the gate math is most of a step, ran its scalar loop as the hottest code).
template <bool Save, typename T, int NB>
FASTRNN_INLINE void gru_panel_row(int64_t nu, int64_t U, const T* xr, int64_t H, const T* hr, const T* bh,
                                  const T* hprev, T* h, T* gates, T* hn) {
  using V = GateVec<T, NB>;
  if (nu == U)
    gru_forward_row<Save, T, V>(U, xr, H, hr, U, bh, hprev, h, gates, H, hn);
  else
    gru_forward_row<Save, T>(nu, xr, H, hr, U, bh, hprev, h, gates, H, hn);
}

// A panel holds UV vectors of units per gate: G * UV accumulators per row keep the FMA units busy.
template <int G>
constexpr int units_vectors() {
  return G == 1 ? 4 : 1;
}

template <typename T, int NB, int G>
FASTRNN_INLINE void fused_panels(const FusedStep<T>& s, int64_t p0, int64_t p1) {
  constexpr int UV = units_vectors<G>();
  constexpr int U = UV * panel::Vec<T>::L;
  constexpr int64_t SW = int64_t(panel::stripe_vecs(NB, G * UV)) * panel::Vec<T>::L;  // a stripe's row
  alignas(64) T C[panel::kMR * G * U];
  const int64_t H = s.H, GH = s.GH;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t j0 = p * U, nu = std::min<int64_t>(U, H - j0);
    const T* wpan = s.wp + p * H * G * U;
    for (int64_t ib = 0, nb = panel::row_blocks(s.bs); ib < nb; ++ib) {
      const int64_t i0 = panel::row_block(s.bs, ib), m = panel::row_block(s.bs, ib + 1) - i0;
      if (G != 3 && s.wx) {
        if constexpr (G != 3)
          panel::product_rows<T, NB, G * UV, false, G * UV, true>(s.hcur + i0 * H, H, m, H, wpan, H * SW, C,
                                                                  G * U, s.x + (s.off + i0) * s.I, s.I, s.I,
                                                                  s.wx + p * s.I * G * U, s.I * SW);
      } else {
        panel::prefetch_gate_rows(s.xg + (s.off + i0 - s.xg_row0) * GH + j0, GH, m, G, H, nu);
        panel::product_rows<T, NB, G * UV>(s.hcur + i0 * H, H, m, H, wpan, H * SW, C, G * U);
      }
      for (int64_t i = 0; i < m; ++i) {
        const int64_t b = i0 + i, row = s.off + b;
        const T* xr = s.xg + (row - s.xg_row0) * s.xg_ld + j0;
        const T* hr = C + i * G * U;
        T* hn = s.hnext + b * H + j0;
        if constexpr (G == 4) {
          if (s.save)
            lstm_panel_row<true, T, NB>(nu, U, xr, H, hr, s.c + b * H + j0, hn, s.ws0 + row * GH + j0,
                                    s.ws1 + row * H + j0);
          else
            lstm_panel_row<false, T, NB>(nu, U, xr, H, hr, s.c + b * H + j0, hn, nullptr, nullptr);
        } else if constexpr (G == 3) {
          const T* bh = s.bhn ? s.bhn + j0 : nullptr;
          if (s.save)
            gru_panel_row<true, T, NB>(nu, U, xr, H, hr, bh, s.hcur + b * H + j0, hn, s.ws0 + row * GH + j0,
                                       s.ws1 + row * H + j0);
          else
            gru_panel_row<false, T, NB>(nu, U, xr, H, hr, bh, s.hcur + b * H + j0, hn, nullptr, nullptr);
        } else if (nu == U) {
          rnn_forward_row<T, GateVec<T, NB>>(U, s.act, xr, hr, hn);
        } else {
          rnn_forward_row<T>(nu, s.act, xr, hr, hn);
        }
        T* o = s.out + row * H + j0;
        if (o != hn)  // (hnext is the step's output rows wherever the schedule allows)
          for (int64_t u = 0; u < nu; ++u) o[u] = hn[u];
      }
    }
  }
}

template <typename T, int NB>
FASTRNN_INLINE void fused_step_impl(const FusedStep<T>& s, int64_t p0, int64_t p1) {
  switch (s.cell) {
    case Cell::LSTM: fused_panels<T, NB, 4>(s, p0, p1); break;
    case Cell::GRU: fused_panels<T, NB, 3>(s, p0, p1); break;
    case Cell::RNN: fused_panels<T, NB, 1>(s, p0, p1); break;
  }
}


// ---------------------------------------------------------------------------------------
// A single step (T = 1: a frame at a time, and the cells), with few rows. Packing W_hh or
// dispatching two GEMMs costs more than the step, so each thread takes blocks of kStepU hidden
// units, computes their G gate rows of x W_ih^T and h W_hh^T as dot products straight from the
// weights as they lie, and applies the gate math at once: one parallel region, no buffers.
// ---------------------------------------------------------------------------------------
constexpr int64_t kStepU = 16;
constexpr int64_t kStepMaxRows = 8;  // above this a GEMM over all rows wins

template <typename T>
struct OneStep {
  Cell cell;
  bool save;
  Nonlinearity act;
  int64_t I, H, GH, rows;
  const T* x;     // [rows, I]
  const T* h;     // [rows, H] h_{t-1}
  const T* w_ih;  // [GH, I]
  const T* w_hh;  // [GH, H]
  const T* b_ih;  // [GH] or null
  const T* b_hh;  // [GH] or null (GRU: only its r and z parts are added here, b_hn below)
  const T* bhn;   // [H] GRU b_hn or null
  T* c;           // [rows, H] LSTM c, updated in place
  T* out;         // [rows, H] h_t
  T* ws0;         // [rows, GH] saved gate activations or null
  T* ws1;         // [rows, H] saved LSTM cells / GRU hn or null
};

template <typename T, int NB>
FASTRNN_INLINE void one_step_impl(const OneStep<T>& s, int64_t blk0, int64_t blk1) {
  constexpr int64_t U = kStepU, MR = panel::kDotMR;
  const int64_t G = s.GH / s.H, H = s.H, GH = s.GH;
  alignas(64) T xg[MR * 4 * U], hg[MR * 4 * U];
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t j0 = blk * U, nu = std::min<int64_t>(U, H - j0);
    for (int64_t b0 = 0; b0 < s.rows; b0 += MR) {
      const int64_t m = std::min<int64_t>(MR, s.rows - b0);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r0 = g * H + j0;
        panel::dot_block<T, NB>(s.x + b0 * s.I, s.I, m, s.w_ih + r0 * s.I, s.I, nu, s.I, xg + g * U, G * U);
        panel::dot_block<T, NB>(s.h + b0 * H, H, m, s.w_hh + r0 * H, H, nu, H, hg + g * U, G * U);
        if (s.b_ih) {
          const bool hh = !(s.cell == Cell::GRU && g == 2);  // b_hn sits inside r * (W_hn h + b_hn)
          for (int64_t i = 0; i < m; ++i)
            for (int64_t u = 0; u < nu; ++u)
              xg[i * G * U + g * U + u] += s.b_ih[r0 + u] + (hh ? s.b_hh[r0 + u] : T(0));
        }
      }
      for (int64_t i = 0; i < m; ++i) {
        const int64_t b = b0 + i;
        const T* xr = xg + i * G * U;
        const T* hr = hg + i * G * U;
        T* hn = s.out + b * H + j0;
        switch (s.cell) {
          case Cell::LSTM:
            if (s.save)
              lstm_forward_row<true, T>(nu, xr, U, hr, U, s.c + b * H + j0, hn, s.ws0 + b * GH + j0, H,
                                        s.ws1 + b * H + j0);
            else
              lstm_forward_row<false, T>(nu, xr, U, hr, U, s.c + b * H + j0, hn, nullptr, H, nullptr);
            break;
          case Cell::GRU: {
            const T* bh = s.bhn ? s.bhn + j0 : nullptr;
            if (s.save)
              gru_forward_row<true, T>(nu, xr, U, hr, U, bh, s.h + b * H + j0, hn, s.ws0 + b * GH + j0, H,
                                       s.ws1 + b * H + j0);
            else
              gru_forward_row<false, T>(nu, xr, U, hr, U, bh, s.h + b * H + j0, hn, nullptr, H, nullptr);
            break;
          }
          case Cell::RNN:
            rnn_forward_row<T>(nu, s.act, xr, hr, hn);
            break;
        }
      }
    }
  }
}

FASTRNN_ISA_KERNEL(forward_rows, FwdRows, forward_rows_impl)
FASTRNN_ISA_KERNEL(backward_rows, BwdRows, backward_rows_impl)
FASTRNN_ISA_KERNEL(fused_step, FusedStep, fused_step_impl)
FASTRNN_ISA_KERNEL(one_step, OneStep, one_step_impl)

// ---------------------------------------------------------------------------------------
// Backward of a single step with few rows (the cells, a frame at a time): after the pointwise
// pass, every product is a weight read or written once: dx = dG_x W_ih and dh = dG_h W_hh read
// the weights row by row, dW_ih = dG_x^T x and dW_hh = dG_h^T h_prev write them row by row.
// One pass over the gate rows does all four (each thread a range of gate rows, its own partial
// dx and dh, added up after), instead of four BLAS calls that each dispatch, thread and read or
// write the whole matrix.
// ---------------------------------------------------------------------------------------
template <typename T>
struct OneStepGrad {
  int64_t m, I, P, GH, slices;
  const T* dgx;   // [m, GH] dL/d(x W_ih^T + b) per gate row
  const T* dgh;   // [m, GH] dL/d(h W_hh^T) per gate row (dgx but for the GRU)
  const T* x;     // [m, I]
  const T* h;     // [m, P] h_{t-1}
  const T* w_ih;  // [GH, I]
  const T* w_hh;  // [GH, P]
  T* gw_ih;       // [GH, I]
  T* gw_hh;       // [GH, P]
  T* dx;          // [slices, m, I], zeroed: slice sl's share of dgx W_ih (null: not needed)
  T* dh;          // [slices, m, P], zeroed: slice sl's share of dgh W_hh (null: not needed)
  bool weights;   // whether gw_ih and gw_hh are needed
};

template <typename T, int NB>
FASTRNN_INLINE void one_step_grad_impl(const OneStepGrad<T>& s, int64_t sl0, int64_t sl1) {
  const int64_t I = s.I, P = s.P, GH = s.GH;
  for (int64_t sl = sl0; sl < sl1; ++sl) {
    T* FASTRNN_RESTRICT dx = s.dx ? s.dx + sl * s.m * I : nullptr;
    T* FASTRNN_RESTRICT dh = s.dh ? s.dh + sl * s.m * P : nullptr;
    for (int64_t g = GH * sl / s.slices; g < GH * (sl + 1) / s.slices; ++g) {
      const T* FASTRNN_RESTRICT wi = s.w_ih + g * I;
      const T* FASTRNN_RESTRICT wh = s.w_hh + g * P;
      T* FASTRNN_RESTRICT gwi = s.gw_ih + g * I;
      T* FASTRNN_RESTRICT gwh = s.gw_hh + g * P;
      for (int64_t b = 0; b < s.m; ++b) {
        const T a = s.dgx[b * GH + g], c = s.dgh[b * GH + g];
        const T* FASTRNN_RESTRICT xb = s.x + b * I;
        const T* FASTRNN_RESTRICT hb = s.h + b * P;
        T* FASTRNN_RESTRICT dxb = dx ? dx + b * I : nullptr;
        T* FASTRNN_RESTRICT dhb = dh ? dh + b * P : nullptr;
        if (s.weights && b == 0) {
          for (int64_t i = 0; i < I; ++i) gwi[i] = a * xb[i];
          for (int64_t p = 0; p < P; ++p) gwh[p] = c * hb[p];
        } else if (s.weights) {
          for (int64_t i = 0; i < I; ++i) gwi[i] += a * xb[i];
          for (int64_t p = 0; p < P; ++p) gwh[p] += c * hb[p];
        }
        // (W_ih and W_hh are read only for these: a step over data with a detached state, as in
        // streaming training, reads neither)
        if (s.dx)
          for (int64_t i = 0; i < I; ++i) dxb[i] += a * wi[i];
        if (s.dh)
          for (int64_t p = 0; p < P; ++p) dhb[p] += c * wh[p];
      }
    }
  }
}

FASTRNN_ISA_KERNEL(one_step_grad, OneStepGrad, one_step_grad_impl)



// Outputs: output [lead, P], hy [B, P], cy [B, H] (LSTM), and the workspace saved for
// backward when train: ws0 = gate activations [N, G*H]; ws1 = LSTM cells c_t / GRU (W_hn h + b_hn)
// [N, H]; ws2 = LSTM projection input o*tanh(c_t) [N, H]. Unused ones are empty.
struct ForwardOut {
  at::Tensor output, hy, cy, ws0, ws1, ws2;
};

// The input projection computed a chunk of steps at a time, right before those steps run: the
// chunk is still in cache when it is read, and no [T*B, G*H] buffer (tens of MB, faulted in
// page by page on every call) is allocated. A chunk is ~8 MB of projections
// (FASTRNN_CHUNK_STEPS=n forces n steps a chunk, for tests).
struct XgChunk {
  at::Tensor rows;
  int64_t row0 = 0;
};

//
// Float32 and float64 projections of 32 rows or more run on the panel kernel (W_ih^T packed in
// column panels, the bias added as the tiles are written): measured on this machine, 2 threads,
// against oneDNN's linear: 100x256 @ 256x1024 112 vs 129 us, 1600x256 @ 256x1024 1.77 vs 2.47 ms,
// 6400x512 @ 512x2048 28 vs ~31 ms (oneDNN's short-K GEMMs run well below its peak). Inference
// keeps the packing between calls (pack_cache.h); training packs for the call (the weight
// changes every step, and a cached copy would cost a second copy).
constexpr int64_t kPanelProjectionMinRows = 32;
constexpr int64_t kPanelWeightGradMinRows = 8;
// Below this input size oneDNN's GEMM wins (5120x32 @ 32x128: 110 us against 142).
constexpr int64_t kPanelProjectionMinK = 64;

template <typename T>
class ChunkedProjection {
 public:
  ChunkedProjection(const Args& a, at::Tensor bias, bool train) : a_(a), bias_(std::move(bias)) {
    const int64_t step_bytes = std::max<int64_t>(1, a.sched.B * a.G * a.H * int64_t(a.opts.dtype().itemsize()));
    steps_ = std::max<int64_t>(1, (int64_t(8) << 20) / step_bytes);
    if (const char* forced = std::getenv("FASTRNN_CHUNK_STEPS")) steps_ = std::max<int64_t>(1, std::atoll(forced));
    const int o = gemm_backend_override().load();
    const int64_t GH = a.G * a.H;
    if (!a.lowp && (o == 0 || o == 4) && a.sched.N >= kPanelProjectionMinRows && a.I >= kPanelProjectionMinK &&
        GH * a.I <= kPanelMaxWeightElems)
      panel_ = std::make_unique<PanelGemm<T>>(a.w_ih, /*trans_b=*/true, GH, a.I, train ? -1 : 2000);
    if (a.lowp && !lowp_gemms(a)) w_ih_f32_ = a.w_ih.to(at::kFloat);
  }
  int64_t steps_per_chunk() const { return steps_; }
  // Projections of the rows of processing steps [s0, s1).
  XgChunk compute(int64_t s0, int64_t s1) const {
    const Schedule& s = a_.sched;
    const int64_t ta = s.time_at(s0), tb = s.time_at(s1 - 1);
    const int64_t lo = std::min(ta, tb), hi = std::max(ta, tb);
    XgChunk c;
    c.row0 = s.off[lo];
    const at::Tensor x = a_.x.narrow(0, c.row0, s.off[hi] + s.bs[hi] - c.row0);
    if (w_ih_f32_.defined()) {
      c.rows = fast_linear(x.to(at::kFloat), w_ih_f32_, bias_).contiguous();  // (lowp_gemms)
    } else if (a_.lowp) {
      // bfloat16 X W_ih^T (oneDNN; torch's CPU mm has no float32-output variant for bfloat16),
      // widened to float32 and the biases added. Into buffers every chunk of the call reuses: a
      // fresh chunk costs its page faults (measured: widening 6400x2048 into a new tensor 22 ms,
      // into a warm one 2 ms; at::add's bf16+fp32 promotion 44 ms).
      const int64_t rows = x.size(0), GH = a_.w_ih.size(0);
      if (!ybuf_.defined() || ybuf_.size(0) < rows) {
        const int64_t cap = std::max(rows, std::min(a_.sched.N, steps_ * a_.sched.B));
        ybuf_ = empty_big({cap, GH}, a_.x.options());
        fbuf_ = empty_big({cap, GH}, a_.opts);
      }
      at::Tensor y = ybuf_.narrow(0, 0, rows);
      at::mm_out(y, x, a_.w_ih.t());
      c.rows = fbuf_.narrow(0, 0, rows);
      c.rows.copy_(y);
      if (bias_.defined()) c.rows.add_(bias_);
    } else if (panel_) {
      // Into one buffer every chunk of the call reuses (a chunk's steps are done when the next is
      // computed).
      const int64_t rows = x.size(0), GH = a_.w_ih.size(0);
      if (!fbuf_.defined() || fbuf_.size(0) < rows)
        fbuf_ = empty_big({std::max(rows, std::min(a_.sched.N, steps_ * a_.sched.B)), GH}, a_.opts);
      c.rows = fbuf_.narrow(0, 0, rows);
      panel_->run(x.data_ptr<T>(), rows, a_.I, c.rows.data_ptr<T>(), GH, false,
                  bias_.defined() ? bias_.data_ptr<T>() : nullptr);
    } else {
      c.rows = fast_linear(x, a_.w_ih, bias_).contiguous();
    }
    return c;
  }

 private:
  const Args& a_;
  at::Tensor bias_;
  int64_t steps_ = 1;
  std::unique_ptr<PanelGemm<T>> panel_;
  mutable at::Tensor ybuf_, fbuf_;  // a chunk's projections (bfloat16 calls: bf16, and widened)
  at::Tensor w_ih_f32_;             // bfloat16 calls without lowp_gemms: W_ih widened
};

// ---------------------------------------------------------------------------------------
// Fused input. Where W_ih and W_hh together are small (training: they stay in a core's L2
// beside a few rows; inference: up to 2 MB, see below), each step's
// x W_ih^T is taken in the same pass as h W_hh^T (FusedStep::wx) instead of by a chunk GEMM
// before the steps: the G*H-wide projection rows are never written to memory and read back, there
// is no projection phase (nor its fork and join), and the input's product runs at the step
// product's rate (rows of >= 4 share each weight load). The choice depends on the shapes alone,
// never on the thread count, so that results stay bitwise the same on any number of threads
// (tests/test_threads.py). LSTM and RNN only (the GRU's r scales only the recurrent part of n);
// not bfloat16 (x stays bfloat16 for its GEMM). FASTRNN_FUSE_INPUT=0 / 1 turns it off / on
// wherever the cell allows (tests and measurements). Inference takes it up to 2 MB of weights
// (beyond a core's L2, but the projection phase it saves costs more: measured, Zen 4, 2
// threads, T=100, B=16, I=H=256, 9.86 -> 8.99 ms; T=200, B=16, I=128, H=256, 16.1 -> 13.6 ms);
// training only to 640 KB (at T=100, B=16, I=H=256 it measured 29.9 against 30.2 ms: the
// saved gates' writes compete with the weights' reads).
// ---------------------------------------------------------------------------------------
constexpr double kFusedInputMaxWeightBytes = 640.0 * 1024;
constexpr double kFusedInputMaxWeightBytesInference = 2048.0 * 1024;
constexpr int64_t kFusedInputMinRows = 4;

bool fuse_input(const Args& a, bool train) {
  const char* e = std::getenv("FASTRNN_FUSE_INPUT");  // (read each call, as FASTRNN_CHUNK_STEPS)
  const int o = e && *e ? std::atoi(e) : -1;
  if (a.cell == Cell::GRU || a.lowp || o == 0) return false;
  if (o == 1) return true;
  const double w_bytes = double(a.I + a.H) * double(a.G * a.H) * double(a.opts.dtype().itemsize());
  return w_bytes <= (train ? kFusedInputMaxWeightBytes : kFusedInputMaxWeightBytesInference) &&
         a.sched.B >= kFusedInputMinRows;
}

template <typename T>
void fused_forward_kernel(const Args& a, bool train, ForwardOut& o) {
  const Schedule& s = a.sched;
  const int64_t H = a.H, G = a.G, GH = a.G * a.H, B = s.B;
  const int64_t U = int64_t(panel::Vec<T>::L) *
                    (a.cell == Cell::RNN ? units_vectors<1>() : a.cell == Cell::GRU ? units_vectors<3>() : units_vectors<4>());
  const int64_t NR = G * U, n_panels = (H + U - 1) / U;
  const auto opts = a.opts;

  PhaseTimer timer("fused forward");
  at::Tensor b_hn;
  at::Tensor bias = folded_bias(a.cell, a.H, a.b_ih, a.b_hh, b_hn);
  const bool fuse_x = fuse_input(a, train);
  std::optional<ChunkedProjection<T>> projection;
  at::Tensor wx;
  if (fuse_x) {
    wx = gate_panels<T>(a.w_ih, G, H, U);
    if (!bias.defined()) bias = at::zeros({GH}, opts);
  } else {
    projection.emplace(a, bias, train);
  }
  at::Tensor wp = gate_panels<T>(a.w_hh_src, G, H, U);
  timer.mark("pack W_hh");

  at::Tensor hbuf = at::empty({2, B, H}, opts);
  hbuf.select(0, 0).copy_(a.hx);
  hbuf.select(0, 1).copy_(a.hx);
  if (a.cell == Cell::LSTM) o.cy = a.cx.clone();
  o.output = empty_big(lead_with(a, H), opts);
  if (train && a.cell != Cell::RNN) {
    o.ws0 = empty_big({s.N, GH}, opts);
    o.ws1 = empty_big({s.N, H}, opts);
  }

  FusedStep<T> st{a.cell, train, a.relu ? Nonlinearity::Relu : Nonlinearity::Tanh, H, GH, U, n_panels, 0, 0,
                  wp.data_ptr<T>(), fuse_x ? bias.data_ptr<T>() : nullptr, 0, fuse_x ? 0 : GH,
                  fuse_x ? wx.data_ptr<T>() : nullptr, fuse_x ? a.x.data_ptr<T>() : nullptr, a.I, nullptr, nullptr,
                  a.cell == Cell::LSTM ? o.cy.data_ptr<T>() : nullptr, o.output.data_ptr<T>(),
                  o.ws0.defined() ? o.ws0.data_ptr<T>() : nullptr, o.ws1.defined() ? o.ws1.data_ptr<T>() : nullptr,
                  b_hn.defined() ? b_hn.data_ptr<T>() : nullptr};
  T* hb = hbuf.data_ptr<T>();
  // Rows [0, bs_t) of step t start from rows [0, bs_t) of the previous step's output, which are
  // there wherever batch sizes do not grow from one processed step to the next (everything but a
  // reversed PackedSequence): each step then writes h_t straight into its output rows, which the
  // next step reads, and nothing is copied. Otherwise h is double-buffered and copied out.
  const bool in_place = !s.reverse || s.bs.front() == s.bs.back();
  T* out_rows = o.output.data_ptr<T>();
  auto step_args = [&](int64_t step) {
    FusedStep<T> x = st;
    const int64_t t = s.time_at(step);
    x.bs = s.bs[t];
    x.off = s.off[t];
    if (in_place) {
      x.hcur = step == 0 ? hb : out_rows + s.off[s.time_at(step - 1)] * H;
      x.hnext = out_rows + x.off * H;
    } else {
      x.hcur = hb + (step % 2) * B * H;
      x.hnext = hb + (1 - step % 2) * B * H;
    }
    return x;
  };
  const int64_t slices = std::min<int64_t>(at::get_num_threads(), n_panels);
  const bool split = slices > 1 && threads_pay(double(B) * double(G * H) * double(H),
                                               double(G * H) * double(H) * double(sizeof(T)));
  // Fused input: one chunk of every step, W_ih and W_hh read by each thread every step.
  const double w_bytes = double(fuse_x ? a.I + H : H) * double(GH) * double(sizeof(T));
  const int64_t chunk_steps = fuse_x ? s.T : projection->steps_per_chunk();
  for (int64_t c0 = 0; c0 < s.T; c0 += chunk_steps) {
    const int64_t c1 = std::min(s.T, c0 + chunk_steps);
    XgChunk chunk;  // (owns the rows st.xg points into until the chunk's steps are done)
    if (!fuse_x) {
      chunk = projection->compute(c0, c1);
      timer.mark("projection");
      st.xg = chunk.rows.data_ptr<T>();
      st.xg_row0 = chunk.row0;
    }
    const int64_t row_sl = row_slices(B, w_bytes, double(c1 - c0) * double(B) * w_bytes / double(sizeof(T)),
                                      fuse_x ? kFusedInputMaxWeightBytes : kRowSplitMaxWeightBytes);
    if (row_sl > 1) {  // each thread its rows, every step and every panel (team.h)
      run_row_split_steps(c0, c1, B, H, row_sl, step_args, [&](const FusedStep<T>& x) { fused_step(x, 0, n_panels); });
    } else {
      run_panel_steps(c0, c1, n_panels, H, NR, split, step_args,
                      [](const FusedStep<T>& x, int64_t p0, int64_t p1) { fused_step(x, p0, p1); });
    }
    if (fuse_x)
      timer.mark(row_sl > 1 ? "time loop, input fused, rows split" : "time loop, input fused");
    else
      timer.mark(row_sl > 1 ? "time loop, rows split" : "time loop");
  }

  // h_n of each row is its output at its last processed step.
  o.hy = at::empty({B, H}, opts);
  T* hy = o.hy.data_ptr<T>();
  const T* out = o.output.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t last_t = 0;
    if (!s.reverse)
      while (last_t + 1 < s.T && s.bs[last_t + 1] > b) ++last_t;
    std::memcpy(hy + b * H, out + (s.off[last_t] + b) * H, sizeof(T) * H);
  }
}

template <typename T>
void forward_kernel(const Args& a, bool train, ForwardOut& o) {
  const Schedule& s = a.sched;
  const int64_t H = a.H, P = a.P, GH = a.G * a.H, B = s.B;
  const bool proj = a.w_hr.defined();

  PhaseTimer timer("forward");
  at::Tensor b_hn;
  const ChunkedProjection<T> projection(a, folded_bias(a.cell, a.H, a.b_ih, a.b_hh, b_hn), train);

  o.hy = a.hx.clone();
  if (a.cell == Cell::LSTM) o.cy = a.cx.clone();
  o.output = empty_big(lead_with(a, P), a.opts);
  if (train && a.cell != Cell::RNN) o.ws0 = empty_big({s.N, GH}, a.opts);
  if (train && a.cell != Cell::RNN) o.ws1 = empty_big({s.N, H}, a.opts);
  if (train && proj) o.ws2 = empty_big({s.N, H}, a.opts);
  at::Tensor hg = at::empty({B, GH}, a.opts);
  at::Tensor rbuf = (proj && !train) ? at::empty({B, H}, a.opts) : at::Tensor();

  // MKL packing pays back only over several steps.
  const int64_t pack_m = s.T > 1 ? B : 0;
  // (Unused when the product runs in bfloat16: nothing packed, W_hh not read.)
  WeightGemm<T> rec(a.bf16_rec ? nullptr : a.w_hh.data_ptr<T>(), /*trans_b=*/true, GH, P, a.bf16_rec ? 0 : B,
                    a.bf16_rec ? 0 : pack_m);

  std::unique_ptr<WeightGemm<T>> projg;
  if (proj) projg = std::make_unique<WeightGemm<T>>(a.w_hr.data_ptr<T>(), true, P, H, B, pack_m);

  T* hgp = hg.data_ptr<T>();
  T* h = o.hy.data_ptr<T>();
  T* c = a.cell == Cell::LSTM ? o.cy.data_ptr<T>() : nullptr;
  T* out = o.output.data_ptr<T>();
  T* ws0 = o.ws0.defined() ? o.ws0.data_ptr<T>() : nullptr;
  T* ws1 = o.ws1.defined() ? o.ws1.data_ptr<T>() : nullptr;
  T* ws2 = o.ws2.defined() ? o.ws2.data_ptr<T>() : nullptr;
  const T* bhn = b_hn.defined() ? b_hn.data_ptr<T>() : nullptr;
  const Nonlinearity act = a.relu ? Nonlinearity::Relu : Nonlinearity::Tanh;
  const int64_t grain = row_grain(GH);

  XgChunk chunk;
  for (int64_t step = 0, chunk_end = 0; step < s.T; ++step) {
    if (step == chunk_end) {
      chunk_end = std::min(s.T, step + projection.steps_per_chunk());
      chunk = projection.compute(step, chunk_end);
    }
    const int64_t t = s.time_at(step), bs = s.bs[t], off = s.off[t];
    if constexpr (std::is_same_v<T, float>) {
      if (a.bf16_rec)
        bf16_step_gemm(h, bs, P, a.w_hh_src, hgp, GH, false);
      else
        rec.run(h, bs, P, hgp, GH, T(0));
    } else {
      rec.run(h, bs, P, hgp, GH, T(0));
    }
    T* r = proj ? (train ? ws2 + off * H : rbuf.data_ptr<T>()) : h;  // where o*tanh(c) goes
    const FwdRows<T> rows{a.cell, train, act, H, P, GH, off, chunk.rows.data_ptr<T>(), chunk.row0, hgp, h, c, r,
                          proj ? H : P, ws0, ws1, bhn};
    at::parallel_for(0, bs, grain, [&](int64_t b0, int64_t b1) { forward_rows(rows, b0, b1); });
    if (proj) projg->run(r, bs, H, h, P, T(0));
    if (bs > 0) std::memcpy(out + off * P, h, sizeof(T) * bs * P);
  }
  timer.mark("time loop");
}


template <typename T>
void one_step_kernel(const Args& a, bool train, ForwardOut& o) {
  const int64_t H = a.H, GH = a.G * a.H, rows = a.sched.N;
  const auto opts = a.opts;
  // (States copied with memcpy, not clone(): a call here is a few microseconds of work, and
  // clone's dispatch and TensorIterator cost about one each. prepare() made cx contiguous.)
  if (a.cell == Cell::LSTM) {
    o.cy = at::empty({rows, H}, opts);
    if (rows * H > 0) std::memcpy(o.cy.data_ptr<T>(), a.cx.data_ptr<T>(), sizeof(T) * rows * H);
  }
  o.output = at::empty(lead_with(a, H), opts);
  const T* b_ih = a.b_ih.defined() ? a.b_ih.data_ptr<T>() : nullptr;
  const T* b_hh = a.b_hh.defined() ? a.b_hh.data_ptr<T>() : nullptr;
  if (train && a.cell != Cell::RNN) {
    o.ws0 = at::empty({rows, GH}, opts);
    o.ws1 = at::empty({rows, H}, opts);
  }
  const OneStep<T> st{a.cell, train, a.relu ? Nonlinearity::Relu : Nonlinearity::Tanh, a.I, H, GH, rows,
                      a.x.data_ptr<T>(), a.hx.data_ptr<T>(), a.w_ih.data_ptr<T>(), a.w_hh.data_ptr<T>(),
                      b_ih, b_hh, (b_hh && a.cell == Cell::GRU) ? b_hh + 2 * H : nullptr,
                      a.cell == Cell::LSTM ? o.cy.data_ptr<T>() : nullptr, o.output.data_ptr<T>(),
                      o.ws0.defined() ? o.ws0.data_ptr<T>() : nullptr, o.ws1.defined() ? o.ws1.data_ptr<T>() : nullptr};
  const int64_t blocks = (H + kStepU - 1) / kStepU;
  // Split over threads only when each gets enough weight rows to stream to beat the fork.
  const int64_t block_macs = std::max<int64_t>(1, a.G * kStepU * (a.I + H) * rows);
  const int64_t grain = std::max<int64_t>(1, (int64_t(64) << 10) / block_macs);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) { one_step(st, b0, b1); });
  o.hy = at::empty({rows, H}, opts);
  if (rows * H > 0) std::memcpy(o.hy.data_ptr<T>(), o.output.data_ptr<T>(), sizeof(T) * rows * H);
}


// A single step of more rows than the dot path takes (kStepMaxRows) runs on the fused panels too,
// which stay cached between calls (a decoder's cell, a streaming layer), for every cell and any
// weight size the panels take, in inference and training. Until session 19 it took two BLAS
// GEMMs and a gate pass, unless it was inference with 32 rows or more and (LSTM, RNN) weights
// within 2 MB. Measured (Zen 3, 2 threads, one process, us), inference, the BLAS step, then
// the fused one forced: LSTM B=17, I=H=256 403 -> 263; B=32, I=100, H=384 (3 MB of weights)
// 714 -> 588; B=128, I=256, H=384 2783 -> 1841; B=512, I=100, H=700 22753 -> 17982; B=9, I=32,
// H=64 86 -> 54; B=17, I=512, H=1024 3479 -> 3330; GRU B=17, I=8, H=256 271 -> 153; B=12,
// I=H=100 152 -> 122; B=64, I=256, H=700 2661 -> 2486; RNN B=17, I=100, H=64 85 -> 46; even:
// RNN B=64, I=8, H=256 155 / 158 and B=128, I=32, H=64 65 / 65 (the same path twice, GRU B=32,
// I=H=512: 918 and 997, this VM's noise). Training (forward and backward of a cell, interleaved
// with nn's): LSTM B=17, I=H=256 1614 -> 1529; B=32, I=100, H=384 2623 -> 2382; B=128, I=256,
// H=384 7663 -> 6609; GRU B=17, I=8, H=256 846 -> 719; B=64, I=256, H=700 9792 -> 8849; and with
// W_hh changed before every call (each packing missed): LSTM B=17, I=H=256 1830 -> 1826, B=128,
// I=256, H=384 8262 -> 7405. Earlier, on a Zen 4 (LSTM inference, I=H=256): B=64 0.45 -> 0.40
// ms, B=256 1.53 -> 1.38 ms.
bool prefer_fused(const Args& a) {
  const int o = gemm_backend_override().load();
  if (o == 4) return true;
  if (o != 0) return false;
  return a.G * a.H * a.H <= kPanelMaxWeightElems;
}

// Autocast must not re-cast the kernels' own ATen calls (a float32 at::mm would come back
// bfloat16 inside a torch.autocast("cpu") region): the ops run in the dtypes they are given.
using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;

ForwardOut forward(Args a, bool train) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  ForwardOut o;
  a.bf16_rec = bf16_recurrent(a);
  const bool fused = !a.w_hr.defined() && !a.bf16_rec && prefer_fused(a);
  // The single-step kernel reads x and W_ih as they lie, in the compute dtype: bfloat16 steps
  // take the GEMM path (bfloat16 projection) instead.
  const bool one_step = !a.lowp && !a.w_hr.defined() && a.sched.T == 1 && a.sched.N <= kStepMaxRows &&
                        gemm_backend_override().load() == 0;
  if (!fused && !a.bf16_rec) convert_w_hh(a);
  AT_DISPATCH_FLOATING_TYPES(a.opts.dtype().toScalarType(), "fastrnn_forward", [&] {
    if (one_step)
      one_step_kernel<scalar_t>(a, train, o);
    else if (fused)
      fused_forward_kernel<scalar_t>(a, train, o);
    else
      forward_kernel<scalar_t>(a, train, o);
  });
  if (a.lowp) {
    // bfloat16 out, as torch.nn in bfloat16; the workspace stays float32 (backward's input).
    o.output = o.output.to(at::kBFloat16);
    o.hy = o.hy.to(at::kBFloat16);
    if (o.cy.defined()) o.cy = o.cy.to(at::kBFloat16);
  }
  if (!o.cy.defined()) o.cy = at::empty({0}, a.x.options());
  for (at::Tensor* t : {&o.ws0, &o.ws1, &o.ws2})
    if (!t->defined()) *t = at::empty({0}, a.opts);
  return o;
}

struct BackwardOut {
  at::Tensor grad_input, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr, grad_hx, grad_cx;
};

// A weight gradient over a chunk's rows on the panel kernel: out [GH, C] = (or += when
// accumulate) dG^T X, with dgt = dG^T [GH, rows] (transposed in scratch, as for oneDNN) and X
// given by its rows (row(r): C contiguous elements, anywhere: h_prev is gathered here), packed
// into column panels in scratch slot `slot`. Work split over panels and blocks of GH rows.
template <typename T, typename Row>
void panel_weight_grad(const at::Tensor& dgt, const Row& row, int64_t rows, int64_t C, ScratchSlot slot,
                       at::Tensor& out, bool accumulate) {
  constexpr int64_t NR = panel::kGemmV * panel::Vec<T>::L;
  const int64_t GH = dgt.size(0), n_panels = (C + NR - 1) / NR;
  at::Tensor packed = scratch(slot, {n_panels, rows, NR}, dgt.options());
  T* pk = packed.data_ptr<T>();
  pack_panels<T, false>(pk, rows, C, row);
  if (!accumulate) out = empty_big({GH, C}, dgt.options());
  const panel::GemmArgs<T> g{dgt.data_ptr<T>(), rows, GH, rows, C, pk, out.data_ptr<T>(), C, accumulate};
  PanelGemm<T>::run_split(g, n_panels);
}

// grad_output [N, P] read with its strides (rows rs apart, elements cs apart; 0 where expanded).
template <typename T>
struct GradRows {
  const T* p;
  int64_t rs, cs, P;
  // dh[i, :] += grad_output[row0 + i, :] for i < rows (dh: rows of P contiguous elements).
  void add_to(T* FASTRNN_RESTRICT dh, int64_t row0, int64_t rows) const {
    if (rows <= 0) return;
    if (cs == 1 && rs == P) {
      const T* FASTRNN_RESTRICT g = p + row0 * P;
      for (int64_t i = 0; i < rows * P; ++i) dh[i] += g[i];
      return;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const T* g = p + (row0 + r) * rs;
      T* FASTRNN_RESTRICT d = dh + r * P;
      if (cs == 1) {  // rows apart (a direction's half of a bidirectional layer's output)
        for (int64_t q = 0; q < P; ++q) d[q] += g[q];
      } else if (cs == 0) {
        const T v = g[0];
        for (int64_t q = 0; q < P; ++q) d[q] += v;
      } else {
        for (int64_t q = 0; q < P; ++q) d[q] += g[q * cs];
      }
    }
  }
};

template <typename T>
void backward_kernel(const Args& a, const at::Tensor& grad_out_, const at::Tensor& grad_hy, const at::Tensor& grad_cy,
                     const at::Tensor& output_, const at::Tensor& ws0_, const at::Tensor& ws1_, const at::Tensor& ws2_,
                     GradMask need, BackwardOut& g) {
  const Schedule& s = a.sched;
  const int64_t H = a.H, P = a.P, GH = a.G * a.H, B = s.B, N = s.N;
  const bool proj = a.w_hr.defined();
  PhaseTimer timer("backward");
  // bfloat16 calls: the output and the incoming gradients widened to float32 (no-ops otherwise).
  const auto compute = a.opts.dtype().toScalarType();
  // grad_output as it lies where that is a view: the gradient of out.sum() or out.mean() is one
  // value expanded (strides 0), and materialising it cost a [N, P] copy per call (13 MB at
  // T=100, B=64, P=512).
  const at::Tensor grad_out = grad_out_.reshape({N, P}).to(compute);
  const GradRows<T> go{grad_out.data_ptr<T>(), grad_out.stride(0), grad_out.stride(1), P};
  at::Tensor output = output_.reshape({N, P}).to(compute).contiguous();
  at::Tensor ws0 = ws0_.contiguous(), ws1 = ws1_.contiguous(), ws2 = ws2_.contiguous();

  at::Tensor dh = grad_hy.to(compute).contiguous().clone();
  at::Tensor dc = a.cell == Cell::LSTM ? grad_cy.to(compute).contiguous().clone() : at::Tensor();
  at::Tensor dh_all = proj && need.weights ? empty_big({N, P}, a.opts) : at::Tensor();
  at::Tensor drbuf = proj ? at::empty({B, H}, a.opts) : at::Tensor();
  const Nonlinearity act = a.relu ? Nonlinearity::Relu : Nonlinearity::Tanh;

  if (s.T == 1 && N >= 1 && N <= kStepMaxRows && !proj && !a.lowp && gemm_backend_override().load() == 0) {
    // One step, few rows (the forward's one_step_kernel case): the pointwise pass, then one pass
    // over the weights (one_step_grad).
    T* dhp = dh.data_ptr<T>();
    go.add_to(dhp, 0, N);
    at::Tensor dgx = at::empty({N, GH}, a.opts);
    at::Tensor dgh = a.cell == Cell::GRU ? at::empty({N, GH}, a.opts) : dgx;
    const BwdRows<T> rows{a.cell, act, H, P, GH, 0, 0, &s, ws0.numel() ? ws0.data_ptr<T>() : nullptr,
                          ws1.numel() ? ws1.data_ptr<T>() : nullptr, output.data_ptr<T>(), a.hx.data_ptr<T>(),
                          a.cell == Cell::LSTM ? a.cx.data_ptr<T>() : nullptr, dhp, dhp,
                          dc.defined() ? dc.data_ptr<T>() : nullptr, dgx.data_ptr<T>(), dgh.data_ptr<T>(), 0};
    backward_rows(rows, 0, N);
    const int64_t slices = std::max<int64_t>(
        1, std::min<int64_t>(at::get_num_threads(), (GH * (a.I + P) * N) / (int64_t(64) << 10)));
    const at::Tensor dx_part = need.input ? at::zeros({slices, N, a.I}, a.opts) : at::Tensor();
    const at::Tensor dh_part = need.state ? at::zeros({slices, N, P}, a.opts) : at::Tensor();
    if (need.weights) {
      g.grad_w_ih = empty_big({GH, a.I}, a.opts);
      g.grad_w_hh = empty_big({GH, P}, a.opts);
    }
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    const OneStepGrad<T> st{N, a.I, P, GH, slices, dgx.data_ptr<T>(), dgh.data_ptr<T>(), a.x.data_ptr<T>(),
                            a.hx.data_ptr<T>(), a.w_ih.data_ptr<T>(), a.w_hh.data_ptr<T>(), ptr(g.grad_w_ih),
                            ptr(g.grad_w_hh), ptr(dx_part), ptr(dh_part), need.weights};
    at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) { one_step_grad(st, s0, s1); });
    // The slices' partial products added up; the GRU's row pass left z * dh in dh, which the
    // recurrent product adds to (the other cells' dh is the product alone).
    if (need.input) g.grad_input = (slices > 1 ? dx_part.sum(0) : dx_part[0]).reshape(lead_with(a, a.I));
    if (need.state) {
      const at::Tensor dhr = slices > 1 ? dh_part.sum(0) : dh_part[0];
      g.grad_hx = a.cell == Cell::GRU ? dh.add_(dhr) : dhr;
    }
    if (need.weights) {
      g.grad_b_ih = dgx.sum(0);
      g.grad_b_hh = a.cell == Cell::GRU ? dgh.sum(0) : g.grad_b_ih.clone();
    }
    g.grad_w_hr = at::empty({0}, a.opts);
    g.grad_cx = dc.defined() ? dc : at::empty({0}, a.opts);
    timer.mark("one step");
    return;
  }

  // The steps run in chunks (in processing order, backwards), each followed by its share of the
  // weight gradients (dW_hh += dG_h^T h_prev, dW_ih += dG_x^T X, over the chunk's rows) and its
  // rows of grad_input = dG_x W_ih. dG then needs a buffer for one chunk (~8 MB), not [N, G*H],
  // and is still in cache when the GEMMs read it: training's peak memory stays below torch.nn's
  // (measured at T=100, B=64, I=H=512). oneDNN wants K-contiguous operands for these long-K
  // products, so each chunk's dG and X are transposed (at the chunk's size). Products on neither
  // the panel kernel (below) nor oneDNN take one chunk and at::mm, which needs no transposes.
  // On oneDNN, a chunk's dG is ~8 MB, or up to 32 MB where the weight gradients are large: each
  // chunk's GEMMs write a whole [GH, I] and [GH, P] product (fresh from oneDNN) then added up, so
  // a chunk should hold more rows of dG than the gradients have (measured, T=50, B=32, I=H=1024:
  // 8 MB chunks, 4 of them, 41 ms each for dW_ih and dW_hh plus 5 ms of sums; one chunk, ~30).
  const int64_t step_bytes = std::max<int64_t>(1, B * GH * int64_t(sizeof(T)));
  const int64_t grad_bytes = GH * (a.I + P) * int64_t(sizeof(T));
  // The chunk GEMMs (grad_input = dG_x W_ih and the weight gradients dG^T [X | h_prev]) run on the
  // panel kernel for float32/float64 with enough rows (as the forward's projection), accumulating
  // the weight gradients in place: chunks of 8 MB of dG then, which stay in L3 while each panel
  // of the product streams them (measured per chunk, 2 threads, against oneDNN: T=100, B=16,
  // I=H=256 dW_hh 2.43 -> 2.07 ms, dW_ih 2.06 -> 1.72, grad_input 2.11 -> 1.67; B=64, I=H=512
  // dW_hh 8.5 -> 8.0, dW_ih 7.7 -> 7.0, grad_input 7.7 -> 7.4; with a 26 MB dG at I=H=1024 the
  // weight gradients ran 15% slower than oneDNN's). X and h_prev at least a panel wide (at I = H =
  // 32, half-empty panels: training T=5, B=1024 ran 2.75 -> 3.05-3.55 ms).
  constexpr int64_t kNR = panel::kGemmV * panel::Vec<T>::L;
  const int backend = gemm_backend_override().load();
  // The weight gradients take the panel kernel from fewer rows than grad_input, whose W_ih it
  // would pack for the call: with few rows their product is bound by writing the [GH, I + P]
  // result, which the panel kernel writes into pooled memory (oneDNN's result is fresh memory
  // whose pages fault in: the likely cost, not measured apart; at T=1, B=17, I=64, H=700, proj
  // 350 its dW_hh took 0.65 ms, 51 GFLOP/s, in torch's profiler). Measured, training a layer,
  // 2 threads, panel from 8 rows against from 32 (two interleaved runs): T=1, I=H=1024, B=12
  // 1.12x / 1.59x, B=31 1.49x / 1.24x; I=H=512, B=24 1.48x / 1.35x; GRU I=H=256, B=16 1.05x /
  // 1.04x; T=3, B=8, GRU I=H=300 1.05x / 1.08x; but I=H=512, B=31 0.94x / 0.96x, I=128, H=1024,
  // B=31 0.98x / 0.99x and T=2, B=10, I=H=768 0.93x / 0.98x.
  const bool panel_ok = !a.lowp && (backend == 0 || backend == 4) && a.I >= kNR && P >= kNR &&
                        GH * a.I <= kPanelMaxWeightElems;
  const bool panel_products = panel_ok && N >= kPanelProjectionMinRows && need.input;
  const bool panel_wgrad = panel_ok && N >= kPanelWeightGradMinRows && need.weights;
  const bool chunked = N > 0 && (panel_products || panel_wgrad ||
                                 use_onednn_for(GH, std::max(a.I, P), N, std::is_same_v<T, float>));
  const int64_t chunk_bytes = panel_products || panel_wgrad
                                  ? int64_t(8) << 20
                                  : std::clamp<int64_t>(2 * grad_bytes, int64_t(8) << 20, int64_t(32) << 20);
  int64_t chunk_steps = chunked ? std::max<int64_t>(1, chunk_bytes / step_bytes) : std::max<int64_t>(1, s.T);
  if (const char* forced = std::getenv("FASTRNN_CHUNK_STEPS")) chunk_steps = std::max<int64_t>(1, std::atoll(forced));
  const int64_t cap_rows = std::max<int64_t>(1, std::min(N, chunk_steps * B));
  at::Tensor dgx = scratch(kScratchDgx, {cap_rows, GH}, a.opts);
  at::Tensor dgh = a.cell == Cell::GRU ? scratch(kScratchDgh, {cap_rows, GH}, a.opts) : dgx;

  const int64_t pack_m = s.T > 1 ? B : 0;
  // dh = dgh W_hh per step: on the panel kernel where it beats BLAS dispatch (and always when
  // forced), else BLAS/oneDNN (WeightGemm, which packs or transposes W_hh up front: only built
  // when it runs), or in bfloat16 (bf16_step_gemm on W_hh^T).
  std::unique_ptr<PanelGemm<T>> rec_panel;
  const at::Tensor w_hh_t = a.bf16_rec ? a.w_hh_src.t().contiguous() : at::Tensor();  // [P, GH] bf16
  {
    const int o = gemm_backend_override().load();
    if (!a.bf16_rec && (o == 4 || (o == 0 && s.T > 1 && GH * P <= kPanelMaxWeightElems)))
      rec_panel = std::make_unique<PanelGemm<T>>(a.w_hh, /*trans_b=*/false, P, GH, /*cache_layout=*/-1);
  }
  const bool blas_rec = !a.bf16_rec && !rec_panel;
  // One step (T = 1) takes plain BLAS, which reads W_hh as it lies: oneDNN would have it
  // transposed first, a pass over W_hh for one product, or for none (without grad_hx the single
  // step's dh is never computed). Measured, a cell's backward at B=32, I=256, H=512: the
  // transpose took 0.39 ms (GRU) and 0.72 ms (LSTM) of it.
  const int64_t rec_rows = s.T > 1 ? B : 0;
  WeightGemm<T> rec(blas_rec ? a.w_hh.data_ptr<T>() : nullptr, /*trans_b=*/false, P, GH, blas_rec ? rec_rows : 0,
                    blas_rec ? pack_m : 0);
  std::unique_ptr<WeightGemm<T>> projg;  // dr = dh W_hr
  if (proj) projg = std::make_unique<WeightGemm<T>>(a.w_hr.data_ptr<T>(), false, H, P, rec_rows, pack_m);

  const T* outp = output.data_ptr<T>();
  const T* g0 = ws0.numel() ? ws0.data_ptr<T>() : nullptr;
  const T* g1 = ws1.numel() ? ws1.data_ptr<T>() : nullptr;
  const T* hx = a.hx.data_ptr<T>();
  const T* cx = a.cell == Cell::LSTM ? a.cx.data_ptr<T>() : nullptr;
  T* dhp = dh.data_ptr<T>();
  T* dcp = dc.defined() ? dc.data_ptr<T>() : nullptr;
  T* dgxp = dgx.data_ptr<T>();
  T* dghp = dgh.data_ptr<T>();
  T* dhall = dh_all.defined() ? dh_all.data_ptr<T>() : nullptr;
  T* drp = proj ? drbuf.data_ptr<T>() : nullptr;
  const int64_t grain = row_grain(GH);

  timer.mark("setup");
  const int64_t slices = rec_panel ? std::min<int64_t>(at::get_num_threads(), rec_panel->panels()) : 1;
  // Decided once: the per-step loop below must not re-check it (it reads the environment).
  const bool team = rec_panel && !proj && use_persistent_team(slices, s.T) &&
                    threads_pay(double(B) * double(GH) * double(P), double(GH) * double(P) * double(sizeof(T)));

  // Runs processing steps [c_lo, c_hi) backwards; their rows start at row0.
  auto run_steps = [&](int64_t c_lo, int64_t c_hi, int64_t row0) -> bool {
    const int64_t row_sl =
        rec_panel && !proj
            ? row_slices(B, double(GH) * double(P) * double(sizeof(T)), double(c_hi - c_lo) * double(B) * double(GH * P))
            : 1;
    if (row_sl > 1) {
      // Each thread its rows through every step, as the fused forward's row split (team.h): a
      // row's dh, dc and dG depend on that row alone.
      const bool gru = a.cell == Cell::GRU;
      run_row_slices(B, row_sl, [&](int64_t r0, int64_t r1) {
        for (int64_t step = c_hi - 1; step >= c_lo; --step) {
          const int64_t t = s.time_at(step), bs = s.bs[t], off = s.off[t];
          const int64_t e = std::min(bs, r1);
          if (e <= r0) continue;
          go.add_to(dhp + r0 * P, off + r0, e - r0);
          const BwdRows<T> rows{a.cell, act, H, P, GH, off, t, &s, g0, g1, outp, hx, cx, dhp, dhp, dcp, dgxp, dghp, row0};
          backward_rows(rows, r0, e);
          if (step == 0 && !need.state) continue;  // (its dh would only be grad_hx)
          rec_panel->run_panels(dghp + (off + r0 - row0) * GH, e - r0, GH, dhp + r0 * P, P, gru, 0,
                                rec_panel->panels());
        }
      });
      return true;
    }
    if (team && c_hi - c_lo > 1) {
      // As in the fused forward: one parallel region, two barriers a step (the row pass writes
      // dG that every panel reads; the panel pass writes columns of dh that every row reads).
      StepBarrier barrier;
      StepUnits units(slices);  // the panel pass's (team.h)
      const int64_t pieces = panel_pieces(rec_panel->panels(), slices), n_units = rec_panel->panels() * pieces;
      const bool gru = a.cell == Cell::GRU;
      at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
        int64_t target = 0;
        for (int64_t step = c_hi - 1; step >= c_lo; --step) {
          const int64_t t = s.time_at(step), bs = s.bs[t], off = s.off[t];
          const int64_t r0 = bs * s0 / slices, r1 = bs * s1 / slices;
          go.add_to(dhp + r0 * P, off + r0, r1 - r0);
          const BwdRows<T> rows{a.cell, act, H, P, GH, off, t, &s, g0, g1, outp, hx, cx, dhp, dhp, dcp, dgxp, dghp, row0};
          backward_rows(rows, r0, r1);
          if (step == 0 && !need.state) break;  // (its dh would only be grad_hx)
          barrier.arrive_and_wait(s1 - s0, target += slices);
          for (int64_t sl = s0; sl < s1; ++sl)
            units.run(sl, n_units, uint32_t(c_hi - step), [&](int64_t u) {
              const int64_t p = u / pieces, q0 = bs * (u % pieces) / pieces, q1 = bs * (u % pieces + 1) / pieces;
              rec_panel->run_panels(dghp + (off + q0 - row0) * GH, q1 - q0, GH, dhp + q0 * P, P, gru, p, p + 1);
            });
          barrier.arrive_and_wait(s1 - s0, target += slices);
        }
      });
      return false;
    }
    for (int64_t step = c_hi - 1; step >= c_lo; --step) {
      const int64_t t = s.time_at(step), bs = s.bs[t], off = s.off[t];
      go.add_to(dhp, off, bs);
      const T* dr = dhp;
      if (proj) {
        if (bs > 0 && dhall) std::memcpy(dhall + off * P, dhp, sizeof(T) * bs * P);
        projg->run(dhp, bs, P, drp, H, T(0));
        dr = drp;
      }
      const BwdRows<T> rows{a.cell, act, H, P, GH, off, t, &s, g0, g1, outp, hx, cx, dr, dhp, dcp, dgxp, dghp, row0};
      at::parallel_for(0, bs, grain, [&](int64_t b0, int64_t b1) { backward_rows(rows, b0, b1); });
      if (step == 0 && !need.state) continue;  // (its dh would only be grad_hx)
      // The GRU's row pass left z * dh in dh: the recurrent GEMM adds to it.
      T* dg = dghp + (off - row0) * GH;
      if constexpr (std::is_same_v<T, float>) {
        if (a.bf16_rec) {
          bf16_step_gemm(dg, bs, GH, w_hh_t, dhp, P, a.cell == Cell::GRU);
          continue;
        }
      }
      if (rec_panel)
        rec_panel->run(dg, bs, GH, dhp, P, a.cell == Cell::GRU);
      else
        rec.run(dg, bs, GH, dhp, P, a.cell == Cell::GRU ? T(1) : T(0));
    }
    return false;
  };

  // For h_prev: the row each row's step started from, or -1 - b for row b of the initial state.
  std::vector<int64_t> prev_of_row(N);
  for (int64_t t = 0; t < s.T; ++t)
    for (int64_t b = 0; b < s.bs[t]; ++b) {
      const int64_t prev = s.prev_row(t, b);
      prev_of_row[s.off[t] + b] = prev >= 0 ? prev : -1 - b;
    }
  // grad_input = dG_x W_ih: oneDNN takes the weight as [N, K] (W_ih^T, transposed once); at::mm
  // takes W_ih as it is.
  // Or on the panel kernel (panel_products, above), W_ih packed for the call.
  std::unique_ptr<PanelGemm<T>> gi_panel;
  if (panel_products) gi_panel = std::make_unique<PanelGemm<T>>(a.w_ih, /*trans_b=*/false, a.I, GH, -1);
  const bool onednn_gi =
      need.input && !gi_panel && !a.lowp && use_onednn_for(N, a.I, GH, std::is_same_v<T, float>);
  at::Tensor w_ih_t = onednn_gi ? transposed<T>(a.w_ih) : at::Tensor();
  if (need.input) g.grad_input = empty_big({N, a.I}, a.x.options());
  if (need.weights) g.grad_b_ih = at::zeros({GH}, a.opts);
  at::Tensor lp_dgx, lp_dgh, lp_hprev;  // bfloat16 calls: per-chunk bf16 operands
  const bool lp_gemms = lowp_gemms(a);
  const at::Tensor w_ih_f32 = a.lowp && !lp_gemms && need.input ? a.w_ih.to(at::kFloat) : at::Tensor();
  at::Tensor grad_b_hn = a.cell == Cell::GRU && need.weights ? at::zeros({GH}, a.opts) : at::Tensor();
  bool first = true;
  for (int64_t c_hi = s.T; c_hi > 0; c_hi -= chunk_steps) {
    const int64_t c_lo = std::max<int64_t>(0, c_hi - chunk_steps);
    const int64_t t_a = s.time_at(c_lo), t_b = s.time_at(c_hi - 1);
    const int64_t t_lo = std::min(t_a, t_b), t_hi = std::max(t_a, t_b);
    const int64_t row0 = s.off[t_lo], rows = s.off[t_hi] + s.bs[t_hi] - row0;
    timer.mark(run_steps(c_lo, c_hi, row0) ? "steps, rows split" : "steps");
    if (rows == 0) continue;
    // h_prev of the chunk's rows, read where it lies (the output rows of the previous step, or
    // the initial state).
    auto hprev_row = [&](int64_t r) -> const T* {
      const int64_t prev = prev_of_row[row0 + r];
      return prev >= 0 ? outp + prev * P : hx + (-1 - prev) * P;
    };
    at::Tensor dgx_c = dgx.narrow(0, 0, rows), dgh_c = dgh.narrow(0, 0, rows);
    auto gather_hprev = [&] {  // (float32, for the bfloat16 calls' GEMMs)
      at::Tensor hprev = scratch(kScratchHprev, {rows, P}, a.opts);
      T* hpv = hprev.data_ptr<T>();
      for (int64_t r = 0; r < rows; ++r) std::memcpy(hpv + r * P, hprev_row(r), sizeof(T) * P);
      return hprev;
    };
    at::Tensor gw_hh, gw_ih, dgx_b;
    if (a.lowp && !lp_gemms) {
      if (need.weights) {  // float32 GEMMs on the widened operands (lowp_gemms)
        const at::Tensor hprev = gather_hprev();
        gw_hh = at::mm(dgh_c.t(), hprev);
        gw_ih = at::mm(dgx_c.t(), a.x.narrow(0, row0, rows).to(at::kFloat));
      }
    } else if (a.lowp) {
      // The chunk's GEMMs in bfloat16 (oneDNN, float32 accumulation inside each product; each
      // chunk's share is added up in float32 and rounded once at the end). The bf16 copies of
      // dG and h_prev go to buffers every chunk reuses (fresh ones fault their pages in).
      if (!lp_dgx.defined()) {
        lp_dgx = empty_big({cap_rows, GH}, a.x.options());
        lp_dgh = a.cell == Cell::GRU ? empty_big({cap_rows, GH}, a.x.options()) : lp_dgx;
        lp_hprev = empty_big({cap_rows, P}, a.x.options());
      }
      if (need.input || need.weights) dgx_b = lp_dgx.narrow(0, 0, rows).copy_(dgx_c);
      if (need.weights) {
        const at::Tensor hprev = gather_hprev();
        const at::Tensor dgh_b = a.cell == Cell::GRU ? lp_dgh.narrow(0, 0, rows).copy_(dgh_c) : dgx_b;
        gw_hh = at::mm(dgh_b.t(), lp_hprev.narrow(0, 0, rows).copy_(hprev)).to(at::kFloat);
        gw_ih = at::mm(dgx_b.t(), a.x.narrow(0, row0, rows)).to(at::kFloat);
      }
    } else if (!need.weights) {
      // (no weight gradients)
    } else if (panel_wgrad) {
      // Both gradients accumulate in place over the chunks; so do the bias gradients, summed as
      // dG is transposed (as on oneDNN, below: gemm.h's col_sums).
      const bool gru = a.cell == Cell::GRU;
      at::Tensor dgt = transposed<T>(dgh_c, kScratchDgT, (gru ? grad_b_hn : g.grad_b_ih).data_ptr<T>());
      timer.mark("dG transpose");
      panel_weight_grad<T>(dgt, hprev_row, rows, P, kScratchHT, g.grad_w_hh, !first);
      timer.mark("dW_hh");
      if (gru) dgt = transposed<T>(dgx_c, kScratchDgT, g.grad_b_ih.data_ptr<T>());
      const T* xr = a.x.data_ptr<T>() + row0 * a.I;
      panel_weight_grad<T>(dgt, [&](int64_t r) { return xr + r * a.I; }, rows, a.I, kScratchXT, g.grad_w_ih,
                           !first);
    } else {
      // dgx_t: shared by both weight gradients when dgh is dgx (its column sums, the bias
      // gradient, taken once: by the first).
      at::Tensor dgx_t;
      const bool gru = a.cell == Cell::GRU;
      gw_hh = weight_grad_rows<T>(dgh_c, hprev_row, P, gru ? nullptr : &dgx_t, kScratchHT, kScratchHprev,
                                  gru ? &grad_b_hn : &g.grad_b_ih);
      timer.mark("dW_hh");
      gw_ih = weight_grad<T>(dgx_c, a.x.narrow(0, row0, rows), &dgx_t, kScratchXT, gru ? &g.grad_b_ih : nullptr);
    }
    timer.mark("dW_ih");
    if (panel_wgrad || !need.weights) {
      // (accumulated in place, or none)
    } else if (first) {
      g.grad_w_hh = gw_hh;
      g.grad_w_ih = gw_ih;
    } else {
      g.grad_w_hh.add_(gw_hh);
      g.grad_w_ih.add_(gw_ih);
    }
    first = false;
    timer.mark("dW sums");
    if (need.input) {
      at::Tensor gi_rows = g.grad_input.narrow(0, row0, rows);
      if (a.lowp && !lp_gemms)
        gi_rows.copy_(at::mm(dgx_c, w_ih_f32));
      else if (a.lowp)
        at::mm_out(gi_rows, dgx_b, a.w_ih);  // bfloat16 rows, rounded once
      else if (gi_panel)
        gi_panel->run(dgxp, rows, GH, gi_rows.data_ptr<T>(), a.I, false);
      else if (onednn_gi)
        gi_rows.copy_(onednn_linear(dgx_c, w_ih_t, at::Tensor()));
      else
        at::mm_out(gi_rows, dgx_c, a.w_ih);
      timer.mark("grad_input");
    }
    if (a.lowp && need.weights) {  // (else summed with the weight gradients)
      g.grad_b_ih.add_(dgx_c.sum(0));
      if (grad_b_hn.defined()) grad_b_hn.add_(dgh_c.sum(0));
      timer.mark("bias sums");
    }
  }
  if (need.weights) {
    if (first) {  // no rows at all
      g.grad_w_hh = at::zeros({GH, P}, a.opts);
      g.grad_w_ih = at::zeros({GH, a.I}, a.opts);
    }
    g.grad_b_hh = a.cell == Cell::GRU ? grad_b_hn : g.grad_b_ih.clone();
    g.grad_w_hr = proj ? weight_grad<T>(dh_all, ws2) : at::empty({0}, a.opts);
  }
  if (need.input) g.grad_input = g.grad_input.reshape(lead_with(a, a.I));
  g.grad_hx = dh;
  g.grad_cx = dc.defined() ? dc : at::empty({0}, a.opts);
  if (a.lowp) {  // every gradient in the dtype of its input, as torch.nn in bfloat16
    for (at::Tensor* t : {&g.grad_w_ih, &g.grad_w_hh, &g.grad_b_ih, &g.grad_b_hh, &g.grad_w_hr, &g.grad_hx,
                          &g.grad_cx})
      if (t->defined()) *t = t->to(at::kBFloat16);
  }
}

void validate_backward(const Args& a, const at::Tensor& grad_output, const at::Tensor& grad_hy,
                       const c10::optional<at::Tensor>& grad_cy, const at::Tensor& output, const at::Tensor& ws0,
                       const at::Tensor& ws1, const at::Tensor& ws2) {
  RecurrentShape shape{a.I, a.H, a.P, a.G, a.sched};
  validate_recurrent_backward(a.op, a.cell, shape, a.x, at::Device(at::kCPU), a.opts.dtype().toScalarType(),
                              a.w_hr.defined(), grad_output, grad_hy, grad_cy, output, ws0, ws1, ws2);
}

// check = false: the caller has validated the arguments (validate_backward).
BackwardOut backward(Args a, const at::Tensor& grad_output, const at::Tensor& grad_hy,
                     const c10::optional<at::Tensor>& grad_cy, const at::Tensor& output, const at::Tensor& ws0,
                     const at::Tensor& ws1, const at::Tensor& ws2, GradMask need, bool check = true) {
  if (check) validate_backward(a, grad_output, grad_hy, grad_cy, output, ws0, ws1, ws2);
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  a.bf16_rec = bf16_recurrent(a);
  if (!a.bf16_rec) convert_w_hh(a);
  BackwardOut g;
  AT_DISPATCH_FLOATING_TYPES(a.opts.dtype().toScalarType(), "fastrnn_backward", [&] {
    backward_kernel<scalar_t>(a, grad_output, grad_hy, grad_cy.has_value() ? *grad_cy : at::Tensor(), output, ws0,
                              ws1, ws2, need, g);
  });
  drop_unmasked(g, need, a.x.options());
  return g;
}

// ----------------------------------------------------------------------------------------
// Op entry points (schemas in csrc/registration.cpp)
// ----------------------------------------------------------------------------------------
using OptT = c10::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward(
    const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& b_ih, const OptT& b_hh,
    const OptT& w_hr, const at::Tensor& hx, const at::Tensor& cx, const OptT& batch_sizes, bool reverse, bool train) {
  Args a = prepare("fastrnn.lstm_forward", Cell::LSTM, input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, batch_sizes,
                   reverse);
  ForwardOut o = forward(a, train);
  return {o.output, o.hy, o.cy, o.ws0, o.ws1, o.ws2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_cy,
              const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& w_hr,
              const at::Tensor& hx, const at::Tensor& cx, const OptT& batch_sizes, bool reverse,
              const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
              const at::Tensor& proj_input, std::array<bool, 3> output_mask) {
  Args a = prepare("fastrnn.lstm_backward", Cell::LSTM, input, w_ih, w_hh, c10::nullopt, c10::nullopt, w_hr, hx, cx,
                   batch_sizes, reverse);
  BackwardOut g = backward(a, grad_output, grad_hy, grad_cy, output, gates, cells, proj_input, GradMask(output_mask));
  return {g.grad_input, g.grad_w_ih, g.grad_w_hh, g.grad_b_ih, g.grad_b_hh, g.grad_w_hr, g.grad_hx, g.grad_cx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_forward(const at::Tensor& input, const at::Tensor& w_ih,
                                                                       const at::Tensor& w_hh, const OptT& b_ih,
                                                                       const OptT& b_hh, const at::Tensor& hx,
                                                                       const OptT& batch_sizes, bool reverse,
                                                                       bool train) {
  Args a = prepare("fastrnn.gru_forward", Cell::GRU, input, w_ih, w_hh, b_ih, b_hh, c10::nullopt, hx, c10::nullopt,
                   batch_sizes, reverse);
  ForwardOut o = forward(a, train);
  return {o.output, o.hy, o.ws0, o.ws1};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& input, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& hx, const OptT& batch_sizes, bool reverse, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& hn, std::array<bool, 3> output_mask) {
  Args a = prepare("fastrnn.gru_backward", Cell::GRU, input, w_ih, w_hh, c10::nullopt, c10::nullopt, c10::nullopt, hx,
                   c10::nullopt, batch_sizes, reverse);
  at::Tensor none = at::empty({0}, input.options());
  BackwardOut g = backward(a, grad_output, grad_hy, c10::nullopt, output, gates, hn, none, GradMask(output_mask));
  return {g.grad_input, g.grad_w_ih, g.grad_w_hh, g.grad_b_ih, g.grad_b_hh, g.grad_hx};
}

std::tuple<at::Tensor, at::Tensor> rnn_forward(const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                               const OptT& b_ih, const OptT& b_hh, const at::Tensor& hx,
                                               const OptT& batch_sizes, bool reverse, bool relu) {
  Args a = prepare("fastrnn.rnn_forward", Cell::RNN, input, w_ih, w_hh, b_ih, b_hh, c10::nullopt, hx, c10::nullopt,
                   batch_sizes, reverse);
  a.relu = relu;
  ForwardOut o = forward(a, false);
  return {o.output, o.hy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& input, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& hx, const OptT& batch_sizes, bool reverse, bool relu,
    const at::Tensor& output, std::array<bool, 3> output_mask) {
  Args a = prepare("fastrnn.rnn_backward", Cell::RNN, input, w_ih, w_hh, c10::nullopt, c10::nullopt, c10::nullopt, hx,
                   c10::nullopt, batch_sizes, reverse);
  a.relu = relu;
  at::Tensor none = at::empty({0}, input.options());
  BackwardOut g = backward(a, grad_output, grad_hy, c10::nullopt, output, none, none, none, GradMask(output_mask));
  return {g.grad_input, g.grad_w_ih, g.grad_w_hh, g.grad_b_ih, g.grad_b_hh, g.grad_hx};
}

// ----------------------------------------------------------------------------------------
// Bidirectional LSTM layers: both directions at once, each on its own thread of one parallel
// region. Inside, a direction runs on that thread alone (nested parallel_for runs inline; oneDNN
// and MKL run single-threaded inside a region), which beats running the directions one after
// the other on both threads: no barrier between steps, no GEMM split in two. Measured (2
// threads, this machine, forward + backward of both directions, sequential vs concurrent):
// T=100, B=16, H=256: I=256 29.9 -> 26.8 ms, I=512 45.4 -> 41.4 ms; T=50, B=16, I=H=128 6.1 ->
// 4.6 ms; T=100, B=64, I=H=512 416 -> 388 ms; inference 6-30% faster. Every argument is
// validated before either direction starts.
// ----------------------------------------------------------------------------------------
constexpr double kConcurrentMinMacs = 1024.0 * 1024;  // per direction; smaller layers run in turn
// The reverse direction's op name in error messages.
#define FASTRNN_REVERSE(op) op " (reverse direction: the *_r arguments)"

template <typename Run>
void both_directions(const Args& a, const Run& run) {
  const double macs = double(a.sched.N) * double(a.G * a.H) * double(a.I + a.P);
  if (at::get_num_threads() < 2 || at::in_parallel_region() || macs < kConcurrentMinMacs) {
    run(0);
    run(1);
    return;
  }
  // The worker thread takes the caller's thread-local state (dispatch keys: the op runs below
  // autograd; grad mode; autocast exclusion), which OpenMP does not carry over.
  const at::ThreadLocalState tls;
  at::parallel_for(0, 2, 1, [&](int64_t d0, int64_t d1) {
    at::ThreadLocalStateGuard guard(tls);
    for (int64_t d = d0; d < d1; ++d) run(d);
  });
}

// Both directions' forward.
void bidir_forward(const Args* a, bool train, ForwardOut* o) {
  both_directions(a[0], [&](int64_t d) { o[d] = forward(a[d], train); });
}

// One direction's arguments of a bidirectional backward op: the incoming gradients (grad_cy for
// the LSTM only), the forward's output and its workspace (empty where the cell has none).
struct DirectionGrads {
  at::Tensor grad_output, grad_hy;
  c10::optional<at::Tensor> grad_cy;
  at::Tensor output, ws0, ws1, ws2;
};

// Both directions' backward, every argument validated before either starts; grad_input summed
// into g[0].
void bidir_backward(const Args* a, const DirectionGrads* in, GradMask need, BackwardOut* g) {
  for (int d = 0; d < 2; ++d)
    validate_backward(a[d], in[d].grad_output, in[d].grad_hy, in[d].grad_cy, in[d].output, in[d].ws0, in[d].ws1,
                      in[d].ws2);
  both_directions(a[0], [&](int64_t d) {
    const DirectionGrads& x = in[d];
    g[d] = backward(a[d], x.grad_output, x.grad_hy, x.grad_cy, x.output, x.ws0, x.ws1, x.ws2, need, false);
  });
  if (need.input) g[0].grad_input.add_(g[1].grad_input);
}

using T12 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                       at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

T12 lstm_bidir_forward(const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& b_ih,
                       const OptT& b_hh, const OptT& w_hr, const at::Tensor& hx, const at::Tensor& cx,
                       const at::Tensor& w_ih_r, const at::Tensor& w_hh_r, const OptT& b_ih_r, const OptT& b_hh_r,
                       const OptT& w_hr_r, const at::Tensor& hx_r, const at::Tensor& cx_r, const OptT& batch_sizes,
                       bool train) {
  const Args a[2] = {prepare("fastrnn.lstm_bidir_forward", Cell::LSTM, input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx,
                             batch_sizes, false),
                     prepare(FASTRNN_REVERSE("fastrnn.lstm_bidir_forward"), Cell::LSTM, input,
                             w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r, hx_r, cx_r, batch_sizes, true)};
  ForwardOut o[2];
  bidir_forward(a, train, o);
  return {o[0].output, o[0].hy, o[0].cy, o[0].ws0, o[0].ws1, o[0].ws2,
          o[1].output, o[1].hy, o[1].cy, o[1].ws0, o[1].ws1, o[1].ws2};
}

// grad_input is the sum of both directions'.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_bidir_backward(const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_cy,
                    const at::Tensor& grad_output_r, const at::Tensor& grad_hy_r, const at::Tensor& grad_cy_r,
                    const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& w_hr,
                    const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih_r, const at::Tensor& w_hh_r,
                    const OptT& w_hr_r, const at::Tensor& hx_r, const at::Tensor& cx_r, const OptT& batch_sizes,
                    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
                    const at::Tensor& proj_input, const at::Tensor& output_r, const at::Tensor& gates_r,
                    const at::Tensor& cells_r, const at::Tensor& proj_input_r, std::array<bool, 3> output_mask) {
  const Args a[2] = {prepare("fastrnn.lstm_bidir_backward", Cell::LSTM, input, w_ih, w_hh, c10::nullopt, c10::nullopt,
                             w_hr, hx, cx, batch_sizes, false),
                     prepare(FASTRNN_REVERSE("fastrnn.lstm_bidir_backward"), Cell::LSTM, input,
                             w_ih_r, w_hh_r, c10::nullopt, c10::nullopt, w_hr_r, hx_r, cx_r, batch_sizes, true)};
  const DirectionGrads in[2] = {{grad_output, grad_hy, grad_cy, output, gates, cells, proj_input},
                                {grad_output_r, grad_hy_r, grad_cy_r, output_r, gates_r, cells_r, proj_input_r}};
  BackwardOut g[2];
  bidir_backward(a, in, GradMask(output_mask), g);
  return {g[0].grad_input,
          g[0].grad_w_ih, g[0].grad_w_hh, g[0].grad_b_ih, g[0].grad_b_hh, g[0].grad_w_hr, g[0].grad_hx, g[0].grad_cx,
          g[1].grad_w_ih, g[1].grad_w_hh, g[1].grad_b_ih, g[1].grad_b_hh, g[1].grad_w_hr, g[1].grad_hx, g[1].grad_cx};
}

// GRU and Elman RNN: as the LSTM's, without cell state and projection.
using T4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using T8 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using T11 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                       at::Tensor, at::Tensor, at::Tensor>;

// The two directions' Args of a GRU/RNN bidirectional op (biases only for a forward); op_r names
// the reverse direction in error messages.
void prepare_pair(Args* a, const char* op, const char* op_r, Cell cell, const at::Tensor& input,
                  const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& b_ih, const OptT& b_hh,
                  const at::Tensor& hx, const at::Tensor& w_ih_r, const at::Tensor& w_hh_r, const OptT& b_ih_r,
                  const OptT& b_hh_r, const at::Tensor& hx_r, const OptT& batch_sizes, bool relu) {
  a[0] = prepare(op, cell, input, w_ih, w_hh, b_ih, b_hh, c10::nullopt, hx, c10::nullopt, batch_sizes, false);
  a[1] = prepare(op_r, cell, input, w_ih_r, w_hh_r, b_ih_r, b_hh_r, c10::nullopt, hx_r, c10::nullopt, batch_sizes,
                 true);
  a[0].relu = a[1].relu = relu;
}


T8 gru_bidir_forward(const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& b_ih,
                     const OptT& b_hh, const at::Tensor& hx, const at::Tensor& w_ih_r, const at::Tensor& w_hh_r,
                     const OptT& b_ih_r, const OptT& b_hh_r, const at::Tensor& hx_r, const OptT& batch_sizes,
                     bool train) {
  Args a[2];
  prepare_pair(a, "fastrnn.gru_bidir_forward", FASTRNN_REVERSE("fastrnn.gru_bidir_forward"), Cell::GRU, input, w_ih,
               w_hh, b_ih, b_hh, hx, w_ih_r, w_hh_r, b_ih_r, b_hh_r, hx_r, batch_sizes, false);
  ForwardOut o[2];
  bidir_forward(a, train, o);
  return {o[0].output, o[0].hy, o[0].ws0, o[0].ws1, o[1].output, o[1].hy, o[1].ws0, o[1].ws1};
}

// The backward of a GRU/RNN bidirectional op (the GRU's workspace: gates and hn; the RNN has none:
// undefined tensors, passed on as empty ones once the arguments are validated).
T11 gru_rnn_bidir_backward(const char* op, const char* op_r, Cell cell, bool relu, const at::Tensor& grad_output,
                           const at::Tensor& grad_hy, const at::Tensor& grad_output_r, const at::Tensor& grad_hy_r,
                           const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const at::Tensor& hx, const at::Tensor& w_ih_r, const at::Tensor& w_hh_r,
                           const at::Tensor& hx_r, const OptT& batch_sizes, const at::Tensor& output,
                           const at::Tensor& gates, const at::Tensor& hn, const at::Tensor& output_r,
                           const at::Tensor& gates_r, const at::Tensor& hn_r, GradMask need) {
  Args a[2];
  prepare_pair(a, op, op_r, cell, input, w_ih, w_hh, c10::nullopt, c10::nullopt, hx, w_ih_r, w_hh_r, c10::nullopt,
               c10::nullopt, hx_r, batch_sizes, relu);
  const at::Tensor none = at::empty({0}, input.options());
  auto ws = [&](const at::Tensor& t) { return t.defined() ? t : none; };
  const DirectionGrads in[2] = {{grad_output, grad_hy, c10::nullopt, output, ws(gates), ws(hn), none},
                                {grad_output_r, grad_hy_r, c10::nullopt, output_r, ws(gates_r), ws(hn_r), none}};
  BackwardOut g[2];
  bidir_backward(a, in, need, g);
  return {g[0].grad_input, g[0].grad_w_ih, g[0].grad_w_hh, g[0].grad_b_ih, g[0].grad_b_hh, g[0].grad_hx,
          g[1].grad_w_ih, g[1].grad_w_hh, g[1].grad_b_ih, g[1].grad_b_hh, g[1].grad_hx};
}

T11 gru_bidir_backward(const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_output_r,
                       const at::Tensor& grad_hy_r, const at::Tensor& input, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, const at::Tensor& hx, const at::Tensor& w_ih_r, const at::Tensor& w_hh_r,
                       const at::Tensor& hx_r, const OptT& batch_sizes, const at::Tensor& output,
                       const at::Tensor& gates, const at::Tensor& hn, const at::Tensor& output_r,
                       const at::Tensor& gates_r, const at::Tensor& hn_r, std::array<bool, 3> output_mask) {
  return gru_rnn_bidir_backward("fastrnn.gru_bidir_backward", FASTRNN_REVERSE("fastrnn.gru_bidir_backward"), Cell::GRU,
                                false, grad_output, grad_hy, grad_output_r, grad_hy_r, input, w_ih, w_hh, hx, w_ih_r,
                                w_hh_r, hx_r, batch_sizes, output, gates, hn, output_r, gates_r, hn_r,
                                GradMask(output_mask));
}

T4 rnn_bidir_forward(const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& b_ih,
                     const OptT& b_hh, const at::Tensor& hx, const at::Tensor& w_ih_r, const at::Tensor& w_hh_r,
                     const OptT& b_ih_r, const OptT& b_hh_r, const at::Tensor& hx_r, const OptT& batch_sizes,
                     bool relu) {
  Args a[2];
  prepare_pair(a, "fastrnn.rnn_bidir_forward", FASTRNN_REVERSE("fastrnn.rnn_bidir_forward"), Cell::RNN, input, w_ih,
               w_hh, b_ih, b_hh, hx, w_ih_r, w_hh_r, b_ih_r, b_hh_r, hx_r, batch_sizes, relu);
  ForwardOut o[2];
  bidir_forward(a, false, o);
  return {o[0].output, o[0].hy, o[1].output, o[1].hy};
}

T11 rnn_bidir_backward(const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_output_r,
                       const at::Tensor& grad_hy_r, const at::Tensor& input, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, const at::Tensor& hx, const at::Tensor& w_ih_r, const at::Tensor& w_hh_r,
                       const at::Tensor& hx_r, const OptT& batch_sizes, bool relu, const at::Tensor& output,
                       const at::Tensor& output_r, std::array<bool, 3> output_mask) {
  const at::Tensor none;  // (no workspace)
  return gru_rnn_bidir_backward("fastrnn.rnn_bidir_backward", FASTRNN_REVERSE("fastrnn.rnn_bidir_backward"), Cell::RNN,
                                relu, grad_output, grad_hy, grad_output_r, grad_hy_r, input, w_ih, w_hh, hx, w_ih_r,
                                w_hh_r, hx_r, batch_sizes, output, none, none, output_r, none, none,
                                GradMask(output_mask));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("gru_bidir_forward", &gru_bidir_forward);
  m.impl("gru_bidir_backward", &gru_bidir_backward);
  m.impl("rnn_bidir_forward", &rnn_bidir_forward);
  m.impl("rnn_bidir_backward", &rnn_bidir_backward);
  m.impl("lstm_bidir_forward", &lstm_bidir_forward);
  m.impl("lstm_bidir_backward", &lstm_bidir_backward);
  m.impl("lstm_forward", &lstm_forward);
  m.impl("lstm_backward", &lstm_backward);
  m.impl("gru_forward", &gru_forward);
  m.impl("gru_backward", &gru_backward);
  m.impl("rnn_forward", &rnn_forward);
  m.impl("rnn_backward", &rnn_backward);
}

}  // namespace fastrnn
