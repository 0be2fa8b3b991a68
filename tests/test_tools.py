"""The layers under tools that take a model apart, where torch.nn's layers have a behaviour
third-party code relies on: torch.fx.symbolic_trace (layers are leaf calls), torch.jit.script
(compiles), and the meta device (shape-only forwards for deferred init and FLOP counting)."""
import copy

import pytest
import torch
from torch import nn

import fastrnn
from conftest import assert_close

# (fastrnn layer, torch.nn layer or None, constructor args, an input)
LAYERS = {
    "LSTM": (fastrnn.LSTM, nn.LSTM, (6, 5), dict(num_layers=2, bidirectional=True), (4, 3, 6)),
    "LSTM_proj": (fastrnn.LSTM, nn.LSTM, (6, 5), dict(proj_size=3, batch_first=True), (3, 4, 6)),
    "GRU": (fastrnn.GRU, nn.GRU, (6, 5), dict(batch_first=True), (3, 4, 6)),
    "RNN": (fastrnn.RNN, nn.RNN, (6, 5), dict(nonlinearity="relu"), (4, 3, 6)),
    "LSTMCell": (fastrnn.LSTMCell, nn.LSTMCell, (6, 5), {}, (3, 6)),
    "GRUCell": (fastrnn.GRUCell, nn.GRUCell, (6, 5), {}, (3, 6)),
    "RNNCell": (fastrnn.RNNCell, nn.RNNCell, (6, 5), {}, (3, 6)),
    "LayerNormLSTM": (fastrnn.LayerNormLSTM, None, (6, 5), {}, (4, 3, 6)),
    "PeepholeLSTM": (fastrnn.PeepholeLSTM, None, (6, 5), {}, (4, 3, 6)),
    "LayerNormGRUCell": (fastrnn.LayerNormGRUCell, None, (6, 5), {}, (3, 6)),
}


class TupleHolder(nn.Module):
    """A model containing a layer that returns a pair, as user code does (output passed on)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        out, _ = self.layer(x)
        return out * 2.0


class TensorHolder(TupleHolder):
    def forward(self, x):
        return self.layer(x) * 2.0


def Holder(layer):
    return TensorHolder(layer) if isinstance(layer, (fastrnn.GRUCell, fastrnn.RNNCell, fastrnn.LayerNormGRUCell)) \
        else TupleHolder(layer)


@pytest.mark.parametrize("name", list(LAYERS))
def test_fx_symbolic_trace_records_a_leaf_call(name):
    cls, _, args, kw, shape = LAYERS[name]
    model = Holder(cls(*args, **kw).double())
    gm = torch.fx.symbolic_trace(model)
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["layer"]
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert_close(gm(x), model(x))
    torch.autograd.grad(gm(x).sum(), x)  # the traced module trains too


def test_fx_symbolic_trace_of_the_layer_itself_is_a_clear_error():
    with pytest.raises(TypeError, match="leaf module"):
        torch.fx.symbolic_trace(fastrnn.LSTM(4, 3))


def test_fx_attention_modules_are_leaves():
    class Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = fastrnn.MultiheadAttention(8, 2, batch_first=True)
            self.add = fastrnn.AdditiveAttention(8, 8, 6)

        def forward(self, q, k):
            o, _ = self.mha(q, k, k)
            c, _ = self.add(o, k)
            return c

    m = Att().double()
    gm = torch.fx.symbolic_trace(m)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["mha", "add"]
    q, k = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    assert_close(gm(q, k), m(q, k))


@pytest.mark.parametrize("name", [n for n, v in LAYERS.items() if v[1] is not None])
def test_jit_script_compiles_the_torch_nn_equivalent(name):
    cls, tcls, args, kw, shape = LAYERS[name]
    model = Holder(cls(*args, **kw).double())
    eager = copy.deepcopy(model)
    scripted = torch.jit.script(model)
    x = torch.randn(*shape, dtype=torch.float64)
    assert_close(scripted(x), eager(x))
    # torch's __prepare_scriptable__ hook swaps the layer in the scripted model's source too
    # (as it does torchvision's modules): the same parameters, the same results.
    assert isinstance(model.layer, tcls)
    assert_close(model(x), eager(x))


def test_jit_script_shares_the_parameters():
    layer = fastrnn.LSTM(6, 5)
    model = Holder(layer)
    scripted = torch.jit.script(model)
    assert scripted.layer.weight_hh_l0.data_ptr() == layer.weight_hh_l0.data_ptr()


def test_jit_script_of_a_variant_says_why_it_cannot():
    with pytest.raises(Exception, match="no torch.nn counterpart"):
        torch.jit.script(Holder(fastrnn.LayerNormLSTM(6, 5)))


@pytest.mark.parametrize("name", list(LAYERS))
def test_meta_device_forward_gives_torch_nn_shapes(name):
    cls, tcls, args, kw, shape = LAYERS[name]
    with torch.device("meta"):
        ours = cls(*args, **kw)
        out = ours(torch.randn(*shape))
    outs = out if isinstance(out, tuple) else (out,)
    assert all(t.device.type == "meta" for t in torch.utils._pytree.tree_leaves(outs))
    if tcls is not None:
        with torch.device("meta"):
            ref = tcls(*args, **kw)(torch.randn(*shape))
        refs = ref if isinstance(ref, tuple) else (ref,)
        assert [t.shape for t in torch.utils._pytree.tree_leaves(outs)] == \
               [t.shape for t in torch.utils._pytree.tree_leaves(refs)]
