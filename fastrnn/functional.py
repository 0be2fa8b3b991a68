"""Functional forms of fastrnn's fused recurrent layers.

Shapes: T = steps, B = batch, I = input size, H = hidden size, P = proj_size or H,
L = num_layers, D = 2 if bidirectional else 1.

The stacked functions take the same arguments as torch's internal ``torch._VF.lstm`` /
``gru`` / ``rnn_tanh`` / ``rnn_relu`` (which torch.nn's layers call), so a layer can swap
one for the other. On devices fastrnn has no kernel for, they call torch's implementation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ops = torch.ops.fastrnn

__all__ = ["lstm", "gru", "rnn", "lstm_layer", "gru_layer", "rnn_layer"]


def _needs_grad(*tensors):
    # torch.jit.trace bakes this flag into the graph as a constant and re-runs the model under
    # no_grad to check the trace: saving the workspace whenever tracing keeps the two graphs
    # identical and the traced model differentiable.
    if torch.jit.is_tracing():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_NATIVE_DTYPES = (torch.float32, torch.float64)


def _has_kernel(input: torch.Tensor) -> bool:
    """Whether fastrnn's kernels run this input. Otherwise the layers call torch's own
    implementation, exactly as torch.nn would: other devices (CUDA in a CPU-only build),
    dtypes without a fused kernel yet (float16, bfloat16), and autocast regions, where
    torch.nn's RNNs run in the autocast dtype."""
    device = input.device
    if input.dtype not in _NATIVE_DTYPES or torch.is_autocast_enabled(device.type):
        return False
    if device.type == "cpu":
        return True
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastrnn::lstm_forward", device.type.upper())


def _call(op, train, *args):
    # Inference skips the autograd layer: its Python wrapper (register_autograd) costs more than
    # a small step. Not while compiling: dynamo traces the op as it is.
    if train or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def lstm_layer(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, batch_sizes=None, reverse=False):
    """One LSTM layer in one direction, fused.

    input: [T, B, I], or packed [N, I] with batch_sizes [T] (int64, CPU, non-increasing)
    hx: [B, P]  cx: [B, H]  w_ih: [4H, I]  w_hh: [4H, P]  b_ih, b_hh: [4H]  w_hr: [P, H]
    Returns output [T, B, P] (or [N, P]), h_n [B, P], c_n [B, H].
    """
    train = _needs_grad(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr)
    out, hy, cy, _, _, _ = _call(_ops.lstm_forward, train, input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, batch_sizes, reverse, train)
    return out, hy, cy


def gru_layer(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, batch_sizes=None, reverse=False):
    """One GRU layer in one direction, fused. input [T, B, I] (or packed [N, I]); hx [B, H];
    w_ih [3H, I]; w_hh [3H, H]; b_ih, b_hh [3H]. Returns output [T, B, H] (or [N, H]), h_n [B, H]."""
    train = _needs_grad(input, hx, w_ih, w_hh, b_ih, b_hh)
    out, hy, _, _ = _call(_ops.gru_forward, train, input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse, train)
    return out, hy


def rnn_layer(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, batch_sizes=None, reverse=False, nonlinearity="tanh"):
    """One Elman RNN layer in one direction, fused. input [T, B, I] (or packed [N, I]); hx [B, H];
    w_ih [H, I]; w_hh [H, H]; b_ih, b_hh [H]. Returns output [T, B, H] (or [N, H]), h_n [B, H]."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    train = _needs_grad(input, hx, w_ih, w_hh, b_ih, b_hh)
    return _call(_ops.rnn_forward, train, input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse,
                 nonlinearity == "relu")


def _torch_fallback(fn, input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                    batch_sizes):
    """torch's own implementation, for devices fastrnn has no kernel for."""
    if batch_sizes is None:
        return tuple(fn(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first))
    return tuple(fn(input, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional))


def _stack(layer_fn, input, states, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
           batch_sizes):
    """Runs layer_fn over layers and directions; states: list of [L*D, B, *] initial states."""
    D = 2 if bidirectional else 1
    if len(params) % (num_layers * D) != 0:
        raise ValueError(f"params: expected a multiple of num_layers*num_directions = {num_layers * D} tensors, "
                         f"got {len(params)}")
    per = len(params) // (num_layers * D)
    dense_batch_first = batch_first and batch_sizes is None
    x = input.transpose(0, 1) if dense_batch_first else input
    if num_layers == 1 and D == 1:  # the common case, without the bookkeeping below
        w = params
        out, *fin = layer_fn(x, [s[0] for s in states], w[0], w[1], w[2] if has_biases else None,
                             w[3] if has_biases else None, w[4 if has_biases else 2:], batch_sizes, False)
        return (out.transpose(0, 1) if dense_batch_first else out), [f.unsqueeze(0) for f in fin]
    finals = [[] for _ in states]
    for layer in range(num_layers):
        if layer > 0 and dropout > 0 and train:
            x = F.dropout(x, dropout, training=True)
        outs = []
        for d in range(D):
            k = layer * D + d
            p = params[k * per:(k + 1) * per]
            w_ih, w_hh = p[0], p[1]
            b_ih, b_hh = (p[2], p[3]) if has_biases else (None, None)
            extra = p[4 if has_biases else 2:]
            out, *fin = layer_fn(x, [s[k] for s in states], w_ih, w_hh, b_ih, b_hh, extra, batch_sizes, d == 1)
            outs.append(out)
            for acc, f in zip(finals, fin):
                acc.append(f)
        x = outs[0] if D == 1 else torch.cat(outs, dim=-1)
    if dense_batch_first:
        x = x.transpose(0, 1)
    return x, [torch.stack(f) for f in finals]


def lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, batch_sizes=None):
    """Stacked LSTM with torch.nn.LSTM's semantics (arguments as ``torch._VF.lstm``).

    input: [T, B, I] ([B, T, I] if batch_first), or packed data [N, I] with batch_sizes
    hx: (h_0 [L*D, B, P], c_0 [L*D, B, H])
    params: per layer and direction, w_ih, w_hh, (b_ih, b_hh if has_biases), (w_hr if projecting)
    Returns (output [T, B, D*P], h_n [L*D, B, P], c_n [L*D, B, H]).
    """
    if not _has_kernel(input):
        return _torch_fallback(torch._VF.lstm, input, hx, params, has_biases, num_layers, dropout, train,
                               bidirectional, batch_first, batch_sizes)

    def layer(x, st, w_ih, w_hh, b_ih, b_hh, extra, bsz, rev):
        w_hr = extra[0] if extra else None
        return lstm_layer(x, st[0], st[1], w_ih, w_hh, b_ih, b_hh, w_hr, bsz, rev)

    out, (h, c) = _stack(layer, input, list(hx), params, has_biases, num_layers, dropout, train, bidirectional,
                         batch_first, batch_sizes)
    return out, h, c


def gru(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, batch_sizes=None):
    """Stacked GRU with torch.nn.GRU's semantics. hx: [L*D, B, H].
    Returns (output [T, B, D*H], h_n [L*D, B, H])."""
    if not _has_kernel(input):
        return _torch_fallback(torch._VF.gru, input, hx, params, has_biases, num_layers, dropout, train,
                               bidirectional, batch_first, batch_sizes)

    def layer(x, st, w_ih, w_hh, b_ih, b_hh, extra, bsz, rev):
        return gru_layer(x, st[0], w_ih, w_hh, b_ih, b_hh, bsz, rev)

    out, (h,) = _stack(layer, input, [hx], params, has_biases, num_layers, dropout, train, bidirectional,
                       batch_first, batch_sizes)
    return out, h


def rnn(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, batch_sizes=None,
        nonlinearity="tanh"):
    """Stacked Elman RNN (tanh or relu) with torch.nn.RNN's semantics. hx: [L*D, B, H].
    Returns (output [T, B, D*H], h_n [L*D, B, H])."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    if not _has_kernel(input):
        fn = torch._VF.rnn_tanh if nonlinearity == "tanh" else torch._VF.rnn_relu
        return _torch_fallback(fn, input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                               batch_first, batch_sizes)

    def layer(x, st, w_ih, w_hh, b_ih, b_hh, extra, bsz, rev):
        return rnn_layer(x, st[0], w_ih, w_hh, b_ih, b_hh, bsz, rev, nonlinearity)

    out, (h,) = _stack(layer, input, [hx], params, has_biases, num_layers, dropout, train, bidirectional,
                       batch_first, batch_sizes)
    return out, h
