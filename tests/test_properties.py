"""Property-based tests (hypothesis): random shapes and arguments, fastrnn vs torch.nn and vs the
plain-PyTorch references, in float64 -- outputs, final states and every gradient.

Bounded and reproducible: a fixed number of examples per property, derandomize=True (the same
examples every run, no example database), no deadline. Each property counts the examples it
ran and asserts that it ran enough of them (a misconfigured strategy that rejects everything
fails instead of passing vacuously); the counts are printed in the terminal summary line of
each test and recorded as the `examples` property of the test (junit XML).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
from fastrnn import functional as FR
from fastrnn import reference as R
from conftest import assert_close, flat, isa_builds

F64 = torch.float64
MAX_EXAMPLES = {"layers": 60, "cells": 40, "ops": 60}
PROPERTY_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_count: dict[str, int] = {}


def _run_property(name, prop, request, record_property, capsys):
    """Runs a @given function, then checks and reports how many examples it executed."""
    _count[name] = 0
    prop()
    n = _count[name]
    record_property("examples", n)
    with capsys.disabled():
        print(f"\n[hypothesis] {request.node.name}: {n} examples")
    # derandomized runs may stop a little short of max_examples when they exhaust small parts of
    # the space, never by much
    assert n >= 0.8 * MAX_EXAMPLES[name], f"only {n} examples ran"


def _compare_modules(ref, ours, x, hx, extra_leaves, seed):
    r = ref(x) if hx is None else ref(x, hx)
    o = ours(x) if hx is None else ours(x, hx)
    rf, of = flat(r), flat(o)
    assert len(rf) == len(of)
    for a, b in zip(of, rf):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close(a, b)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(t.shape, dtype=F64, generator=g) for t in rf]
    lr = list(extra_leaves) + list(ref.parameters())
    lo = list(extra_leaves) + list(ours.parameters())
    gr = torch.autograd.grad(rf, lr, cot, allow_unused=True, retain_graph=True)
    go = torch.autograd.grad(of, lo, cot, allow_unused=True)
    names = [f"leaf{i}" for i in range(len(extra_leaves))] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, go, gr):
        if a is None or b is None:  # B = 0: no graph may reach a leaf; the other side must be zero then
            other = a if a is not None else b
            assert other is None or not other.any(), name
            continue
        assert_close(a, b, msg=name)
    return r, o


# ------------------------------------------------------------------------------ layers
@st.composite
def layer_cases(draw):
    kind = draw(st.sampled_from(["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]))
    H = draw(st.integers(1, 40))
    c = dict(kind=kind, I=draw(st.integers(1, 24)), H=H, num_layers=draw(st.integers(1, 3)),
             bidirectional=draw(st.booleans()), batch_first=draw(st.booleans()), bias=draw(st.booleans()),
             proj_size=0, T=draw(st.integers(1, 7)), mode=draw(st.sampled_from(["dense", "packed", "unbatched"])),
             with_hx=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31 - 1)))
    if kind == "LSTM" and H > 1 and draw(st.booleans()):
        c["proj_size"] = draw(st.integers(1, H - 1))
    if c["mode"] == "dense":
        c["B"] = draw(st.integers(0, 9))
    elif c["mode"] == "packed":
        c["B"] = draw(st.integers(1, 9))
        c["lengths"] = draw(st.lists(st.integers(1, c["T"]), min_size=c["B"], max_size=c["B"]))
    else:
        c["B"] = None
    return c


def _make_layer_pair(c):
    kw = dict(num_layers=c["num_layers"], bidirectional=c["bidirectional"], batch_first=c["batch_first"],
              bias=c["bias"])
    kind = c["kind"]
    if kind == "LSTM":
        kw["proj_size"] = c["proj_size"]
    if kind.startswith("RNN"):
        kw["nonlinearity"] = kind.split("_")[1].lower()
    name = kind.split("_")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(nn, name)(c["I"], c["H"], **kw).to(F64)
        ours = getattr(fastrnn, name)(c["I"], c["H"], **kw).to(F64)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@settings(max_examples=MAX_EXAMPLES["layers"], **PROPERTY_SETTINGS)
@given(layer_cases())
@example(dict(kind="LSTM", I=3, H=17, num_layers=2, bidirectional=True, batch_first=False, bias=True, proj_size=5,
              T=4, mode="packed", B=5, lengths=[1, 4, 2, 4, 3], with_hx=True, seed=1))
@example(dict(kind="GRU", I=5, H=33, num_layers=1, bidirectional=True, batch_first=True, bias=False, proj_size=0,
              T=3, mode="dense", B=0, with_hx=True, seed=2))
def _layer_property(c):
    _count["layers"] += 1
    torch.manual_seed(c["seed"])
    ref, ours = _make_layer_pair(c)
    D = 2 if c["bidirectional"] else 1
    P = c["proj_size"] or c["H"]
    T, B = c["T"], c["B"]
    leaves = []
    if c["mode"] == "packed":
        padded = torch.randn(B, T, c["I"], dtype=F64, requires_grad=True)
        x = pack_padded_sequence(padded, torch.tensor(c["lengths"]), batch_first=True, enforce_sorted=False)
        leaves.append(padded)
    elif c["mode"] == "dense":
        x = torch.randn(*((B, T) if c["batch_first"] else (T, B)), c["I"], dtype=F64, requires_grad=True)
        leaves.append(x)
    else:
        x = torch.randn(T, c["I"], dtype=F64, requires_grad=True)
        leaves.append(x)
    hx = None
    if c["with_hx"]:
        lead = (c["num_layers"] * D,) + (() if B is None else (B,))
        h0 = torch.randn(*lead, P, dtype=F64, requires_grad=True)
        hx = h0
        leaves.append(h0)
        if c["kind"] == "LSTM":
            c0 = torch.randn(*lead, c["H"], dtype=F64, requires_grad=True)
            hx = (h0, c0)
            leaves.append(c0)
    r, o = _compare_modules(ref, ours, x, hx, leaves, c["seed"])
    if c["mode"] == "packed":
        assert isinstance(o[0], PackedSequence)
        assert torch.equal(o[0].batch_sizes, r[0].batch_sizes)
        assert torch.equal(o[0].unsorted_indices, r[0].unsorted_indices)


def test_layers_match_torch_property(request, record_property, capsys):
    _run_property("layers", _layer_property, request, record_property, capsys)


# ------------------------------------------------------------------------------ cells
@settings(max_examples=MAX_EXAMPLES["cells"], **PROPERTY_SETTINGS)
@given(kind=st.sampled_from(["LSTMCell", "GRUCell", "RNNCell_tanh", "RNNCell_relu"]), I=st.integers(1, 24),
       H=st.integers(1, 40), B=st.one_of(st.none(), st.integers(0, 9)), bias=st.booleans(), with_hx=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1))
def _cell_property(kind, I, H, B, bias, with_hx, seed):
    _count["cells"] += 1
    torch.manual_seed(seed)
    name, _, nl = kind.partition("_")
    kw = dict(nonlinearity=nl) if nl else {}
    ref = getattr(nn, name)(I, H, bias=bias, **kw).to(F64)
    ours = getattr(fastrnn, name)(I, H, bias=bias, **kw).to(F64)
    ours.load_state_dict(ref.state_dict(), strict=True)
    lead = () if B is None else (B,)
    x = torch.randn(*lead, I, dtype=F64, requires_grad=True)
    leaves, hx = [x], None
    if with_hx:
        hs = [torch.randn(*lead, H, dtype=F64, requires_grad=True) for _ in range(2 if name == "LSTMCell" else 1)]
        leaves += hs
        hx = tuple(hs) if name == "LSTMCell" else hs[0]
    _compare_modules(ref, ours, x, hx, leaves, seed)


def test_cells_match_torch_property(request, record_property, capsys):
    _run_property("cells", _cell_property, request, record_property, capsys)


# ------------------------------------------------------------------------------ raw ops
GATES = {"lstm": 4, "lstm_proj": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


@st.composite
def op_cases(draw):
    cell = draw(st.sampled_from(list(GATES)))
    H = draw(st.integers(2 if cell == "lstm_proj" else 1, 40))
    c = dict(cell=cell, T=draw(st.integers(1, 8)), I=draw(st.integers(1, 24)), H=H,
             P=draw(st.integers(1, H - 1)) if cell == "lstm_proj" else H, bias=draw(st.booleans()),
             reverse=draw(st.booleans()), packed=draw(st.booleans()),
             backend=draw(st.sampled_from(["auto", "blas", "generic", "onednn", "fused"])),
             isa=draw(st.sampled_from(isa_builds())), seed=draw(st.integers(0, 2 ** 31 - 1)))
    if c["packed"]:
        lengths = draw(st.lists(st.integers(1, c["T"]), min_size=1, max_size=9))
        lengths = sorted(lengths, reverse=True)
        c["T"] = lengths[0]
        c["batch_sizes"] = [sum(1 for n in lengths if n > t) for t in range(c["T"])]
        c["B"] = len(lengths)
    else:
        c["B"] = draw(st.integers(0, 9))
    return c


def _op_tensors(c):
    g = torch.Generator().manual_seed(c["seed"])
    r = lambda *s: (torch.randn(*s, dtype=F64, generator=g) * 0.5).requires_grad_()  # noqa: E731
    G, H, P, I, B = GATES[c["cell"]], c["H"], c["P"], c["I"], c["B"]
    w = dict(w_ih=r(G * H, I), w_hh=r(G * H, P), b_ih=r(G * H) if c["bias"] else None,
             b_hh=r(G * H) if c["bias"] else None)
    if c["cell"] == "lstm_proj":
        w["w_hr"] = r(P, H)
    bsz = torch.tensor(c["batch_sizes"], dtype=torch.int64) if c["packed"] else None
    x = r(sum(c["batch_sizes"]), I) if c["packed"] else r(c["T"], B, I)
    st_ = dict(hx=r(B, P))
    if c["cell"].startswith("lstm"):
        st_["cx"] = r(B, H)
    return x, st_, w, bsz


def _run_op(fns, c, x, st_, w, bsz):
    cell = c["cell"]
    if cell.startswith("lstm"):
        return fns[0](x, st_["hx"], st_["cx"], w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], w.get("w_hr"), bsz,
                      c["reverse"])
    if cell == "gru":
        return fns[1](x, st_["hx"], w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], bsz, c["reverse"])
    return fns[2](x, st_["hx"], w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], bsz, c["reverse"], cell.split("_")[1])


@settings(max_examples=MAX_EXAMPLES["ops"], **PROPERTY_SETTINGS)
@given(op_cases())
def _op_property(c):
    _count["ops"] += 1
    from fastrnn import _C
    old = _C.get_gemm_backend(), _C.get_isa()
    _C.set_gemm_backend(c["backend"])
    _C.set_isa(c["isa"])
    try:
        x, st_, w, bsz = _op_tensors(c)
        outs = _run_op((FR.lstm_layer, FR.gru_layer, FR.rnn_layer), c, x, st_, w, bsz)
        refs = _run_op((R.lstm_layer_ref, R.gru_layer_ref, R.rnn_layer_ref), c, x, st_, w, bsz)
        assert len(outs) == len(refs)
        for o, r in zip(outs, refs):
            assert o.shape == r.shape
            assert_close(o, r)
        g = torch.Generator().manual_seed(c["seed"] + 1)
        cot = [torch.randn(t.shape, dtype=F64, generator=g) for t in refs]
        leaves = [t for t in [x, *st_.values(), *w.values()] if t is not None]
        gf = torch.autograd.grad(outs, leaves, cot, allow_unused=True)
        gr = torch.autograd.grad(refs, leaves, cot, allow_unused=True)
        for i, (a, b) in enumerate(zip(gf, gr)):
            if c["B"] == 0 and (a is None or b is None):
                continue
            assert a is not None and b is not None, f"leaf {i}: gradient missing"
            assert_close(a, b, msg=f"leaf {i}")
    finally:
        _C.set_gemm_backend(old[0])
        _C.set_isa(old[1])


def test_ops_match_reference_property(request, record_property, capsys):
    _run_property("ops", _op_property, request, record_property, capsys)
