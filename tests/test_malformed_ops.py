"""Malformed calls to every registered fastrnn op raise a Python exception: never a crash, never a
return value. Valid but unusual layouts (non-contiguous, expanded, offset views, empty batch)
must work and give exactly what the contiguous call gives.

The whole table runs in a child process (this file, run as a script), one JSON line per case on
stdout, so a segfault or abort inside the kernel fails the case that caused it instead of killing
pytest. A child that dies is restarted on the cases it did not reach; the case it was running is
recorded as crashed, with the head of any sanitizer report on its stderr (`make test-asan` runs
this table against the ASan/UBSan build).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

import fastrnn  # noqa: F401  (registers torch.ops.fastrnn.*)

RECURRENT_OPS = ["lstm_forward", "lstm_backward", "gru_forward", "gru_backward", "rnn_forward", "rnn_backward",
                 "lstm_bidir_forward", "lstm_bidir_backward", "gru_bidir_forward", "gru_bidir_backward",
                 "rnn_bidir_forward", "rnn_bidir_backward"]
VARIANT_OPS = ["variant_lstm_forward", "variant_lstm_backward", "variant_gru_forward", "variant_gru_backward"]
ATTENTION_OPS = ["sdpa_forward", "sdpa_backward", "additive_attention_forward", "additive_attention_backward"]
STACK_OPS = ["recurrent_stack"]
COPY_OPS = ["state_copy"]  # takes any tensor: only non-tensors and argument counts are malformed
OPS = RECURRENT_OPS + VARIANT_OPS + ATTENTION_OPS + STACK_OPS + COPY_OPS
ALLOWED = ("RuntimeError", "ValueError", "TypeError", "NotImplementedError")  # the last is a RuntimeError

T, B, I, H, P = 4, 3, 5, 6, 4
BATCH_SIZES = [3, 3, 2, 1]  # sums to 9 packed rows, B = 3
GATES = {"lstm": 4, "lstm_bidir": 4, "gru": 3, "gru_bidir": 3, "rnn_bidir": 1, "rnn": 1, "variant_lstm": 4, "variant_gru": 3}


def cell_kind(op: str) -> tuple[str, str]:
    """("lstm", "forward") for lstm_forward, ("variant_lstm", "backward") for variant_lstm_backward."""
    cell, kind = op.rsplit("_", 1)
    return cell, kind

# A CPU call with one meta tensor dispatches to the Meta kernel (Meta outranks CPU), i.e. to the
# fake kernels of fastrnn/_ops.py: the "meta" rows check that those raise too (they used to
# return uninitialised CPU tensors; fixed in a46a624 after this table found it).


# ------------------------------------------------------------------------------ valid calls
def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen) * 0.4


def base_args(op: str, variant: str, batch: int = B) -> "OrderedDict[str, object]":
    """A valid argument list for `op`, in schema order. variant: dense, proj (LSTM projection),
    packed, bf16 (dense in bfloat16: the backward's workspace is the forward's float32); for the
    attention ops dense (no mask) or masked."""
    if op in ATTENTION_OPS:
        return attention_args(op, variant, batch)
    if op in STACK_OPS:
        return stack_args(variant, batch)
    if op in COPY_OPS:
        return OrderedDict(x=_randn(torch.Generator().manual_seed(1234), batch, H))
    cell, kind = cell_kind(op)
    if cell.startswith("variant_"):
        return variant_base_args(op, variant, batch)
    if cell.endswith("_bidir"):
        return bidir_base_args(cell, kind, variant, batch)
    G = GATES[cell]
    proj, packed = variant == "proj", variant == "packed"
    Ph = P if proj else H
    gen = torch.Generator().manual_seed(1234)
    if variant == "bf16":
        def _randn_lp(gen, *shape):
            return (torch.randn(*shape, generator=gen) * 0.4).bfloat16()
    randn = _randn_lp if variant == "bf16" else _randn
    x = randn(gen, sum(BATCH_SIZES), I) if packed else randn(gen, T, batch, I)
    bsz = torch.tensor(BATCH_SIZES, dtype=torch.int64) if packed else None
    w_ih, w_hh = randn(gen, G * H, I), randn(gen, G * H, Ph)
    b_ih, b_hh = randn(gen, G * H), randn(gen, G * H)
    w_hr = randn(gen, P, H) if proj else None
    nb = BATCH_SIZES[0] if packed else batch
    hx, cx = randn(gen, nb, Ph), randn(gen, nb, H)
    ops = torch.ops.fastrnn
    if cell == "lstm":
        fwd = OrderedDict(input=x, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr, hx=hx, cx=cx,
                          batch_sizes=bsz, reverse=False, train=True)
        if kind == "forward":
            return fwd
        out, hy, cy, gates, cells, pin = ops.lstm_forward(*fwd.values())
        return OrderedDict(grad_output=randn(gen, *out.shape), grad_hy=randn(gen, *hy.shape),
                           grad_cy=randn(gen, *cy.shape), input=x, w_ih=w_ih, w_hh=w_hh, w_hr=w_hr, hx=hx, cx=cx,
                           batch_sizes=bsz, reverse=False, output=out, gates=gates, cells=cells, proj_input=pin,
                           output_mask=[True, True, True])
    if cell == "gru":
        fwd = OrderedDict(input=x, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, hx=hx, batch_sizes=bsz, reverse=False,
                          train=True)
        if kind == "forward":
            return fwd
        out, hy, gates, hn = ops.gru_forward(*fwd.values())
        return OrderedDict(grad_output=randn(gen, *out.shape), grad_hy=randn(gen, *hy.shape), input=x, w_ih=w_ih,
                           w_hh=w_hh, hx=hx, batch_sizes=bsz, reverse=False, output=out, gates=gates, hn=hn,
                           output_mask=[True, True, True])
    fwd = OrderedDict(input=x, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, hx=hx, batch_sizes=bsz, reverse=False,
                      relu=False)
    if kind == "forward":
        return fwd
    out, hy = ops.rnn_forward(*fwd.values())
    return OrderedDict(grad_output=randn(gen, *out.shape), grad_hy=randn(gen, *hy.shape), input=x, w_ih=w_ih,
                       w_hh=w_hh, hx=hx, batch_sizes=bsz, reverse=False, relu=False, output=out,
                       output_mask=[True, True, True])


def bidir_base_args(cell: str, kind: str, variant: str, batch: int = B) -> "OrderedDict[str, object]":
    """*_bidir_*: the single-direction op's arguments for the forward direction, other values of the
    same shapes for the reverse one (suffix _r); input, batch_sizes and the flag shared. The
    backward's arguments are looked up by their schema names."""
    base = cell[:-len("_bidir")]
    f = base_args(base + "_forward", variant, batch)
    shared = ("input", "batch_sizes", "reverse", "train", "relu")
    per_direction = [k for k in f if k not in shared]
    fwd = OrderedDict(input=f["input"])
    fwd.update((k, f[k]) for k in per_direction)
    fwd.update((k + "_r", None if f[k] is None else f[k].flip(0) * 0.75) for k in per_direction)
    fwd["batch_sizes"] = f["batch_sizes"]
    flag = "relu" if base == "rnn" else "train"
    fwd[flag] = f[flag]
    if kind == "forward":
        return fwd
    res = getattr(torch.ops.fastrnn, cell + "_forward")(*fwd.values())
    outs = [a.name for a in getattr(torch.ops.fastrnn, base + "_forward").default._schema.returns]
    vals = dict(fwd)
    gen = torch.Generator().manual_seed(99)
    for i, name in enumerate(outs):
        for sfx, t in (("", res[i]), ("_r", res[len(outs) + i])):
            vals[name + sfx] = t
            vals["grad_" + name + sfx] = _randn(gen, *t.shape).to(t.dtype)
    vals["output_mask"] = [True, True, True]
    return OrderedDict((k, vals[k]) for k in schema_names(cell + "_backward"))


AH, AL, AS, AE, AEV, AD = 2, 5, 6, 4, 3, 7  # heads, query len, key len, query/key dim, value dim, additive hidden


def attention_args(op: str, variant: str, batch: int = B) -> "OrderedDict[str, object]":
    gen = torch.Generator().manual_seed(4321)
    ops = torch.ops.fastrnn
    masked = variant == "masked"
    if op.startswith("sdpa"):
        q, k, v = _randn(gen, batch, AH, AL, AE), _randn(gen, batch, AH, AS, AE), _randn(gen, batch, AH, AS, AEV)
        mask = (torch.rand(batch, AH, AL, AS, generator=gen) < 0.7) if masked else None
        if mask is not None:
            mask[..., 0] = True
        fwd = OrderedDict(query=q, key=k, value=v, attn_mask=mask, is_causal=False, scale=0.5)
        if op == "sdpa_forward":
            return fwd
        out, lse = ops.sdpa_forward(*fwd.values())
        return OrderedDict(grad_output=_randn(gen, *out.shape), query=q, key=k, value=v, attn_mask=mask, output=out,
                           lse=lse, is_causal=False, scale=0.5)
    qp, kp, vals, vv = _randn(gen, batch, AL, AD), _randn(gen, batch, AS, AD), _randn(gen, batch, AS, AEV), _randn(gen, AD)
    mask = (torch.rand(batch, AL, AS, generator=gen) < 0.7) if masked else None
    if mask is not None:
        mask[..., 0] = True
    fwd = OrderedDict(query_proj=qp, key_proj=kp, values=vals, v=vv, mask=mask, scale=0.5)
    if op == "additive_attention_forward":
        return fwd
    ctx, w = ops.additive_attention_forward(*fwd.values())
    return OrderedDict(grad_context=_randn(gen, *ctx.shape), grad_weights=_randn(gen, *w.shape), query_proj=qp,
                       key_proj=kp, values=vals, v=vv, weights=w, scale=0.5)


# Malformations that are valid calls for the attention ops (the value width is free in a forward;
# a mask needs only to broadcast; an omitted mask means none).
ATTENTION_OK = {
    ("sdpa_forward", "value", "size_last+1"), ("sdpa_forward", "value", "zero_last_dim"),
    ("additive_attention_forward", "values", "size_last+1"), ("additive_attention_forward", "values", "zero_last_dim"),
    ("sdpa_forward", "attn_mask", "rank_down"), ("sdpa_backward", "attn_mask", "rank_down"),
    ("additive_attention_forward", "mask", "rank_down"),
    ("sdpa_forward", "attn_mask", "None"), ("sdpa_backward", "attn_mask", "None"),
    ("additive_attention_forward", "mask", "None"),
}


def variant_base_args(op: str, variant: str, batch: int = B) -> "OrderedDict[str, object]":
    """A valid call of a variant op with every feature on: LayerNorm, peepholes (LSTM), a
    zoneout mask. variant: dense or packed."""
    cell, kind = cell_kind(op)
    lstm = cell == "variant_lstm"
    G = GATES[cell]
    packed = variant == "packed"
    gen = torch.Generator().manual_seed(4321)
    x = _randn(gen, sum(BATCH_SIZES), I) if packed else _randn(gen, T, batch, I)
    bsz = torch.tensor(BATCH_SIZES, dtype=torch.int64) if packed else None
    nb = BATCH_SIZES[0] if packed else batch
    w = OrderedDict(w_ih=_randn(gen, G * H, I), w_hh=_randn(gen, G * H, H), b_ih=_randn(gen, G * H),
                    b_hh=_randn(gen, G * H))
    ln = OrderedDict(ln_ih_w=1 + _randn(gen, G * H), ln_ih_b=_randn(gen, G * H), ln_hh_w=1 + _randn(gen, G * H),
                     ln_hh_b=_randn(gen, G * H))
    if lstm:
        ln.update(ln_c_w=1 + _randn(gen, H), ln_c_b=_randn(gen, H))
    hx, cx = _randn(gen, nb, H), _randn(gen, nb, H)
    mask = torch.bernoulli(torch.full((*x.shape[:-1], (2 if lstm else 1) * H), 0.3), generator=gen)
    fwd = OrderedDict(input=x, **w, **ln)
    if lstm:
        fwd.update(w_peep=_randn(gen, 3, H), hx=hx, cx=cx)
    else:
        fwd.update(hx=hx)
    fwd.update(zoneout_mask=mask, zoneout_p=0.3, batch_sizes=bsz, reverse=False, train=True)
    if kind == "forward":
        return fwd
    res = getattr(torch.ops.fastrnn, f"{cell}_forward")(*fwd.values())
    out, hy = res[0], res[1]
    grads = OrderedDict(grad_output=_randn(gen, *out.shape), grad_hy=_randn(gen, *hy.shape))
    if lstm:
        grads["grad_cy"] = _randn(gen, *res[2].shape)
    bwd = OrderedDict(**grads, input=x, w_ih=w["w_ih"], w_hh=w["w_hh"], **ln)
    if lstm:
        bwd.update(w_peep=fwd["w_peep"], hx=hx, cx=cx)
    else:
        bwd.update(hx=hx)
    bwd.update(zoneout_mask=mask, zoneout_p=0.3, batch_sizes=bsz, reverse=False, output=out)
    ws = res[3:] if lstm else res[2:]
    names = ["gates", "cells" if lstm else "hn", "norm", "stats"]
    bwd.update(zip(names, ws))
    return bwd


# recurrent_stack configurations: (mode, num_layers, bidirectional, batch_first, proj, packed, has_biases)
STACK_CONFIGS = {
    "lstm_bi_batch_first": ("LSTM", 2, True, True, False, False, True),
    "lstm_proj": ("LSTM", 2, False, False, True, False, True),
    "gru_bi": ("GRU", 2, True, False, False, False, True),
    "rnn_relu_nobias": ("RNN_RELU", 1, True, False, False, False, False),
    "lstm_packed": ("LSTM", 2, True, False, False, True, True),
}


def stack_args(variant: str, batch: int = B) -> "OrderedDict[str, object]":
    """A valid recurrent_stack call (torch._VF's arguments for a whole stack), in schema order."""
    mode, L, bi, batch_first, proj, packed, bias = STACK_CONFIGS[variant]
    gen = torch.Generator().manual_seed(1234)
    G, D = {"LSTM": 4, "GRU": 3}.get(mode, 1), 2 if bi else 1
    Ph = P if proj else H
    if packed:
        x = _randn(gen, sum(BATCH_SIZES), I)
    else:
        x = _randn(gen, batch, T, I) if batch_first else _randn(gen, T, batch, I)
    nb = BATCH_SIZES[0] if packed else batch
    params = []
    for layer in range(L):
        for _ in range(D):
            params += [_randn(gen, G * H, I if layer == 0 else D * Ph), _randn(gen, G * H, Ph)]
            params += [_randn(gen, G * H), _randn(gen, G * H)] if bias else []
            params += [_randn(gen, P, H)] if proj else []
    return OrderedDict(mode=mode, input=x, hx=_randn(gen, L * D, nb, Ph),
                       cx=_randn(gen, L * D, nb, H) if mode == "LSTM" else None, params=params, has_biases=bias,
                       num_layers=L, dropout=0.0, train=False, bidirectional=bi, batch_first=batch_first,
                       batch_sizes=torch.tensor(BATCH_SIZES, dtype=torch.int64) if packed else None)


def _set_param(k, value):
    def fn(args):
        params = list(args["params"])
        params[k] = value(params[k]) if callable(value) else value
        args["params"] = params
        return args
    return fn


def stack_cases() -> list["Case"]:
    """recurrent_stack's table: each tensor argument and a few parameters malformed one way at a
    time, the list of parameters too short or too long, and the scalars out of range."""
    op, cases = "recurrent_stack", []
    for variant, (mode, L, bi, batch_first, proj, packed, bias) in STACK_CONFIGS.items():
        args = stack_args(variant)
        for arg in ("input", "hx", "cx", "batch_sizes"):
            value = args[arg]
            if value is None:
                if arg == "cx":  # a cell state given to a GRU or RNN
                    cases.append(Case(op, variant, arg, "given", "error", _set(arg, torch.zeros(2, B, H))))
                continue
            for what, mut in ERROR_MUTATIONS.items():
                if mut(value) is None or (arg == "batch_sizes" and what != "meta" and what != "float64"):
                    continue
                # one more step of a dense [T, B, I] input is a valid call
                ok = arg == "input" and what == "size_first+1" and not packed and not batch_first
                cases.append(Case(op, variant, arg, what, "ok" if ok else "error", _set(arg, mut)))
            for what, mut in LAYOUT_MUTATIONS.items():
                if mut(value) is not None and not (arg == "batch_sizes" and what == "expanded"):
                    cases.append(Case(op, variant, arg, what, "same", _set(arg, mut)))
            cases.append(Case(op, variant, arg, "None", "error", _set(arg, None)))
            cases.append(Case(op, variant, arg, "python_list", "error", _set(arg, lambda t: t.tolist())))
        n = len(args["params"])
        for k in sorted({0, 1, n // 2, n - 1}):
            p = args["params"][k]
            for what in ("rank_up", "size_last+1", "size_first+1", "float64", "meta", "empty_1d"):
                if ERROR_MUTATIONS[what](p) is not None:
                    cases.append(Case(op, variant, f"params[{k}]", what, "error",
                                      _set_param(k, ERROR_MUTATIONS[what])))
            cases.append(Case(op, variant, f"params[{k}]", "None", "error", _set_param(k, None)))
            for what, mut in LAYOUT_MUTATIONS.items():
                if mut(p) is not None:
                    cases.append(Case(op, variant, f"params[{k}]", what, "same", _set_param(k, mut)))
        cases.append(Case(op, variant, "params", "one_too_few", "error", _set("params", lambda p: p[:-1])))
        cases.append(Case(op, variant, "params", "one_too_many", "error", _set("params", lambda p: p + p[-1:])))
        cases.append(Case(op, variant, "params", "empty", "error", _set("params", [])))
        cases.append(Case(op, variant, "params", "a_tensor", "error", _set("params", lambda p: p[0])))
        other = "GRU" if mode == "LSTM" else "LSTM"
        for what, m in (("unknown", "TRANSFORMER"), ("lower_case", mode.lower()), ("other_cell", other)):
            cases.append(Case(op, variant, "mode", what, "error", _set("mode", m)))
        for what, v in (("zero", 0), ("negative", -1), ("one_more", L + 1)):
            cases.append(Case(op, variant, "num_layers", what, "error", _set("num_layers", v)))
        for what, v in (("negative", -0.5), ("above_one", 1.5), ("nan", float("nan"))):
            cases.append(Case(op, variant, "dropout", what, "error", _set("dropout", v)))
        cases.append(Case(op, variant, "has_biases", "flipped", "error", _set("has_biases", not bias)))
        cases.append(Case(op, variant, "bidirectional", "flipped", "error", _set("bidirectional", not bi)))
        if not packed:  # B != T: the other layout's batch does not match the states
            cases.append(Case(op, variant, "batch_first", "flipped", "error", _set("batch_first", not batch_first)))
            cases.append(Case(op, variant, "batch_sizes", "given_for_dense_input", "error",
                              _set("batch_sizes", torch.tensor([B] * T))))
            cases.append(Case(op, variant, "batch", "zero", "ok", lambda a, v=variant: stack_args(v, batch=0)))
        cases.append(Case(op, variant, "train", "with_dropout", "ok",
                          lambda a: OrderedDict(a, train=True, dropout=0.5)))
        for arg in ("has_biases", "train", "bidirectional", "batch_first"):
            cases.append(Case(op, variant, arg, "str", "error", _set(arg, "yes")))
            cases.append(Case(op, variant, arg, "tensor", "error", _set(arg, torch.ones(2))))
        cases.append(Case(op, variant, "args", "too_few", "error", lambda a: OrderedDict(list(a.items())[:-1])))
        cases.append(Case(op, variant, "args", "too_many", "error",
                          lambda a: OrderedDict(list(a.items()) + [("extra", torch.ones(1))])))
        to_meta = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v  # noqa: E731
        cases.append(Case(op, variant, "all", "meta", "ok", lambda a: OrderedDict(
            (k, [to_meta(p) for p in v] if k == "params" else to_meta(v)) for k, v in a.items())))
    return cases


def schema_names(op: str) -> list[str]:
    return [a.name for a in getattr(torch.ops.fastrnn, op).default._schema.arguments]


def schema_optional(op: str) -> set[str]:
    return {a.name for a in getattr(torch.ops.fastrnn, op).default._schema.arguments
            if str(a.type).startswith("Optional") or str(a.type).endswith("?")}


# ------------------------------------------------------------------------------ mutations
# Each mutation maps a tensor to a malformed replacement (or None to skip the case).
def _cat1(t, dim):
    return torch.cat([t, t.narrow(dim, 0, 1)], dim)


ERROR_MUTATIONS = {
    "rank_up": lambda t: t.unsqueeze(0),
    "rank_down": lambda t: t.select(0, 0) if t.dim() >= 1 and t.size(0) > 0 else None,
    "size_last+1": lambda t: _cat1(t, -1) if t.dim() >= 1 and t.size(-1) > 0 else None,
    "size_first+1": lambda t: _cat1(t, 0) if t.dim() >= 2 and t.size(0) > 0 else None,
    "float64": lambda t: t.double() if t.dtype != torch.float64 else t.float(),
    "float16": lambda t: t.half(),
    "bfloat16": lambda t: t.bfloat16() if t.dtype != torch.bfloat16 else t.float(),
    "int64": lambda t: t.long() if t.dtype != torch.int64 else None,
    "int32": lambda t: t.int(),
    "meta": lambda t: t.to("meta"),
    "empty_1d": lambda t: torch.empty(0, dtype=t.dtype),
    "zero_last_dim": lambda t: t.narrow(-1, 0, 0) if t.dim() >= 2 else None,
}


def _strided(t):
    """Same values, last dimension with stride 2."""
    if t.dim() == 0 or t.numel() == 0:
        return None
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    v = buf[..., ::2]
    v.copy_(t)
    return v


def _column_major(t):
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 and t.numel() > 1 else None


def _offset(t):
    """Contiguous, but not at the start of its storage."""
    if t.dim() == 0:
        return None
    return torch.cat([torch.full_like(t.reshape(-1)[:1], 99), t.reshape(-1)])[1:].view(t.shape) if t.numel() else None


def _expanded(t):
    """Stride 0 along dimension 0 (values differ from t; compared to their contiguous copy)."""
    return t[:1].expand_as(t) if t.dim() >= 1 and t.size(0) > 1 else None


LAYOUT_MUTATIONS = {"strided": _strided, "column_major": _column_major, "offset": _offset, "expanded": _expanded}


class Case:
    def __init__(self, op, variant, arg, what, expect, fn):
        self.id = f"{op}-{variant}-{arg}-{what}"
        self.op, self.variant, self.arg, self.what, self.expect, self.fn = op, variant, arg, what, expect, fn


def _set(arg, value):
    def fn(args):
        args[arg] = value(args[arg]) if callable(value) else value
        return args
    return fn


def copy_cases() -> list[Case]:
    op, v = "state_copy", "dense"
    cases = [Case(op, v, "x", "None", "error", _set("x", None)),
             Case(op, v, "x", "python_list", "error", _set("x", lambda t: t.tolist())),
             Case(op, v, "x", "int", "error", _set("x", 3)),
             Case(op, v, "args", "too_few", "error", lambda a: OrderedDict()),
             Case(op, v, "args", "too_many", "error",
                  lambda a: OrderedDict(list(a.items()) + [("extra", torch.ones(1))])),
             Case(op, v, "all", "meta", "ok", lambda a: OrderedDict(x=a["x"].to("meta"))),
             Case(op, v, "batch", "zero", "ok", lambda a: base_args(op, v, batch=0))]
    base = base_args(op, v)["x"]
    cases += [Case(op, v, "x", what, "same", _set("x", mut)) for what, mut in LAYOUT_MUTATIONS.items()
              if mut(base) is not None]
    return cases


def _variants(op):
    if op in COPY_OPS:
        return ["dense"]
    if op in ATTENTION_OPS:
        return ["dense", "masked"]
    if op in STACK_OPS:
        return list(STACK_CONFIGS)
    cell = cell_kind(op)[0]
    if cell.startswith("variant_"):
        return ["dense", "packed"]
    return ["dense", "proj", "packed", "bf16"] if cell in ("lstm", "lstm_bidir") else ["dense", "packed", "bf16"]


def build_cases() -> list[Case]:
    cases = []
    for op in OPS:
        if op in STACK_OPS:
            cases += stack_cases()
            continue
        if op in COPY_OPS:
            cases += copy_cases()
            continue
        cell, kind = cell_kind(op)
        attention = op in ATTENTION_OPS
        optional = schema_optional(op)
        for variant in _variants(op):
            args = base_args(op, variant)
            packed = variant == "packed"
            for arg, value in args.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if packed and arg != "batch_sizes" and arg not in ("input", "hx"):
                    # the packed variant adds coverage for packed-specific arguments; per-argument
                    # malformations of weights and workspaces are covered by the dense variants
                    muts = {k: ERROR_MUTATIONS[k] for k in ("meta",)}
                else:
                    muts = ERROR_MUTATIONS
                for what, mut in muts.items():
                    if mut(value) is None:
                        continue
                    if kind == "forward" and not packed and arg == "input" and what == "size_first+1":
                        # a longer sequence is a valid call (not with a zoneout mask of the old length)
                        expect = "error" if cell.startswith("variant_") else "ok"
                        cases.append(Case(op, variant, arg, "one_more_step", expect, _set(arg, mut)))
                        continue
                    expect = "ok" if (op, arg, what) in ATTENTION_OK else "error"
                    if arg in ("proj_input", "proj_input_r") and variant != "proj" and what == "empty_1d":
                        expect = "ok"  # the (0,) tensor expected without w_hr
                    cases.append(Case(op, variant, arg, what, expect, _set(arg, mut)))
                for what, mut in LAYOUT_MUTATIONS.items():
                    if arg == "batch_sizes" and what == "expanded":
                        continue  # changes the sum of batch_sizes: a malformed call, covered below
                    if mut(value) is None:
                        continue
                    cases.append(Case(op, variant, arg, what, "same", _set(arg, mut)))
                # without peepholes or a zoneout mask the variant ops are still valid calls
                none_ok = ((cell.startswith("variant_") and arg in ("w_peep", "zoneout_mask"))
                           or (op, arg, "None") in ATTENTION_OK)
                cases.append(Case(op, variant, arg, "None", "ok" if none_ok else "error", _set(arg, None)))
                cases.append(Case(op, variant, arg, "python_list", "error", _set(arg, lambda t: t.tolist())))
            # a required-by-this-config optional argument missing is covered above ("None"); here:
            # (None for a bool is not in the table: torch's op binding converts it to False, as it
            # does for aten ops.)
            for arg, value in args.items():
                if isinstance(value, bool):
                    cases.append(Case(op, variant, arg, "str", "error", _set(arg, "yes")))
                    cases.append(Case(op, variant, arg, "tensor", "error", _set(arg, torch.ones(2))))
            # the recurrent backward ops' output_mask (input, weights, states): a list of 3 bools, which
            # may be left out (all computed)
            if "output_mask" in args:
                for what, v in (("short", [True]), ("long", [True] * 4), ("str", "yes"), ("None", None),
                                ("tensor", torch.ones(3, dtype=torch.bool))):
                    cases.append(Case(op, variant, "output_mask", what, "error", _set("output_mask", v)))
                cases.append(Case(op, variant, "output_mask", "all_false", "ok", _set("output_mask", [False] * 3)))
                cases.append(Case(op, variant, "output_mask", "omitted", "same",
                                  lambda a: OrderedDict(list(a.items())[:-1])))
            # (the last argument without a default value left out)
            n_required = len(args) - ("output_mask" in args)
            cases.append(Case(op, variant, "args", "too_few", "error",
                              lambda a, n=n_required: OrderedDict(list(a.items())[:n - 1])))
            cases.append(Case(op, variant, "args", "too_many", "error",
                              lambda a: OrderedDict(list(a.items()) + [("extra", torch.ones(1))])))
            cases.append(Case(op, variant, "all", "meta", "ok",
                              lambda a: OrderedDict((k, v.to("meta") if isinstance(v, torch.Tensor) else v)
                                                    for k, v in a.items())))
            if attention:
                cases.append(Case(op, variant, "batch", "zero", "ok",
                                  lambda a, op=op, variant=variant: base_args(op, variant, batch=0)))
                if op.startswith("sdpa"):
                    cases.append(Case(op, variant, "is_causal", "with_attn_mask" if variant == "masked" else "true",
                                      "error" if variant == "masked" else "ok", _set("is_causal", True)))
            elif not packed:
                cases.append(Case(op, variant, "batch_sizes", "given_for_dense_input", "error",
                                  _set("batch_sizes", torch.tensor([B] * T))))
                cases.append(Case(op, variant, "batch", "zero", "ok",
                                  lambda a, op=op, variant=variant: base_args(op, variant, batch=0)))
            else:
                bad = {
                    "negative": [3, 3, -1, 4], "unsorted": [1, 2, 3, 3], "sum_too_small": [3, 2, 2, 1],
                    "sum_too_large": [3, 3, 2, 2], "zero_entry": [3, 3, 3, 0], "first_ne_hx_batch": [4, 2, 2, 1],
                    "all_zero": [0, 0, 0, 0], "one_step_too_many_rows": [9],
                    "int64_overflow_sum": [2 ** 63 - 1, 2 ** 63 - 1, sum(BATCH_SIZES) + 2],
                    "huge_first": [2 ** 40, 1, 1, 1],
                }
                for what, v in bad.items():
                    cases.append(Case(op, variant, "batch_sizes", what, "error",
                                      _set("batch_sizes", torch.tensor(v, dtype=torch.int64))))
                cases.append(Case(op, variant, "batch_sizes", "2d", "error",
                                  _set("batch_sizes", torch.tensor([BATCH_SIZES]))))
                cases.append(Case(op, variant, "input", "dense_3d_with_batch_sizes", "error",
                                  _set("input", lambda t: t.reshape(3, 3, I))))
            if cell.startswith("variant_"):
                for what, p in (("above_one", 1.5), ("negative", -0.25), ("nan", float("nan"))):
                    cases.append(Case(op, variant, "zoneout_p", what, "error", _set("zoneout_p", p)))
            if kind == "backward" and cell in ("lstm", "lstm_bidir", "gru", "gru_bidir", "variant_lstm", "variant_gru"):
                ws = ["gates", "cells", "proj_input"] if cell.startswith("lstm") else ["gates", "hn"]
                if variant != "proj":
                    ws = ws[:2]
                if cell.endswith("_bidir"):
                    ws = ws + [w + "_r" for w in ws]
                if cell.startswith("variant_"):
                    ws = ["gates", "cells" if cell == "variant_lstm" else "hn", "norm", "stats"]
                for w in ws:
                    cases.append(Case(op, variant, w, "transposed_shape", "error", _set(w, lambda t: t.reshape(
                        t.shape[1], t.shape[0]) if t.dim() == 2 else t.reshape(-1))))
                    cases.append(Case(op, variant, w, "from_train_false", "error",
                                      _set(w, lambda t: torch.empty(0, dtype=t.dtype))))
            if kind == "backward" and "output" in args:
                cases.append(Case(op, variant, "output", "from_shorter_sequence", "error",
                                  _set("output", lambda t: t[:-1])))
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


# ------------------------------------------------------------------------------ the child process
def _call(op, args):
    return getattr(torch.ops.fastrnn, op)(*args.values())


def _flat(res):
    return list(res) if isinstance(res, (tuple, list)) else [res]


def _expected_shapes_ok(op, args, res):
    """For calls expected to work: output shapes follow the inputs (checked against a CPU run of the
    same call where the inputs are not meta)."""
    out = _flat(res)
    if op in COPY_OPS:
        return len(out) == 1 and out[0].shape == args["x"].shape and out[0].is_contiguous()
    if op in STACK_OPS:
        D = 2 if args["bidirectional"] else 1
        P_out = args["hx"].shape[-1]  # proj_size, or hidden_size
        c_shape = tuple(args["cx"].shape) if args["cx"] is not None else (0,)
        return (tuple(out[0].shape) == (*args["input"].shape[:-1], D * P_out)
                and tuple(out[1].shape) == tuple(args["hx"].shape) and tuple(out[2].shape) == c_shape)
    if op in ATTENTION_OPS:
        first = args["query"] if op.startswith("sdpa") else args["query_proj"]
        if op.endswith("_backward"):
            return all(isinstance(t, torch.Tensor) for t in out) and tuple(out[0].shape) == tuple(first.shape)
        value = args["value"] if op.startswith("sdpa") else args["values"]
        return tuple(out[0].shape) == (*first.shape[:-1], value.shape[-1])
    if op.endswith("_backward"):
        # (grad_input: empty where output_mask leaves it out)
        gi_shape = tuple(args["input"].shape) if args.get("output_mask", [True])[0] else (0,)
        return all(isinstance(t, torch.Tensor) for t in out) and tuple(out[0].shape) == gi_shape
    H_out = args["w_hr"].shape[0] if args.get("w_hr") is not None else args["w_ih"].shape[0] // GATES[cell_kind(op)[0]]
    return tuple(out[0].shape) == (*args["input"].shape[:-1], H_out) and tuple(out[1].shape) == tuple(
        args["hx"].shape)


def run_case(case: Case) -> dict:
    args = case.fn(base_args(case.op, case.variant))
    try:
        res = _call(case.op, args)
    except Exception as e:  # noqa: BLE001 -- the type is the result
        return {"status": "raised", "type": type(e).__name__, "msg": str(e).splitlines()[0][:300] if str(e) else ""}
    if case.expect == "error":
        out = _flat(res)
        desc = [f"{t.device}:{tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(t) for t in out]
        return {"status": "returned", "msg": ", ".join(desc)}
    if case.expect == "ok":
        return {"status": "ok" if _expected_shapes_ok(case.op, args, res) else "bad_shapes",
                "msg": str([tuple(t.shape) for t in _flat(res)])}
    # "same": the call with the layout-mutated argument equals the call with its contiguous copy
    ref_args = OrderedDict((k, v.contiguous() if k == case.arg and isinstance(v, torch.Tensor) else v)
                           for k, v in args.items())
    if case.arg.startswith("params["):  # one element of recurrent_stack's list
        k = int(case.arg[len("params["):-1])
        ref_args["params"] = [p.contiguous() if i == k else p for i, p in enumerate(args["params"])]
        mutated = args["params"][k]  # (the case tests a layout: not the plain one)
        assert not mutated.is_contiguous() or mutated.storage_offset() != 0, case.id
    ref = _flat(_call(case.op, ref_args))
    got = _flat(res)
    bad = [i for i, (a, b) in enumerate(zip(got, ref)) if a.shape != b.shape or not torch.equal(a, b)]
    if bad:
        diffs = [float((got[i] - ref[i]).abs().max()) if got[i].shape == ref[i].shape and got[i].numel() else None
                 for i in bad]
        return {"status": "differs", "msg": f"outputs {bad} differ, max abs diff {diffs}"}
    return {"status": "same"}


def child_main(ids: list[str]) -> None:
    torch.set_num_threads(1)
    by_id = {c.id: c for c in build_cases()}
    for cid in ids:
        print(json.dumps({"start": cid}), flush=True)
        if cid == "__selftest_abort__":
            os.abort()
        try:
            r = run_case(by_id[cid])
        except Exception as e:  # noqa: BLE001
            r = {"status": "harness_error", "msg": f"{type(e).__name__}: {e}"}
        r["id"] = cid
        print(json.dumps(r), flush=True)


def _crash_report(err: str) -> str:
    """The head of a sanitizer / fatal-error report if there is one (its first frames name the
    culprit), else the tail of stderr."""
    lines = err.splitlines()
    for i, line in enumerate(lines):
        if any(k in line for k in ("runtime error:", "ERROR: AddressSanitizer", "Fatal Python error",
                                   "Segmentation fault", "terminate called")):
            return "\n".join(lines[i:i + 12])
    return err[-3000:]


def run_table(ids: list[str], timeout: float = 300.0) -> dict[str, dict]:
    """Runs the cases in child processes; a case that kills its child is recorded as crashed."""
    results: dict[str, dict] = {}
    todo = list(ids)
    while todo:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)))
        try:
            out, err = proc.communicate(json.dumps(todo), timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err = f"[killed after {timeout:.0f} s]\n" + err
        started = None
        for line in out.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "start" in rec:
                started = rec["start"]
            elif "id" in rec:
                results[rec["id"]] = rec
                started = None
        todo = [i for i in todo if i not in results]
        if not todo:
            break
        victim = started if started is not None else todo[0]
        results[victim] = {"id": victim, "status": "crashed",
                           "msg": f"child exit code {proc.returncode}; stderr:\n{_crash_report(err)}"}
        todo = [i for i in todo if i != victim]
    return results


# ------------------------------------------------------------------------------ the tests
CASES = build_cases()


@pytest.fixture(scope="module")
def table():
    return run_table([c.id for c in CASES])


def test_table_covers_every_registered_op():
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastrnn::")}
    assert registered == set(OPS), f"registered fastrnn ops changed: {sorted(registered)}"
    for op in OPS:
        for variant in _variants(op):
            assert list(base_args(op, variant)) == schema_names(op), op
        assert any(c.op == op and c.expect == "error" for c in CASES)


def test_harness_catches_a_crash():
    """A case that kills the child is reported as crashed, and the cases after it still run."""
    ids = [CASES[0].id, "__selftest_abort__", CASES[1].id]
    r = run_table(ids)
    assert r["__selftest_abort__"]["status"] == "crashed"
    assert r[CASES[0].id]["status"] == r[CASES[1].id]["status"] == "raised"


def test_valid_base_calls_work():
    for op in OPS:
        for variant in _variants(op):
            res = _flat(_call(op, base_args(op, variant)))
            assert all(torch.isfinite(t).all() for t in res if t.numel()), (op, variant)


def _check(case, r):
    assert r["status"] not in ("crashed", "harness_error"), f"{case.id}: {r['status']}: {r.get('msg')}"
    if case.expect == "error":
        assert r["status"] == "raised", f"{case.id}: malformed call returned ({r.get('msg')}) instead of raising"
        assert r["type"] in ALLOWED, f"{case.id}: raised {r['type']}: {r['msg']}"
    elif case.expect == "ok":
        assert r["status"] == "ok", f"{case.id}: {r}"
    else:
        assert r["status"] == "same", f"{case.id}: {r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_call(case, table):
    _check(case, table[case.id])


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        child_main(json.loads(sys.stdin.read()))
    else:
        print(f"{len(CASES)} cases; run with pytest")
