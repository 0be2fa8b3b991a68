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


# ---------------------------------------------------------------------------- LSTM
def _lstm_setup(ctx, inputs, output):
    input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, batch_sizes, reverse, train = inputs
    out, hy, cy, gates, cells, proj_input = output
    ctx.mark_non_differentiable(gates, cells, proj_input)
    ctx.reverse = reverse
    ctx.save_for_backward(input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, batch_sizes, out, gates, cells, proj_input)


def _lstm_backward(ctx, g_out, g_hy, g_cy, *_):
    input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, batch_sizes, out, gates, cells, proj_input = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        grads = _reference_grads(
            lambda: R.lstm_layer_ref(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, ctx.reverse),
            (input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx), (g_out, g_hy, g_cy))
        return (*grads, None, None, None)
    g = _ops.lstm_backward(_zeros_if_none(g_out, out), _zeros_if_none(g_hy, hx), _zeros_if_none(g_cy, cx),
                           input, w_ih, w_hh, w_hr, hx, cx, batch_sizes, ctx.reverse, out, gates, cells,
                           proj_input)
    gi, gw_ih, gw_hh, gb_ih, gb_hh, gw_hr, ghx, gcx = g
    bias = (gb_ih, gb_hh) if b_ih is not None else (None, None)
    return (gi, gw_ih, gw_hh, *bias, gw_hr if w_hr is not None else None, ghx, gcx, None, None, None)


torch.library.register_autograd("fastrnn::lstm_forward", _lstm_backward, setup_context=_lstm_setup)


# ---------------------------------------------------------------------------- GRU
def _gru_setup(ctx, inputs, output):
    input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse, train = inputs
    out, hy, gates, hn = output
    ctx.mark_non_differentiable(gates, hn)
    ctx.reverse = reverse
    ctx.save_for_backward(input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, out, gates, hn)


def _gru_backward(ctx, g_out, g_hy, *_):
    input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, out, gates, hn = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        grads = _reference_grads(
            lambda: R.gru_layer_ref(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, ctx.reverse),
            (input, w_ih, w_hh, b_ih, b_hh, hx), (g_out, g_hy))
        return (*grads, None, None, None)
    gi, gw_ih, gw_hh, gb_ih, gb_hh, ghx = _ops.gru_backward(
        _zeros_if_none(g_out, out), _zeros_if_none(g_hy, hx), input, w_ih, w_hh, hx, batch_sizes, ctx.reverse,
        out, gates, hn)
    bias = (gb_ih, gb_hh) if b_ih is not None else (None, None)
    return (gi, gw_ih, gw_hh, *bias, ghx, None, None, None)


torch.library.register_autograd("fastrnn::gru_forward", _gru_backward, setup_context=_gru_setup)


# ---------------------------------------------------------------------------- RNN
def _rnn_setup(ctx, inputs, output):
    input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse, relu = inputs
    out, hy = output
    ctx.reverse = reverse
    ctx.relu = relu
    ctx.save_for_backward(input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, out)


def _rnn_backward(ctx, g_out, g_hy):
    input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, out = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        act = "relu" if ctx.relu else "tanh"
        grads = _reference_grads(
            lambda: R.rnn_layer_ref(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, ctx.reverse, act),
            (input, w_ih, w_hh, b_ih, b_hh, hx), (g_out, g_hy))
        return (*grads, None, None, None)
    gi, gw_ih, gw_hh, gb_ih, gb_hh, ghx = _ops.rnn_backward(
        _zeros_if_none(g_out, out), _zeros_if_none(g_hy, hx), input, w_ih, w_hh, hx, batch_sizes, ctx.reverse,
        ctx.relu, out)
    bias = (gb_ih, gb_hh) if b_ih is not None else (None, None)
    return (gi, gw_ih, gw_hh, *bias, ghx, None, None, None)


torch.library.register_autograd("fastrnn::rnn_forward", _rnn_backward, setup_context=_rnn_setup)


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
