"""Backward formulas: each forward op's gradient is its fused *_backward op.

The forward ops save their workspace (gate activations, cell states) only when called with
train=True; fastrnn.functional sets it from grad mode, so inference saves nothing.

The fused backward ops have no derivative of their own. When a backward runs with
create_graph=True (double backward: gradient penalties, Hessian-vector products), the
gradients are instead computed by differentiating the plain-PyTorch reference of the same
layer, so they stay differentiable and correct (at the reference's speed).
"""
from __future__ import annotations

import torch

from . import reference as R

_ops = torch.ops.fastrnn


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _reference_grads(forward, tensors, grad_outputs):
    """Gradients of forward()'s outputs w.r.t. `tensors` (None where not needed), as a graph."""
    with torch.enable_grad():
        outs = forward()
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    cot = [_zeros_if_none(g, o) for g, o in zip(grad_outputs, outs)]
    grads = iter(torch.autograd.grad(outs, wanted, cot, create_graph=True, allow_unused=True)) if wanted else iter(())
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in tensors)


# ------------------------------------------------------------------- LSTM, GRU, RNN
# The recurrent forward ops have their autograd in C++ (csrc/autograd.cpp: a Python
# autograd.Function costs several times a small step). Their double backward lands here.
def reference_backward(kind, saved, grad_outputs, reverse, relu):
    """Gradients of the layer's tensor inputs, differentiable (create_graph=True), from the
    plain-PyTorch reference. saved: the op's tensor inputs in schema order (None where absent):
    lstm (input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, batch_sizes), gru/rnn (input, w_ih, w_hh,
    b_ih, b_hh, hx, batch_sizes); grad_outputs: of (output, hy[, cy]), None where unused."""
    if kind == "lstm":
        input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, bsz = saved
        return _reference_grads(lambda: R.lstm_layer_ref(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, bsz, reverse),
                                (input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx), grad_outputs)
    input, w_ih, w_hh, b_ih, b_hh, hx, bsz = saved
    if kind == "gru":
        fwd = lambda: R.gru_layer_ref(input, hx, w_ih, w_hh, b_ih, b_hh, bsz, reverse)  # noqa: E731
    else:
        act = "relu" if relu else "tanh"
        fwd = lambda: R.rnn_layer_ref(input, hx, w_ih, w_hh, b_ih, b_hh, bsz, reverse, act)  # noqa: E731
    return _reference_grads(fwd, (input, w_ih, w_hh, b_ih, b_hh, hx), grad_outputs)


# ---------------------------------------------------------------------------- attention
# Masks are not differentiated here: fastrnn.functional sends a mask that requires grad down
# the reference path instead.
def _sdpa_setup(ctx, inputs, output):
    query, key, value, attn_mask, is_causal, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.is_causal, ctx.scale = is_causal, scale
    ctx.save_for_backward(query, key, value, attn_mask, out, lse)


def _sdpa_backward(ctx, g_out, _g_lse):
    query, key, value, attn_mask, out, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        grads = _reference_grads(
            lambda: (R.scaled_dot_product_attention_ref(query, key, value, attn_mask, 0.0, ctx.is_causal, ctx.scale),),
            (query, key, value), (g_out,))
        return (*grads, None, None, None)
    dq, dk, dv = _ops.sdpa_backward(_zeros_if_none(g_out, out), query, key, value, attn_mask, out, lse, ctx.is_causal,
                                    ctx.scale)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("fastrnn::sdpa_forward", _sdpa_backward, setup_context=_sdpa_setup)


def _additive_setup(ctx, inputs, output):
    query_proj, key_proj, values, v, mask, scale = inputs
    context, weights = output
    ctx.scale = scale
    ctx.save_for_backward(query_proj, key_proj, values, v, mask, weights)


def _additive_backward(ctx, g_context, g_weights):
    query_proj, key_proj, values, v, mask, weights = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        grads = _reference_grads(
            lambda: R.additive_attention_core_ref(query_proj, key_proj, values, v, mask, ctx.scale),
            (query_proj, key_proj, values, v), (g_context, g_weights))
        return (*grads, None, None)
    B, T, S = weights.shape
    g_context = _zeros_if_none(g_context, query_proj.new_empty((B, T, values.shape[-1])))
    g_weights = _zeros_if_none(g_weights, weights)
    dqp, dkp, dvalues, dv = _ops.additive_attention_backward(g_context, g_weights, query_proj, key_proj, values, v,
                                                             weights, ctx.scale)
    return dqp, dkp, dvalues, dv, None, None


torch.library.register_autograd("fastrnn::additive_attention_forward", _additive_backward,
                                setup_context=_additive_setup)


# ---------------------------------------------------------------------------- variant LSTM
# The zoneout mask and zoneout_p are constants of the forward (the mask is a random draw), so they
# get no gradient; DropConnect never reaches these ops (it is an autograd-visible product on W_hh).
def _opt_grads(present, grads):
    return tuple(g if p is not None else None for p, g in zip(present, grads))


def _vlstm_setup(ctx, inputs, output):
    (input, w_ih, w_hh, b_ih, b_hh, lnxw, lnxb, lnhw, lnhb, lncw, lncb, w_peep, hx, cx, mask, p, batch_sizes,
     reverse, train) = inputs
    out, hy, cy, gates, cells, norm, stats = output
    ctx.mark_non_differentiable(gates, cells, norm, stats)
    # Unused outputs' gradients stay None instead of zero tensors of their shape: the workspace is
    # hundreds of MB at training sizes (zero-filling it cost ~30 ms and ~50k page faults a call).
    ctx.set_materialize_grads(False)
    ctx.reverse, ctx.p = reverse, p
    ctx.save_for_backward(input, w_ih, w_hh, b_ih, b_hh, lnxw, lnxb, lnhw, lnhb, lncw, lncb, w_peep, hx, cx, mask,
                          batch_sizes, out, gates, cells, norm, stats)


def _vlstm_backward(ctx, g_out, g_hy, g_cy, *_):
    (input, w_ih, w_hh, b_ih, b_hh, lnxw, lnxb, lnhw, lnhb, lncw, lncb, w_peep, hx, cx, mask, batch_sizes, out, gates,
     cells, norm, stats) = ctx.saved_tensors
    ln = (lnxw, lnxb, lnhw, lnhb, lncw, lncb)
    diff = (input, w_ih, w_hh, b_ih, b_hh, *ln, w_peep, hx, cx)
    if torch.is_grad_enabled():  # create_graph=True
        grads = _reference_grads(
            lambda: R.variant_lstm_layer_ref(input, hx, cx, w_ih, w_hh, b_ih, b_hh, ln if lnxw is not None else None,
                                             w_peep, mask, ctx.p, batch_sizes, ctx.reverse),
            diff, (g_out, g_hy, g_cy))
        return (*grads[:12], grads[12], grads[13], None, None, None, None, None)
    g = _ops.variant_lstm_backward(_zeros_if_none(g_out, out), _zeros_if_none(g_hy, hx), _zeros_if_none(g_cy, cx),
                                   input, w_ih, w_hh, *ln, w_peep, hx, cx, mask, ctx.p, batch_sizes, ctx.reverse, out,
                                   gates, cells, norm, stats)
    return (*_opt_grads(diff[:12], g[:12]), g[12], g[13], None, None, None, None, None)


torch.library.register_autograd("fastrnn::variant_lstm_forward", _vlstm_backward, setup_context=_vlstm_setup)


# ---------------------------------------------------------------------------- variant GRU
def _vgru_setup(ctx, inputs, output):
    input, w_ih, w_hh, b_ih, b_hh, lnxw, lnxb, lnhw, lnhb, hx, mask, p, batch_sizes, reverse, train = inputs
    out, hy, gates, hn, norm, stats = output
    ctx.mark_non_differentiable(gates, hn, norm, stats)
    ctx.set_materialize_grads(False)  # as the variant LSTM's
    ctx.reverse, ctx.p = reverse, p
    ctx.save_for_backward(input, w_ih, w_hh, b_ih, b_hh, lnxw, lnxb, lnhw, lnhb, hx, mask, batch_sizes, out, gates, hn,
                          norm, stats)


def _vgru_backward(ctx, g_out, g_hy, *_):
    (input, w_ih, w_hh, b_ih, b_hh, lnxw, lnxb, lnhw, lnhb, hx, mask, batch_sizes, out, gates, hn, norm,
     stats) = ctx.saved_tensors
    ln = (lnxw, lnxb, lnhw, lnhb)
    diff = (input, w_ih, w_hh, b_ih, b_hh, *ln, hx)
    if torch.is_grad_enabled():  # create_graph=True
        grads = _reference_grads(
            lambda: R.variant_gru_layer_ref(input, hx, w_ih, w_hh, b_ih, b_hh, ln if lnxw is not None else None, mask,
                                            ctx.p, batch_sizes, ctx.reverse),
            diff, (g_out, g_hy))
        return (*grads, None, None, None, None, None)
    g = _ops.variant_gru_backward(_zeros_if_none(g_out, out), _zeros_if_none(g_hy, hx), input, w_ih, w_hh, *ln, hx,
                                  mask, ctx.p, batch_sizes, ctx.reverse, out, gates, hn, norm, stats)
    return (*_opt_grads(diff, g), None, None, None, None, None)


torch.library.register_autograd("fastrnn::variant_gru_forward", _vgru_backward, setup_context=_vgru_setup)
