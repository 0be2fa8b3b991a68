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


# ------------------------------------------------------- LSTM, GRU, RNN, variant cells
# The recurrent and variant forward ops have their autograd in C++ (csrc/autograd.cpp: a Python
# autograd.Function costs several times a small step). Their double backward lands here.
def reference_backward(kind, saved, grad_outputs, reverse, relu, p=0.0):
    """Gradients of the layer's tensor inputs, differentiable (create_graph=True), from the
    plain-PyTorch reference. saved: the op's tensor inputs in schema order (None where absent):
    lstm (input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, batch_sizes), gru/rnn (input, w_ih, w_hh,
    b_ih, b_hh, hx, batch_sizes), variant_lstm (input, w_ih, w_hh, b_ih, b_hh, 6 LayerNorm
    tensors, w_peep, hx, cx, zoneout_mask, batch_sizes), variant_gru (input, w_ih, w_hh, b_ih,
    b_hh, 4 LayerNorm tensors, hx, zoneout_mask, batch_sizes); grad_outputs: of (output, hy[, cy]),
    None where unused; p: zoneout_p. The zoneout mask and p are constants (no gradient)."""
    if kind == "variant_lstm":
        input, w_ih, w_hh, b_ih, b_hh, *ln, w_peep, hx, cx, mask, bsz = saved
        return _reference_grads(
            lambda: R.variant_lstm_layer_ref(input, hx, cx, w_ih, w_hh, b_ih, b_hh,
                                             ln if ln[0] is not None else None, w_peep, mask, p, bsz, reverse),
            (input, w_ih, w_hh, b_ih, b_hh, *ln, w_peep, hx, cx), grad_outputs)
    if kind == "variant_gru":
        input, w_ih, w_hh, b_ih, b_hh, *ln, hx, mask, bsz = saved
        return _reference_grads(
            lambda: R.variant_gru_layer_ref(input, hx, w_ih, w_hh, b_ih, b_hh, ln if ln[0] is not None else None,
                                            mask, p, bsz, reverse),
            (input, w_ih, w_hh, b_ih, b_hh, *ln, hx), grad_outputs)
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
