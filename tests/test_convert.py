"""convert(model): swapping torch.nn recurrent layers for fastrnn keeps outputs and training."""
import copy

import pytest
import torch
from torch import nn

import fastrnn
from fastrnn.convert import to_torch
from conftest import assert_close


class EmbLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(32, 4)

    def forward(self, tokens):
        out, _ = self.lstm(self.emb(tokens))
        return self.fc(out[:, -1])


class GRUWithCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(6, 10)
        self.cell = nn.LSTMCell(10, 12)
        self.rnn = nn.Sequential(nn.Linear(12, 12))
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        out, h = self.gru(x)
        hc = None
        for t in range(out.shape[0]):
            hc = self.cell(out[t], hc)
        return self.head(self.rnn(hc[0]))


class CustomLSTM(nn.LSTM):
    def forward(self, x, hx=None):
        return super().forward(x * 2, hx)


def train_losses(model, inputs, target, steps=20):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("make,inp,n_cls", [
    (EmbLSTM, lambda: torch.randint(0, 30, (5, 7)), 4),
    (GRUWithCell, lambda: torch.randn(6, 5, 6, dtype=torch.float64), 3),
])
def test_convert_keeps_outputs_and_training(make, inp, n_cls):
    torch.manual_seed(0)
    base = make().double()
    x = inp()
    target = torch.randint(0, n_cls, (5,))
    ref = copy.deepcopy(base)
    conv = fastrnn.convert(copy.deepcopy(base))
    assert not any(type(m) in (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell) for m in conv.modules())
    assert any(isinstance(m, (fastrnn.LSTM, fastrnn.GRU, fastrnn.LSTMCell)) for m in conv.modules())
    assert_close(conv(x), ref(x))
    l_ref = train_losses(ref, x, target)
    l_conv = train_losses(conv, x, target)
    torch.testing.assert_close(torch.tensor(l_conv), torch.tensor(l_ref), rtol=1e-9, atol=1e-10)
    assert l_conv[-1] < l_conv[0]
    back = to_torch(conv)
    assert any(type(m) is nn.LSTM or type(m) is nn.GRU for m in back.modules())
    assert_close(back(x), ref(x))


def test_convert_shares_parameters_and_mode():
    lstm = nn.LSTM(3, 4, proj_size=2).eval()
    for p in lstm.parameters():
        p.requires_grad_(False)
    new = fastrnn.convert(lstm)
    assert isinstance(new, fastrnn.LSTM) and not new.training
    assert all(a is b for a, b in zip(lstm.parameters(), new.parameters()))
    assert not any(p.requires_grad for p in new.parameters())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(new(x)[0], lstm(x)[0], rtol=1e-5, atol=1e-6)


def test_convert_leaves_subclasses_alone():
    m = nn.Sequential(CustomLSTM(3, 4), nn.Identity())
    out = fastrnn.convert(m)
    assert type(out[0]) is CustomLSTM


@pytest.mark.parametrize("cls,kw", [(nn.RNN, dict(nonlinearity="relu", num_layers=2)), (nn.GRU, dict(bias=False)),
                                     (nn.RNNCell, dict(nonlinearity="relu")), (nn.GRUCell, {})])
def test_from_torch_to_torch_roundtrip(cls, kw):
    m = cls(3, 5, **kw).double()
    f = fastrnn.convert(m)
    assert type(f).__name__ == cls.__name__ and type(f).__module__.startswith("fastrnn")
    back = f.to_torch()
    assert type(back) is cls
    x = torch.randn(4, 3, dtype=torch.float64)
    assert_close(f(x)[0] if isinstance(f(x), tuple) else f(x), m(x)[0] if isinstance(m(x), tuple) else m(x))
    assert back.state_dict().keys() == m.state_dict().keys()
    with pytest.raises(TypeError):
        type(f).from_torch(nn.Linear(2, 2))
