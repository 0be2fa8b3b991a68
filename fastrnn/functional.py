"""Functional forms of fastrnn's fused recurrent layers and attention ops.

Shapes: T = steps, B = batch, I = input size, H = hidden size, P = proj_size or H,
L = num_layers, D = 2 if bidirectional else 1.

The stacked functions take the same arguments as torch's internal ``torch._VF.lstm`` /
``gru`` / ``rnn_tanh`` / ``rnn_relu`` (which torch.nn's layers call), so a layer can swap
one for the other. On devices fastrnn has no kernel for, they call torch's implementation.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F

_ops = torch.ops.fastrnn

__all__ = ["lstm", "gru", "rnn", "lstm_layer", "gru_layer", "rnn_layer", "scaled_dot_product_attention",
           "additive_attention", "luong_attention", "variant_lstm_layer", "variant_gru_layer", "variant_lstm",
           "variant_gru"]


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False for device types autocast does not know
    (meta, where torch.nn's layers run shape-only forwards: deferred init, FLOP counters)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _needs_grad(*tensors):
    # torch.jit.trace bakes this flag into the graph as a constant and re-runs the model under
    # no_grad to check the trace: saving the workspace whenever tracing keeps the two graphs
    # identical and the traced model differentiable.
    if torch.jit.is_tracing():
        return True
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # (a loop, not a generator: a cell's step calls this every time)
        if t is not None and t.requires_grad:
            return True
    return False


def _forward_ad_active() -> bool:
    """Inside a forward-mode AD level (torch.autograd.forward_ad.dual_level: dual tensors,
    jacobian(strategy="forward-mode")). The ops' autograd Functions have no jvp, so the layers
    then run torch's implementation (or the reference), whose ops all have forward derivatives.
    Not while compiling: dynamo traces the ops."""
    return _forward_ad._current_level >= 0 and not torch.compiler.is_compiling()


def _transforms_active() -> bool:
    """torch.func transforms (grad, jacrev, vmap, ...), which refuse the ops' C++ autograd
    Function, or forward-mode AD (_forward_ad_active). Not while compiling."""
    return _forward_ad_active() or (not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active())


def _plain_eager() -> bool:
    """An eager call no tool records or transforms: not while torch.compile or torch.jit.trace
    records, not inside a torch.func transform or forward-AD level, not in a CPU autocast region.
    The layers' and cells' fast path (a few cheap tests, then one call of the fused op: a
    step-at-a-time caller pays the general path's checks every call) runs only then.
    is_compiling first: dynamo folds it to True and traces no further."""
    return not (torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
                or _forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()
                or torch.is_autocast_enabled("cpu"))


_NATIVE_DTYPES = (torch.float32, torch.float64)
# The LSTM/GRU/RNN CPU kernels also take bfloat16 (float32 state and gate math, bfloat16 GEMMs).
_RECURRENT_DTYPES = _NATIVE_DTYPES + (torch.bfloat16,)
# The CUDA kernels (LSTM/GRU/RNN only) take float16 and bfloat16 as well (float32 gate math).
_CUDA_DTYPES = _NATIVE_DTYPES + (torch.float16, torch.bfloat16)
# The ops with CUDA kernels in this build (none in a CPU-only build), read once: the dispatcher
# query is not traceable by torch.compile.
_CUDA_OPS = frozenset(op for op in ("lstm_forward", "gru_forward", "rnn_forward", "variant_lstm_forward",
                                    "variant_gru_forward")
                      if torch._C._dispatch_has_kernel_for_dispatch_key("fastrnn::" + op, "CUDA"))


def _has_kernel(input: torch.Tensor, recurrent: bool = False, op: str = "lstm_forward") -> bool:
    """Whether fastrnn's kernel for `op` runs this input. Otherwise the layers call torch's own
    implementation (or fastrnn's plain-PyTorch reference, for the cells torch.nn lacks), exactly
    as torch.nn would: other devices (CUDA in a CPU-only build; CUDA ops without a CUDA kernel:
    the variant cells), dtypes without a fused kernel (on the CPU float16, and bfloat16 except for
    the LSTM/GRU/RNN layers, `recurrent`), autocast regions, where torch.nn's RNNs run in the
    autocast dtype (the recurrent layers handle CPU bfloat16 autocast themselves:
    _autocast_bf16), and torch.func transforms (grad, jacrev, ...), which refuse the ops' C++
    autograd Function."""
    device = input.device
    if device.type == "cpu":
        dtypes = _RECURRENT_DTYPES if recurrent else _NATIVE_DTYPES
    elif device.type == "cuda":
        dtypes = _CUDA_DTYPES
    else:  # meta, xpu, mps, ...: torch's implementation (shape-only on meta)
        return False
    if input.dtype not in dtypes or autocast_enabled(device.type):
        return False
    if _transforms_active():
        return False
    return device.type == "cpu" or op in _CUDA_OPS


def _autocast_bf16(input: torch.Tensor) -> bool:
    """Inside torch.autocast("cpu", dtype=torch.bfloat16), whether torch.nn would run this
    float32 input in bfloat16. Where torch.nn returns bfloat16 (the dense LSTM without projection:
    mkldnn_rnn_layer is on CPU autocast's lower-precision list; the RNN, dense or packed, whose
    per-step linear is), fastrnn's layers do the same on their bfloat16 kernels. Where it returns
    float32 (the GRU, the packed LSTM, the LSTM with proj_size: torch 2.13), and under other
    autocast dtypes (float16), they call torch's implementation, as before: same dtypes, same
    values."""
    return (input.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and input.dtype in (torch.float32, torch.bfloat16))


def _bf16(t):
    # As autocast casts: float32 only, differentiably (float32 parameters get float32 gradients).
    return t.to(torch.bfloat16) if t is not None and t.dtype == torch.float32 else t


def _recurrent_args(input, hx, params, autocast_ok):
    """(run the fused kernels, input, hx, params): under bfloat16 autocast, everything cast.
    autocast_ok=False: torch.nn does not return bfloat16 for this layer under autocast
    (_autocast_bf16), so torch's implementation runs."""
    if input.is_cpu and not torch.is_autocast_enabled("cpu"):  # the common case, in a few cheap tests
        fused = input.dtype in _RECURRENT_DTYPES and not _transforms_active()
        return fused, input, hx, params
    if autocast_ok and _autocast_bf16(input):
        return True, _bf16(input), tuple(_bf16(h) for h in hx), [_bf16(p) for p in params]
    return _has_kernel(input, recurrent=True), input, hx, params


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
    hx, cx = _own_states(hx, cx)
    out, hy, cy, _, _, _ = _call(_ops.lstm_forward, train, input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, batch_sizes, reverse, train)
    return out, hy, cy


def gru_layer(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, batch_sizes=None, reverse=False):
    """One GRU layer in one direction, fused. input [T, B, I] (or packed [N, I]); hx [B, H];
    w_ih [3H, I]; w_hh [3H, H]; b_ih, b_hh [3H]. Returns output [T, B, H] (or [N, H]), h_n [B, H]."""
    train = _needs_grad(input, hx, w_ih, w_hh, b_ih, b_hh)
    hx, = _own_states(hx)
    out, hy, _, _ = _call(_ops.gru_forward, train, input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse, train)
    return out, hy


def rnn_layer(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, batch_sizes=None, reverse=False, nonlinearity="tanh"):
    """One Elman RNN layer in one direction, fused. input [T, B, I] (or packed [N, I]); hx [B, H];
    w_ih [H, I]; w_hh [H, H]; b_ih, b_hh [H]. Returns output [T, B, H] (or [N, H]), h_n [B, H]."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    train = _needs_grad(input, hx, w_ih, w_hh, b_ih, b_hh)
    hx, = _own_states(hx)
    return _call(_ops.rnn_forward, train, input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse,
                 nonlinearity == "relu")


def _torch_fallback(fn, input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                    batch_sizes):
    """torch's own implementation, for devices fastrnn has no kernel for."""
    if batch_sizes is None:
        return tuple(fn(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first))
    return tuple(fn(input, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional))


def _caller_owned(out):
    """The output a layer op returns is also saved for its backward (the h_{t-1} of every step),
    so an in-place edit of it would fail backward's version check. torch.nn's native kernels let
    training code edit the returned output in place before backward (nn.ReLU(inplace=True),
    out += residual, masked_fill_), so with a graph the caller gets a copy (a bidirectional
    layer's torch.cat already is one). While torch.jit.trace records, always: its check re-runs
    the model under no_grad, and the two graphs must match (as _needs_grad)."""
    return out.clone() if out.requires_grad or torch.jit.is_tracing() else out


def _own_states(*states):
    """A layer op's initial states, copied while torch.compile traces (by fastrnn::state_copy:
    Inductor removes an aten.clone as a no-op; eager calls take no copy). The op saves them for
    its backward, and Inductor's backward may write in place into a saved tensor it takes to be
    unaliased (a donated buffer) before a saved view of it (a state taken from [L*D, B, H]) is
    read: silently wrong gradients (measured, torch 2.13; recurrent_stack in csrc/autograd.cpp
    does the same for the LSTM, GRU and RNN layers)."""
    if torch.compiler.is_compiling():
        return tuple(None if s is None else _ops.state_copy(s) for s in states)
    return states


def _check_lstm_state_pair(hx):
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise RuntimeError(f"lstm: hx must be a pair (h_0, c_0), got {type(hx).__name__} of "
                           f"{len(hx) if isinstance(hx, (tuple, list)) else 1}")


def _stack(layer_fn, input, states, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
           batch_sizes):
    """Runs layer_fn over layers and directions; states: list of [L*D, B, *] initial states.
    (The variant cells' stack; the LSTM, GRU and RNN run the same loop in C++: the
    fastrnn::recurrent_stack op.)"""
    D = 2 if bidirectional else 1
    for st in states:  # before any kernel: a state indexed per layer below must have the layers
        if not isinstance(st, torch.Tensor) or st.dim() != 3 or st.size(0) != num_layers * D:
            shape = list(st.shape) if isinstance(st, torch.Tensor) else type(st).__name__
            raise RuntimeError(f"hx: expected initial states of shape [num_layers * num_directions = {num_layers * D}, "
                               f"batch, hidden], got {shape}")
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
        out = _caller_owned(out)
        return (out.transpose(0, 1) if dense_batch_first else out), [f.unsqueeze(0) for f in fin]
    finals = [[] for _ in states]
    layer_states = [s.unbind(0) for s in states]  # one call, not one index per layer and direction
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
            out, *fin = layer_fn(x, [s[k] for s in layer_states], w_ih, w_hh, b_ih, b_hh, extra, batch_sizes, d == 1)
            outs.append(out)
            for acc, f in zip(finals, fin):
                acc.append(f)
        x = outs[0] if D == 1 else torch.cat(outs, dim=-1)
    if D == 1:
        x = _caller_owned(x)
    if dense_batch_first:
        x = x.transpose(0, 1)
    return x, [torch.stack(f) for f in finals]


# bfloat16 LSTM inference with steps of 16M multiply-adds or more (B * 4H * H; the size where the
# kernels switch to per-step bfloat16 GEMMs) runs torch's own oneDNN LSTM primitive, which is
# faster there (measured, T=100, B=64, I=H=512, 2 threads: 31 ms against fastrnn's 37-48 ms) and
# gives torch.nn's values. Not while compiling (torch's LSTM breaks the graph) nor in training
# (even there: 133 vs 137 ms, and fastrnn's backward keeps training's memory lower). Only where
# oneDNN has bfloat16 (AVX-512 BF16 and the like): on an AVX2 CPU torch's bfloat16 LSTM is a slow
# generic path (measured, Zen 3: 1.78 s at that shape, fastrnn's kernels 0.2 s).
_BF16_TORCH_MIN_MACS = 16 * 1024 * 1024


@functools.lru_cache(maxsize=None)
def _onednn_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _bf16_inference_prefers_torch(input, hx, params, batch_sizes, has_proj):
    if (input.dtype != torch.bfloat16 or input.device.type != "cpu" or batch_sizes is not None or has_proj
            or torch.compiler.is_compiling()):
        return False
    if _needs_grad(input, *hx, *params) or hx[1].dim() < 2:
        return False  # (malformed states: _stack's check names them)
    B, H = hx[1].size(-2), hx[1].size(-1)
    return B * 4 * H * H >= _BF16_TORCH_MIN_MACS and _onednn_bf16()


def lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, batch_sizes=None):
    """Stacked LSTM with torch.nn.LSTM's semantics (arguments as ``torch._VF.lstm``).

    input: [T, B, I] ([B, T, I] if batch_first), or packed data [N, I] with batch_sizes
    hx: (h_0 [L*D, B, P], c_0 [L*D, B, H])
    params: per layer and direction, w_ih, w_hh, (b_ih, b_hh if has_biases), (w_hr if projecting)
    Returns (output [T, B, D*P], h_n [L*D, B, P], c_n [L*D, B, H]).
    """
    _check_lstm_state_pair(hx)
    per_layer = len(params) // max(1, num_layers * (2 if bidirectional else 1))
    has_proj = per_layer == (5 if has_biases else 3)
    fused, input, hx, params = _recurrent_args(input, hx, params, not has_proj and batch_sizes is None)
    if not fused or _bf16_inference_prefers_torch(input, hx, params, batch_sizes, has_proj):
        return _torch_fallback(torch._VF.lstm, input, hx, params, has_biases, num_layers, dropout, train,
                               bidirectional, batch_first, batch_sizes)

    return tuple(_ops.recurrent_stack("LSTM", input, hx[0], hx[1], params, has_biases, num_layers, dropout, train,
                                      bidirectional, batch_first, batch_sizes))


def gru(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, batch_sizes=None):
    """Stacked GRU with torch.nn.GRU's semantics. hx: [L*D, B, H].
    Returns (output [T, B, D*H], h_n [L*D, B, H])."""
    fused, input, (hx,), params = _recurrent_args(input, (hx,), params, False)
    if not fused:
        return _torch_fallback(torch._VF.gru, input, hx, params, has_biases, num_layers, dropout, train,
                               bidirectional, batch_first, batch_sizes)

    return _ops.recurrent_stack("GRU", input, hx, None, params, has_biases, num_layers, dropout, train, bidirectional,
                                batch_first, batch_sizes)[:2]


def rnn(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, batch_sizes=None,
        nonlinearity="tanh"):
    """Stacked Elman RNN (tanh or relu) with torch.nn.RNN's semantics. hx: [L*D, B, H].
    Returns (output [T, B, D*H], h_n [L*D, B, H])."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    fused, input, (hx,), params = _recurrent_args(input, (hx,), params, True)
    if not fused:
        fn = torch._VF.rnn_tanh if nonlinearity == "tanh" else torch._VF.rnn_relu
        return _torch_fallback(fn, input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                               batch_first, batch_sizes)

    mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
    return _ops.recurrent_stack(mode, input, hx, None, params, has_biases, num_layers, dropout, train, bidirectional,
                                batch_first, batch_sizes)[:2]


# ------------------------------------------------------------------------------------ attention
def _check_tensor(t, name, fn):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")


def _check_same(t, ref, name, ref_name, fn):
    if t.dtype != ref.dtype:
        raise RuntimeError(f"{fn}: {name} and {ref_name} must have the same dtype, got {t.dtype} and {ref.dtype}")
    if t.device != ref.device:
        raise RuntimeError(f"{fn}: {name} and {ref_name} must be on the same device, got {t.device} and {ref.device}")


def _check_mask(mask, name, fn, query, shape):
    """mask: bool (True = attend) or floating (added to the scores), broadcastable to `shape`.
    Returns it as bool or in query's dtype."""
    _check_tensor(mask, name, fn)
    if mask.device != query.device:
        raise RuntimeError(f"{fn}: {name} and query must be on the same device, got {mask.device} and {query.device}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise RuntimeError(f"{fn}: {name} must be bool (True = attend) or floating point (added to the scores), "
                           f"got {mask.dtype}")
    try:
        torch.broadcast_shapes(mask.shape, shape)
        ok = mask.dim() <= len(shape)
    except RuntimeError:
        ok = False
    if not ok or torch.broadcast_shapes(mask.shape, shape) != torch.Size(shape):
        raise RuntimeError(f"{fn}: {name} of shape {list(mask.shape)} is not broadcastable to {list(shape)}")
    return mask if mask.dtype in (torch.bool, query.dtype) else mask.to(query.dtype)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """softmax(Q K^T * scale + mask) V, with the arguments and semantics of
    torch.nn.functional.scaled_dot_product_attention.

    query [..., L, E], key [..., S, E], value [..., S, Ev] (leading dims broadcast) -> [..., L, Ev].
    attn_mask: bool (True = attend) or float (added), broadcastable to [..., L, S].
    is_causal: query i attends to keys j <= i (top-left aligned, as torch). With attn_mask too,
    both apply, where torch's CPU kernel takes the pair (4-D inputs of one batch and head count,
    value width = query width, no dropout); elsewhere, as torch, a RuntimeError.
    scale: defaults to 1/sqrt(E). A query row with every key masked gives zeros (as torch on CPU).
    enable_gqa: grouped-query attention: key and value may have fewer heads (dim -3), a divisor
    of query's; each serves query.size(-3) // key.size(-3) consecutive query heads.

    CPU float32/float64 runs the fused kernel (blocked online softmax; backward recomputes the
    probabilities from the saved log-sum-exp, so nothing [L, S]-sized is kept). dropout_p > 0,
    other dtypes and other devices call torch's own implementation.
    """
    fn = "fastrnn.scaled_dot_product_attention"
    for t, n in ((query, "query"), (key, "key"), (value, "value")):
        _check_tensor(t, n, fn)
        if t.dim() < 2:
            raise RuntimeError(f"{fn}: {n} must be at least 2-D [..., seq, features], got shape {list(t.shape)}")
    _check_same(key, query, "key", "query", fn)
    _check_same(value, query, "value", "query", fn)
    if scale is not None and not isinstance(scale, numbers.Real) and not (
            isinstance(scale, torch.Tensor) and scale.dim() == 0):
        raise TypeError(f"{fn}: argument 'scale' must be float, not {type(scale).__name__}")
    if attn_mask is not None:
        _check_tensor(attn_mask, "attn_mask", fn)  # (before the pair check reads its rank)
    if key.shape[-1] != query.shape[-1]:
        raise RuntimeError(f"{fn}: key.size(-1) must equal query.size(-1) = {query.shape[-1]}, "
                           f"got key of shape {list(key.shape)}")
    if value.shape[-2] != key.shape[-2]:
        raise RuntimeError(f"{fn}: value.size(-2) must equal key.size(-2) = {key.shape[-2]} (the key length), "
                           f"got value of shape {list(value.shape)}")
    if not 0.0 <= dropout_p <= 1.0:  # (torch's class; 1.0 drops everything, as torch's dropout)
        raise RuntimeError(f"{fn}: dropout_p: dropout probability has to be between 0 and 1, but got {dropout_p}")
    # (on key and value as given, before enable_gqa repeats their heads: torch decides so)
    if is_causal and attn_mask is not None and not _causal_with_mask(query, key, value, attn_mask, dropout_p,
                                                                     enable_gqa):
        raise RuntimeError(f"{fn}: Explicit attn_mask should not be set when is_causal=True (torch takes both only "
                           "where its CPU flash kernel runs: see _causal_with_mask)")
    if enable_gqa:  # (after the checks that do not need the heads: no copy for a call that fails)
        key, value = _gqa_heads(query, key, value, fn)
    try:
        lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except RuntimeError:
        raise RuntimeError(f"{fn}: the leading (batch) dimensions of query {list(query.shape)}, key "
                           f"{list(key.shape)} and value {list(value.shape)} do not broadcast") from None
    L, S = query.shape[-2], key.shape[-2]
    if isinstance(attn_mask, torch.Tensor) and attn_mask.is_floating_point() and attn_mask.dtype not in (
            torch.float32, query.dtype):  # as torch's: a float mask is float32 or query's dtype
        raise RuntimeError(f"{fn}: Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                           f"attn_mask.dtype: {attn_mask.dtype} and query.dtype: {query.dtype} instead.")
    if attn_mask is not None:
        attn_mask = _check_mask(attn_mask, "attn_mask", fn, query, (*lead, L, S))
        if is_causal:  # both masks: the causal one folded into attn_mask (top-left aligned)
            keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
            attn_mask = attn_mask & keep if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~keep, -math.inf)
            is_causal = False
    scale = _default_scale(query) if scale is None else float(scale)
    if not _attention_kernel(query) or dropout_p > 0.0:
        # torch's own kernel: other devices and dtypes, and dropout (same semantics, its RNG).
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
    if attn_mask is not None and attn_mask.requires_grad:
        from . import reference as R  # the fused backward does not differentiate the mask
        return R.scaled_dot_product_attention_ref(query, key, value, attn_mask, 0.0, is_causal, scale)
    # The op works on [B, H, L, E]: fewer leading dims are unsqueezed, more are flattened into B.
    nlead = len(lead)
    q, k, v = (t.expand(*lead, *t.shape[-2:]) for t in (query, key, value))
    if nlead > 2:
        nb = math.prod(lead[:-1])  # (not -1: a reshape cannot infer it when a length is 0)
        q, k, v = (t.reshape(nb, lead[-1], *t.shape[-2:]) for t in (q, k, v))
        if attn_mask is not None:
            attn_mask = attn_mask.expand(*lead, L, S).reshape(nb, lead[-1], L, S)
    elif nlead < 2:
        q, k, v = (t.view((1,) * (2 - nlead) + tuple(t.shape)) for t in (q, k, v))
    out, _ = _ops.sdpa_forward(q, k, v, attn_mask, is_causal, scale)
    return out.view(*lead, L, value.shape[-1])


def _gqa_heads(query, key, value, fn):
    """key and value with their heads (dim -3) repeated to query's, as torch's enable_gqa."""
    if query.dim() < 3 or key.dim() < 3 or value.dim() < 3:  # (torch's class: it indexes dim -3)
        raise IndexError(f"{fn}: enable_gqa=True needs a heads dimension (-3), got query {list(query.shape)}, "
                         f"key {list(key.shape)} and value {list(value.shape)}")
    hq = query.shape[-3]
    for t in (key, value):
        if t.shape[-3] == 0 or hq % t.shape[-3] != 0:
            raise RuntimeError(f"{fn}: Number of heads in key and value must divide the number of heads in query "
                               f"(enable_gqa=True), got query {list(query.shape)}, key {list(key.shape)} and value "
                               f"{list(value.shape)}")
    return tuple(t if t.shape[-3] == hq else t.repeat_interleave(hq // t.shape[-3], dim=-3) for t in (key, value))


def _causal_with_mask(query, key, value, attn_mask, dropout_p, enable_gqa):
    """Whether torch's CPU scaled_dot_product_attention takes is_causal=True with an attn_mask
    (applying both): where its flash kernel runs (torch 2.13's checks): 4-D inputs with a last
    stride of 1, one batch size, one head count (or, with enable_gqa, key and value heads equal
    and dividing query's), equal query/key/value widths, a 2-D or 4-D mask that needs no
    gradient, no dropout, flash enabled. Elsewhere its math kernel refuses the pair."""
    if not (query.dim() == key.dim() == value.dim() == 4 and attn_mask.dim() in (2, 4) and dropout_p == 0.0
            and not attn_mask.requires_grad and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
            and query.shape[0] == key.shape[0] == value.shape[0]
            and query.shape[-1] == key.shape[-1] == value.shape[-1]):
        return False
    hq, hk, hv = query.shape[1], key.shape[1], value.shape[1]
    heads_ok = hk == hv and hk > 0 and hq % hk == 0 if enable_gqa else hq == hk == hv
    # (the backend flag is not read while compiling: dynamo cannot trace it)
    return heads_ok and (torch.compiler.is_compiling() or torch.backends.cuda.flash_sdp_enabled())


def _default_scale(query):
    E = query.shape[-1]
    return 1.0 / math.sqrt(E) if E > 0 else 1.0


def _attention_kernel(t):
    """Whether fastrnn's fused attention kernels run this tensor (CPU float32/float64, outside
    autocast); otherwise the functions fall back (see each docstring)."""
    return (t.device.type == "cpu" and t.dtype in _NATIVE_DTYPES and not torch.is_autocast_enabled("cpu")
            and not _transforms_active())


def _attention_mask_3d(mask, B, T, S, query, fn):
    """An additive/Luong mask [B, S] or [B, T, S] as a [B, T, S] view (bool or query's dtype)."""
    _check_tensor(mask, "mask", fn)
    if mask.dim() not in (2, 3) or mask.shape[0] != B or mask.shape[-1] != S or (mask.dim() == 3 and mask.shape[1] != T):
        raise RuntimeError(f"{fn}: mask must have shape [batch, src_len] = {[B, S]} or [batch, tgt_len, src_len] = "
                           f"{[B, T, S]}, got {list(mask.shape)}")
    if mask.dim() == 2:
        mask = mask.unsqueeze(1)  # one source mask for every target step
    return _check_mask(mask, "mask", fn, query, (B, T, S))


def _check_attention_inputs(fn, query, keys, values):
    for t, n in ((query, "query"), (keys, "keys"), (values, "values")):
        _check_tensor(t, n, fn)
        if t.dim() != 3:
            raise ValueError(f"{fn}: {n} must be 3-D [batch, len, features], got shape {list(t.shape)}")
    _check_same(keys, query, "keys", "query", fn)
    _check_same(values, query, "values", "query", fn)
    if keys.shape[0] != query.shape[0] or values.shape[0] != query.shape[0]:
        raise RuntimeError(f"{fn}: query, keys and values must have the same batch size, got {query.shape[0]}, "
                           f"{keys.shape[0]} and {values.shape[0]}")
    if values.shape[1] != keys.shape[1]:
        raise RuntimeError(f"{fn}: values.size(1) must equal keys.size(1) = {keys.shape[1]} (the source length), "
                           f"got values of shape {list(values.shape)}")


def additive_attention(query, keys, values, w_q, w_k, v, bias=None, mask=None, scale=False):
    """Additive (Bahdanau) attention: e_ij = v . tanh(W_q q_i + W_k k_j + bias) (/ sqrt(D) when scale),
    weights = softmax_j(e_ij + mask_ij), context_i = sum_j weights_ij values_j.

    query [B, T, Dq], keys [B, S, Dk], values [B, S, Dv]; w_q [D, Dq], w_k [D, Dk], v [D], bias [D] or None;
    mask: bool [B, S] or [B, T, S] (True = attend), or float (added). Rows with every key masked get
    zero weights and a zero context.
    Returns (context [B, T, Dv], weights [B, T, S]).

    The fused CPU kernel (float32/float64) never materialises the [B, T, S, D] tanh tensor: the
    backward recomputes tanh tile by tile, so memory is O(B*T*S).
    """
    fn = "fastrnn.additive_attention"
    _check_attention_inputs(fn, query, keys, values)
    for t, n, d in ((w_q, "w_q", 2), (w_k, "w_k", 2), (v, "v", 1), (bias, "bias", 1)):
        if t is None and n == "bias":
            continue
        _check_tensor(t, n, fn)
        _check_same(t, query, n, "query", fn)
        if t.dim() != d:
            raise ValueError(f"{fn}: {n} must be {d}-D, got shape {list(t.shape)}")
    D = w_q.shape[0]
    if w_q.shape[1] != query.shape[-1]:
        raise RuntimeError(f"{fn}: w_q must have shape [hidden, query_dim] = [{D}, {query.shape[-1]}], "
                           f"got {list(w_q.shape)}")
    if tuple(w_k.shape) != (D, keys.shape[-1]):
        raise RuntimeError(f"{fn}: w_k must have shape [hidden, key_dim] = [{D}, {keys.shape[-1]}], "
                           f"got {list(w_k.shape)}")
    for t, n in ((v, "v"), (bias, "bias")):
        if t is not None and t.shape[0] != D:
            raise RuntimeError(f"{fn}: {n} must have shape [hidden] = [{D}], got {list(t.shape)}")
    B, T, S = query.shape[0], query.shape[1], keys.shape[1]
    if mask is not None:
        mask = _attention_mask_3d(mask, B, T, S, query, fn)
    qp = F.linear(query, w_q, bias)
    kp = F.linear(keys, w_k)
    scale_factor = 1.0 / math.sqrt(D) if scale and D > 0 else 1.0
    if not _attention_kernel(query) or (mask is not None and mask.requires_grad):
        from . import reference as R  # other devices/dtypes, or a mask to differentiate
        return R.additive_attention_core_ref(qp, kp, values, v, mask, scale_factor)
    return _ops.additive_attention_forward(qp, kp, values, v, mask, scale_factor)


def luong_attention(query, keys, values, weight=None, mask=None):
    """Luong attention: e_ij = q_i^T W k_j ("general": weight W [Dq, Dk]) or q_i^T k_j ("dot":
    weight None), weights = softmax_j(e_ij + mask_ij), context_i = sum_j weights_ij values_j.
    Shapes and masks as additive_attention. Returns (context [B, T, Dv], weights [B, T, S]).
    Two batched GEMMs around a softmax: nothing larger than the [B, T, S] weights is formed."""
    fn = "fastrnn.luong_attention"
    _check_attention_inputs(fn, query, keys, values)
    if weight is None:
        if keys.shape[-1] != query.shape[-1]:
            raise RuntimeError(f"{fn}: 'dot' attention needs keys.size(-1) == query.size(-1), got "
                               f"{keys.shape[-1]} and {query.shape[-1]}")
    else:
        _check_tensor(weight, "weight", fn)
        _check_same(weight, query, "weight", "query", fn)
        if tuple(weight.shape) != (query.shape[-1], keys.shape[-1]):
            raise RuntimeError(f"{fn}: weight must have shape [query_dim, key_dim] = "
                               f"{[query.shape[-1], keys.shape[-1]]}, got {list(weight.shape)}")
    B, T, S = query.shape[0], query.shape[1], keys.shape[1]
    if mask is not None:
        mask = _attention_mask_3d(mask, B, T, S, query, fn)
    from . import reference as R
    return R.luong_attention_ref(query, keys, values, weight, mask)
# ---------------------------------------------------------------------------- variant cells
# LayerNorm LSTM/GRU, peephole LSTM, zoneout and recurrent DropConnect (SEMANTICS.md, "Variants").
# ln: (ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b[, ln_c_w, ln_c_b]) or None; w_peep [3, H] = (w_ci, w_cf,
# w_co) or None. zoneout_mask: the mask d (1 = keep the previous value), [*input.shape[:-1], 2H]
# for the LSTM (h then c) or [..., H] for the GRU; without one, zoneout_p is used as d (eval).


def variant_lstm_layer(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None, ln=None, w_peep=None, zoneout_mask=None,
                       zoneout_p=0.0, batch_sizes=None, reverse=False):
    """One variant LSTM layer in one direction, fused. Shapes as lstm_layer (no projection);
    ln_ih_*/ln_hh_* are [4H], ln_c_* [H]. Returns output [T, B, H] (or [N, H]), h_n, c_n."""
    ln6 = tuple(ln) if ln is not None else (None,) * 6
    if len(ln6) != 6:
        raise ValueError(f"ln: expected 6 tensors (ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b), got {len(ln6)}")
    if not _has_kernel(input, op="variant_lstm_forward"):
        from . import reference as R
        return R.variant_lstm_layer_ref(input, hx, cx, w_ih, w_hh, b_ih, b_hh, ln, w_peep, zoneout_mask, zoneout_p,
                                        batch_sizes, reverse)
    train = _needs_grad(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_peep, *ln6)
    hx, cx = _own_states(hx, cx)
    out, hy, cy, *_ = _call(_ops.variant_lstm_forward, train, input, w_ih, w_hh, b_ih, b_hh, *ln6, w_peep, hx, cx,
                            zoneout_mask, float(zoneout_p), batch_sizes, reverse, train)
    return out, hy, cy


def variant_gru_layer(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, ln=None, zoneout_mask=None, zoneout_p=0.0,
                      batch_sizes=None, reverse=False):
    """One variant GRU layer in one direction, fused; ln_* are [3H]. Returns output, h_n."""
    ln4 = tuple(ln) if ln is not None else (None,) * 4
    if len(ln4) != 4:
        raise ValueError(f"ln: expected 4 tensors (ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b), got {len(ln4)}")
    if not _has_kernel(input, op="variant_gru_forward"):
        from . import reference as R
        return R.variant_gru_layer_ref(input, hx, w_ih, w_hh, b_ih, b_hh, ln, zoneout_mask, zoneout_p, batch_sizes,
                                       reverse)
    train = _needs_grad(input, hx, w_ih, w_hh, b_ih, b_hh, *ln4)
    hx, = _own_states(hx)
    out, hy, *_ = _call(_ops.variant_gru_forward, train, input, w_ih, w_hh, b_ih, b_hh, *ln4, hx, zoneout_mask,
                        float(zoneout_p), batch_sizes, reverse, train)
    return out, hy


def check_probability(name, p):
    """Bad hyperparameters raise ValueError naming the argument and the value."""
    if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def zoneout_masks(input, slots, hidden_size, p, training):
    """(mask, zoneout_p) for one layer and direction: in training a fresh Bernoulli(p) mask d of
    shape [*input.shape[:-1], slots*H] from torch's RNG (reproducible under torch.manual_seed), in
    eval no mask and p itself (the expectation)."""
    if p <= 0.0:
        return None, 0.0
    if training:
        shape = (*input.shape[:-1], slots * hidden_size)
        return torch.bernoulli(torch.full(shape, p, dtype=input.dtype, device=input.device)), p
    return None, p


def drop_connect(w_hh, p, training):
    """Recurrent DropConnect (AWD-LSTM's WeightDrop): W_hh * m / (1 - p), m ~ Bernoulli(1 - p), one
    mask per forward call, drawn with torch's RNG (F.dropout on the weight, so it scales by 1/(1-p)
    like AWD-LSTM). Gradients reach W_hh through autograd's product. Eval: W_hh unchanged."""
    if p <= 0.0 or not training:
        return w_hh
    return F.dropout(w_hh, p, training=True)


def _check_variant_args(params, num_layers, bidirectional, per_layer, zoneout, weight_drop):
    """The stacked variant functions' hyperparameters and parameter count, before any kernel
    (zoneout's Bernoulli draw, or an index into a short list, failed without naming them)."""
    check_probability("zoneout", zoneout)
    check_probability("weight_drop", weight_drop)
    LD = num_layers * (2 if bidirectional else 1)
    if len(params) not in tuple(LD * n for n in per_layer):
        raise ValueError(f"params: expected {' or '.join(str(LD * n) for n in per_layer)} tensors "
                         f"({' or '.join(map(str, per_layer))} per layer and direction, for {LD}), got {len(params)}")


def variant_lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                 batch_sizes=None, *, layer_norm=False, peephole=False, zoneout=0.0, weight_drop=0.0):
    """Stacked variant LSTM (arguments as lstm(), no projection). params per layer and direction:
    w_ih, w_hh, (b_ih, b_hh if has_biases), (6 LayerNorm tensors if layer_norm), (w_ci, w_cf, w_co
    if peephole). `train` selects zoneout's and DropConnect's training behaviour (masks drawn
    here) and inter-layer dropout. Returns (output, h_n, c_n)."""
    n_ln = 6 if layer_norm else 0
    base = (4 if has_biases else 2) + n_ln + (3 if peephole else 0)
    _check_variant_args(params, num_layers, bidirectional, (base,) if n_ln or peephole else (base, base + 1),
                        zoneout, weight_drop)

    def layer(x, st, w_ih, w_hh, b_ih, b_hh, extra, bsz, rev):
        ln = tuple(extra[:n_ln]) if layer_norm else None
        w_peep = torch.stack(tuple(extra[n_ln:n_ln + 3])) if peephole else None
        w_hr = extra[0] if (not layer_norm and not peephole and extra) else None  # fastrnn.LSTM's projection
        w_hh = drop_connect(w_hh, weight_drop, train)
        mask, p = zoneout_masks(x, 2, w_ih.shape[0] // 4, zoneout, train)
        if ln is None and w_peep is None and p == 0.0:
            if not _has_kernel(x):
                from . import reference as R
                return R.lstm_layer_ref(x, st[0], st[1], w_ih, w_hh, b_ih, b_hh, w_hr, bsz, rev)
            return lstm_layer(x, st[0], st[1], w_ih, w_hh, b_ih, b_hh, w_hr, bsz, rev)
        if w_hr is not None:
            raise ValueError("zoneout is not supported with proj_size > 0")
        return variant_lstm_layer(x, st[0], st[1], w_ih, w_hh, b_ih, b_hh, ln, w_peep, mask, p, bsz, rev)

    _check_lstm_state_pair(hx)
    out, (h, c) = _stack(layer, input, list(hx), params, has_biases, num_layers, dropout, train, bidirectional,
                         batch_first, batch_sizes)
    return out, h, c


def variant_gru(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                batch_sizes=None, *, layer_norm=False, zoneout=0.0, weight_drop=0.0):
    """Stacked variant GRU; params per layer and direction: w_ih, w_hh, (b_ih, b_hh), (4 LayerNorm
    tensors if layer_norm). Returns (output, h_n)."""
    _check_variant_args(params, num_layers, bidirectional, ((4 if has_biases else 2) + (4 if layer_norm else 0),),
                        zoneout, weight_drop)

    def layer(x, st, w_ih, w_hh, b_ih, b_hh, extra, bsz, rev):
        ln = tuple(extra[:4]) if layer_norm else None
        w_hh = drop_connect(w_hh, weight_drop, train)
        mask, p = zoneout_masks(x, 1, w_hh.shape[1], zoneout, train)
        if ln is None and p == 0.0:
            if not _has_kernel(x):
                from . import reference as R
                return R.gru_layer_ref(x, st[0], w_ih, w_hh, b_ih, b_hh, bsz, rev)
            return gru_layer(x, st[0], w_ih, w_hh, b_ih, b_hh, bsz, rev)
        return variant_gru_layer(x, st[0], w_ih, w_hh, b_ih, b_hh, ln, mask, p, bsz, rev)

    out, (h,) = _stack(layer, input, [hx], params, has_biases, num_layers, dropout, train, bidirectional,
                       batch_first, batch_sizes)
    return out, h
