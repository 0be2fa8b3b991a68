"""Serialization: pickle, torch.save/torch.load of whole modules, state_dict round trips, copy,
and torch.export (static and dynamic batch / sequence length, save/load of the program) of
models built from fastrnn.LSTM, GRU and RNN.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.export import Dim

import fastrnn
from conftest import Tagger, assert_close

F64 = torch.float64

LAYERS = {
    "lstm": lambda: fastrnn.LSTM(6, 10, num_layers=2, bidirectional=True, batch_first=True),
    "lstm_proj": lambda: fastrnn.LSTM(6, 10, proj_size=4, dropout=0.0),
    "gru": lambda: fastrnn.GRU(6, 10, num_layers=2, bias=False),
    "rnn": lambda: fastrnn.RNN(6, 10, nonlinearity="relu", bidirectional=True),
    "lstm_cell": lambda: fastrnn.LSTMCell(6, 10),
    "gru_cell": lambda: fastrnn.GRUCell(6, 10, bias=False),
    "rnn_cell": lambda: fastrnn.RNNCell(6, 10, nonlinearity="relu"),
    "converted": lambda: fastrnn.convert(nn.GRU(6, 10, batch_first=True)),
}


def _input(name):
    g = torch.Generator().manual_seed(1)
    if name.endswith("cell"):
        return torch.randn(3, 6, dtype=F64, generator=g)
    return torch.randn(3, 5, 6, dtype=F64, generator=g)


def _outputs(m, x):
    out = m(x)
    flat = []
    for o in (out if isinstance(out, tuple) else (out,)):
        flat.extend(o if isinstance(o, tuple) else (o,))
    return flat


def _assert_same_module(a, b, x):
    assert type(a) is type(b)
    assert repr(a) == repr(b)
    assert a.training == b.training
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
        assert sa[k].data_ptr() != sb[k].data_ptr(), f"{k}: shares storage with the original"
    with torch.no_grad():
        for p, q in zip(_outputs(a, x), _outputs(b, x)):
            assert torch.equal(p, q)
    # and the copy trains: gradients flow to its own parameters
    sum(o.sum() for o in _outputs(b, x)).backward()
    assert all(p.grad is not None for p in b.parameters())
    assert all(p.grad is None for p in a.parameters())


@pytest.mark.parametrize("name", list(LAYERS))
def test_pickle_roundtrip(name):
    torch.manual_seed(0)
    m = LAYERS[name]().double()
    m(_input(name))  # a forward first: no native state may leak into the pickle
    _assert_same_module(m, pickle.loads(pickle.dumps(m)), _input(name))


@pytest.mark.parametrize("name", list(LAYERS))
def test_torch_save_load_whole_module(name, tmp_path):
    torch.manual_seed(0)
    m = LAYERS[name]().double().eval()
    path = tmp_path / "m.pt"
    torch.save(m, path)
    m2 = torch.load(path, weights_only=False)
    _assert_same_module(m, m2, _input(name))


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_deepcopy(name):
    m = LAYERS[name]().double()
    _assert_same_module(m, copy.deepcopy(m), _input(name))


@pytest.mark.parametrize("name", list(LAYERS))
def test_state_dict_file_roundtrip(name, tmp_path):
    """state_dict -> file -> a freshly initialised module (weights_only load) gives the same
    outputs; and the torch.nn twin loads the same file."""
    torch.manual_seed(0)
    m = LAYERS[name]().double()
    path = tmp_path / "sd.pt"
    torch.save(m.state_dict(), path)
    torch.manual_seed(1)
    fresh = LAYERS[name]().double()
    x = _input(name)
    assert not torch.equal(_outputs(fresh, x)[0], _outputs(m, x)[0])
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for p, q in zip(_outputs(fresh, x), _outputs(m, x)):
        assert torch.equal(p, q)
    twin = fresh.to_torch() if hasattr(fresh, "to_torch") else None
    if twin is not None:
        ref = type(twin)(**_ctor_kwargs(twin)).double()
        ref.load_state_dict(torch.load(path, weights_only=True), strict=True)
        for p, q in zip(_outputs(ref, x), _outputs(m, x)):
            assert_close(p, q)


def _ctor_kwargs(t):
    """Constructor arguments of a torch.nn recurrent module (for a fresh, non-meta instance)."""
    if isinstance(t, nn.RNNCellBase):
        kw = dict(input_size=t.input_size, hidden_size=t.hidden_size, bias=t.bias)
        if isinstance(t, nn.RNNCell):
            kw["nonlinearity"] = t.nonlinearity
        return kw
    kw = dict(input_size=t.input_size, hidden_size=t.hidden_size, num_layers=t.num_layers, bias=t.bias,
              batch_first=t.batch_first, dropout=t.dropout, bidirectional=t.bidirectional)
    if isinstance(t, nn.LSTM):
        kw["proj_size"] = t.proj_size
    if isinstance(t, nn.RNN):
        kw["nonlinearity"] = t.nonlinearity
    return kw


# ------------------------------------------------------------------------------ torch.export
EXPORT_MODELS = {
    "gru": lambda: fastrnn.GRU(8, 12, num_layers=2, batch_first=True),
    "rnn": lambda: fastrnn.RNN(8, 12, bidirectional=True, batch_first=True, nonlinearity="relu"),
    "lstm_proj_bi": lambda: fastrnn.LSTM(8, 12, proj_size=4, bidirectional=True, batch_first=True),
}


@pytest.mark.parametrize("dynamic", ["static", "batch", "batch_and_seq"])
@pytest.mark.parametrize("name", list(EXPORT_MODELS))
def test_export_matches_eager(name, dynamic):
    torch.manual_seed(0)
    model = Tagger(EXPORT_MODELS[name](), return_state=True).eval()
    tokens = torch.randint(0, 20, (3, 7))
    dims = {"static": None,
            "batch": {"tokens": {0: Dim("batch", min=1, max=64)}},
            "batch_and_seq": {"tokens": {0: Dim("batch", min=1, max=64), 1: Dim("seq", min=1, max=512)}}}[dynamic]
    ep = torch.export.export(model, (tokens,), dynamic_shapes=dims)
    assert any("fastrnn" in str(n.target) for n in ep.graph.nodes), "the fused op is not in the graph"
    shapes = {"static": [(3, 7)], "batch": [(3, 7), (1, 7), (11, 7)],
              "batch_and_seq": [(3, 7), (1, 1), (6, 13), (2, 40)]}[dynamic]
    for shape in shapes:
        t = torch.randint(0, 20, shape)
        for a, b in zip(ep.module()(t), model(t)):
            assert a.shape == b.shape
            assert_close(a, b)
    if dynamic != "static":
        with pytest.raises(Exception):
            ep.module()(torch.randint(0, 20, (65, 7)))  # outside the declared range


@pytest.mark.parametrize("name", list(EXPORT_MODELS))
def test_exported_program_save_load(name, tmp_path):
    torch.manual_seed(0)
    model = Tagger(EXPORT_MODELS[name](), return_state=True).eval()
    tokens = torch.randint(0, 20, (3, 7))
    ep = torch.export.export(model, (tokens,), dynamic_shapes={"tokens": {0: Dim("batch", min=1, max=64)}})
    path = tmp_path / "prog.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    t = torch.randint(0, 20, (5, 7))
    for a, b in zip(loaded.module()(t), model(t)):
        assert_close(a, b)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_jit_trace(kind):
    """torch.jit.trace (its default sanity check included) records the fused ops; the traced
    module matches eager, forward and backward."""
    m = getattr(fastrnn, kind)(3, 6, num_layers=2, bidirectional=True).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    traced = torch.jit.trace(m, x)
    assert "fastrnn::" in str(traced.graph)
    y = torch.randn(7, 4, 3, dtype=torch.float64, requires_grad=True)
    out_t, out_e = traced(y)[0], m(y)[0]
    assert_close(out_t, out_e)
    g_t, = torch.autograd.grad(out_t.sum(), y)
    g_e, = torch.autograd.grad(out_e.sum(), y)
    assert_close(g_t, g_e)
