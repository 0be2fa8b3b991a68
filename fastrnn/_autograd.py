"""Backward formulas: each forward op's gradient is its fused *_backward op.

The forward ops save their workspace (gate activations, cell states) only when called with
train=True; fastrnn.functional sets it from grad mode, so inference saves nothing.
"""
from __future__ import annotations

import torch

_ops = torch.ops.fastrnn


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


# ---------------------------------------------------------------------------- LSTM
def _lstm_setup(ctx, inputs, output):
    input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, batch_sizes, reverse, train = inputs
    out, hy, cy, gates, cells, proj_input = output
    ctx.mark_non_differentiable(gates, cells, proj_input)
    ctx.reverse = reverse
    ctx.has_bias = b_ih is not None
    ctx.has_proj = w_hr is not None
    ctx.save_for_backward(input, w_ih, w_hh, w_hr, hx, cx, batch_sizes, out, gates, cells, proj_input)


def _lstm_backward(ctx, g_out, g_hy, g_cy, *_):
    input, w_ih, w_hh, w_hr, hx, cx, batch_sizes, out, gates, cells, proj_input = ctx.saved_tensors
    g = _ops.lstm_backward(_zeros_if_none(g_out, out), _zeros_if_none(g_hy, hx), _zeros_if_none(g_cy, cx),
                           input, w_ih, w_hh, w_hr, hx, cx, batch_sizes, ctx.reverse, out, gates, cells,
                           proj_input)
    gi, gw_ih, gw_hh, gb_ih, gb_hh, gw_hr, ghx, gcx = g
    bias = (gb_ih, gb_hh) if ctx.has_bias else (None, None)
    return (gi, gw_ih, gw_hh, *bias, gw_hr if ctx.has_proj else None, ghx, gcx, None, None, None)


torch.library.register_autograd("fastrnn::lstm_forward", _lstm_backward, setup_context=_lstm_setup)


# ---------------------------------------------------------------------------- GRU
def _gru_setup(ctx, inputs, output):
    input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse, train = inputs
    out, hy, gates, hn = output
    ctx.mark_non_differentiable(gates, hn)
    ctx.reverse = reverse
    ctx.has_bias = b_ih is not None
    ctx.save_for_backward(input, w_ih, w_hh, hx, batch_sizes, out, gates, hn)


def _gru_backward(ctx, g_out, g_hy, *_):
    input, w_ih, w_hh, hx, batch_sizes, out, gates, hn = ctx.saved_tensors
    gi, gw_ih, gw_hh, gb_ih, gb_hh, ghx = _ops.gru_backward(
        _zeros_if_none(g_out, out), _zeros_if_none(g_hy, hx), input, w_ih, w_hh, hx, batch_sizes, ctx.reverse,
        out, gates, hn)
    bias = (gb_ih, gb_hh) if ctx.has_bias else (None, None)
    return (gi, gw_ih, gw_hh, *bias, ghx, None, None, None)


torch.library.register_autograd("fastrnn::gru_forward", _gru_backward, setup_context=_gru_setup)


# ---------------------------------------------------------------------------- RNN
def _rnn_setup(ctx, inputs, output):
    input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse, relu = inputs
    out, hy = output
    ctx.reverse = reverse
    ctx.relu = relu
    ctx.has_bias = b_ih is not None
    ctx.save_for_backward(input, w_ih, w_hh, hx, batch_sizes, out)


def _rnn_backward(ctx, g_out, g_hy):
    input, w_ih, w_hh, hx, batch_sizes, out = ctx.saved_tensors
    gi, gw_ih, gw_hh, gb_ih, gb_hh, ghx = _ops.rnn_backward(
        _zeros_if_none(g_out, out), _zeros_if_none(g_hy, hx), input, w_ih, w_hh, hx, batch_sizes, ctx.reverse,
        ctx.relu, out)
    bias = (gb_ih, gb_hh) if ctx.has_bias else (None, None)
    return (gi, gw_ih, gw_hh, *bias, ghx, None, None, None)


torch.library.register_autograd("fastrnn::rnn_forward", _rnn_backward, setup_context=_rnn_setup)
