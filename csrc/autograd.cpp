// Autograd for the recurrent and variant forward ops, in C++ (TORCH_LIBRARY_IMPL(fastrnn, Autograd)).
//
// torch.library.register_autograd wraps an op in a Python autograd.Function: ~50 us a call,
// several times a small step's whole cost (a decoder cell called once per step in training).
// Here the forward redispatches below autograd to the backend kernel (CPU, or the fake kernel
// under torch.compile), saves what backward needs and returns; backward calls the fused
// *_backward op. Only double backward (create_graph=True: the gradients must themselves be
// differentiable) calls into Python, which differentiates the plain-PyTorch reference
// (fastrnn/_autograd.py, reference_backward).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/autograd.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

namespace fastrnn {
namespace {

namespace py = pybind11;
using at::Tensor;
using OptT = c10::optional<at::Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor opt(const OptT& t) { return t.has_value() ? *t : Tensor(); }
OptT as_opt(const Tensor& t) { return t.defined() ? OptT(t) : OptT(); }
// An unused output's gradient: one zero expanded to its shape (the backward kernels read it in
// place or copy it), not a zero-filled [T, B, H] per call.
Tensor zeros_if_undefined(const Tensor& g, const Tensor& like) {
  // (sym_sizes: a packed input's batch under torch.compile is data-dependent, and sizes() would
  // have to specialise it)
  return g.defined() ? g : at::zeros({}, like.options()).expand_symint(like.sym_sizes());
}

// Where a recurrent forward's input, weights and biases, and initial states sit among its
// arguments (the positions of their gradients among backward's results too).
struct GradSlots {
  std::vector<size_t> input, weights, states;
};

// A recurrent backward op's output_mask (csrc/registration.cpp): whether the input, any weight or
// bias, any initial state needs a gradient. `args`: the forward's arguments up to its last tensor,
// undefined where not given or not a tensor (autograd numbers its edges over the given tensors).
std::array<bool, 3> needed_grads(AutogradContext* ctx, const variable_list& args, const GradSlots& at) {
  auto any = [&](const std::vector<size_t>& ks) {
    for (size_t k : ks) {
      if (!args[k].defined()) continue;
      size_t edge = 0;
      for (size_t j = 0; j < k; ++j) edge += args[j].defined() ? 1 : 0;
      if (ctx->needs_input_grad(edge)) return true;
    }
    return false;
  };
  return {any(at.input), any(at.weights), any(at.states)};
}

// backward's results with the gradients left out of `need` undefined (the op returned empty ones).
variable_list masked(variable_list g, std::array<bool, 3> need, const GradSlots& at) {
  const std::vector<size_t>* groups[3] = {&at.input, &at.weights, &at.states};
  for (size_t i = 0; i < 3; ++i)
    if (!need[i])
      for (size_t k : *groups[i]) g[k] = Tensor();
  return g;
}

// A forward op's workspace outputs (what backward reads) as the op returns them under autograd:
// without a gradient. They are not marked non-differentiable in the Function (compiled autograd,
// torch._dynamo.config.compiled_autograd, asserts that no Function output is), so each is a
// Function output whose gradient, never formed, stays undefined (set_materialize_grads(false)),
// handed out detached.
Tensor workspace(const Tensor& t) { return t.detach(); }

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The recurrent ops' biases are kept out of save_for_backward, whose version check refused an
// in-place edit of a bias between forward and backward (an EMA or optimizer step taken before
// backward): the fused backward needs only whether they were given (their gradients are sums of
// the gate gradients), and torch.nn's GRU, RNN and cells, which do not save them either, allow
// the edit. They stay in saved_data (slot k of the saved list) for double backward, which
// recomputes through their values: there an edit since the forward raises autograd's error.
void save_biases_apart(AutogradContext* ctx, variable_list saved, std::initializer_list<size_t> slots) {
  c10::List<int64_t> idx;
  for (size_t k : slots) {
    const Tensor& b = saved[k];
    const std::string key = "bias" + std::to_string(k);
    ctx->saved_data[key] = b.defined() ? c10::IValue(b) : c10::IValue();
    ctx->saved_data[key + "_version"] = (b.defined() && !b.is_inference()) ? int64_t(b._version()) : int64_t(0);
    saved[k] = Tensor();
    idx.push_back(int64_t(k));
  }
  ctx->saved_data["bias_slots"] = idx;
  ctx->save_for_backward(saved);
}

variable_list saved_with_biases(AutogradContext* ctx) {
  variable_list s = ctx->get_saved_variables();
  for (int64_t k : ctx->saved_data["bias_slots"].toIntList()) {
    const std::string key = "bias" + std::to_string(k);
    const c10::IValue& v = ctx->saved_data[key];
    if (v.isNone()) continue;
    s[k] = v.toTensor();
    TORCH_CHECK(!at::GradMode::is_enabled() || s[k].is_inference() ||
                    s[k]._version() == ctx->saved_data[key + "_version"].toInt(),
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                "a bias of a fastrnn recurrent layer, edited after its forward (double backward recomputes through "
                "its values; a first-order backward allows the edit, as torch.nn's)");
  }
  return s;
}

// Double backward (create_graph=True) of every recurrent op: fastrnn._autograd.reference_backward
// (kind, saved, grads, reverse, relu, p) differentiates the plain-PyTorch reference on the op's
// tensor inputs (the first n_saved saved tensors) and returns their gradients (None where not
// needed) as a graph; padded to n_inputs, one per forward argument (the flags get none).
variable_list reference_backward(const char* kind, const variable_list& saved, size_t n_saved,
                                 const variable_list& grads, size_t n_inputs, bool reverse, bool relu = false,
                                 double p = 0.0) {
  py::gil_scoped_acquire gil;
  py::list s, g;
  for (size_t k = 0; k < n_saved; ++k) s.append(saved[k].defined() ? py::cast(saved[k]) : py::none());
  for (const Tensor& t : grads) g.append(t.defined() ? py::cast(t) : py::none());
  py::object res = py::module_::import("fastrnn._autograd").attr("reference_backward")(kind, s, g, reverse, relu, p);
  variable_list out;
  for (py::handle h : res) out.push_back(h.is_none() ? Tensor() : h.cast<Tensor>());
  out.resize(n_inputs);
  return out;
}

// ---------------------------------------------------------------------------------------- LSTM
using LstmFwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptT&, const OptT&, const OptT&, const Tensor&, const Tensor&,
    const OptT&, bool, bool);
using LstmBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&,
    const Tensor&, const Tensor&, const OptT&, bool, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    std::array<bool, 3>);

struct LstmFunction : public torch::autograd::Function<LstmFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                               const OptT& b_ih, const OptT& b_hh, const OptT& w_hr, const Tensor& hx,
                               const Tensor& cx, const OptT& batch_sizes, bool reverse, bool train) {
    static const auto op = op_handle<LstmFwdSig>("fastrnn::lstm_forward");
    // Unused output gradients stay undefined: zero-filling the workspace's would cost its size.
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, hy, cy, gates, cells, pin] = op.call(input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, batch_sizes, reverse,
                                                    train);
    save_biases_apart(ctx, {input, w_ih, w_hh, opt(b_ih), opt(b_hh), opt(w_hr), hx, cx, opt(batch_sizes), out, gates,
                            cells, pin}, {3, 4});
    ctx->saved_data["reverse"] = reverse;
    return {out, hy, cy, gates, cells, pin};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = saved_with_biases(ctx);
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const Tensor &input = s[0], &w_ih = s[1], &w_hh = s[2], &b_ih = s[3], &w_hr = s[5], &hx = s[6], &cx = s[7];
    const Tensor &bsz = s[8], &out = s[9];
    if (at::GradMode::is_enabled())  // (batch_sizes, reverse, train: no gradient)
      return reference_backward("lstm", s, 9, {grads[0], grads[1], grads[2]}, 11, reverse);
    static const auto op = op_handle<LstmBwdSig>("fastrnn::lstm_backward");
    static const GradSlots at{{0}, {1, 2, 3, 4, 5}, {6, 7}};
    const auto need = needed_grads(ctx, variable_list(s.begin(), s.begin() + 9), at);
    auto [gi, gw_ih, gw_hh, gb_ih, gb_hh, gw_hr, ghx, gcx] =
        op.call(zeros_if_undefined(grads[0], out), zeros_if_undefined(grads[1], hx), zeros_if_undefined(grads[2], cx),
                input, w_ih, w_hh, as_opt(w_hr), hx, cx, as_opt(bsz), reverse, out, s[10], s[11], s[12], need);
    const bool bias = b_ih.defined();
    return masked({gi, gw_ih, gw_hh, bias ? gb_ih : Tensor(), bias ? gb_hh : Tensor(),
                   w_hr.defined() ? gw_hr : Tensor(), ghx, gcx, Tensor(), Tensor(), Tensor()},
                  need, at);
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_autograd(
    const Tensor& input, const Tensor& w_ih, const Tensor& w_hh, const OptT& b_ih, const OptT& b_hh, const OptT& w_hr,
    const Tensor& hx, const Tensor& cx, const OptT& batch_sizes, bool reverse, bool train) {
  variable_list r = LstmFunction::apply(input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, batch_sizes, reverse, train);
  return {r[0], r[1], r[2], workspace(r[3]), workspace(r[4]), workspace(r[5])};
}

// ------------------------------------------------------------------------- bidirectional LSTM
// lstm_bidir_forward: both directions of a layer in one op (csrc/cpu/recurrent.cpp runs them at
// once); saved and differentiated as two lstm_forward calls would be, in one node.
using LstmBidirBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                   Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const OptT&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&,
    const Tensor&, const Tensor&, const OptT&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, std::array<bool, 3>);
using T12 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using LstmBidirFwdSig = T12(const Tensor&, const Tensor&, const Tensor&, const OptT&, const OptT&, const OptT&,
                            const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&, const OptT&,
                            const OptT&, const Tensor&, const Tensor&, const OptT&, bool);

struct LstmBidirFunction : public torch::autograd::Function<LstmBidirFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                               const OptT& b_ih, const OptT& b_hh, const OptT& w_hr, const Tensor& hx,
                               const Tensor& cx, const Tensor& w_ih_r, const Tensor& w_hh_r, const OptT& b_ih_r,
                               const OptT& b_hh_r, const OptT& w_hr_r, const Tensor& hx_r, const Tensor& cx_r,
                               const OptT& batch_sizes, bool train) {
    static const auto op = op_handle<LstmBidirFwdSig>("fastrnn::lstm_bidir_forward");
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    T12 r = op.call(input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r, hx_r, cx_r,
                    batch_sizes, train);
    variable_list out = std::apply([](auto&&... t) { return variable_list{t...}; }, r);
    // Per direction, as LstmFunction saves: the op's tensor inputs, then output and workspace.
    save_biases_apart(ctx, {input, w_ih, w_hh, opt(b_ih), opt(b_hh), opt(w_hr), hx, cx, opt(batch_sizes), out[0],
                            out[3], out[4], out[5], input, w_ih_r, w_hh_r, opt(b_ih_r), opt(b_hh_r), opt(w_hr_r),
                            hx_r, cx_r, opt(batch_sizes), out[6], out[9], out[10], out[11]}, {3, 4, 16, 17});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = saved_with_biases(ctx);
    const variable_list f(s.begin(), s.begin() + 13), r(s.begin() + 13, s.end());  // [input ... workspace]
    if (at::GradMode::is_enabled()) {
      variable_list gf = reference_backward("lstm", f, 9, {grads[0], grads[1], grads[2]}, 9, false);
      variable_list gr = reference_backward("lstm", r, 9, {grads[6], grads[7], grads[8]}, 9, true);
      const Tensor gi = !gf[0].defined() ? gr[0] : !gr[0].defined() ? gf[0] : gf[0] + gr[0];
      return {gi,    gf[1], gf[2], gf[3], gf[4], gf[5], gf[6], gf[7], gr[1], gr[2], gr[3],
              gr[4], gr[5], gr[6], gr[7], Tensor(), Tensor()};
    }
    static const auto op = op_handle<LstmBidirBwdSig>("fastrnn::lstm_bidir_backward");
    static const GradSlots at{{0}, {1, 2, 3, 4, 5, 8, 9, 10, 11, 12}, {6, 7, 13, 14}};
    const auto need = needed_grads(
        ctx, {f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], r[1], r[2], r[3], r[4], r[5], r[6], r[7], f[8]}, at);
    auto [gi, gw_ih, gw_hh, gb_ih, gb_hh, gw_hr, ghx, gcx, gw_ih_r, gw_hh_r, gb_ih_r, gb_hh_r, gw_hr_r, ghx_r, gcx_r] =
        op.call(zeros_if_undefined(grads[0], f[9]), zeros_if_undefined(grads[1], f[6]),
                zeros_if_undefined(grads[2], f[7]), zeros_if_undefined(grads[6], r[9]),
                zeros_if_undefined(grads[7], r[6]), zeros_if_undefined(grads[8], r[7]), f[0], f[1], f[2], as_opt(f[5]),
                f[6], f[7], r[1], r[2], as_opt(r[5]), r[6], r[7], as_opt(f[8]), f[9], f[10], f[11], f[12], r[9],
                r[10], r[11], r[12], need);
    // A gradient for each optional argument only where it was given (f[3] b_ih, f[5] w_hr).
    auto given = [](const Tensor& arg, const Tensor& grad) { return arg.defined() ? grad : Tensor(); };
    return masked({gi, gw_ih, gw_hh, given(f[3], gb_ih), given(f[3], gb_hh), given(f[5], gw_hr), ghx, gcx,
                   /* reverse direction: */ gw_ih_r, gw_hh_r, given(r[3], gb_ih_r), given(r[3], gb_hh_r),
                   given(r[5], gw_hr_r), ghx_r, gcx_r, Tensor(), Tensor()},
                  need, at);
  }
};

T12 lstm_bidir_forward_autograd(const Tensor& input, const Tensor& w_ih, const Tensor& w_hh, const OptT& b_ih,
                                const OptT& b_hh, const OptT& w_hr, const Tensor& hx, const Tensor& cx,
                                const Tensor& w_ih_r, const Tensor& w_hh_r, const OptT& b_ih_r, const OptT& b_hh_r,
                                const OptT& w_hr_r, const Tensor& hx_r, const Tensor& cx_r, const OptT& batch_sizes,
                                bool train) {
  variable_list r = LstmBidirFunction::apply(input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, w_ih_r, w_hh_r, b_ih_r,
                                             b_hh_r, w_hr_r, hx_r, cx_r, batch_sizes, train);
  return {r[0], r[1], r[2], workspace(r[3]), workspace(r[4]), workspace(r[5]),
          r[6], r[7], r[8], workspace(r[9]), workspace(r[10]), workspace(r[11])};
}

// ----------------------------------------------------------------------------------------- GRU
using GruFwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptT&,
                                                             const OptT&, const Tensor&, const OptT&, bool, bool);
using GruBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&, bool,
    const Tensor&, const Tensor&, const Tensor&, std::array<bool, 3>);

// The GRU's and RNN's forward arguments: input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, ...
const GradSlots kGruRnnSlots{{0}, {1, 2, 3, 4}, {5}};

struct GruFunction : public torch::autograd::Function<GruFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                               const OptT& b_ih, const OptT& b_hh, const Tensor& hx, const OptT& batch_sizes,
                               bool reverse, bool train) {
    static const auto op = op_handle<GruFwdSig>("fastrnn::gru_forward");
    // Unused output gradients stay undefined: zero-filling the workspace's would cost its size.
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, hy, gates, hn] = op.call(input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse, train);
    save_biases_apart(ctx, {input, w_ih, w_hh, opt(b_ih), opt(b_hh), hx, opt(batch_sizes), out, gates, hn}, {3, 4});
    ctx->saved_data["reverse"] = reverse;
    return {out, hy, gates, hn};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = saved_with_biases(ctx);
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const Tensor &input = s[0], &w_ih = s[1], &w_hh = s[2], &b_ih = s[3], &hx = s[5], &bsz = s[6], &out = s[7];
    if (at::GradMode::is_enabled()) return reference_backward("gru", s, 7, {grads[0], grads[1]}, 9, reverse);
    static const auto op = op_handle<GruBwdSig>("fastrnn::gru_backward");
    const auto need = needed_grads(ctx, variable_list(s.begin(), s.begin() + 7), kGruRnnSlots);
    auto [gi, gw_ih, gw_hh, gb_ih, gb_hh, ghx] =
        op.call(zeros_if_undefined(grads[0], out), zeros_if_undefined(grads[1], hx), input, w_ih, w_hh, hx,
                as_opt(bsz), reverse, out, s[8], s[9], need);
    const bool bias = b_ih.defined();
    return masked({gi, gw_ih, gw_hh, bias ? gb_ih : Tensor(), bias ? gb_hh : Tensor(), ghx, Tensor(), Tensor(),
                   Tensor()},
                  need, kGruRnnSlots);
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_forward_autograd(const Tensor& input, const Tensor& w_ih,
                                                                const Tensor& w_hh, const OptT& b_ih, const OptT& b_hh,
                                                                const Tensor& hx, const OptT& batch_sizes, bool reverse,
                                                                bool train) {
  variable_list r = GruFunction::apply(input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse, train);
  return {r[0], r[1], workspace(r[2]), workspace(r[3])};
}

// ----------------------------------------------------------------------------------------- RNN
using RnnFwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptT&, const OptT&,
                                             const Tensor&, const OptT&, bool, bool);
using RnnBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&, bool, bool,
    const Tensor&, std::array<bool, 3>);

struct RnnFunction : public torch::autograd::Function<RnnFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                               const OptT& b_ih, const OptT& b_hh, const Tensor& hx, const OptT& batch_sizes,
                               bool reverse, bool relu) {
    static const auto op = op_handle<RnnFwdSig>("fastrnn::rnn_forward");
    // Unused output gradients stay undefined: zero-filling the workspace's would cost its size.
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, hy] = op.call(input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse, relu);
    save_biases_apart(ctx, {input, w_ih, w_hh, opt(b_ih), opt(b_hh), hx, opt(batch_sizes), out}, {3, 4});
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["relu"] = relu;
    return {out, hy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = saved_with_biases(ctx);
    const bool reverse = ctx->saved_data["reverse"].toBool(), relu = ctx->saved_data["relu"].toBool();
    const Tensor &input = s[0], &w_ih = s[1], &w_hh = s[2], &b_ih = s[3], &hx = s[5], &bsz = s[6], &out = s[7];
    if (at::GradMode::is_enabled()) return reference_backward("rnn", s, 7, {grads[0], grads[1]}, 9, reverse, relu);
    static const auto op = op_handle<RnnBwdSig>("fastrnn::rnn_backward");
    const auto need = needed_grads(ctx, variable_list(s.begin(), s.begin() + 7), kGruRnnSlots);
    auto [gi, gw_ih, gw_hh, gb_ih, gb_hh, ghx] = op.call(zeros_if_undefined(grads[0], out),
                                                         zeros_if_undefined(grads[1], hx), input, w_ih, w_hh, hx,
                                                         as_opt(bsz), reverse, relu, out, need);
    const bool bias = b_ih.defined();
    return masked({gi, gw_ih, gw_hh, bias ? gb_ih : Tensor(), bias ? gb_hh : Tensor(), ghx, Tensor(), Tensor(),
                   Tensor()},
                  need, kGruRnnSlots);
  }
};

std::tuple<Tensor, Tensor> rnn_forward_autograd(const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                                                const OptT& b_ih, const OptT& b_hh, const Tensor& hx,
                                                const OptT& batch_sizes, bool reverse, bool relu) {
  variable_list r = RnnFunction::apply(input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse, relu);
  return {r[0], r[1]};
}

// ------------------------------------------------------------------ bidirectional GRU and RNN
// gru_bidir_forward (flag = train; workspace gates, hn) and rnn_bidir_forward (flag = relu; no
// workspace), as LstmBidirFunction.
using GruRnnBidirBwdRet = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                     Tensor>;
using GruBidirFwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptT&, const OptT&, const Tensor&, const Tensor&, const Tensor&,
    const OptT&, const OptT&, const Tensor&, const OptT&, bool);
using RnnBidirFwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                  const OptT&, const OptT&, const Tensor&,
                                                                  const Tensor&, const Tensor&, const OptT&,
                                                                  const OptT&, const Tensor&, const OptT&, bool);
using GruBidirBwdSig = GruRnnBidirBwdRet(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&, const OptT&, const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&, const Tensor&, const Tensor&, std::array<bool, 3>);
using RnnBidirBwdSig = GruRnnBidirBwdRet(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&, const OptT&, bool, const Tensor&, const Tensor&,
                                         std::array<bool, 3>);

template <bool Gru>
struct GruRnnBidirFunction : public torch::autograd::Function<GruRnnBidirFunction<Gru>> {
  static constexpr size_t kOuts = Gru ? 4 : 2;    // outputs a direction
  static constexpr size_t kSaved = Gru ? 10 : 8;  // saved a direction: 7 inputs, output, workspace

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                               const OptT& b_ih, const OptT& b_hh, const Tensor& hx, const Tensor& w_ih_r,
                               const Tensor& w_hh_r, const OptT& b_ih_r, const OptT& b_hh_r, const Tensor& hx_r,
                               const OptT& batch_sizes, bool flag) {
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    variable_list out;
    if constexpr (Gru) {
      static const auto op = op_handle<GruBidirFwdSig>("fastrnn::gru_bidir_forward");
      out = std::apply([](auto&&... t) { return variable_list{t...}; },
                       op.call(input, w_ih, w_hh, b_ih, b_hh, hx, w_ih_r, w_hh_r, b_ih_r, b_hh_r, hx_r, batch_sizes,
                               flag));
    } else {
      static const auto op = op_handle<RnnBidirFwdSig>("fastrnn::rnn_bidir_forward");
      out = std::apply([](auto&&... t) { return variable_list{t...}; },
                       op.call(input, w_ih, w_hh, b_ih, b_hh, hx, w_ih_r, w_hh_r, b_ih_r, b_hh_r, hx_r, batch_sizes,
                               flag));
    }
    variable_list saved = {input, w_ih, w_hh, opt(b_ih), opt(b_hh), hx, opt(batch_sizes), out[0]};
    if (Gru) saved.insert(saved.end(), {out[2], out[3]});
    const variable_list rev = {input, w_ih_r, w_hh_r, opt(b_ih_r), opt(b_hh_r), hx_r, opt(batch_sizes), out[kOuts]};
    saved.insert(saved.end(), rev.begin(), rev.end());
    if (Gru) saved.insert(saved.end(), {out[6], out[7]});
    save_biases_apart(ctx, saved, {3, 4, kSaved + 3, kSaved + 4});
    ctx->saved_data["flag"] = flag;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = saved_with_biases(ctx);
    const variable_list f(s.begin(), s.begin() + kSaved), r(s.begin() + kSaved, s.end());
    const bool flag = ctx->saved_data["flag"].toBool(), relu = !Gru && flag;
    const Tensor &go = grads[0], &ghy = grads[1], &go_r = grads[kOuts], &ghy_r = grads[kOuts + 1];
    if (at::GradMode::is_enabled()) {
      const char* kind = Gru ? "gru" : "rnn";
      variable_list gf = reference_backward(kind, f, 7, {go, ghy}, 7, false, relu);
      variable_list gr = reference_backward(kind, r, 7, {go_r, ghy_r}, 7, true, relu);
      const Tensor gi = !gf[0].defined() ? gr[0] : !gr[0].defined() ? gf[0] : gf[0] + gr[0];
      return {gi, gf[1], gf[2], gf[3], gf[4], gf[5], gr[1], gr[2], gr[3], gr[4], gr[5], Tensor(), Tensor()};
    }
    static const GradSlots at{{0}, {1, 2, 3, 4, 6, 7, 8, 9}, {5, 10}};
    const auto need =
        needed_grads(ctx, {f[0], f[1], f[2], f[3], f[4], f[5], r[1], r[2], r[3], r[4], r[5], f[6]}, at);
    GruRnnBidirBwdRet g;
    const Tensor a0 = zeros_if_undefined(go, f[7]), a1 = zeros_if_undefined(ghy, f[5]),
                 a2 = zeros_if_undefined(go_r, r[7]), a3 = zeros_if_undefined(ghy_r, r[5]);
    if constexpr (Gru) {
      static const auto op = op_handle<GruBidirBwdSig>("fastrnn::gru_bidir_backward");
      g = op.call(a0, a1, a2, a3, f[0], f[1], f[2], f[5], r[1], r[2], r[5], as_opt(f[6]), f[7], f[8], f[9], r[7],
                  r[8], r[9], need);
    } else {
      static const auto op = op_handle<RnnBidirBwdSig>("fastrnn::rnn_bidir_backward");
      g = op.call(a0, a1, a2, a3, f[0], f[1], f[2], f[5], r[1], r[2], r[5], as_opt(f[6]), relu, f[7], r[7], need);
    }
    auto [gi, gw_ih, gw_hh, gb_ih, gb_hh, ghx, gw_ih_r, gw_hh_r, gb_ih_r, gb_hh_r, ghx_r] = g;
    const bool bias = f[3].defined(), bias_r = r[3].defined();
    return masked({gi, gw_ih, gw_hh, bias ? gb_ih : Tensor(), bias ? gb_hh : Tensor(), ghx, gw_ih_r, gw_hh_r,
                   bias_r ? gb_ih_r : Tensor(), bias_r ? gb_hh_r : Tensor(), ghx_r, Tensor(), Tensor()},
                  need, at);
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_bidir_forward_autograd(
    const Tensor& input, const Tensor& w_ih, const Tensor& w_hh, const OptT& b_ih, const OptT& b_hh, const Tensor& hx,
    const Tensor& w_ih_r, const Tensor& w_hh_r, const OptT& b_ih_r, const OptT& b_hh_r, const Tensor& hx_r,
    const OptT& batch_sizes, bool train) {
  variable_list r = GruRnnBidirFunction<true>::apply(input, w_ih, w_hh, b_ih, b_hh, hx, w_ih_r, w_hh_r, b_ih_r,
                                                     b_hh_r, hx_r, batch_sizes, train);
  return {r[0], r[1], workspace(r[2]), workspace(r[3]), r[4], r[5], workspace(r[6]), workspace(r[7])};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rnn_bidir_forward_autograd(
    const Tensor& input, const Tensor& w_ih, const Tensor& w_hh, const OptT& b_ih, const OptT& b_hh, const Tensor& hx,
    const Tensor& w_ih_r, const Tensor& w_hh_r, const OptT& b_ih_r, const OptT& b_hh_r, const Tensor& hx_r,
    const OptT& batch_sizes, bool relu) {
  variable_list r = GruRnnBidirFunction<false>::apply(input, w_ih, w_hh, b_ih, b_hh, hx, w_ih_r, w_hh_r, b_ih_r,
                                                      b_hh_r, hx_r, batch_sizes, relu);
  return {r[0], r[1], r[2], r[3]};
}

// ------------------------------------------------------------------------------ variant cells
// The zoneout mask and zoneout_p are constants of the forward (the mask is a random draw), so they
// get no gradient; DropConnect never reaches these ops (it is an autograd-visible product on W_hh).
// A gradient is returned only for the optional tensors that were given.
variable_list given_only(const variable_list& inputs, const std::vector<Tensor>& grads, size_t n_total) {
  variable_list out(n_total);
  for (size_t k = 0; k < grads.size(); ++k)
    if (inputs[k].defined()) out[k] = grads[k];
  return out;
}

using VLstmFwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptT&, const OptT&, const OptT&, const OptT&, const OptT&,
    const OptT&, const OptT&, const OptT&, const OptT&, const Tensor&, const Tensor&, const OptT&, double,
    const OptT&, bool, bool);
using VLstmBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                               Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&,
    const OptT&, const OptT&, const OptT&, const OptT&, const OptT&, const OptT&, const Tensor&, const Tensor&,
    const OptT&, double, const OptT&, bool, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&);

struct VLstmFunction : public torch::autograd::Function<VLstmFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                               const OptT& b_ih, const OptT& b_hh, const OptT& lnxw, const OptT& lnxb,
                               const OptT& lnhw, const OptT& lnhb, const OptT& lncw, const OptT& lncb,
                               const OptT& w_peep, const Tensor& hx, const Tensor& cx, const OptT& mask, double p,
                               const OptT& batch_sizes, bool reverse, bool train) {
    static const auto op = op_handle<VLstmFwdSig>("fastrnn::variant_lstm_forward");
    ctx->set_materialize_grads(false);  // the workspace's gradients would be hundreds of MB of zeros
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, hy, cy, gates, cells, norm, stats] = op.call(input, w_ih, w_hh, b_ih, b_hh, lnxw, lnxb, lnhw, lnhb,
                                                            lncw, lncb, w_peep, hx, cx, mask, p, batch_sizes,
                                                            reverse, train);
    // 0-13: the differentiable inputs in schema order, 14 mask, 15 batch_sizes, 16-20 outputs
    ctx->save_for_backward({input, w_ih, w_hh, opt(b_ih), opt(b_hh), opt(lnxw), opt(lnxb), opt(lnhw), opt(lnhb),
                            opt(lncw), opt(lncb), opt(w_peep), hx, cx, opt(mask), opt(batch_sizes), out, gates, cells,
                            norm, stats});
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["p"] = p;
    return {out, hy, cy, gates, cells, norm, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const double p = ctx->saved_data["p"].toDouble();
    constexpr size_t kInputs = 19;
    if (at::GradMode::is_enabled())
      return reference_backward("variant_lstm", s, 16, {grads[0], grads[1], grads[2]}, kInputs, reverse, false, p);
    static const auto op = op_handle<VLstmBwdSig>("fastrnn::variant_lstm_backward");
    const Tensor &input = s[0], &hx = s[12], &cx = s[13], &out = s[16];
    auto g = op.call(zeros_if_undefined(grads[0], out), zeros_if_undefined(grads[1], hx),
                     zeros_if_undefined(grads[2], cx), input, s[1], s[2], as_opt(s[5]), as_opt(s[6]), as_opt(s[7]),
                     as_opt(s[8]), as_opt(s[9]), as_opt(s[10]), as_opt(s[11]), hx, cx, as_opt(s[14]), p,
                     as_opt(s[15]), reverse, out, s[17], s[18], s[19], s[20]);
    auto [gi, gw_ih, gw_hh, gb_ih, gb_hh, g0, g1, g2, g3, g4, g5, gpeep, ghx, gcx] = g;
    return given_only(s, {gi, gw_ih, gw_hh, gb_ih, gb_hh, g0, g1, g2, g3, g4, g5, gpeep, ghx, gcx}, kInputs);
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> variant_lstm_forward_autograd(
    const Tensor& input, const Tensor& w_ih, const Tensor& w_hh, const OptT& b_ih, const OptT& b_hh, const OptT& lnxw,
    const OptT& lnxb, const OptT& lnhw, const OptT& lnhb, const OptT& lncw, const OptT& lncb, const OptT& w_peep,
    const Tensor& hx, const Tensor& cx, const OptT& mask, double p, const OptT& batch_sizes, bool reverse,
    bool train) {
  variable_list r = VLstmFunction::apply(input, w_ih, w_hh, b_ih, b_hh, lnxw, lnxb, lnhw, lnhb, lncw, lncb, w_peep,
                                         hx, cx, mask, p, batch_sizes, reverse, train);
  return {r[0], r[1], r[2], workspace(r[3]), workspace(r[4]), workspace(r[5]), workspace(r[6])};
}

using VGruFwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptT&, const OptT&, const OptT&, const OptT&, const OptT&,
    const OptT&, const Tensor&, const OptT&, double, const OptT&, bool, bool);
using VGruBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&, const OptT&, const OptT&,
    const OptT&, const Tensor&, const OptT&, double, const OptT&, bool, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&);

struct VGruFunction : public torch::autograd::Function<VGruFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                               const OptT& b_ih, const OptT& b_hh, const OptT& lnxw, const OptT& lnxb,
                               const OptT& lnhw, const OptT& lnhb, const Tensor& hx, const OptT& mask, double p,
                               const OptT& batch_sizes, bool reverse, bool train) {
    static const auto op = op_handle<VGruFwdSig>("fastrnn::variant_gru_forward");
    ctx->set_materialize_grads(false);  // as the variant LSTM's
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, hy, gates, hn, norm, stats] =
        op.call(input, w_ih, w_hh, b_ih, b_hh, lnxw, lnxb, lnhw, lnhb, hx, mask, p, batch_sizes, reverse, train);
    // 0-9: the differentiable inputs in schema order, 10 mask, 11 batch_sizes, 12-16 outputs
    ctx->save_for_backward({input, w_ih, w_hh, opt(b_ih), opt(b_hh), opt(lnxw), opt(lnxb), opt(lnhw), opt(lnhb), hx,
                            opt(mask), opt(batch_sizes), out, gates, hn, norm, stats});
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["p"] = p;
    return {out, hy, gates, hn, norm, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const double p = ctx->saved_data["p"].toDouble();
    constexpr size_t kInputs = 15;
    if (at::GradMode::is_enabled())
      return reference_backward("variant_gru", s, 12, {grads[0], grads[1]}, kInputs, reverse, false, p);
    static const auto op = op_handle<VGruBwdSig>("fastrnn::variant_gru_backward");
    const Tensor &input = s[0], &hx = s[9], &out = s[12];
    auto [gi, gw_ih, gw_hh, gb_ih, gb_hh, g0, g1, g2, g3, ghx] =
        op.call(zeros_if_undefined(grads[0], out), zeros_if_undefined(grads[1], hx), input, s[1], s[2], as_opt(s[5]),
                as_opt(s[6]), as_opt(s[7]), as_opt(s[8]), hx, as_opt(s[10]), p, as_opt(s[11]), reverse, out, s[13],
                s[14], s[15], s[16]);
    return given_only(s, {gi, gw_ih, gw_hh, gb_ih, gb_hh, g0, g1, g2, g3, ghx}, kInputs);
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> variant_gru_forward_autograd(
    const Tensor& input, const Tensor& w_ih, const Tensor& w_hh, const OptT& b_ih, const OptT& b_hh, const OptT& lnxw,
    const OptT& lnxb, const OptT& lnhw, const OptT& lnhb, const Tensor& hx, const OptT& mask, double p,
    const OptT& batch_sizes, bool reverse, bool train) {
  variable_list r = VGruFunction::apply(input, w_ih, w_hh, b_ih, b_hh, lnxw, lnxb, lnhw, lnhb, hx, mask, p,
                                        batch_sizes, reverse, train);
  return {r[0], r[1], workspace(r[2]), workspace(r[3]), workspace(r[4]), workspace(r[5])};
}


// ------------------------------------------------------------------------------- state_copy
void check_state_copy_input(const Tensor& x) {
  TORCH_CHECK(x.defined(), "fastrnn.state_copy: x must be a tensor, got None");
  TORCH_CHECK(x.layout() == at::kStrided && !x.is_nested() && !x.is_mkldnn(),
              "fastrnn.state_copy: x must be a dense (strided) tensor, got layout ", x.layout(),
              x.is_nested() ? " (nested)" : "");
}

Tensor state_copy(const Tensor& x) {
  check_state_copy_input(x);
  return x.clone(at::MemoryFormat::Contiguous);
}

struct StateCopyFunction : public torch::autograd::Function<StateCopyFunction> {
  static Tensor forward(AutogradContext*, const Tensor& x) {
    static const auto op = op_handle<Tensor(const Tensor&)>("fastrnn::state_copy");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x);
  }
  static variable_list backward(AutogradContext*, variable_list grads) { return grads; }
};

Tensor state_copy_autograd(const Tensor& x) {
  check_state_copy_input(x);
  return StateCopyFunction::apply(x);
}

// ------------------------------------------------------------------------ the *_backward ops
// They compute gradients and have none of their own (a double backward differentiates the
// reference instead, above). Called under grad mode with an argument that requires grad, they
// raise: without an autograd kernel torch would return outputs that require grad and, on
// backward, leave the gradients None with only a deprecation warning.
bool ivalue_requires_grad(const c10::IValue& v) {
  if (v.isTensor()) return v.toTensor().defined() && v.toTensor().requires_grad();
  if (v.isList())
    for (const c10::IValue& e : v.toListRef())
      if (ivalue_requires_grad(e)) return true;
  return false;
}

void not_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  if (at::GradMode::is_enabled()) {
    const auto given = torch::jit::last(*stack, args.size());
    for (size_t i = 0; i < args.size(); ++i)
      TORCH_CHECK(!ivalue_requires_grad(given[i]), op.schema().name(), " is not differentiable, and its argument ",
                  args[i].name(), " requires grad: call it under torch.no_grad() (the gradients of the forward op, "
                  "with create_graph=True, are differentiable)");
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
}

// ------------------------------------------------------------------------------ whole stacks
// recurrent_stack: a stacked (and/or bidirectional) LSTM, GRU or RNN in one call, with the
// arguments of torch._VF.lstm / gru / rnn_tanh / rnn_relu. CompositeImplicitAutograd: it loops
// over the per-layer ops above, so autograd, double backward, the fake kernels and
// torch.compile all come from them; what it removes is Python's per-layer and per-call work
// (fastrnn.functional._stack did this loop in Python: ~4 us a layer on top of the op).
enum class StackMode { LSTM, GRU, RNN_TANH, RNN_RELU };

StackMode stack_mode(c10::string_view mode) {
  if (mode == "LSTM") return StackMode::LSTM;
  if (mode == "GRU") return StackMode::GRU;
  if (mode == "RNN_TANH") return StackMode::RNN_TANH;
  if (mode == "RNN_RELU") return StackMode::RNN_RELU;
  TORCH_CHECK_VALUE(false, "fastrnn.recurrent_stack: mode must be one of 'LSTM', 'GRU', 'RNN_TANH', 'RNN_RELU', got '",
                    std::string(mode), "'");
}

// Whether a layer call must save its workspace: grad mode on and some input requires grad.
bool any_requires_grad(at::ArrayRef<Tensor> ts) {
  for (const Tensor& t : ts)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

void check_stack_state(const char* name, const Tensor& st, int64_t LD) {
  // sym_size: under torch.export a size() call would specialise the batch dimension too.
  TORCH_CHECK(st.dim() == 3 && st.sym_size(0) == LD, "fastrnn.recurrent_stack: ", name,
              ": expected initial states of shape [num_layers * num_directions = ", LD, ", batch, hidden], got ",
              st.sizes());
}

std::tuple<Tensor, Tensor, Tensor> recurrent_stack(c10::string_view mode_name, const Tensor& input, const Tensor& hx,
                                                   const OptT& cx_opt, at::TensorList params, bool has_biases,
                                                   int64_t num_layers, double dropout, bool train, bool bidirectional,
                                                   bool batch_first, const OptT& batch_sizes) {
  const StackMode mode = stack_mode(mode_name);
  TORCH_CHECK(input.defined() && hx.defined(), "fastrnn.recurrent_stack: ", input.defined() ? "hx" : "input",
              " must be a tensor, got None");
  const bool lstm = mode == StackMode::LSTM, relu = mode == StackMode::RNN_RELU;
  const Tensor cx = opt(cx_opt);
  const bool packed = batch_sizes.has_value() && batch_sizes->defined();
  TORCH_CHECK_VALUE(num_layers >= 1, "fastrnn.recurrent_stack: num_layers must be at least 1, got ", num_layers);
  TORCH_CHECK_VALUE(dropout >= 0.0 && dropout <= 1.0, "fastrnn.recurrent_stack: dropout must be a probability in "
                    "[0, 1], got ", dropout);
  TORCH_CHECK(input.dim() == (packed ? 2 : 3), "fastrnn.recurrent_stack: input: expected ",
              packed ? "packed data [N, input_size] with batch_sizes" : "a 3-D tensor [T, B, input_size]", ", got ",
              input.dim(), "-D");
  const int64_t D = bidirectional ? 2 : 1, LD = num_layers * D;
  check_stack_state("hx", hx, LD);
  if (lstm) {
    TORCH_CHECK(cx.defined(), "fastrnn.recurrent_stack: cx (the initial cell state) is required for mode 'LSTM'");
    check_stack_state("cx", cx, LD);
  } else {
    TORCH_CHECK(!cx.defined(), "fastrnn.recurrent_stack: cx is only taken for mode 'LSTM', got one for mode '",
                std::string(mode_name), "'");
  }
  const int64_t base = has_biases ? 4 : 2;
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(n == LD * base || (lstm && n == LD * (base + 1)), "fastrnn.recurrent_stack: params: expected ",
                    LD * base, lstm ? " (or, with proj_size, " + std::to_string(LD * (base + 1)) + ")" : "",
                    " tensors for num_layers * num_directions = ", LD, (has_biases ? " with" : " without"),
                    " biases, got ", n);
  const int64_t per = n / LD;
  // Every parameter before any layer runs (the layer ops check the sizes that follow from them):
  // defined, the input's dtype and device, 2-D weights and 1-D biases.
  for (int64_t k = 0; k < n; ++k) {
    const Tensor& p = params[k];
    const int64_t j = k % per;
    const bool bias = has_biases && (j == 2 || j == 3);
    TORCH_CHECK(p.defined(), "fastrnn.recurrent_stack: params[", k, "] is undefined");
    TORCH_CHECK(p.device() == input.device(), "fastrnn.recurrent_stack: params[", k, "] and input must be on the same ",
                "device, got ", p.device(), " and ", input.device());
    TORCH_CHECK_VALUE(p.scalar_type() == input.scalar_type(), "fastrnn.recurrent_stack: params[", k,
                      "] and input must have the same dtype, got ", p.scalar_type(), " and ", input.scalar_type());
    TORCH_CHECK(p.dim() == (bias ? 1 : 2), "fastrnn.recurrent_stack: params[", k, "] (", j < 2 ? "a weight" :
                bias ? "a bias" : "w_hr", " of layer ", k / per / D, ") must be ", bias ? 1 : 2, "-D, got ", p.dim(),
                "-D");
  }

  static const auto lstm_op = op_handle<LstmFwdSig>("fastrnn::lstm_forward");
  static const auto gru_op = op_handle<GruFwdSig>("fastrnn::gru_forward");
  static const auto rnn_op = op_handle<RnnFwdSig>("fastrnn::rnn_forward");
  static const auto lstm_bidir_op = op_handle<LstmBidirFwdSig>("fastrnn::lstm_bidir_forward");
  static const auto gru_bidir_op = op_handle<GruBidirFwdSig>("fastrnn::gru_bidir_forward");
  static const auto rnn_bidir_op = op_handle<RnnBidirFwdSig>("fastrnn::rnn_bidir_forward");

  // One direction's weights: w_ih, w_hh, b_ih, b_hh, w_hr (the last three optional).
  struct Dir {
    Tensor w_ih, w_hh;
    OptT b_ih, b_hh, w_hr;
  };
  auto dir = [&](int64_t k) {
    const Tensor* p = params.data() + k * per;
    Dir d{p[0], p[1], c10::nullopt, c10::nullopt, c10::nullopt};
    if (has_biases) {
      d.b_ih = p[2];
      d.b_hh = p[3];
    }
    if (per == base + 1) d.w_hr = p[base];
    return d;
  };
  std::vector<Tensor> hs = hx.unbind(0);
  std::vector<Tensor> cs = lstm ? cx.unbind(0) : std::vector<Tensor>();
  // While torch.compile traces (its tensors carry the Python key), each layer's initial states
  // are copies (state_copy: Inductor would remove an aten.clone as a no-op), not views of hx and
  // cx: a layer op saves them for its backward, and Inductor's backward may write in place into a
  // saved tensor it takes to be unaliased (a donated buffer) before a saved view of it is read.
  // Measured, torch 2.13: with hx = zeros, AOT autograd saved the zeros and their unbind view and
  // merged the zeros with those of a backward select_scatter or index_put (from h_n[-1], or a
  // PackedSequence's unsorted_indices), which overwrote them first: silently wrong gradients.
  // (fastrnn.functional._own_states does the same for the Python callers of the layer ops.)
  // Eager calls take no copies.
  if (input.key_set().has(c10::DispatchKey::Python) || hx.key_set().has(c10::DispatchKey::Python)) {
    static const auto copy_op = op_handle<Tensor(const Tensor&)>("fastrnn::state_copy");
    for (Tensor& h : hs) h = copy_op.call(h);
    for (Tensor& c : cs) c = copy_op.call(c);
  }
  const bool dense_batch_first = batch_first && !packed;
  Tensor x = dense_batch_first ? input.transpose(0, 1) : input;
  const bool cpu = input.device().is_cpu();
  std::vector<Tensor> hy(LD), cy(lstm ? LD : 0);
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    if (layer > 0 && dropout > 0 && train) x = at::dropout(x, dropout, true);
    const int64_t k0 = layer * D;
    const bool ws = at::GradMode::is_enabled() &&
                     (x.requires_grad() || any_requires_grad(params.slice(k0 * per, D * per)) ||
                      any_requires_grad(at::ArrayRef<Tensor>(hs).slice(k0, D)) ||
                      (lstm && any_requires_grad(at::ArrayRef<Tensor>(cs).slice(k0, D))));
    // Without a graph to record, the layer ops run below autograd, as fastrnn.functional._call did.
    c10::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!ws) below.emplace();
    // A layer op's outputs as a list: output, hy, (cy for the LSTM), then its workspace; the
    // bidirectional ops return one such run per direction, `per_dir` apart.
    auto as_list = [](auto&& t) { return std::apply([](auto&&... v) { return std::vector<Tensor>{v...}; }, t); };
    std::vector<Tensor> outs;
    auto take = [&](const std::vector<Tensor>& o, size_t first, int64_t k) {
      outs.push_back(o[first]);
      hy[k] = o[first + 1];
      if (lstm) cy[k] = o[first + 2];
    };
    try {
      if (D == 2 && cpu) {  // both directions in one op (at once, with two threads or more)
        const Dir f = dir(k0), r = dir(k0 + 1);
        std::vector<Tensor> o;
        size_t per_dir = 2;
        if (lstm) {
          o = as_list(lstm_bidir_op.call(x, f.w_ih, f.w_hh, f.b_ih, f.b_hh, f.w_hr, hs[k0], cs[k0], r.w_ih, r.w_hh,
                                         r.b_ih, r.b_hh, r.w_hr, hs[k0 + 1], cs[k0 + 1], batch_sizes, ws));
          per_dir = 6;
        } else if (mode == StackMode::GRU) {
          o = as_list(gru_bidir_op.call(x, f.w_ih, f.w_hh, f.b_ih, f.b_hh, hs[k0], r.w_ih, r.w_hh, r.b_ih, r.b_hh,
                                        hs[k0 + 1], batch_sizes, ws));
          per_dir = 4;
        } else {
          o = as_list(rnn_bidir_op.call(x, f.w_ih, f.w_hh, f.b_ih, f.b_hh, hs[k0], r.w_ih, r.w_hh, r.b_ih, r.b_hh,
                                        hs[k0 + 1], batch_sizes, relu));
        }
        take(o, 0, k0);
        take(o, per_dir, k0 + 1);
      } else {
        for (int64_t d = 0; d < D; ++d) {
          const int64_t k = k0 + d;
          const Dir w = dir(k);
          if (lstm)
            take(as_list(lstm_op.call(x, w.w_ih, w.w_hh, w.b_ih, w.b_hh, w.w_hr, hs[k], cs[k], batch_sizes, d == 1,
                                      ws)),
                 0, k);
          else if (mode == StackMode::GRU)
            take(as_list(gru_op.call(x, w.w_ih, w.w_hh, w.b_ih, w.b_hh, hs[k], batch_sizes, d == 1, ws)), 0, k);
          else
            take(as_list(rnn_op.call(x, w.w_ih, w.w_hh, w.b_ih, w.b_hh, hs[k], batch_sizes, d == 1, relu)), 0, k);
        }
      }
    } catch (c10::Error& e) {  // the layer ops name the argument; say which layer it was
      e.add_context("fastrnn.recurrent_stack: in layer " + std::to_string(layer) + " (params[" +
                    std::to_string(k0 * per) + ":" + std::to_string((k0 + D) * per) + "], hx[" + std::to_string(k0) +
                    ":" + std::to_string(k0 + D) + "])");
      throw;
    }
    x = D == 1 ? outs[0] : at::cat(outs, -1);
  }
  // The output a layer op returns is also saved for its backward (the h_{t-1} of every step):
  // with a graph the caller gets a copy, so that editing it in place (nn.ReLU(inplace=True),
  // out += residual) before backward works, as with torch.nn (a torch.cat already is one).
  if (D == 1 && x.requires_grad()) x = x.clone();
  if (dense_batch_first) x = x.transpose(0, 1);
  Tensor h_n = LD == 1 ? hy[0].unsqueeze(0) : at::stack(hy);
  Tensor c_n = lstm ? (LD == 1 ? cy[0].unsqueeze(0) : at::stack(cy)) : at::empty({0}, hx.options());
  return {x, h_n, c_n};
}

}  // namespace
}  // namespace fastrnn

TORCH_LIBRARY_IMPL(fastrnn, Autograd, m) {
  m.impl("state_copy", &fastrnn::state_copy_autograd);
  m.impl("lstm_forward", &fastrnn::lstm_forward_autograd);
  m.impl("lstm_bidir_forward", &fastrnn::lstm_bidir_forward_autograd);
  m.impl("gru_bidir_forward", &fastrnn::gru_bidir_forward_autograd);
  m.impl("rnn_bidir_forward", &fastrnn::rnn_bidir_forward_autograd);
  m.impl("gru_forward", &fastrnn::gru_forward_autograd);
  m.impl("rnn_forward", &fastrnn::rnn_forward_autograd);
  m.impl("variant_lstm_forward", &fastrnn::variant_lstm_forward_autograd);
  m.impl("variant_gru_forward", &fastrnn::variant_gru_forward_autograd);
  for (const char* op : {"lstm_backward", "gru_backward", "rnn_backward", "lstm_bidir_backward", "gru_bidir_backward",
                         "rnn_bidir_backward", "sdpa_backward", "additive_attention_backward", "variant_lstm_backward",
                         "variant_gru_backward"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&fastrnn::not_differentiable>());
}

TORCH_LIBRARY_IMPL(fastrnn, CompositeImplicitAutograd, m) { m.impl("recurrent_stack", &fastrnn::recurrent_stack); }

TORCH_LIBRARY_IMPL(fastrnn, CompositeExplicitAutograd, m) { m.impl("state_copy", &fastrnn::state_copy); }
