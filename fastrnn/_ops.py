"""Fake (meta) kernels for every fastrnn op, so torch.compile and torch.export can trace them.

The shapes here mirror the schemas in csrc/registration.cpp: `input` is dense [T, B, I] or
packed [N, I] (with `batch_sizes`); the workspace outputs are [N, *] with N = T*B (or the
packed row count), or empty when train=False.
"""
from __future__ import annotations

import functools

import torch

_lib = "fastrnn::"


# Every output of the CPU kernels is a fresh contiguous tensor, so the fakes use new_empty(shape)
# (contiguous), never empty_like (which would copy a caller's strides).


def _register_fake(op):
    """torch.library.register_fake for fastrnn::op, plus the check the CPU kernels make first: a
    None for a Tensor argument (the binding passes it through; a CPU call with one meta tensor
    then lands in the fake kernel) raises a RuntimeError naming the argument, not an
    AttributeError from the shape logic."""
    schema = getattr(torch.ops.fastrnn, op).default._schema
    required = [(i, a.name) for i, a in enumerate(schema.arguments) if str(a.type) == "Tensor"]

    def register(fn):
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            for i, name in required:
                t = args[i] if i < len(args) else kwargs.get(name)
                if not isinstance(t, torch.Tensor):
                    raise RuntimeError(f"fastrnn.{op}: {name} must be a tensor, got {type(t).__name__}")
            return fn(*args, **kwargs)
        return torch.library.register_fake(_lib + op)(checked)
    return register


def _rows(input):
    n = 1
    for s in input.shape[:-1]:
        n = n * s
    return n


def _check_common(name, input, w_ih, w_hh, hx, gates):
    torch._check(input.dim() in (2, 3), lambda: f"{name}: input must be 3-D [T, B, I] or packed 2-D [N, I]")
    torch._check(w_ih.dim() == 2 and w_hh.dim() == 2, lambda: f"{name}: w_ih and w_hh must be 2-D")
    torch._check(w_ih.shape[0] % gates == 0, lambda: f"{name}: w_ih.size(0) must be a multiple of {gates}")
    torch._check(w_ih.shape[1] == input.shape[-1],
                 lambda: f"{name}: w_ih must have shape [gates*hidden_size, input.size(-1)]")
    torch._check(hx.dim() == 2, lambda: f"{name}: hx must be 2-D [batch, hidden]")
    for t, tn in ((w_ih, "w_ih"), (w_hh, "w_hh"), (hx, "hx")):
        torch._check(t.dtype == input.dtype, lambda: f"{name}: {tn} and input must have the same dtype")
        torch._check(t.device == input.device, lambda: f"{name}: {tn} and input must be on the same device, got "
                     f"{t.device} and {input.device}")


def _check_devices(name, input, **tensors):
    """Every tensor argument on input's device. A CPU call with one meta tensor dispatches here
    (Meta outranks CPU), so this check is what stops it from returning uninitialised tensors."""
    for arg, t in tensors.items():
        if isinstance(t, torch.Tensor):
            torch._check(t.device == input.device, lambda: f"{name}: {arg} and input must be on the same device, "
                         f"got {t.device} and {input.device}")


def _workspace(input, train, *widths):
    # The kernels' compute dtype: float32 for bfloat16 and float16 (CUDA) input (states and gate
    # math in float32).
    dtype = torch.float32 if input.dtype in (torch.bfloat16, torch.float16) else input.dtype
    n = _rows(input)
    return tuple(input.new_empty((n, w) if (train and w) else (0,), dtype=dtype) for w in widths)


@_register_fake("state_copy")
def _state_copy_fake(x):
    return x.new_empty(x.shape)


@_register_fake("lstm_forward")
def _lstm_forward_fake(input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, batch_sizes, reverse, train):
    _check_common("fastrnn.lstm_forward", input, w_ih, w_hh, hx, 4)
    _check_devices("fastrnn.lstm_forward", input, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr, cx=cx, batch_sizes=batch_sizes)
    H = w_ih.shape[0] // 4
    P = w_hr.shape[0] if w_hr is not None else H
    out = input.new_empty((*input.shape[:-1], P))
    gates, cells, proj = _workspace(input, train, 4 * H, H, H if w_hr is not None else 0)
    return out, hx.new_empty(hx.shape), cx.new_empty(cx.shape), gates, cells, proj


_FULL_MASK = (True, True, True)


def _masked(grads, output_mask, weights, states):
    """The backward ops' results with those output_mask leaves out (input, weights, states) empty,
    as the kernels return them."""
    torch._check(len(output_mask) == 3, lambda: f"output_mask: expected 3 bools (input, weights, states), got "
                 f"{len(output_mask)}")
    groups = ((0,), weights, states)
    return tuple(g.new_empty((0,)) if any(i in groups[k] and not output_mask[k] for k in range(3)) else g
                 for i, g in enumerate(grads))


@_register_fake("lstm_backward")
def _lstm_backward_fake(grad_output, grad_hy, grad_cy, input, w_ih, w_hh, w_hr, hx, cx, batch_sizes, reverse,
                        output, gates, cells, proj_input, output_mask=_FULL_MASK):
    _check_devices("fastrnn.lstm_backward", input, grad_output=grad_output, grad_hy=grad_hy, grad_cy=grad_cy,
                   w_ih=w_ih, w_hh=w_hh, w_hr=w_hr, hx=hx, cx=cx, batch_sizes=batch_sizes, output=output,
                   gates=gates, cells=cells, proj_input=proj_input)
    H = w_ih.shape[0] // 4
    gw_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else input.new_empty((0,))
    return _masked((input.new_empty(input.shape), w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape),
                    input.new_empty((4 * H,)), input.new_empty((4 * H,)), gw_hr, hx.new_empty(hx.shape),
                    cx.new_empty(cx.shape)), output_mask, (1, 2, 3, 4, 5), (6, 7))


@_register_fake("lstm_bidir_forward")
def _lstm_bidir_forward_fake(input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r,
                             hx_r, cx_r, batch_sizes, train):
    return (_lstm_forward_fake(input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, batch_sizes, False, train)
            + _lstm_forward_fake(input, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r, hx_r, cx_r, batch_sizes, True, train))


@_register_fake("lstm_bidir_backward")
def _lstm_bidir_backward_fake(grad_output, grad_hy, grad_cy, grad_output_r, grad_hy_r, grad_cy_r, input, w_ih, w_hh,
                              w_hr, hx, cx, w_ih_r, w_hh_r, w_hr_r, hx_r, cx_r, batch_sizes, output, gates, cells,
                              proj_input, output_r, gates_r, cells_r, proj_input_r, output_mask=_FULL_MASK):
    f = _lstm_backward_fake(grad_output, grad_hy, grad_cy, input, w_ih, w_hh, w_hr, hx, cx, batch_sizes, False,
                            output, gates, cells, proj_input, output_mask)
    r = _lstm_backward_fake(grad_output_r, grad_hy_r, grad_cy_r, input, w_ih_r, w_hh_r, w_hr_r, hx_r, cx_r,
                            batch_sizes, True, output_r, gates_r, cells_r, proj_input_r, output_mask)
    return f + r[1:]


@_register_fake("gru_forward")
def _gru_forward_fake(input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse, train):
    _check_common("fastrnn.gru_forward", input, w_ih, w_hh, hx, 3)
    _check_devices("fastrnn.gru_forward", input, b_ih=b_ih, b_hh=b_hh, batch_sizes=batch_sizes)
    H = w_ih.shape[0] // 3
    out = input.new_empty((*input.shape[:-1], H))
    gates, hn = _workspace(input, train, 3 * H, H)
    return out, hx.new_empty(hx.shape), gates, hn


@_register_fake("rnn_forward")
def _rnn_forward_fake(input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse, relu):
    _check_common("fastrnn.rnn_forward", input, w_ih, w_hh, hx, 1)
    _check_devices("fastrnn.rnn_forward", input, b_ih=b_ih, b_hh=b_hh, batch_sizes=batch_sizes)
    H = w_ih.shape[0]
    return input.new_empty((*input.shape[:-1], H)), hx.new_empty(hx.shape)


def _gru_rnn_backward_fake(gates_per_h):
    # rest: (gru) output, gates, hn; (rnn) relu, output; then output_mask where given
    n_rest = 3 if gates_per_h == 3 else 2

    def fake(grad_output, grad_hy, input, w_ih, w_hh, hx, batch_sizes, reverse, *rest, output_mask=_FULL_MASK):
        if len(rest) > n_rest:
            rest, output_mask = rest[:n_rest], rest[n_rest]
        _check_devices("fastrnn backward", input, grad_output=grad_output, grad_hy=grad_hy, w_ih=w_ih, w_hh=w_hh,
                       hx=hx, batch_sizes=batch_sizes, **{f"arg{i}": t for i, t in enumerate(rest)})
        G = w_ih.shape[0]
        return _masked((input.new_empty(input.shape), w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape),
                        input.new_empty((G,)), input.new_empty((G,)), hx.new_empty(hx.shape)),
                       output_mask, (1, 2, 3, 4), (5,))
    return fake


_register_fake("gru_backward")(_gru_rnn_backward_fake(3))
_register_fake("rnn_backward")(_gru_rnn_backward_fake(1))


@_register_fake("gru_bidir_forward")
def _gru_bidir_forward_fake(input, w_ih, w_hh, b_ih, b_hh, hx, w_ih_r, w_hh_r, b_ih_r, b_hh_r, hx_r, batch_sizes,
                            train):
    return (_gru_forward_fake(input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, False, train)
            + _gru_forward_fake(input, w_ih_r, w_hh_r, b_ih_r, b_hh_r, hx_r, batch_sizes, True, train))


@_register_fake("rnn_bidir_forward")
def _rnn_bidir_forward_fake(input, w_ih, w_hh, b_ih, b_hh, hx, w_ih_r, w_hh_r, b_ih_r, b_hh_r, hx_r, batch_sizes,
                            relu):
    return (_rnn_forward_fake(input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, False, relu)
            + _rnn_forward_fake(input, w_ih_r, w_hh_r, b_ih_r, b_hh_r, hx_r, batch_sizes, True, relu))


def _gru_rnn_bidir_backward_fake(gates_per_h):
    one = _gru_rnn_backward_fake(gates_per_h)

    n_rest = 6 if gates_per_h == 3 else 3

    def fake(grad_output, grad_hy, grad_output_r, grad_hy_r, input, w_ih, w_hh, hx, w_ih_r, w_hh_r, hx_r,
             batch_sizes, *rest, output_mask=_FULL_MASK):
        # rest: (gru) output, gates, hn, output_r, gates_r, hn_r; (rnn) relu, output, output_r; then
        # output_mask where given
        if len(rest) > n_rest:
            rest, output_mask = rest[:n_rest], rest[n_rest]
        saved, saved_r = (rest[:3], rest[3:]) if gates_per_h == 3 else ((rest[0], rest[1]), (rest[0], rest[2]))
        f = one(grad_output, grad_hy, input, w_ih, w_hh, hx, batch_sizes, False, *saved, output_mask=output_mask)
        r = one(grad_output_r, grad_hy_r, input, w_ih_r, w_hh_r, hx_r, batch_sizes, True, *saved_r,
                output_mask=output_mask)
        return f + r[1:]
    return fake


_register_fake("gru_bidir_backward")(_gru_rnn_bidir_backward_fake(3))
_register_fake("rnn_bidir_backward")(_gru_rnn_bidir_backward_fake(1))


# ------------------------------------------------------------------------------------ attention
def _check_attention_devices(name, ref, **tensors):
    for arg, t in tensors.items():
        if isinstance(t, torch.Tensor):
            torch._check(t.device == ref.device, lambda: f"{name}: {arg} and {next(iter(tensors))} must be on the "
                         f"same device, got {t.device} and {ref.device}")


def _check_sdpa(name, query, key, value, attn_mask):
    torch._check(query.dim() == 4 and key.dim() == 4 and value.dim() == 4,
                 lambda: f"{name}: query, key and value must be 4-D [batch, heads, len, features]")
    B, H, L, E = query.shape
    S = key.shape[2]
    torch._check(tuple(key.shape) == (B, H, S, E), lambda: f"{name}: key must have shape [batch, heads, src_len, "
                 f"query.size(-1)]")
    torch._check(tuple(value.shape[:3]) == (B, H, S), lambda: f"{name}: value must have shape [batch, heads, "
                 f"key.size(2), value_dim]")
    for t, tn in ((key, "key"), (value, "value")):
        torch._check(t.dtype == query.dtype, lambda: f"{name}: {tn} and query must have the same dtype")
    if attn_mask is not None:
        torch._check(attn_mask.dtype == torch.bool or attn_mask.dtype == query.dtype,
                     lambda: f"{name}: attn_mask must be bool or have query's dtype")


@_register_fake("sdpa_forward")
def _sdpa_forward_fake(query, key, value, attn_mask, is_causal, scale):
    _check_attention_devices("fastrnn.sdpa_forward", query, query=query, key=key, value=value, attn_mask=attn_mask)
    _check_sdpa("fastrnn.sdpa_forward", query, key, value, attn_mask)
    B, H, L, _ = query.shape
    return query.new_empty((B, H, L, value.shape[-1])), query.new_empty((B, H, L))


@_register_fake("sdpa_backward")
def _sdpa_backward_fake(grad_output, query, key, value, attn_mask, output, lse, is_causal, scale):
    _check_attention_devices("fastrnn.sdpa_backward", query, query=query, grad_output=grad_output, key=key,
                             value=value, attn_mask=attn_mask, output=output, lse=lse)
    _check_sdpa("fastrnn.sdpa_backward", query, key, value, attn_mask)
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _check_additive(name, query_proj, key_proj, values, v):
    torch._check(query_proj.dim() == 3 and key_proj.dim() == 3 and values.dim() == 3 and v.dim() == 1,
                 lambda: f"{name}: query_proj, key_proj and values must be 3-D and v 1-D")
    B, T, D = query_proj.shape
    S = key_proj.shape[1]
    torch._check(tuple(key_proj.shape) == (B, S, D), lambda: f"{name}: key_proj must have shape [batch, src_len, "
                 f"query_proj.size(-1)]")
    torch._check(tuple(values.shape[:2]) == (B, S), lambda: f"{name}: values must have shape [batch, src_len, dim]")
    torch._check(tuple(v.shape) == (D,), lambda: f"{name}: v must have shape [query_proj.size(-1)]")


@_register_fake("additive_attention_forward")
def _additive_forward_fake(query_proj, key_proj, values, v, mask, scale):
    _check_attention_devices("fastrnn.additive_attention_forward", query_proj, query_proj=query_proj,
                             key_proj=key_proj, values=values, v=v, mask=mask)
    _check_additive("fastrnn.additive_attention_forward", query_proj, key_proj, values, v)
    B, T, _ = query_proj.shape
    return query_proj.new_empty((B, T, values.shape[-1])), query_proj.new_empty((B, T, key_proj.shape[1]))


@_register_fake("additive_attention_backward")
def _additive_backward_fake(grad_context, grad_weights, query_proj, key_proj, values, v, weights, scale):
    _check_attention_devices("fastrnn.additive_attention_backward", query_proj, query_proj=query_proj,
                             grad_context=grad_context, grad_weights=grad_weights, key_proj=key_proj, values=values,
                             v=v, weights=weights)
    _check_additive("fastrnn.additive_attention_backward", query_proj, key_proj, values, v)
    return (query_proj.new_empty(query_proj.shape), key_proj.new_empty(key_proj.shape),
            values.new_empty(values.shape), v.new_empty(v.shape))
def _variant_workspace(input, train, G, H, lstm, ln):
    n = _rows(input)
    if not train:
        return tuple(input.new_empty((0,)) for _ in range(4))
    norm_w = 2 * G * H + (H if lstm else 0)
    return (input.new_empty((n, G * H)), input.new_empty((n, H)),
            input.new_empty((n, norm_w)) if ln else input.new_empty((0,)),
            input.new_empty((n, 3 if lstm else 2)) if ln else input.new_empty((0,)))


@_register_fake("variant_lstm_forward")
def _variant_lstm_forward_fake(input, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b,
                               w_peep, hx, cx, zoneout_mask, zoneout_p, batch_sizes, reverse, train):
    name = "fastrnn.variant_lstm_forward"
    _check_common(name, input, w_ih, w_hh, hx, 4)
    _check_devices(name, input, b_ih=b_ih, b_hh=b_hh, ln_ih_w=ln_ih_w, ln_ih_b=ln_ih_b, ln_hh_w=ln_hh_w,
                   ln_hh_b=ln_hh_b, ln_c_w=ln_c_w, ln_c_b=ln_c_b, w_peep=w_peep, cx=cx, zoneout_mask=zoneout_mask,
                   batch_sizes=batch_sizes)
    torch._check(0.0 <= zoneout_p <= 1.0, lambda: f"{name}: zoneout_p must be a probability in [0, 1]")
    H = w_ih.shape[0] // 4
    out = input.new_empty((*input.shape[:-1], H))
    ws = _variant_workspace(input, train, 4, H, True, ln_ih_w is not None)
    return (out, hx.new_empty(hx.shape), cx.new_empty(cx.shape), *ws)


@_register_fake("variant_lstm_backward")
def _variant_lstm_backward_fake(grad_output, grad_hy, grad_cy, input, w_ih, w_hh, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b,
                                ln_c_w, ln_c_b, w_peep, hx, cx, zoneout_mask, zoneout_p, batch_sizes, reverse, output,
                                gates, cells, norm, stats):
    _check_devices("fastrnn.variant_lstm_backward", input, grad_output=grad_output, grad_hy=grad_hy,
                   grad_cy=grad_cy, w_ih=w_ih, w_hh=w_hh, ln_ih_w=ln_ih_w, ln_ih_b=ln_ih_b, ln_hh_w=ln_hh_w,
                   ln_hh_b=ln_hh_b, ln_c_w=ln_c_w, ln_c_b=ln_c_b, w_peep=w_peep, hx=hx, cx=cx,
                   zoneout_mask=zoneout_mask, batch_sizes=batch_sizes, output=output, gates=gates, cells=cells,
                   norm=norm, stats=stats)
    GH = w_ih.shape[0]
    H = GH // 4
    ln = ln_ih_w is not None
    vec = lambda n: input.new_empty((n,)) if ln else input.new_empty((0,))  # noqa: E731
    return (input.new_empty(input.shape), w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape),
            input.new_empty((GH,)), input.new_empty((GH,)), vec(GH), vec(GH), vec(GH), vec(GH), vec(H), vec(H),
            input.new_empty((3, H)) if w_peep is not None else input.new_empty((0,)), hx.new_empty(hx.shape),
            cx.new_empty(cx.shape))


@_register_fake("variant_gru_forward")
def _variant_gru_forward_fake(input, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, hx, zoneout_mask,
                              zoneout_p, batch_sizes, reverse, train):
    name = "fastrnn.variant_gru_forward"
    _check_common(name, input, w_ih, w_hh, hx, 3)
    _check_devices(name, input, b_ih=b_ih, b_hh=b_hh, ln_ih_w=ln_ih_w, ln_ih_b=ln_ih_b, ln_hh_w=ln_hh_w,
                   ln_hh_b=ln_hh_b, zoneout_mask=zoneout_mask, batch_sizes=batch_sizes)
    torch._check(0.0 <= zoneout_p <= 1.0, lambda: f"{name}: zoneout_p must be a probability in [0, 1]")
    H = w_ih.shape[0] // 3
    out = input.new_empty((*input.shape[:-1], H))
    return (out, hx.new_empty(hx.shape), *_variant_workspace(input, train, 3, H, False, ln_ih_w is not None))


@_register_fake("variant_gru_backward")
def _variant_gru_backward_fake(grad_output, grad_hy, input, w_ih, w_hh, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, hx,
                               zoneout_mask, zoneout_p, batch_sizes, reverse, output, gates, hn, norm, stats):
    _check_devices("fastrnn.variant_gru_backward", input, grad_output=grad_output, grad_hy=grad_hy, w_ih=w_ih,
                   w_hh=w_hh, ln_ih_w=ln_ih_w, ln_ih_b=ln_ih_b, ln_hh_w=ln_hh_w, ln_hh_b=ln_hh_b, hx=hx,
                   zoneout_mask=zoneout_mask, batch_sizes=batch_sizes, output=output, gates=gates, hn=hn, norm=norm,
                   stats=stats)
    GH = w_ih.shape[0]
    ln = ln_ih_w is not None
    vec = lambda n: input.new_empty((n,)) if ln else input.new_empty((0,))  # noqa: E731
    return (input.new_empty(input.shape), w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape),
            input.new_empty((GH,)), input.new_empty((GH,)), vec(GH), vec(GH), vec(GH), vec(GH), hx.new_empty(hx.shape))
