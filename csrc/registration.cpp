// Every fastrnn op schema, in one place. Backends register implementations with
// TORCH_LIBRARY_IMPL(fastrnn, <backend>, m); Python adds fake kernels and autograd
// (fastrnn/_ops.py, fastrnn/_autograd.py).
//
// Recurrent ops cover one layer in one direction over a whole sequence. `input` is dense
// [T, B, I], or packed [N, I] when `batch_sizes` ([T], int64, CPU, non-increasing) is given.
// The *_forward ops return the output and final state, then the workspace backward needs
// (empty tensors when train=False).
// The *_backward ops' output_mask says which gradients to compute: the input's, the weights' and
// biases', the initial states'. Each one left out is not computed and comes back as an empty
// tensor (autograd passes which of the forward's inputs need a gradient: a layer over data needs
// no grad_input, a frozen layer no weight gradients).
#include <torch/library.h>

TORCH_LIBRARY(fastrnn, m) {
  m.def(
      "lstm_forward(Tensor input, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, "
      "Tensor hx, Tensor cx, Tensor? batch_sizes, bool reverse, bool train) -> "
      "(Tensor output, Tensor hy, Tensor cy, Tensor gates, Tensor cells, Tensor proj_input)");
  m.def(
      "lstm_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor w_ih, Tensor w_hh, "
      "Tensor? w_hr, Tensor hx, Tensor cx, Tensor? batch_sizes, bool reverse, Tensor output, Tensor gates, "
      "Tensor cells, Tensor proj_input, bool[3] output_mask=[True, True, True]) -> (Tensor grad_input, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_w_hr, Tensor grad_hx, "
      "Tensor grad_cx)");
  m.def(
      "gru_forward(Tensor input, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor hx, "
      "Tensor? batch_sizes, bool reverse, bool train) -> (Tensor output, Tensor hy, Tensor gates, Tensor hn)");
  m.def(
      "gru_backward(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor w_ih, Tensor w_hh, Tensor hx, "
      "Tensor? batch_sizes, bool reverse, Tensor output, Tensor gates, Tensor hn, "
      "bool[3] output_mask=[True, True, True]) -> (Tensor grad_input, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_hx)");
  m.def(
      "rnn_forward(Tensor input, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor hx, "
      "Tensor? batch_sizes, bool reverse, bool relu) -> (Tensor output, Tensor hy)");
  m.def(
      "rnn_backward(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor w_ih, Tensor w_hh, Tensor hx, "
      "Tensor? batch_sizes, bool reverse, bool relu, Tensor output, bool[3] output_mask=[True, True, True]) -> "
      "(Tensor grad_input, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_hx)");
  // Both directions of a bidirectional layer in one call (run at once where the CPU has
  // two threads): the arguments of lstm_forward / lstm_backward for the forward direction, then
  // the same for the reverse direction (suffix _r); input and batch_sizes are shared. The
  // backward's grad_input is the sum of both directions'.
  m.def(
      "lstm_bidir_forward(Tensor input, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, "
      "Tensor hx, Tensor cx, Tensor w_ih_r, Tensor w_hh_r, Tensor? b_ih_r, Tensor? b_hh_r, Tensor? w_hr_r, "
      "Tensor hx_r, Tensor cx_r, Tensor? batch_sizes, bool train) -> (Tensor output, Tensor hy, Tensor cy, "
      "Tensor gates, Tensor cells, Tensor proj_input, Tensor output_r, Tensor hy_r, Tensor cy_r, Tensor gates_r, "
      "Tensor cells_r, Tensor proj_input_r)");
  m.def(
      "lstm_bidir_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, Tensor grad_output_r, "
      "Tensor grad_hy_r, Tensor grad_cy_r, Tensor input, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor hx, "
      "Tensor cx, Tensor w_ih_r, Tensor w_hh_r, Tensor? w_hr_r, Tensor hx_r, Tensor cx_r, Tensor? batch_sizes, "
      "Tensor output, Tensor gates, Tensor cells, Tensor proj_input, Tensor output_r, Tensor gates_r, "
      "Tensor cells_r, Tensor proj_input_r, bool[3] output_mask=[True, True, True]) -> (Tensor grad_input, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_w_hr, Tensor grad_hx, "
      "Tensor grad_cx, Tensor grad_w_ih_r, Tensor grad_w_hh_r, Tensor grad_b_ih_r, Tensor grad_b_hh_r, "
      "Tensor grad_w_hr_r, Tensor grad_hx_r, Tensor grad_cx_r)");
  // The same for the GRU and the Elman RNN.
  m.def(
      "gru_bidir_forward(Tensor input, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor hx, "
      "Tensor w_ih_r, Tensor w_hh_r, Tensor? b_ih_r, Tensor? b_hh_r, Tensor hx_r, Tensor? batch_sizes, bool train) "
      "-> (Tensor output, Tensor hy, Tensor gates, Tensor hn, Tensor output_r, Tensor hy_r, Tensor gates_r, "
      "Tensor hn_r)");
  m.def(
      "gru_bidir_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_output_r, Tensor grad_hy_r, Tensor input, "
      "Tensor w_ih, Tensor w_hh, Tensor hx, Tensor w_ih_r, Tensor w_hh_r, Tensor hx_r, Tensor? batch_sizes, "
      "Tensor output, Tensor gates, Tensor hn, Tensor output_r, Tensor gates_r, Tensor hn_r, "
      "bool[3] output_mask=[True, True, True]) -> (Tensor grad_input, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_hx, Tensor grad_w_ih_r, "
      "Tensor grad_w_hh_r, Tensor grad_b_ih_r, Tensor grad_b_hh_r, Tensor grad_hx_r)");
  m.def(
      "rnn_bidir_forward(Tensor input, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor hx, "
      "Tensor w_ih_r, Tensor w_hh_r, Tensor? b_ih_r, Tensor? b_hh_r, Tensor hx_r, Tensor? batch_sizes, bool relu) "
      "-> (Tensor output, Tensor hy, Tensor output_r, Tensor hy_r)");
  m.def(
      "rnn_bidir_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_output_r, Tensor grad_hy_r, Tensor input, "
      "Tensor w_ih, Tensor w_hh, Tensor hx, Tensor w_ih_r, Tensor w_hh_r, Tensor hx_r, Tensor? batch_sizes, "
      "bool relu, Tensor output, Tensor output_r, bool[3] output_mask=[True, True, True]) -> (Tensor grad_input, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_hx, Tensor grad_w_ih_r, "
      "Tensor grad_w_hh_r, "
      "Tensor grad_b_ih_r, Tensor grad_b_hh_r, Tensor grad_hx_r)");
  // x copied into a fresh contiguous tensor, with an identity gradient: what recurrent_stack
  // and fastrnn.functional give a layer op as its initial state while torch.compile traces (an
  // aten.clone would do, but Inductor removes clones as no-ops; see recurrent_stack in
  // csrc/autograd.cpp).
  m.def("state_copy(Tensor x) -> Tensor");
  // A whole stack (num_layers, one or two directions) with the arguments of torch._VF.lstm / gru /
  // rnn_tanh / rnn_relu: mode 'LSTM', 'GRU', 'RNN_TANH' or 'RNN_RELU'; hx [L*D, B, P], cx [L*D, B, H]
  // (LSTM only); params per layer and direction w_ih, w_hh, (b_ih, b_hh), (w_hr). Composed of the
  // ops above (csrc/autograd.cpp). Returns output [T, B, D*P] ([B, T, D*P] if batch_first; packed
  // [N, D*P]), h_n, and c_n (empty for GRU and RNN).
  m.def(
      "recurrent_stack(str mode, Tensor input, Tensor hx, Tensor? cx, Tensor[] params, bool has_biases, "
      "int num_layers, float dropout, bool train, bool bidirectional, bool batch_first, Tensor? batch_sizes) -> "
      "(Tensor output, Tensor h_n, Tensor c_n)");

  // Attention. sdpa_*: query [B, H, L, E], key [B, H, S, E], value [B, H, S, Ev]; attn_mask bool
  // (true = attend) or query's dtype (added), broadcastable to [B, H, L, S]; lse [B, H, L] is the
  // log-sum-exp of each query row's scores (+inf for a row with every key masked).
  m.def(
      "sdpa_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, bool is_causal, float scale) -> "
      "(Tensor output, Tensor lse)");
  m.def(
      "sdpa_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor output, "
      "Tensor lse, bool is_causal, float scale) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
  // additive_attention_*: query_proj [B, T, D] (W_q q + bias), key_proj [B, S, D] (W_k k), values [B, S, Dv],
  // v [D]; mask bool (true = attend) or additive, broadcastable to [B, T, S]; scale multiplies the energies.
  m.def(
      "additive_attention_forward(Tensor query_proj, Tensor key_proj, Tensor values, Tensor v, Tensor? mask, "
      "float scale) -> (Tensor context, Tensor weights)");
  m.def(
      "additive_attention_backward(Tensor grad_context, Tensor grad_weights, Tensor query_proj, Tensor key_proj, "
      "Tensor values, Tensor v, Tensor weights, float scale) -> (Tensor grad_query_proj, Tensor grad_key_proj, "
      "Tensor grad_values, Tensor grad_v)");
  // Variant cells (SEMANTICS.md, "Variants"; kernels in csrc/cpu/variants.cpp). LayerNorm is on
  // when its gains and biases are given (all or none); w_peep [3, H] = (w_ci, w_cf, w_co);
  // zoneout_mask [*input.shape[:-1], S*H] (S = 2 for the LSTM: h then c) holds d, 1 where a unit
  // keeps its previous state (training); without a mask, zoneout_p is the constant d (eval).
  // Workspace: gates, cells (LSTM c_t) / hn (GRU), and with LayerNorm the normalised values
  // norm [N, 2*G*H (+H)] and their 1/std stats [N, 3 (LSTM) or 2].
  m.def(
      "variant_lstm_forward(Tensor input, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? ln_ih_w, "
      "Tensor? ln_ih_b, Tensor? ln_hh_w, Tensor? ln_hh_b, Tensor? ln_c_w, Tensor? ln_c_b, Tensor? w_peep, Tensor hx, "
      "Tensor cx, Tensor? zoneout_mask, float zoneout_p, Tensor? batch_sizes, bool reverse, bool train) -> "
      "(Tensor output, Tensor hy, Tensor cy, Tensor gates, Tensor cells, Tensor norm, Tensor stats)");
  m.def(
      "variant_lstm_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor w_ih, "
      "Tensor w_hh, Tensor? ln_ih_w, Tensor? ln_ih_b, Tensor? ln_hh_w, Tensor? ln_hh_b, Tensor? ln_c_w, "
      "Tensor? ln_c_b, Tensor? w_peep, Tensor hx, Tensor cx, Tensor? zoneout_mask, float zoneout_p, "
      "Tensor? batch_sizes, bool reverse, Tensor output, Tensor gates, Tensor cells, Tensor norm, Tensor stats) -> "
      "(Tensor grad_input, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, "
      "Tensor grad_ln_ih_w, Tensor grad_ln_ih_b, Tensor grad_ln_hh_w, Tensor grad_ln_hh_b, Tensor grad_ln_c_w, "
      "Tensor grad_ln_c_b, Tensor grad_w_peep, Tensor grad_hx, Tensor grad_cx)");
  m.def(
      "variant_gru_forward(Tensor input, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? ln_ih_w, "
      "Tensor? ln_ih_b, Tensor? ln_hh_w, Tensor? ln_hh_b, Tensor hx, Tensor? zoneout_mask, float zoneout_p, "
      "Tensor? batch_sizes, bool reverse, bool train) -> (Tensor output, Tensor hy, Tensor gates, Tensor hn, "
      "Tensor norm, Tensor stats)");
  m.def(
      "variant_gru_backward(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor w_ih, Tensor w_hh, "
      "Tensor? ln_ih_w, Tensor? ln_ih_b, Tensor? ln_hh_w, Tensor? ln_hh_b, Tensor hx, Tensor? zoneout_mask, "
      "float zoneout_p, Tensor? batch_sizes, bool reverse, Tensor output, Tensor gates, Tensor hn, Tensor norm, "
      "Tensor stats) -> (Tensor grad_input, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
      "Tensor grad_b_hh, Tensor grad_ln_ih_w, Tensor grad_ln_ih_b, Tensor grad_ln_hh_w, Tensor grad_ln_hh_b, "
      "Tensor grad_hx)");
}
