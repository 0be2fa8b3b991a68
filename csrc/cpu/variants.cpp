// CPU kernels of the variant cells: LayerNorm LSTM / GRU, peephole LSTM and zoneout (one layer,
// one direction, a whole sequence). Semantics: ../shared/SEMANTICS.md, "Variants"; the row math
// is in fastrnn/variant_cells.h. One driver serves both cells; LayerNorm, peepholes and zoneout
// are template switches of the row functions, chosen once per call.
//
// Forward: xg = X W_ih^T, large GEMMs over chunks of ~8 MB of steps computed right before they run
// (LayerNorm of it is per row, so it runs in the step's row pass, where the row is hot anyway); per step hg = h W_hh^T (oneDNN / packed MKL
// through gemm.h, no dispatcher for small products), then one fused pass per batch row: both
// LayerNorms, biases, peepholes, gates, LN of the new cell, zoneout, state update, saving what
// backward needs (normalised values and 1/std per LayerNorm, gate activations, carried cells).
// Backward: per step one fused row pass and one GEMM (dh += dG_h W_hh); weight, LayerNorm and
// peephole gradients are reductions / single GEMMs over all rows after the loop.
//
// Layout and schedule as in recurrent.cpp: rows of step t are input[off_t : off_t + bs_t]
// (dense [T, B, I] is bs_t = B); batch sizes never grow, so the rows alive at a step are a
// prefix of the state buffers. DropConnect is not here: it is an elementwise mask on W_hh
// applied (and differentiated) by autograd in Python before the op is called.
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <thread>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "checks.h"
#include "cpu/gemm.h"
#include "cpu/transpose.h"
#include "cpu/pack_cache.h"
#include "cpu/panel_step.h"
#include "cpu/phase_timer.h"
#include "schedule.h"
#include "cpu/team.h"
#include "cpu/workspace.h"
#include "fastrnn/panel_gemm.h"
#include "fastrnn/variant_cells.h"

namespace fastrnn {
namespace {

using OptT = c10::optional<at::Tensor>;

inline bool given(const OptT& t) { return t.has_value() && t->defined(); }

struct VArgs {
  const char* op;
  bool lstm;
  int64_t G = 0, H = 0, I = 0, GH = 0, S = 1;  // S: zoneout mask slots (2 LSTM: h, c)
  at::Tensor x, w_ih, w_hh, b_ih, b_hh, lnx_w, lnx_b, lnh_w, lnh_b, lnc_w, lnc_b, peep, hx, cx, mask;
  double kp = 0.0;
  Schedule sched;
  bool ln() const { return lnx_w.defined(); }
  bool has_peep() const { return peep.defined(); }
  // Widths of the saved LayerNorm workspace: normalised values [N, norm_w], 1/std [N, stats_w].
  int64_t norm_w() const { return 2 * GH + (lstm ? H : 0); }
  int64_t stats_w() const { return lstm ? 3 : 2; }
};

struct VInputs {
  const at::Tensor* input;
  const at::Tensor* w_ih;
  const at::Tensor* w_hh;
  const OptT* b_ih;
  const OptT* b_hh;
  const OptT* ln[6];  // ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b (last two LSTM only)
  const OptT* w_peep;
  const at::Tensor* hx;
  const at::Tensor* cx;
  const OptT* mask;
  double zoneout_p;
  const OptT* batch_sizes;
  bool reverse;
};

void check_opt(const OptT& t, const VArgs& a, const char* name, std::vector<int64_t> shape, const char* meaning) {
  if (!given(t)) return;
  check_cpu(*t, a.op, name);
  check_dtype(*t, a.op, name, a.x, "input");
  check_shape(*t, a.op, name, std::move(shape), meaning);
}

// Validates every argument and builds the schedule; nothing is read from tensor memory except
// batch_sizes, whose contents are validated themselves.
VArgs prepare(const char* op, bool lstm, const VInputs& in) {
  VArgs a;
  a.op = op;
  a.lstm = lstm;
  a.G = lstm ? 4 : 3;
  a.S = lstm ? 2 : 1;
  const at::Tensor& input = *in.input;
  using Named = std::pair<const at::Tensor*, const char*>;
  std::vector<Named> req{{in.input, "input"}, {in.w_ih, "w_ih"}, {in.w_hh, "w_hh"}, {in.hx, "hx"}};
  if (lstm) req.push_back({in.cx, "cx"});
  for (const Named& n : req) {
    check_defined(*n.first, op, n.second);
    check_cpu(*n.first, op, n.second);
  }
  check_floating(input, op, "input");
  for (const Named& n : req)
    if (n.first != in.input) check_dtype(*n.first, op, n.second, input, "input");
  check_dim(*in.w_ih, op, "w_ih", 2);
  check_dim(*in.w_hh, op, "w_hh", 2);
  check_dim(*in.hx, op, "hx", 2);
  const bool packed = given(*in.batch_sizes);
  if (packed)
    check_dim(input, op, "input (packed, with batch_sizes)", 2);
  else
    check_dim(input, op, "input", 3);
  a.I = input.size(-1);
  TORCH_CHECK(in.w_ih->size(0) % a.G == 0 && in.w_ih->size(0) > 0, op, ": w_ih must have shape [", a.G,
              "*hidden_size, input_size] with hidden_size > 0, got ", shape_str(in.w_ih->sizes()));
  a.H = in.w_ih->size(0) / a.G;
  a.GH = a.G * a.H;
  check_shape(*in.w_ih, op, "w_ih", {a.GH, a.I}, "[gates*hidden_size, input.size(-1)]");
  check_shape(*in.w_hh, op, "w_hh", {a.GH, a.H}, "[gates*hidden_size, hidden_size]");
  a.x = input;  // for dtype checks of the optional tensors
  check_opt(*in.b_ih, a, "b_ih", {a.GH}, "[gates*hidden_size]");
  check_opt(*in.b_hh, a, "b_hh", {a.GH}, "[gates*hidden_size]");
  TORCH_CHECK(given(*in.b_ih) == given(*in.b_hh), op, ": b_ih and b_hh must be given together or both be None");
  const char* ln_names[6] = {"ln_ih_w", "ln_ih_b", "ln_hh_w", "ln_hh_b", "ln_c_w", "ln_c_b"};
  const int n_ln = lstm ? 6 : 4;
  int n_given = 0;
  for (int k = 0; k < n_ln; ++k) {
    const bool cell_side = k >= 4;
    check_opt(*in.ln[k], a, ln_names[k], {cell_side ? a.H : a.GH}, cell_side ? "[hidden_size]" : "[gates*hidden_size]");
    n_given += given(*in.ln[k]);
  }
  TORCH_CHECK(n_given == 0 || n_given == n_ln, op, ": the LayerNorm gains and biases (",
              lstm ? "ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b" : "ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b",
              ") must all be given or all be None, got ", n_given, " of ", n_ln);
  if (in.w_peep) check_opt(*in.w_peep, a, "w_peep", {3, a.H}, "[3, hidden_size] (w_ci, w_cf, w_co)");
  TORCH_CHECK_VALUE(std::isfinite(in.zoneout_p) && in.zoneout_p >= 0.0 && in.zoneout_p <= 1.0, op,
                    ": zoneout_p must be a probability in [0, 1], got ", in.zoneout_p);
  a.kp = in.zoneout_p;

  a.sched = make_schedule(op, input, *in.batch_sizes, in.reverse);
  const Schedule& s = a.sched;
  check_shape(*in.hx, op, "hx", {s.B, a.H}, "[batch, hidden_size]");
  if (lstm) check_shape(*in.cx, op, "cx", {s.B, a.H}, "[batch, hidden_size]");
  if (given(*in.mask)) {
    std::vector<int64_t> ms = s.lead_with(a.S * a.H);
    check_opt(*in.mask, a, "zoneout_mask", ms, lstm ? "input.shape[:-1] + [2*hidden_size] (h then c)"
                                                      : "input.shape[:-1] + [hidden_size]");
  }
  TORCH_CHECK(s.N < kMaxRows && a.GH < kMaxRows && a.I < kMaxRows, op, ": sizes beyond 2^31 are not supported");

  a.x = input.reshape({s.N, a.I}).contiguous();
  a.w_ih = in.w_ih->contiguous();
  a.w_hh = in.w_hh->contiguous();
  if (given(*in.b_ih)) {
    a.b_ih = in.b_ih->value().contiguous();
    a.b_hh = in.b_hh->value().contiguous();
  }
  if (n_given) {
    at::Tensor* dst[6] = {&a.lnx_w, &a.lnx_b, &a.lnh_w, &a.lnh_b, &a.lnc_w, &a.lnc_b};
    for (int k = 0; k < n_ln; ++k) *dst[k] = in.ln[k]->value().contiguous();
  }
  if (in.w_peep && given(*in.w_peep)) a.peep = in.w_peep->value().contiguous();
  a.hx = in.hx->contiguous();
  if (lstm) a.cx = in.cx->contiguous();
  if (given(*in.mask)) a.mask = in.mask->value().reshape({s.N, a.S * a.H}).contiguous();
  return a;
}

std::vector<int64_t> lead_with(const VArgs& a, int64_t last) { return a.sched.lead_with(last); }

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() ? t.data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------
// Row passes. Compiled for AVX-512, AVX2 and the baseline ISA (FASTRNN_ISA_KERNEL), as the
// plain cells' are; FASTRNN_FORCE_GENERIC_ISA / fastrnn._C.set_isa('baseline') pins the baseline.
// ---------------------------------------------------------------------------------------
template <typename T>
struct VFwdRows {
  bool lstm, save, ln, peep;
  VariantParams<T> p;
  int64_t H, GH, off;
  const T* xg;  // input projections of rows [xg_row0, ...), GH wide
  int64_t xg_row0;
  const T* hg;  // [B, GH]
  T* h;         // [B, H]
  T* c;         // [B, H] (LSTM)
  const T* mask;  // zoneout d per row: the mask, or one constant row (mask_ld = 0)
  int64_t mask_ld;
  T* scratch;  // [B, scratch_ld]
  int64_t scratch_ld;
  T* gates;  // [N, GH]
  T* cells;  // [N, H] LSTM c_t / GRU hn
  T* norm;   // [N, norm_ld]
  int64_t norm_ld;
  T* stats;  // [N, stats_ld]
  int64_t stats_ld;
};

template <bool Save, bool LN, bool Peep, typename T>
FASTRNN_INLINE void vfwd_rows_t(const VFwdRows<T>& s, int64_t b0, int64_t b1) {
  const int64_t H = s.H, GH = s.GH;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t row = s.off + b;
    const T* keep = s.mask + row * s.mask_ld;
    T* nr = (Save && LN) ? s.norm + row * s.norm_ld : nullptr;
    T* st = (Save && LN) ? s.stats + row * s.stats_ld : nullptr;
    T* gates = Save ? s.gates + row * GH : nullptr;
    T* cells = Save ? s.cells + row * H : nullptr;
    if (s.lstm)
      vlstm_forward_row<Save, LN, Peep, T>(s.p, s.xg + (row - s.xg_row0) * GH, s.hg + b * GH, s.h + b * H, s.c + b * H, keep,
                                           s.scratch + b * s.scratch_ld, gates, cells, nr, nr ? nr + GH : nullptr,
                                           nr ? nr + 2 * GH : nullptr, st);
    else
      vgru_forward_row<Save, LN, T>(s.p, s.xg + (row - s.xg_row0) * GH, s.hg + b * GH, s.h + b * H, keep,
                                    s.scratch + b * s.scratch_ld, gates, cells, nr, nr ? nr + GH : nullptr, st);
  }
}

template <bool Save, bool LN, typename T>
FASTRNN_INLINE void vfwd_rows_p(const VFwdRows<T>& s, int64_t b0, int64_t b1) {
  if (s.peep)
    vfwd_rows_t<Save, LN, true, T>(s, b0, b1);
  else
    vfwd_rows_t<Save, LN, false, T>(s, b0, b1);
}

template <bool Save, typename T>
FASTRNN_INLINE void vfwd_rows_l(const VFwdRows<T>& s, int64_t b0, int64_t b1) {
  if (s.ln)
    vfwd_rows_p<Save, true, T>(s, b0, b1);
  else
    vfwd_rows_p<Save, false, T>(s, b0, b1);
}

template <typename T, int NB>
FASTRNN_INLINE void vforward_rows_impl(const VFwdRows<T>& s, int64_t b0, int64_t b1) {
  if (s.save)
    vfwd_rows_l<true, T>(s, b0, b1);
  else
    vfwd_rows_l<false, T>(s, b0, b1);
}

template <typename T>
struct VBwdRows {
  bool lstm, ln, peep;
  VariantParams<T> p;
  int64_t H, GH, off, t;
  const Schedule* sched;
  const T* gates;  // [N, GH]
  const T* cells;  // [N, H] LSTM c_t / GRU hn
  const T* out;    // [N, H]
  const T* hx;     // [B, H]
  const T* cx;     // [B, H]
  const T* norm;
  int64_t norm_ld;
  const T* stats;
  int64_t stats_ld;
  const T* mask;  // as VFwdRows
  int64_t mask_ld;
  T* dh;     // [B, H]
  T* dc;     // [B, H]
  T* da;     // [N, GH] LSTM dL/dpre, GRU dL/d(input-side pre)
  T* db;     // [N, GH] GRU dL/d(hidden-side pre)
  T* dhg;    // [N, GH] dL/d(W_hh h) (LN only)
  T* dyc;    // [N, H] LSTM LN_c output gradient (LN only)
  T* dpeep;  // [N, 3H]
  T* scratch;
  int64_t scratch_ld;
};

template <bool LN, bool Peep, typename T>
FASTRNN_INLINE void vbwd_rows_t(const VBwdRows<T>& s, int64_t b0, int64_t b1) {
  const int64_t H = s.H, GH = s.GH;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t row = s.off + b, prev = s.sched->prev_row(s.t, b);
    const T* keep = s.mask + row * s.mask_ld;
    const T* nr = LN ? s.norm + row * s.norm_ld : nullptr;
    const T* st = LN ? s.stats + row * s.stats_ld : nullptr;
    if (s.lstm) {
      const T* cprev = prev >= 0 ? s.cells + prev * H : s.cx + b * H;
      vlstm_backward_row<LN, Peep, T>(s.p, s.gates + row * GH, cprev, nr ? nr + GH : nullptr,
                                      nr ? nr + 2 * GH : nullptr, st, keep, s.dh + b * H, s.dc + b * H,
                                      s.da + row * GH, LN ? s.dhg + row * GH : nullptr, LN ? s.dyc + row * H : nullptr,
                                      Peep ? s.dpeep + row * 3 * H : nullptr, s.scratch + b * s.scratch_ld);
    } else {
      const T* hprev = prev >= 0 ? s.out + prev * H : s.hx + b * H;
      vgru_backward_row<LN, T>(s.p, s.gates + row * GH, s.cells + row * H, hprev, nr ? nr + GH : nullptr, st, keep, s.dh + b * H, s.da + row * GH, s.db + row * GH,
                               LN ? s.dhg + row * GH : nullptr);
    }
  }
}

template <bool LN, typename T>
FASTRNN_INLINE void vbwd_rows_p(const VBwdRows<T>& s, int64_t b0, int64_t b1) {
  if (s.peep)
    vbwd_rows_t<LN, true, T>(s, b0, b1);
  else
    vbwd_rows_t<LN, false, T>(s, b0, b1);
}

template <typename T, int NB>
FASTRNN_INLINE void vbackward_rows_impl(const VBwdRows<T>& s, int64_t b0, int64_t b1) {
  if (s.ln)
    vbwd_rows_p<true, T>(s, b0, b1);
  else
    vbwd_rows_p<false, T>(s, b0, b1);
}

// One pass over the rows of d [N, n] after the loop, in chunks of kChunk rows: per chunk the
// column sums of d and of d * xhat (a bias and a LayerNorm gain gradient) into partial [2, n],
// then, when w is given, d becomes LayerNorm's input gradient in place (the x side). The chunks
// are fixed, so the sums do not depend on the thread count.
constexpr int64_t kChunk = 32;

template <typename T>
struct ColPass {
  int64_t N, n;
  T* d;
  const T* xhat;
  int64_t xhat_ld;
  const T* w;  // LayerNorm gain, or null: no transform
  const T* rstd;
  int64_t rstd_ld;
  T* partial;  // [chunks, 2, n]
};

template <typename T, int NB>
FASTRNN_INLINE void col_pass_impl(const ColPass<T>& s, int64_t c0, int64_t c1) {
  const int64_t n = s.n;
  for (int64_t c = c0; c < c1; ++c) {
    T* FASTRNN_RESTRICT sum = s.partial + c * 2 * n;
    T* FASTRNN_RESTRICT sumx = sum + n;
    for (int64_t k = 0; k < n; ++k) sum[k] = sumx[k] = T(0);
    for (int64_t r = c * kChunk; r < std::min(s.N, (c + 1) * kChunk); ++r) {
      T* FASTRNN_RESTRICT dr = s.d + r * n;
      const T* FASTRNN_RESTRICT xh = s.xhat + r * s.xhat_ld;
      for (int64_t k = 0; k < n; ++k) {
        sum[k] += dr[k];
        sumx[k] += dr[k] * xh[k];
      }
      if (s.w) vdetail::layer_norm_backward(n, dr, s.w, xh, s.rstd[r * s.rstd_ld], dr);
    }
  }
}

// Fused forward without LayerNorm (peephole LSTM, zoneout LSTM/GRU) for small products: W_hh packed
// into panels of U = one vector of hidden units with all G gates of those units side by side; a
// thread multiplies h by its panels and applies the units' math right away, no hg round trip and
// one barrier a step (h is double-buffered: every thread reads all of h_{t-1}).
template <typename T>
struct FusedV {
  bool lstm, save, has_peep, zone;
  int64_t H, GH, bs, off;
  const T* wp;  // [n_panels, H, G*U] (in stripes, panel::striped)
  const T* xg;  // input projections of rows [xg_row0, ...)
  int64_t xg_row0;
  const T* bias_x;  // [GH]
  const T* bias_h;  // [GH] (GRU)
  const T* peep;    // [3, H] or null
  const T* hcur;    // [B, H]
  T* hnext;         // [B, H]
  T* c;             // [B, H] (LSTM)
  T* out;           // [N, H]
  const T* keep;    // zoneout d rows
  int64_t keep_ld;
  T* gates;  // [N, GH]
  T* cells;  // [N, H]
};

template <typename T, int NB, int G, bool Save, bool Peep, bool Zone>
FASTRNN_INLINE void fused_v_panels(const FusedV<T>& s, int64_t p0, int64_t p1) {
  constexpr int U = panel::Vec<T>::L;
  constexpr int64_t SW = int64_t(panel::stripe_vecs(NB, G)) * U;  // a stripe's row
  alignas(64) T C[panel::kMR * G * U];
  const int64_t H = s.H, GH = s.GH;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t j0 = p * U, nu = std::min<int64_t>(U, H - j0);
    const T* wpan = s.wp + p * H * G * U;
    for (int64_t ib = 0, nb = panel::row_blocks(s.bs); ib < nb; ++ib) {
      const int64_t i0 = panel::row_block(s.bs, ib), m = panel::row_block(s.bs, ib + 1) - i0;
      panel::prefetch_gate_rows(s.xg + (s.off + i0 - s.xg_row0) * GH + j0, GH, m, G, H, nu);
      panel::product_rows<T, NB, G>(s.hcur + i0 * H, H, m, H, wpan, H * SW, C, G * U);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t b = i0 + i, row = s.off + b;
        const T* xr = s.xg + (row - s.xg_row0) * GH + j0;
        const T* keep = Zone ? s.keep + row * s.keep_ld + j0 : nullptr;
        T* hn = s.hnext + b * H + j0;
        T* gates = Save ? s.gates + row * GH + j0 : nullptr;
        T* cells = Save ? s.cells + row * H + j0 : nullptr;
        if constexpr (G == 4)
          vlstm_forward_units<Save, Peep, Zone, T>(nu, xr, H, s.bias_x + j0, C + i * G * U, U,
                                                   Peep ? s.peep + j0 : nullptr, s.hcur + b * H + j0, hn,
                                                   s.c + b * H + j0, keep, gates, cells);
        else
          vgru_forward_units<Save, Zone, T>(nu, xr, H, s.bias_x + j0, s.bias_h + j0, C + i * G * U, U,
                                            s.hcur + b * H + j0, hn, keep, gates, cells);
        std::memcpy(s.out + row * H + j0, hn, sizeof(T) * nu);
      }
    }
  }
}

// Template switches: G (LSTM / GRU), Save (training), Peep, Zone (zoneout mask or p > 0).
template <typename T, int NB, int G, bool Save, bool Peep>
FASTRNN_INLINE void fused_v_zone(const FusedV<T>& s, int64_t p0, int64_t p1) {
  if (s.zone)
    fused_v_panels<T, NB, G, Save, Peep, true>(s, p0, p1);
  else
    fused_v_panels<T, NB, G, Save, Peep, false>(s, p0, p1);
}

template <typename T, int NB, int G, bool Save>
FASTRNN_INLINE void fused_v_peep(const FusedV<T>& s, int64_t p0, int64_t p1) {
  if (s.has_peep)
    fused_v_zone<T, NB, G, Save, G == 4>(s, p0, p1);
  else
    fused_v_zone<T, NB, G, Save, false>(s, p0, p1);
}

template <typename T, int NB>
FASTRNN_INLINE void fused_v_impl(const FusedV<T>& s, int64_t p0, int64_t p1) {
  if (s.lstm)
    s.save ? fused_v_peep<T, NB, 4, true>(s, p0, p1) : fused_v_peep<T, NB, 4, false>(s, p0, p1);
  else
    s.save ? fused_v_peep<T, NB, 3, true>(s, p0, p1) : fused_v_peep<T, NB, 3, false>(s, p0, p1);
}

FASTRNN_ISA_KERNEL(vforward_rows, VFwdRows, vforward_rows_impl)
FASTRNN_ISA_KERNEL(vbackward_rows, VBwdRows, vbackward_rows_impl)
FASTRNN_ISA_KERNEL(col_pass, ColPass, col_pass_impl)
FASTRNN_ISA_KERNEL(fused_v, FusedV, fused_v_impl)

// The per-step recurrent product of one call: PanelGemm (cpu/panel_step.h; the packing kept
// between calls under layout ids 0/1 for W / W^T) for W up to kPanelMaxWeightElems, run on the
// calling thread or split over a persistent team; gemm.h's WeightGemm (oneDNN / packed MKL /
// BLAS, as the backend override says) otherwise.
template <typename T>
class StepGemm {
 public:
  // B = W [K, N] row-major (trans_b=false) or W [N, K] used transposed (trans_b=true); w contiguous.
  StepGemm(const at::Tensor& w, bool trans_b, int64_t N, int64_t K, int64_t max_m, int64_t steps) {
    if (use_panels(N, K, steps))
      panel_ = std::make_unique<PanelGemm<T>>(w, trans_b, N, K, trans_b ? 1 : 0);
    else
      blas_ = std::make_unique<WeightGemm<T>>(w.data_ptr<T>(), trans_b, N, K, max_m, steps > 1 ? max_m : 0);
  }
  // As recurrent.cpp's panel path: whenever there are steps to amortise the packing over and the
  // weight is within kPanelMaxWeightElems (gemm.h).
  static bool use_panels(int64_t N, int64_t K, int64_t steps) {
    const int o = gemm_backend_override().load();
    return o == 4 || (o == 0 && steps > 1 && N * K <= kPanelMaxWeightElems);
  }
  bool panelled() const { return panel_ != nullptr; }
  int64_t panels() const { return panel_ ? panel_->panels() : 0; }
  // Panels [p0, p1) only, on the calling thread (a persistent team's share).
  void run_panels(const T* a, int64_t m, int64_t lda, T* c, int64_t ldc, bool accumulate, int64_t p0,
                  int64_t p1) const {
    panel_->run_panels(a, m, lda, c, ldc, accumulate, p0, p1);
  }
  // C[m, N] = A[m, K] B (+ C when accumulate)
  void run(const T* a, int64_t m, int64_t lda, T* c, int64_t ldc, bool accumulate) const {
    if (m == 0) return;
    if (panel_)
      panel_->run(a, m, lda, c, ldc, accumulate);
    else
      blas_->run(a, m, lda, c, ldc, accumulate ? T(1) : T(0));
  }

 private:
  std::unique_ptr<PanelGemm<T>> panel_;
  std::unique_ptr<WeightGemm<T>> blas_;
};



// Zoneout's d for the row functions: the mask [N, S*H], or one row of the constant zoneout_p
// (0 without zoneout) read with row stride 0.
at::Tensor keep_rows(const VArgs& a) {
  return a.mask.defined() ? a.mask : at::full({a.S * a.H}, a.kp, a.x.options());
}

template <typename T>
VariantParams<T> params_of(const VArgs& a, const at::Tensor& bias_x, const at::Tensor& bias_h) {
  VariantParams<T> p;
  p.H = a.H;
  p.lnx_w = ptr_or_null<T>(a.lnx_w);
  p.lnx_b = ptr_or_null<T>(a.lnx_b);
  p.lnh_w = ptr_or_null<T>(a.lnh_w);
  p.lnh_b = ptr_or_null<T>(a.lnh_b);
  p.lnc_w = ptr_or_null<T>(a.lnc_w);
  p.lnc_b = ptr_or_null<T>(a.lnc_b);
  p.bias_x = ptr_or_null<T>(bias_x);
  p.bias_h = ptr_or_null<T>(bias_h);
  p.peep = ptr_or_null<T>(a.peep);
  return p;
}

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------
struct VForwardOut {
  at::Tensor output, hy, cy, gates, cells, norm, stats;
};

template <typename T>
void forward_kernel(const VArgs& a, bool train, VForwardOut& o) {
  const Schedule& s = a.sched;
  const int64_t H = a.H, GH = a.GH, B = s.B, N = s.N;
  const auto opts = a.x.options();
  // LSTM biases fold into one vector; the GRU keeps b_hh on the hidden side (r multiplies it).
  at::Tensor bias_x, bias_h = at::zeros({GH}, opts);
  if (a.b_ih.defined()) {
    if (a.lstm) {
      bias_x = a.b_ih + a.b_hh;
    } else {
      bias_x = a.b_ih;
      bias_h = a.b_hh;
    }
  } else {
    bias_x = bias_h;
  }
  const VariantParams<T> p = params_of<T>(a, bias_x, bias_h);
  const at::Tensor keep = keep_rows(a);

  o.hy = a.hx.clone();
  if (a.lstm) o.cy = a.cx.clone();
  o.output = empty_big(lead_with(a, H), opts);
  if (train) {
    o.gates = empty_big({N, GH}, opts);
    o.cells = empty_big({N, H}, opts);
    if (a.ln()) {
      o.norm = empty_big({N, a.norm_w()}, opts);
      o.stats = at::empty({N, a.stats_w()}, opts);
    }
  }
  at::Tensor hg = at::empty({B, GH}, opts);
  const int64_t scratch_ld = a.lstm ? 5 * H : 6 * H;
  at::Tensor scratch = at::empty({B, scratch_ld}, opts);
  const bool fused = !a.ln() && StepGemm<T>::use_panels(GH, H, s.T);
  std::unique_ptr<StepGemm<T>> recp;
  if (!fused) recp = std::make_unique<StepGemm<T>>(a.w_hh, /*trans_b=*/true, GH, H, B, s.T);
  at::Tensor wp, hbuf;
  if (fused) {
    wp = gate_panels<T>(a.w_hh, a.G, H, panel::Vec<T>::L);
    hbuf = at::empty({2, B, H}, opts);
    hbuf.select(0, 0).copy_(a.hx);
    hbuf.select(0, 1).copy_(a.hx);
  }

  T* h = o.hy.data_ptr<T>();
  T* out = o.output.data_ptr<T>();
  T* hgp = hg.data_ptr<T>();
  const VFwdRows<T> base{a.lstm,
                         train,
                         a.ln(),
                         a.has_peep(),
                         p,
                         H,
                         GH,
                         0,
                         nullptr,
                         0,
                         hgp,
                         h,
                         a.lstm ? o.cy.data_ptr<T>() : nullptr,
                         keep.data_ptr<T>(),
                         a.mask.defined() ? a.S * H : 0,
                         scratch.data_ptr<T>(),
                         scratch_ld,
                         ptr_or_null<T>(o.gates),
                         ptr_or_null<T>(o.cells),
                         ptr_or_null<T>(o.norm),
                         a.norm_w(),
                         ptr_or_null<T>(o.stats),
                         a.stats_w()};
  const int64_t grain = row_grain(GH + H);
  const int64_t slices = (recp && recp->panelled()) ? std::min<int64_t>(at::get_num_threads(), recp->panels()) : 1;
  const FusedV<T> fbase{a.lstm, train, a.has_peep(), a.mask.defined() || a.kp != 0.0, H, GH, 0, 0, fused ? wp.data_ptr<T>() : nullptr, nullptr, 0,
                        bias_x.data_ptr<T>(), bias_h.data_ptr<T>(), ptr_or_null<T>(a.peep), nullptr, nullptr,
                        a.lstm ? o.cy.data_ptr<T>() : nullptr, out, keep.data_ptr<T>(),
                        a.mask.defined() ? a.S * H : 0, ptr_or_null<T>(o.gates), ptr_or_null<T>(o.cells)};
  const int64_t fpanels = fused ? wp.size(0) : 0;
  T* hb = fused ? hbuf.data_ptr<T>() : nullptr;
  auto fused_steps = [&](const VFwdRows<T>& base, int64_t c0, int64_t c1) {
    auto step_args = [&](int64_t step) {
      FusedV<T> x = fbase;
      const int64_t t = s.time_at(step);
      x.xg = base.xg;
      x.xg_row0 = base.xg_row0;
      x.bs = s.bs[t];
      x.off = s.off[t];
      x.hcur = hb + (step % 2) * B * H;
      x.hnext = hb + (1 - step % 2) * B * H;
      return x;
    };
    // Threads only where they pay (team.h), as the plain cells' fused forward: by rows where
    // W_hh is small, else by panels.
    const int64_t row_sl =
        row_slices(B, double(GH) * double(H) * double(sizeof(T)), double(c1 - c0) * double(B) * double(GH * H));
    if (row_sl > 1) {
      PhaseTimer timer("variant forward");
      run_row_split_steps(c0, c1, B, H, row_sl, step_args, [&](const FusedV<T>& x) { fused_v(x, 0, fpanels); });
      timer.mark("time loop, rows split");
      return;
    }
    const bool split = threads_pay(double(B) * double(GH) * double(H), double(GH) * double(H) * double(sizeof(T)));
    run_panel_steps(c0, c1, fpanels, H, a.G * int64_t(panel::Vec<T>::L), split, step_args,
                    [](const FusedV<T>& x, int64_t p0, int64_t p1) { fused_v(x, p0, p1); });
  };
  auto run_steps = [&](const VFwdRows<T>& base, int64_t c0, int64_t c1) {
    if (fused) {
      fused_steps(base, c0, c1);
      return;
    }
    const StepGemm<T>& rec = *recp;
    if (rec.panelled() && use_persistent_team(slices, c1 - c0)) {
      // Per step: each thread its panels of hg = h W_hh^T, barrier, each thread its rows, barrier.
      StepBarrier barrier;
      const int64_t np = rec.panels();
      at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
        int64_t target = 0;
        for (int64_t step = c0; step < c1; ++step) {
          const int64_t t = s.time_at(step), bs = s.bs[t], off = s.off[t];
          rec.run_panels(h, bs, H, hgp, GH, false, np * s0 / slices, np * s1 / slices);
          barrier.arrive_and_wait(s1 - s0, target += slices);
          VFwdRows<T> rows = base;
          rows.off = off;
          const int64_t r0 = bs * s0 / slices, r1 = bs * s1 / slices;
          vforward_rows(rows, r0, r1);
          if (r1 > r0) std::memcpy(out + (off + r0) * H, h + r0 * H, sizeof(T) * (r1 - r0) * H);
          barrier.arrive_and_wait(s1 - s0, target += slices);
        }
      });
    } else {
      for (int64_t step = c0; step < c1; ++step) {
        const int64_t t = s.time_at(step), bs = s.bs[t], off = s.off[t];
        rec.run(h, bs, H, hgp, GH, false);
        VFwdRows<T> rows = base;
        rows.off = off;
        at::parallel_for(0, bs, grain, [&](int64_t b0, int64_t b1) { vforward_rows(rows, b0, b1); });
        if (bs > 0) std::memcpy(out + off * H, h, sizeof(T) * bs * H);
      }
    }
  };
  // The input projection a chunk of steps at a time, just before they run: no [N, G*H] buffer
  // (tens of MB, page-faulted on every call), and the chunk is still in cache when read
  // (FASTRNN_CHUNK_STEPS=n forces n steps a chunk, for tests).
  const int64_t step_bytes = std::max<int64_t>(1, B * GH * int64_t(sizeof(T)));
  int64_t chunk_steps = std::max<int64_t>(1, (int64_t(8) << 20) / step_bytes);
  if (const char* forced = std::getenv("FASTRNN_CHUNK_STEPS")) chunk_steps = std::max<int64_t>(1, std::atoll(forced));
  for (int64_t c0 = 0; c0 < s.T; c0 += chunk_steps) {
    const int64_t c1 = std::min(s.T, c0 + chunk_steps);
    const int64_t ta = s.time_at(c0), tb = s.time_at(c1 - 1), lo = std::min(ta, tb), hi = std::max(ta, tb);
    const int64_t row0 = s.off[lo], nrows = s.off[hi] + s.bs[hi] - row0;
    const at::Tensor xg = fast_linear(a.x.narrow(0, row0, nrows), a.w_ih).contiguous();
    VFwdRows<T> chunk_base = base;
    chunk_base.xg = xg.data_ptr<T>();
    chunk_base.xg_row0 = row0;
    run_steps(chunk_base, c0, c1);
  }
  if (fused) {
    // h_n of each row is its output at its last processed step (the double buffer holds stale
    // rows for sequences that ended earlier).
    for (int64_t b = 0; b < B; ++b) {
      int64_t last_t = 0;
      if (!s.reverse)
        while (last_t + 1 < s.T && s.bs[last_t + 1] > b) ++last_t;
      std::memcpy(h + b * H, out + (s.off[last_t] + b) * H, sizeof(T) * H);
    }
  }
  at::Tensor empty = at::empty({0}, opts);
  for (at::Tensor* t : {&o.cy, &o.gates, &o.cells, &o.norm, &o.stats})
    if (!t->defined()) *t = empty.clone();
}

VForwardOut forward(const VArgs& a, bool train) {
  VForwardOut o;
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fastrnn_variant_forward", [&] { forward_kernel<scalar_t>(a, train, o); });
  return o;
}


// Column sums (of d and of d * xhat) and, with w, the LayerNorm transform of d in place.
template <typename T>
std::pair<at::Tensor, at::Tensor> column_pass(at::Tensor& d, const at::Tensor& xhat, int64_t xhat_ld, const T* w,
                                              const at::Tensor& stats, int64_t rstd_col, int64_t rstd_ld) {
  const int64_t N = d.size(0), n = d.size(1), chunks = (N + kChunk - 1) / kChunk;
  at::Tensor partial = empty_big({chunks, 2, n}, d.options());
  const ColPass<T> cp{N, n, d.data_ptr<T>(), xhat.data_ptr<T>(), xhat_ld, w,
                      w ? stats.data_ptr<T>() + rstd_col : nullptr, rstd_ld, partial.data_ptr<T>()};
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) { col_pass(cp, c0, c1); });
  at::Tensor sums = partial.sum(0);
  return {sums[0].clone(), sums[1].clone()};  // separate storage: op outputs must not alias
}

struct VBackwardOut {
  at::Tensor grad_input, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_ln[6], grad_peep, grad_hx, grad_cx;
};

void check_like(const at::Tensor& t, const VArgs& a, const char* name, std::vector<int64_t> shape,
                const char* meaning) {
  check_defined(t, a.op, name);
  check_cpu(t, a.op, name);
  check_dtype(t, a.op, name, a.x, "input");
  check_shape(t, a.op, name, std::move(shape), meaning);
}

template <typename T>
void backward_kernel(const VArgs& a, const at::Tensor& grad_out_, const at::Tensor& grad_hy,
                     const at::Tensor& grad_cy, const at::Tensor& output_, const at::Tensor& gates_,
                     const at::Tensor& cells_, const at::Tensor& norm_, const at::Tensor& stats_, VBackwardOut& g) {
  const Schedule& s = a.sched;
  const int64_t H = a.H, GH = a.GH, B = s.B, N = s.N;
  const auto opts = a.x.options();
  const bool ln = a.ln(), peep = a.has_peep();
  at::Tensor grad_out = grad_out_.reshape({N, H}).contiguous();
  at::Tensor output = output_.reshape({N, H}).contiguous();
  at::Tensor gates = gates_.contiguous(), cells = cells_.contiguous();
  at::Tensor norm = ln ? norm_.contiguous() : at::Tensor(), stats = ln ? stats_.contiguous() : at::Tensor();
  const VariantParams<T> p = params_of<T>(a, at::Tensor(), at::Tensor());
  const at::Tensor keep = keep_rows(a);

  at::Tensor dh = grad_hy.contiguous().clone();
  at::Tensor dc = a.lstm ? grad_cy.contiguous().clone() : at::Tensor();
  at::Tensor da = empty_big({N, GH}, opts);
  at::Tensor db = a.lstm ? at::Tensor() : empty_big({N, GH}, opts);
  at::Tensor dhg = ln ? empty_big({N, GH}, opts) : (a.lstm ? da : db);
  at::Tensor dyc = (a.lstm && ln) ? empty_big({N, H}, opts) : at::Tensor();
  at::Tensor dpeep = peep ? empty_big({N, 3 * H}, opts) : at::Tensor();
  const int64_t scratch_ld = H;
  at::Tensor scratch = at::empty({B, scratch_ld}, opts);

  const StepGemm<T> rec(a.w_hh, /*trans_b=*/false, H, GH, B, s.T);  // dh += dhg W_hh

  const T* go = grad_out.data_ptr<T>();
  T* dhp = dh.data_ptr<T>();
  T* dhgp = dhg.data_ptr<T>();
  const VBwdRows<T> base{a.lstm,
                         ln,
                         peep,
                         p,
                         H,
                         GH,
                         0,
                         0,
                         &s,
                         gates.data_ptr<T>(),
                         cells.data_ptr<T>(),
                         output.data_ptr<T>(),
                         a.hx.data_ptr<T>(),
                         a.lstm ? a.cx.data_ptr<T>() : nullptr,
                         ptr_or_null<T>(norm),
                         a.norm_w(),
                         ptr_or_null<T>(stats),
                         a.stats_w(),
                         keep.data_ptr<T>(),
                         a.mask.defined() ? a.S * H : 0,
                         dhp,
                         a.lstm ? dc.data_ptr<T>() : nullptr,
                         da.data_ptr<T>(),
                         ptr_or_null<T>(db),
                         dhgp,
                         ptr_or_null<T>(dyc),
                         ptr_or_null<T>(dpeep),
                         scratch.data_ptr<T>(),
                         scratch_ld};
  const int64_t grain = row_grain(GH + H);
  const int64_t slices = rec.panelled() ? std::min<int64_t>(at::get_num_threads(), rec.panels()) : 1;
  PhaseTimer timer("variant backward");
  timer.mark("setup");
  // The row pass leaves the zoneout part (d * dh) in dh; the recurrent product adds to it.
  if (rec.panelled() && use_persistent_team(slices, s.T)) {
    StepBarrier barrier;
    const int64_t np = rec.panels();
    at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
      int64_t target = 0;
      for (int64_t step = s.T - 1; step >= 0; --step) {
        const int64_t t = s.time_at(step), bs = s.bs[t], off = s.off[t];
        const int64_t r0 = bs * s0 / slices, r1 = bs * s1 / slices;
        for (int64_t i = r0 * H; i < r1 * H; ++i) dhp[i] += go[off * H + i];
        VBwdRows<T> rows = base;
        rows.off = off;
        rows.t = t;
        vbackward_rows(rows, r0, r1);
        barrier.arrive_and_wait(s1 - s0, target += slices);
        rec.run_panels(dhgp + off * GH, bs, GH, dhp, H, true, np * s0 / slices, np * s1 / slices);
        barrier.arrive_and_wait(s1 - s0, target += slices);
      }
    });
  } else {
    for (int64_t step = s.T - 1; step >= 0; --step) {
      const int64_t t = s.time_at(step), bs = s.bs[t], off = s.off[t];
      const T* gor = go + off * H;
      for (int64_t i = 0; i < bs * H; ++i) dhp[i] += gor[i];
      VBwdRows<T> rows = base;
      rows.off = off;
      rows.t = t;
      at::parallel_for(0, bs, grain, [&](int64_t b0, int64_t b1) { vbackward_rows(rows, b0, b1); });
      rec.run(dhgp + off * GH, bs, GH, dhp, H, true);
    }
  }

  timer.mark("steps");
  // The state each step started from, as one matrix, so dW_hh is a single GEMM.
  at::Tensor hprev = empty_big({N, H}, opts);
  {
    T* hpv = hprev.data_ptr<T>();
    const T* outp = output.data_ptr<T>();
    const T* hx = a.hx.data_ptr<T>();
    for (int64_t t = 0; t < s.T; ++t)
      for (int64_t b = 0; b < s.bs[t]; ++b) {
        const int64_t prev = s.prev_row(t, b);
        std::memcpy(hpv + (s.off[t] + b) * H, prev >= 0 ? outp + prev * H : hx + b * H, sizeof(T) * H);
      }
  }
  at::Tensor da_t;  // without LayerNorm the LSTM's dhg is da: one transpose serves both weight gradients
  const bool shared = a.lstm && !ln;
  timer.mark("hprev");
  g.grad_w_hh = weight_grad<T>(dhg, hprev, shared ? &da_t : nullptr, kScratchHT);
  timer.mark("grad_w_hh");
  // Bias and LayerNorm gain/bias gradients: sums over rows, before da becomes dL/d(W_ih x).
  at::Tensor empty = at::empty({0}, opts);
  for (auto& t : g.grad_ln) t = empty.clone();  // distinct tensors: outputs must not alias
  if (ln) {
    // The hidden side first: the LSTM's da is also its hidden-side gradient, and the x-side pass
    // turns da into dL/d(W_ih x).
    const int64_t nw = a.norm_w(), sw = a.stats_w();
    at::Tensor& dside = a.lstm ? da : db;
    auto hs = column_pass<T>(dside, norm.narrow(1, GH, GH), nw, nullptr, stats, 1, sw);
    g.grad_b_hh = hs.first;
    g.grad_ln[2] = hs.second;
    g.grad_ln[3] = hs.first.clone();
    auto xs = column_pass<T>(da, norm, nw, a.lnx_w.data_ptr<T>(), stats, 0, sw);
    g.grad_b_ih = xs.first;
    g.grad_ln[0] = xs.second;
    g.grad_ln[1] = xs.first.clone();
    if (a.lstm) {
      auto cs = column_pass<T>(dyc, norm.narrow(1, 2 * GH, H), nw, nullptr, stats, 2, sw);
      g.grad_ln[4] = cs.second;
      g.grad_ln[5] = cs.first;
    }
  } else {
    g.grad_b_ih = da.sum(0);
    g.grad_b_hh = a.lstm ? g.grad_b_ih.clone() : db.sum(0);
  }
  g.grad_peep = peep ? dpeep.sum(0).view({3, H}) : empty.clone();
  timer.mark("sums");
  g.grad_w_ih = weight_grad<T>(da, a.x, shared ? &da_t : nullptr);
  timer.mark("grad_w_ih");
  g.grad_input = fast_linear(da, transposed<T>(a.w_ih)).reshape(lead_with(a, a.I));
  timer.mark("grad_input");
  g.grad_hx = dh;
  g.grad_cx = a.lstm ? dc : empty;
}

VBackwardOut backward(const VArgs& a, const at::Tensor& grad_output, const at::Tensor& grad_hy,
                      const at::Tensor* grad_cy, const at::Tensor& output, const at::Tensor& gates,
                      const at::Tensor& cells, const at::Tensor& norm, const at::Tensor& stats) {
  const Schedule& s = a.sched;
  check_like(grad_output, a, "grad_output", lead_with(a, a.H), "output.shape");
  check_like(output, a, "output", lead_with(a, a.H), "output.shape");
  check_like(grad_hy, a, "grad_hy", {s.B, a.H}, "hx.shape");
  if (a.lstm) check_like(*grad_cy, a, "grad_cy", {s.B, a.H}, "cx.shape");
  const char* nosave = ": the forward was run with train=False, so nothing was saved for backward";
  const char* cells_name = a.lstm ? "cells" : "hn";
  check_defined(gates, a.op, "gates");
  check_defined(cells, a.op, cells_name);
  TORCH_CHECK(gates.numel() == s.N * a.GH && cells.numel() == s.N * a.H, a.op, nosave);
  check_like(gates, a, "gates", {s.N, a.GH}, "[rows, gates*hidden_size]");
  check_like(cells, a, cells_name, {s.N, a.H}, "[rows, hidden_size]");
  if (a.ln()) {
    check_defined(norm, a.op, "norm");
    check_defined(stats, a.op, "stats");
    TORCH_CHECK(norm.numel() == s.N * a.norm_w() && stats.numel() == s.N * a.stats_w(), a.op, nosave,
                " (or it ran without LayerNorm)");
    check_like(norm, a, "norm", {s.N, a.norm_w()}, "[rows, normalised widths]");
    check_like(stats, a, "stats", {s.N, a.stats_w()}, "[rows, layer norms]");
  }
  VBackwardOut g;
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fastrnn_variant_backward", [&] {
    backward_kernel<scalar_t>(a, grad_output, grad_hy, grad_cy ? *grad_cy : at::Tensor(), output, gates, cells, norm,
                              stats, g);
  });
  return g;
}

// ----------------------------------------------------------------------------------------
// Op entry points (schemas in csrc/registration.cpp)
// ----------------------------------------------------------------------------------------
const OptT kNone = c10::nullopt;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> variant_lstm_forward(
    const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& b_ih, const OptT& b_hh,
    const OptT& ln_ih_w, const OptT& ln_ih_b, const OptT& ln_hh_w, const OptT& ln_hh_b, const OptT& ln_c_w,
    const OptT& ln_c_b, const OptT& w_peep, const at::Tensor& hx, const at::Tensor& cx, const OptT& zoneout_mask,
    double zoneout_p, const OptT& batch_sizes, bool reverse, bool train) {
  VInputs in{&input, &w_ih, &w_hh, &b_ih, &b_hh, {&ln_ih_w, &ln_ih_b, &ln_hh_w, &ln_hh_b, &ln_c_w, &ln_c_b},
             &w_peep, &hx, &cx, &zoneout_mask, zoneout_p, &batch_sizes, reverse};
  VArgs a = prepare("fastrnn.variant_lstm_forward", true, in);
  VForwardOut o = forward(a, train);
  return {o.output, o.hy, o.cy, o.gates, o.cells, o.norm, o.stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
variant_lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& grad_cy,
                      const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& ln_ih_w,
                      const OptT& ln_ih_b, const OptT& ln_hh_w, const OptT& ln_hh_b, const OptT& ln_c_w,
                      const OptT& ln_c_b, const OptT& w_peep, const at::Tensor& hx, const at::Tensor& cx,
                      const OptT& zoneout_mask, double zoneout_p, const OptT& batch_sizes, bool reverse,
                      const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
                      const at::Tensor& norm, const at::Tensor& stats) {
  VInputs in{&input, &w_ih, &w_hh, &kNone, &kNone, {&ln_ih_w, &ln_ih_b, &ln_hh_w, &ln_hh_b, &ln_c_w, &ln_c_b},
             &w_peep, &hx, &cx, &zoneout_mask, zoneout_p, &batch_sizes, reverse};
  VArgs a = prepare("fastrnn.variant_lstm_backward", true, in);
  VBackwardOut g = backward(a, grad_output, grad_hy, &grad_cy, output, gates, cells, norm, stats);
  return {g.grad_input, g.grad_w_ih, g.grad_w_hh, g.grad_b_ih, g.grad_b_hh, g.grad_ln[0], g.grad_ln[1],
          g.grad_ln[2], g.grad_ln[3], g.grad_ln[4], g.grad_ln[5], g.grad_peep, g.grad_hx, g.grad_cx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> variant_gru_forward(
    const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& b_ih, const OptT& b_hh,
    const OptT& ln_ih_w, const OptT& ln_ih_b, const OptT& ln_hh_w, const OptT& ln_hh_b, const at::Tensor& hx,
    const OptT& zoneout_mask, double zoneout_p, const OptT& batch_sizes, bool reverse, bool train) {
  const at::Tensor none;
  VInputs in{&input, &w_ih, &w_hh, &b_ih, &b_hh, {&ln_ih_w, &ln_ih_b, &ln_hh_w, &ln_hh_b, &kNone, &kNone},
             nullptr, &hx, &none, &zoneout_mask, zoneout_p, &batch_sizes, reverse};
  VArgs a = prepare("fastrnn.variant_gru_forward", false, in);
  VForwardOut o = forward(a, train);
  return {o.output, o.hy, o.gates, o.cells, o.norm, o.stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
variant_gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_hy, const at::Tensor& input,
                     const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& ln_ih_w, const OptT& ln_ih_b,
                     const OptT& ln_hh_w, const OptT& ln_hh_b, const at::Tensor& hx, const OptT& zoneout_mask,
                     double zoneout_p, const OptT& batch_sizes, bool reverse, const at::Tensor& output,
                     const at::Tensor& gates, const at::Tensor& hn, const at::Tensor& norm, const at::Tensor& stats) {
  const at::Tensor none;
  VInputs in{&input, &w_ih, &w_hh, &kNone, &kNone, {&ln_ih_w, &ln_ih_b, &ln_hh_w, &ln_hh_b, &kNone, &kNone},
             nullptr, &hx, &none, &zoneout_mask, zoneout_p, &batch_sizes, reverse};
  VArgs a = prepare("fastrnn.variant_gru_backward", false, in);
  VBackwardOut g = backward(a, grad_output, grad_hy, nullptr, output, gates, hn, norm, stats);
  return {g.grad_input, g.grad_w_ih, g.grad_w_hh, g.grad_b_ih, g.grad_b_hh,
          g.grad_ln[0], g.grad_ln[1], g.grad_ln[2], g.grad_ln[3], g.grad_hx};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("variant_lstm_forward", &variant_lstm_forward);
  m.impl("variant_lstm_backward", &variant_lstm_backward);
  m.impl("variant_gru_forward", &variant_gru_forward);
  m.impl("variant_gru_backward", &variant_gru_backward);
}

}  // namespace fastrnn
