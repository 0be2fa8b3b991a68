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
