"""torch.compile(fullgraph=True) and torch.export on models built from fastrnn layers."""
import pytest
import torch
from torch import nn

import fastrnn
from conftest import Tagger, assert_close


MODELS = {
    "lstm": lambda: fastrnn.LSTM(8, 12, num_layers=2, bidirectional=True, batch_first=True),
    "lstm_proj": lambda: fastrnn.LSTM(8, 12, proj_size=6, batch_first=True),
    "gru": lambda: fastrnn.GRU(8, 12, num_layers=2, batch_first=True),
    "rnn": lambda: fastrnn.RNN(8, 12, bidirectional=True, batch_first=True, nonlinearity="relu"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_compile_fullgraph_forward_backward(name):
    torch._dynamo.reset()
    model = Tagger(MODELS[name]())
    tokens = torch.randint(0, 20, (3, 7))
    eager_out = model(tokens)
    eager_out.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(tokens)
    out.sum().backward()
    assert_close(out, eager_out)
    for g, e in zip([p.grad for p in model.parameters()], eager_grads):
        assert_close(g, e)


def test_compile_inductor_lstm():
    torch._dynamo.reset()
    model = Tagger(MODELS["lstm"]())
    tokens = torch.randint(0, 20, (2, 5))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(tokens)
    assert_close(out, model(tokens))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_nn_lstm_itself_graph_breaks():
    """The reason fastrnn layers exist under compile: torch.nn.LSTM cannot be traced fullgraph."""
    torch._dynamo.reset()
    model = Tagger(nn.LSTM(8, 12, batch_first=True))
    with pytest.raises(Exception):
        torch.compile(model, fullgraph=True, backend="eager")(torch.randint(0, 20, (2, 5)))


def test_export_roundtrip():
    model = Tagger(MODELS["lstm"]()).eval()
    tokens = torch.randint(0, 20, (2, 5))
    ep = torch.export.export(model, (tokens,))
    assert any("fastrnn" in str(n.target) for n in ep.graph.nodes)
    assert_close(ep.module()(tokens), model(tokens))


# ---------------------------------------- Inductor: gradients through the final state
class FinalState(nn.Module):
    """A classifier on the layer's last hidden state h_n[-1] (the common pattern). zeros_inside:
    the initial state is made in forward as zeros (as tutorials do), else the layer makes it."""

    def __init__(self, layer, zeros_inside=False):
        super().__init__()
        self.layer, self.zeros_inside = layer, zeros_inside

    def forward(self, x):
        if self.zeros_inside:
            L = self.layer.num_layers * (2 if self.layer.bidirectional else 1)
            h0 = torch.zeros(L, x.size(1), self.layer.hidden_size)
            out, st = self.layer(x, (h0, torch.zeros_like(h0)) if self.layer.mode == "LSTM" else h0)
        else:
            out, st = self.layer(x)
        h = st[0] if isinstance(st, tuple) else st
        return h[-1]


FINAL_STATE = {
    "lstm": lambda: FinalState(fastrnn.LSTM(3, 4)),
    "lstm_zeros_inside": lambda: FinalState(fastrnn.LSTM(3, 4), zeros_inside=True),
    "gru": lambda: FinalState(fastrnn.GRU(3, 4)),
    "rnn": lambda: FinalState(fastrnn.RNN(3, 4)),
    "lstm_2bi": lambda: FinalState(fastrnn.LSTM(3, 4, num_layers=2, bidirectional=True)),
    "layernorm_lstm": lambda: FinalState(fastrnn.LayerNormLSTM(3, 4)),
}


@pytest.mark.parametrize("name,packed", [(n, p) for n in FINAL_STATE for p in (False, True)
                                         if not (p and n == "lstm_zeros_inside")])  # (next test: packed hx)
def test_inductor_gradients_through_final_state_match_eager(name, packed):
    """Inductor's backward may write in place into a saved tensor it takes to be unaliased (a
    donated buffer). The layers once saved their initial state as a view of [L*D, B, H] zeros
    that AOT autograd merged with the zeros of h_n[-1]'s backward (or of the PackedSequence's
    unsorted_indices): overwritten before the layer's backward read it, the gradients were
    silently wrong (up to 0.3 off). Compiled gradients must equal eager ones."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = FINAL_STATE[name]()
    x = torch.randn(5, 3, 3)
    if packed:
        x = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([3, 5, 2]), enforce_sorted=False)
    grads = []
    with torch._inductor.config.patch(force_disable_caches=True):
        for fn in (model, torch.compile(model, fullgraph=True)):
            model.zero_grad()
            data = (x.data if packed else x).clone().requires_grad_()
            inp = nn.utils.rnn.PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices) if packed \
                else data
            fn(inp).pow(2).sum().backward()
            grads.append([data.grad] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(grads[1], grads[0]):
        assert_close(got, want)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_compile_packed_input_with_hx_and_unused_outputs(kind):
    """A PackedSequence's batch (batch_sizes[0]) has no value while torch.compile traces: the
    layer's check of h_0 against it once broke the fullgraph trace, and the zero gradient of an
    unused output (c_n here) was sized with it, failing the backward's compile."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = getattr(fastrnn, kind)(3, 4)
    x = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 3, 3), torch.tensor([5, 3, 2]))
    h0 = torch.randn(1, 3, 4)
    hx = (h0, torch.randn(1, 3, 4)) if kind == "LSTM" else h0

    def run(fn):
        layer.zero_grad()
        data = x.data.clone().requires_grad_()
        out, st = fn(nn.utils.rnn.PackedSequence(data, x.batch_sizes), hx)
        h = st[0] if isinstance(st, tuple) else st
        (out.data.sum() + h.sum()).backward()
        return [out.data, h, data.grad] + [p.grad.clone() for p in layer.parameters()]

    eager = run(layer)
    compiled = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    for got, want in zip(compiled, eager):
        assert_close(got, want)


@pytest.mark.parametrize("fullgraph", [True, False])
def test_compiled_layer_names_a_wrong_hx_size(fullgraph):
    """Under torch.compile a dense input's sizes are known while tracing: a wrong h_0 gets
    torch.nn's message (only a packed input's data-dependent batch is left to torch._check)."""
    torch._dynamo.reset()
    f = torch.compile(fastrnn.GRU(3, 4), fullgraph=fullgraph, backend="eager")
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(1, 2, 4\), got \[1, 3, 4\]"):
        f(torch.randn(5, 2, 3), torch.zeros(1, 3, 4))


@pytest.mark.parametrize("name,kw", [("LSTM", dict(num_layers=2, bidirectional=True)), ("LSTM", dict(proj_size=3)),
                                     ("GRU", dict(bidirectional=True)), ("GRU", {}), ("RNN", {}),
                                     ("LayerNormLSTM", {}), ("LayerNormGRU", {})])
def test_compiled_autograd(name, kw):
    """Backward under compiled autograd (torch._dynamo's compiled_autograd, which traces the
    autograd graph itself) gives eager's gradients, as it does for torch.nn's layers: the layer
    ops' autograd nodes may not mark outputs non-differentiable there (CppNode asserts)."""
    torch.manual_seed(0)
    m = getattr(fastrnn, name)(4, 5, **kw).double()
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for compiled in (False, True):
        x.grad = None
        m.zero_grad()
        out, _ = m(x)
        loss = (out * out).sum()
        if compiled:
            with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
                loss.backward()
        else:
            loss.backward()
        grads.append([x.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        assert_close(a, b)


@pytest.mark.parametrize("make", [lambda: fastrnn.LayerNormLSTM(5, 7), lambda: fastrnn.PeepholeLSTM(5, 7),
                                  lambda: fastrnn.LayerNormGRU(5, 7), lambda: fastrnn.LSTM(5, 7, zoneout=0.2).eval(),
                                  lambda: fastrnn.GRU(5, 7, zoneout=0.2).eval()],
                         ids=["LayerNormLSTM", "PeepholeLSTM", "LayerNormGRU", "LSTM-zoneout", "GRU-zoneout"])
def test_jit_trace_of_variant_layers(make):
    """torch.jit.trace's own check (a second run under no_grad) passes on the variant path, and
    the traced layer gives the eager values."""
    import warnings
    m = make()
    x = torch.randn(4, 3, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, (x,))
    assert_close(traced(x)[0], m(x)[0])
