// Every fastrnn op schema, in one place. Backends register implementations with
// TORCH_LIBRARY_IMPL(fastrnn, <backend>, m); Python adds fake kernels and autograd
// (fastrnn/_ops.py, fastrnn/_autograd.py).
//
// Recurrent ops cover one layer in one direction over a whole sequence. `input` is dense
// [T, B, I], or packed [N, I] when `batch_sizes` ([T], int64, CPU, non-increasing) is given.
// The *_forward ops return the output and final state, then the workspace backward needs
// (empty tensors when train=False).
#include <torch/library.h>

TORCH_LIBRARY(fastrnn, m) {
  m.def(
      "lstm_forward(Tensor input, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, "
      "Tensor hx, Tensor cx, Tensor? batch_sizes, bool reverse, bool train) -> "
      "(Tensor output, Tensor hy, Tensor cy, Tensor gates, Tensor cells, Tensor proj_input)");
  m.def(
      "lstm_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor w_ih, Tensor w_hh, "
      "Tensor? w_hr, Tensor hx, Tensor cx, Tensor? batch_sizes, bool reverse, Tensor output, Tensor gates, "
      "Tensor cells, Tensor proj_input) -> (Tensor grad_input, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_w_hr, Tensor grad_hx, Tensor grad_cx)");
  m.def(
      "gru_forward(Tensor input, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor hx, "
      "Tensor? batch_sizes, bool reverse, bool train) -> (Tensor output, Tensor hy, Tensor gates, Tensor hn)");
  m.def(
      "gru_backward(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor w_ih, Tensor w_hh, Tensor hx, "
      "Tensor? batch_sizes, bool reverse, Tensor output, Tensor gates, Tensor hn) -> (Tensor grad_input, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_hx)");
  m.def(
      "rnn_forward(Tensor input, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor hx, "
      "Tensor? batch_sizes, bool reverse, bool relu) -> (Tensor output, Tensor hy)");
  m.def(
      "rnn_backward(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor w_ih, Tensor w_hh, Tensor hx, "
      "Tensor? batch_sizes, bool reverse, bool relu, Tensor output) -> (Tensor grad_input, Tensor grad_w_ih, "
      "Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_hx)");

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
}
