"""Drop-in layers vs torch.nn: outputs, states and every gradient on the same weights."""
import contextlib
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pack_sequence

import fastrnn
import conftest
from conftest import assert_close, cfg_id, flat, kwargs_of

PAIRS = conftest.layer_pairs()


def make_pair(kind, *args, dtype=torch.float64, **kw):
    return conftest.make_pair(kind, *args, dtype=dtype, **kw)


def states_for(kind, ref, B, dtype, unbatched=False):
    D = 2 if ref.bidirectional else 1
    P = getattr(ref, "proj_size", 0) or ref.hidden_size
    lead = (ref.num_layers * D,) if unbatched else (ref.num_layers * D, B)
    h = torch.randn(*lead, P, dtype=dtype, requires_grad=True)
    if kind == "LSTM":
        return (h, torch.randn(*lead, ref.hidden_size, dtype=dtype, requires_grad=True))
    return h


def compare(ref, ours, x, hx, dtype, extra_leaves=()):
    r = ref(x, hx) if hx is not None else ref(x)
    o = ours(x, hx) if hx is not None else ours(x)
    rf, of = flat(r), flat(o)
    assert len(rf) == len(of)
    for a, b in zip(of, rf):
        assert a.shape == b.shape
        assert_close(a, b, dtype=dtype)
    cot = [torch.randn_like(t) for t in rf]
    leaves_r = [t for t in extra_leaves] + list(ref.parameters())
    leaves_o = [t for t in extra_leaves] + list(ours.parameters())
    gr = torch.autograd.grad(rf, leaves_r, cot, allow_unused=True, retain_graph=True)
    go = torch.autograd.grad(of, leaves_o, cot, allow_unused=True)
    for (name, _), a, b in zip([("leaf", None)] * len(extra_leaves) + list(ref.named_parameters()), go, gr):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(a, b, dtype=dtype, msg=name)
    return r, o


CONFIGS = [
    # kind, num_layers, bidirectional, batch_first, bias, proj_size
    ("LSTM", 1, False, False, True, 0),
    ("LSTM", 2, True, False, True, 0),
    ("LSTM", 2, False, True, False, 0),
    ("LSTM", 3, True, True, True, 3),
    ("LSTM", 1, False, False, True, 4),
    ("GRU", 1, False, False, True, 0),
    ("GRU", 2, True, True, True, 0),
    ("GRU", 2, False, False, False, 0),
    ("RNN", 1, False, False, True, 0),
    ("RNN", 2, True, True, False, 0),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx0", "hx"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_dense_matches_torch(cfg, with_hx, dtype):
    kind = cfg[0]
    ref, ours = make_pair(kind, 5, 7, dtype=dtype, **kwargs_of(cfg))
    T, B = 6, 4
    x = torch.randn(*((B, T) if cfg[3] else (T, B)), 5, dtype=dtype, requires_grad=True)
    hx = states_for(kind, ref, B, dtype) if with_hx else None
    leaves = [x] + (list(hx) if isinstance(hx, tuple) else [hx] if hx is not None else [])
    compare(ref, ours, x, hx, dtype, leaves)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_nonlinearity(nonlinearity):
    ref, ours = make_pair("RNN", 4, 6, 2, nonlinearity=nonlinearity, bidirectional=True)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    compare(ref, ours, x, None, torch.float64, [x])
    # positional nonlinearity, as torch.nn.RNN accepts it
    r2 = nn.RNN(4, 6, 1, nonlinearity)
    o2 = fastrnn.RNN(4, 6, 1, nonlinearity)
    assert o2.nonlinearity == r2.nonlinearity == nonlinearity and o2.mode == r2.mode


@pytest.mark.parametrize("with_hx", [False, True], ids=["hx0", "hx"])
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[3], CONFIGS[6], CONFIGS[9]], ids=cfg_id)
def test_unbatched_matches_torch(cfg, with_hx):
    kind = cfg[0]
    ref, ours = make_pair(kind, 5, 7, **kwargs_of(cfg))
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    hx = states_for(kind, ref, None, torch.float64, unbatched=True) if with_hx else None
    leaves = [x] + (list(hx) if isinstance(hx, tuple) else [hx] if hx is not None else [])
    compare(ref, ours, x, hx, torch.float64, leaves)


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx0", "hx"])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1], CONFIGS[3], CONFIGS[6], CONFIGS[9]], ids=cfg_id)
def test_packed_matches_torch(cfg, with_hx, enforce_sorted):
    kind = cfg[0]
    ref, ours = make_pair(kind, 5, 7, **kwargs_of(cfg))
    lengths = [7, 5, 5, 2, 1] if enforce_sorted else [3, 7, 1, 5, 4]
    B, T = len(lengths), max(lengths)
    padded = torch.randn(B, T, 5, dtype=torch.float64, requires_grad=True)
    packed = pack_padded_sequence(padded, torch.tensor(lengths), batch_first=True, enforce_sorted=enforce_sorted)
    hx = states_for(kind, ref, B, torch.float64) if with_hx else None
    leaves = [padded] + (list(hx) if isinstance(hx, tuple) else [hx] if hx is not None else [])
    r, o = compare(ref, ours, packed, hx, torch.float64, leaves)
    assert isinstance(o[0], torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(o[0].batch_sizes, r[0].batch_sizes)
    po, lo = pad_packed_sequence(o[0], batch_first=True)
    pr, lr = pad_packed_sequence(r[0], batch_first=True)
    assert torch.equal(lo, lr)
    assert_close(po, pr)


def test_packed_equals_per_sequence_runs():
    """Each sequence of a packed batch gives what it gives alone (no leakage between rows)."""
    m = fastrnn.LSTM(3, 5, bidirectional=True).double()
    seqs = [torch.randn(L, 3, dtype=torch.float64) for L in (4, 6, 1)]
    out, (h, c) = m(pack_sequence(seqs, enforce_sorted=False))
    padded, lengths = pad_packed_sequence(out)
    for i, s in enumerate(seqs):
        o1, (h1, c1) = m(s.unsqueeze(1))
        assert_close(padded[: len(s), i], o1[:, 0])
        assert_close(h[:, i], h1[:, 0])
        assert_close(c[:, i], c1[:, 0])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_state_dict_both_ways_and_init(kind):
    tcls, fcls = PAIRS[kind]
    kw = dict(num_layers=2, bidirectional=True, bias=True)
    if kind == "LSTM":
        kw["proj_size"] = 3
    torch.manual_seed(123)
    ref = tcls(4, 6, **kw)
    torch.manual_seed(123)
    ours = fcls(4, 6, **kw)
    # same names, shapes, order and initial values (same RNG draws in the same order)
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
    for (n, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
        assert torch.equal(a, b), n
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert ours._flat_weights_names == ref._flat_weights_names
    assert [[p.shape for p in ws] for ws in ours.all_weights] == [[p.shape for p in ws] for ws in ref.all_weights]
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]
    ours.flatten_parameters()  # harmless
    assert all(p.requires_grad for p in ours.parameters())


def test_dtype_and_device_kwargs():
    m = fastrnn.LSTM(3, 4, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    out, _ = m(torch.randn(2, 1, 3, dtype=torch.float64))
    assert out.dtype == torch.float64


@pytest.mark.parametrize("c_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("kw", [{}, dict(num_layers=2, bidirectional=True), dict(proj_size=2)], ids=["1", "2bi", "proj"])
def test_float64_lstm_promotes_lower_precision_c0_as_torch(kw, packed, c_dtype):
    """torch.nn's float64 LSTM takes a c_0 of lower precision (zeros made without a dtype) and
    returns float64 states; the gradient reaching c_0 is in c_0's dtype."""
    ref, ours = make_pair("LSTM", 3, 4, **kw)
    LD = ref.num_layers * (2 if ref.bidirectional else 1)
    h0 = torch.randn(LD, 2, ref.proj_size or 4, dtype=torch.float64)
    c0 = torch.randn(LD, 2, 4).to(c_dtype).requires_grad_()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    if packed:
        x = pack_padded_sequence(x, [5, 3])
    compare(ref, ours, x, (h0, c0), torch.float64, extra_leaves=[c0])
    out, (h, c) = ours(x, (h0, c0))
    assert c.dtype == h.dtype == torch.float64


@pytest.mark.parametrize("c_dtype", [torch.float16, torch.int32, torch.bool, torch.uint8, torch.float64])
@pytest.mark.parametrize("how", ["dense", "packed", "proj", "proj_unbatched", "f64_dense", "f64_packed"])
def test_c0_of_another_dtype_as_torch(how, c_dtype):
    """torch.nn's LSTM takes a c_0 whose dtype promotes to the input's wherever it does not run
    oneDNN (packed input, proj_size, float64): c' = f c + i g with c_0 promoted, states in the
    input's dtype. fastrnn refused all but float64's float32/16 c_0 (the oneDNN case, dense
    float32 without projection, refuses one in both)."""
    f64 = how.startswith("f64")
    dtype = torch.float64 if f64 else torch.float32
    ref, ours = make_pair("LSTM", 3, 4, proj_size=2 if how.startswith("proj") else 0)
    ref, ours = ref.to(dtype), ours.to(dtype)
    torch.manual_seed(1)
    x = torch.randn(5, 2, 3, dtype=dtype)
    h0 = torch.randn(1, 2, ref.proj_size or 4, dtype=dtype)
    c0 = (torch.randn(1, 2, 4) * 3).to(c_dtype)
    if "packed" in how:
        x = pack_padded_sequence(x, [5, 3])
    if how == "proj_unbatched":
        x, h0, c0 = x[:, 0], h0[:, 0], c0[:, 0]
    outcome = []
    for m in (ref, ours):
        try:
            out = m(x, (h0, c0))
            outcome.append(flat(out))
        except RuntimeError:
            outcome.append(RuntimeError)
    assert (outcome[0] is RuntimeError) == (outcome[1] is RuntimeError), outcome
    if outcome[0] is not RuntimeError:
        for a, b in zip(outcome[1], outcome[0]):
            assert a.dtype == b.dtype == dtype
            torch.testing.assert_close(a, b, **({} if f64 else dict(rtol=1e-5, atol=1e-6)))
    accepted = torch.promote_types(c_dtype, dtype) == dtype and how != "dense"
    assert (outcome[1] is not RuntimeError) == accepted


def test_batched_lstm_refuses_one_tensor_for_h0_and_c0_as_torch():
    """A batched LSTM's hx as one [2, L*D, B, H] tensor: torch.nn raises TypeError (fastrnn split
    it into h_0 and c_0); unbatched, both take one."""
    ref, ours = make_pair("LSTM", 3, 4)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for m in (ref, ours):
        with pytest.raises(TypeError):
            m(x, torch.zeros(2, 1, 2, 4, dtype=torch.float64))
        with pytest.raises(TypeError):
            m(pack_padded_sequence(x, [5, 3]), torch.zeros(2, 1, 2, 4, dtype=torch.float64))
    hx = torch.randn(2, 1, 4, dtype=torch.float64)
    for a, b in zip(flat(ours(x[:, 0], hx)), flat(ref(x[:, 0], hx))):
        assert_close(a, b)


def test_num_layers_true_is_one_as_torch():
    """torch.nn builds a layer with num_layers=True (range(True)); fastrnn's runs it as 1 layer
    (torch.nn's own forward then passes the bool on to _VF and fails)."""
    ref, _ = make_pair("GRU", 3, 4, dtype=torch.float64)
    ours = fastrnn.GRU(3, 4, num_layers=True, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    assert ours.num_layers == 1
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for a, b in zip(flat(ours(x)), flat(ref(x))):
        assert_close(a, b)


def test_float32_lstm_refuses_c0_of_another_dtype():
    """(torch.nn's float32 LSTM, on oneDNN, refuses one too, in words about oneDNN.)"""
    m = fastrnn.LSTM(3, 4)
    h0 = torch.zeros(1, 2, 4)
    for c_dtype in (torch.float64, torch.bfloat16):
        with pytest.raises(RuntimeError, match=r"cx dtype \(torch\.\w+\) does not match input dtype"):
            m(torch.randn(5, 2, 3), (h0, torch.zeros(1, 2, 4, dtype=c_dtype)))


def test_empty_batch_matches_torch():
    for kind in ("LSTM", "GRU", "RNN"):
        ref, ours = make_pair(kind, 3, 4, num_layers=2, bidirectional=True)
        x = torch.randn(5, 0, 3, dtype=torch.float64)
        r, o = ref(x), ours(x)
        for a, b in zip(flat(o), flat(r)):
            assert a.shape == b.shape


def test_dropout_between_layers():
    m = fastrnn.LSTM(8, 16, num_layers=3, dropout=0.5).double()
    x = torch.randn(10, 4, 8, dtype=torch.float64)
    m.train()
    a, _ = m(x)
    b, _ = m(x)
    assert not torch.allclose(a, b), "training-mode dropout must be random between calls"
    torch.manual_seed(7)
    c, _ = m(x)
    torch.manual_seed(7)
    d, _ = m(x)
    assert torch.equal(c, d), "dropout must be reproducible under torch.manual_seed"
    m.eval()
    e, _ = m(x)
    f, _ = m(x)
    assert torch.equal(e, f)
    ref = nn.LSTM(8, 16, num_layers=3, dropout=0.5).double().eval()
    ref.load_state_dict(m.state_dict())
    assert_close(e, ref(x)[0])
    # dropout p=1 zeroes the input of layers 2 and 3: their outputs depend on biases only
    m1 = fastrnn.LSTM(8, 16, num_layers=2, dropout=1.0).double().train()
    o1, _ = m1(x)
    o2, _ = m1(torch.randn_like(x))
    assert_close(o1, o2)


def test_dropout_matches_torch_rng():
    """With the same seed, dropout masks equal torch.nn's (same RNG calls in the same order)."""
    ref, ours = make_pair("GRU", 4, 6, num_layers=3, dropout=0.3)
    ref.train(), ours.train()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    torch.manual_seed(3)
    r = ref(x)
    torch.manual_seed(3)
    o = ours(x)
    assert_close(o[0], r[0])
    assert_close(o[1], r[1])


# ------------------------------------------------------------------------------- cells
CELL_PAIRS = {"LSTMCell": (nn.LSTMCell, fastrnn.LSTMCell), "GRUCell": (nn.GRUCell, fastrnn.GRUCell),
              "RNNCell": (nn.RNNCell, fastrnn.RNNCell)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batched,with_hx,bias", list(itertools.product([True, False], [True, False], [True, False])))
@pytest.mark.parametrize("kind", list(CELL_PAIRS))
def test_cells_match_torch(kind, batched, with_hx, bias, dtype):
    tcls, fcls = CELL_PAIRS[kind]
    torch.manual_seed(5)
    ref = tcls(4, 6, bias=bias).to(dtype)
    torch.manual_seed(5)
    ours = fcls(4, 6, bias=bias).to(dtype)
    for (n, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
        assert torch.equal(a, b), n
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    lead = (3,) if batched else ()
    x = torch.randn(*lead, 4, dtype=dtype, requires_grad=True)
    hx = None
    leaves = [x]
    if with_hx:
        hs = [torch.randn(*lead, 6, dtype=dtype, requires_grad=True) for _ in range(2 if kind == "LSTMCell" else 1)]
        leaves += hs
        hx = tuple(hs) if kind == "LSTMCell" else hs[0]
    compare(ref, ours, x, hx, dtype, leaves)


def test_rnncell_relu():
    ref = nn.RNNCell(3, 5, nonlinearity="relu").double()
    ours = fastrnn.RNNCell(3, 5, nonlinearity="relu").double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    compare(ref, ours, x, None, torch.float64, [x])
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]


def _count_general_calls(monkeypatch):
    """A list that gets the class name of each layer or cell call taking the general path (its
    _prepare) rather than the fast one (_fast_states, _fast)."""
    from fastrnn.modules import cells, rnn
    calls = []
    for cls in (rnn._RNNBase, cells._CellBase):
        def spy(self, *args, _prepare=cls._prepare):
            calls.append(type(self).__name__)
            return _prepare(self, *args)
        monkeypatch.setattr(cls, "_prepare", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_common_calls_take_the_fast_path(monkeypatch, dtype):
    """The common call (batched dense CPU input of the weights' dtype; the layers' states as
    expected or none, the cells' given) runs the fused op after one pass of cheap tests, not the
    general path, with torch.nn's values and gradients: with and without a graph, stacked,
    bidirectional, batch_first, without biases, with proj_size."""
    calls = _count_general_calls(monkeypatch)
    configs = [{}, {"num_layers": 2, "bidirectional": True, "batch_first": True}, {"bias": False}]
    for kind in ("LSTM", "GRU", "RNN"):
        extra = {"LSTM": [{"proj_size": 3}], "GRU": [], "RNN": [{"nonlinearity": "relu"}]}[kind]
        for kw in configs + extra:
            ref, ours = make_pair(kind, 4, 6, dtype=dtype, **kw)
            x = torch.randn(5, 3, 4, dtype=dtype, requires_grad=True)
            for hx in (None, states_for(kind, ref, 5 if ref.batch_first else 3, dtype)):
                leaves = [x] + ([] if hx is None else list(hx) if kind == "LSTM" else [hx])
                compare(ref, ours, x, hx, dtype, leaves)
                with torch.no_grad():
                    for a, b in zip(flat(ours(x, hx)), flat(ref(x, hx))):
                        assert not a.requires_grad
                        assert_close(a, b, dtype=dtype)
    for kind, (tcls, fcls) in CELL_PAIRS.items():
        for bias in (True, False):
            ref, ours = tcls(4, 6, bias=bias).to(dtype), fcls(4, 6, bias=bias).to(dtype)
            ours.load_state_dict(ref.state_dict())
            x = torch.randn(3, 4, dtype=dtype, requires_grad=True)
            hs = [torch.randn(3, 6, dtype=dtype, requires_grad=True) for _ in range(2 if kind == "LSTMCell" else 1)]
            compare(ref, ours, x, tuple(hs) if kind == "LSTMCell" else hs[0], dtype, [x] + hs)
    assert calls == []


def test_other_calls_take_the_general_path(monkeypatch):
    """Whatever the fast path's tests do not cover runs the general path (and gives torch.nn's
    result or error there): unbatched and packed input, a dtype or shape that torch.nn refuses,
    autocast, forward-mode AD, a tensor subclass, zoneout, and for the cells omitted states and
    a c_0 of another dtype."""
    calls = _count_general_calls(monkeypatch)

    class Sub(torch.Tensor):
        pass

    ref, ours = make_pair("LSTM", 4, 6, dtype=torch.float32)
    x = torch.randn(5, 3, 4)
    hx = (torch.zeros(1, 3, 6), torch.zeros(1, 3, 6))
    runs = [
        lambda: ours(x[:, 0]),  # unbatched
        lambda: ours(pack_sequence([torch.randn(3, 4), torch.randn(2, 4)])),
        lambda: ours(x.as_subclass(Sub)),
        lambda: fastrnn.LSTM(4, 6, zoneout=0.1)(x),
    ]
    for run in runs:
        n = len(calls)
        run()
        assert calls[n:] == ["LSTM"]
    with pytest.raises(ValueError, match="input dtype"):
        ours(x.double())
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size"):
        ours(x, (torch.zeros(1, 2, 6), hx[1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (as torch.nn: test_bf16 compares the values)
        assert ours(x, hx)[0].dtype == torch.bfloat16
    import torch.autograd.forward_ad as fwAD
    ref64, ours64 = make_pair("LSTM", 4, 6)  # (float64: torch's float32 LSTM has no forward AD)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.double(), torch.ones_like(x.double()))
        out = fwAD.unpack_dual(ours64(dual)[0])
        expected = fwAD.unpack_dual(ref64(dual)[0])
        assert_close(out.primal, expected.primal, dtype=torch.float64)
        assert_close(out.tangent, expected.tangent, dtype=torch.float64)
    assert calls.count("LSTM") == 8
    rnn = fastrnn.RNN(4, 6)
    rnn.nonlinearity = ["tanh"]  # (nonsense set after construction: the general path's ValueError)
    with pytest.raises(ValueError, match="nonlinearity"):
        rnn(x)

    cell = fastrnn.LSTMCell(4, 6)
    h = torch.zeros(3, 6)
    cell(x[0])  # no states
    cell(x[0, 0], (h[0], h[0]))  # unbatched
    h64, c64 = cell(x[0], (h, h.double()))  # torch.nn promotes c_0
    assert h64.dtype == c64.dtype == torch.float64
    with pytest.raises(RuntimeError, match="input_size"):
        cell(torch.zeros(3, 5), (h, h))
    assert calls[-4:] == ["LSTMCell"] * 4


def test_cell_loop_equals_layer():
    """Stepping LSTMCell over time gives the single-layer LSTM's result."""
    layer = fastrnn.LSTM(3, 5).double()
    cell = fastrnn.LSTMCell(3, 5).double()
    cell.load_state_dict({k[:-3]: v for k, v in layer.state_dict().items()})
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    out, (h, c) = layer(x)
    hc = None
    for t in range(6):
        hc = cell(x[t], hc)
        assert_close(hc[0], out[t])
    assert_close(hc[1], c[0])


def test_outputs_are_ordinary_tensors():
    """Large outputs live on huge-page memory: they must still behave like any tensor."""
    m = fastrnn.GRU(64, 256)
    x = torch.randn(200, 16, 64, requires_grad=True)  # output 3.3 MB: the huge-page path
    out, h = m(x)
    assert out.is_contiguous() and out.shape == (200, 16, 256)
    y = out * 2
    y.add_(1).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    import pickle
    clone = pickle.loads(pickle.dumps(out.detach()))
    assert torch.equal(clone, out.detach())
    out2 = out.detach().clone()
    out2.resize_(10, 10)
    assert out2.shape == (10, 10)


@pytest.mark.parametrize("dtype", [torch.float16])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_low_precision_modules_match_torch(kind, dtype):
    """Half modules work as torch.nn's do (torch's implementation runs them). bfloat16 runs
    fastrnn's kernels: tests/test_bf16.py."""
    ref, ours = make_pair(kind, 4, 8, num_layers=2, bidirectional=True, dtype=dtype)
    x = torch.randn(5, 3, 4, dtype=dtype)
    for a, b in zip(flat(ours(x)), flat(ref(x))):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["GRU"])
def test_autocast_matches_torch(kind):
    """Under autocast, the layers torch.nn returns float32 for (the GRU) and the cells run
    torch's implementation: bit for bit. The LSTM and RNN run fastrnn's bfloat16 kernels there
    (tests/test_bf16.py)."""
    ref, ours = make_pair(kind, 4, 8, dtype=torch.float32)
    x = torch.randn(5, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r, o = ref(x), ours(x)
    for a, b in zip(flat(o), flat(r)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cell_ref, cell = nn.LSTMCell(4, 8), fastrnn.LSTMCell(4, 8)
    cell.load_state_dict(cell_ref.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for a, b in zip(cell(x[0]), cell_ref(x[0])):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind,kw", [("LSTM", dict(num_layers=2, bidirectional=True)), ("LSTM", dict(proj_size=2)),
                                     ("GRU", dict(num_layers=2)), ("RNN", dict(bidirectional=True))])
def test_double_backward_matches_torch(kind, kw):
    """create_graph=True (gradient penalties): the second derivative equals torch.nn's."""
    ref, ours = make_pair(kind, 3, 5, **kw)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    res = []
    for m in (ref, ours):
        g, = torch.autograd.grad(m(x)[0].sum(), x, create_graph=True)
        res.append(torch.autograd.grad(g.pow(2).sum(), [x] + list(m.parameters()), allow_unused=True))
    for a, b in zip(res[1], res[0]):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b)


def test_double_backward_packed():
    ref, ours = make_pair("GRU", 3, 5)
    seqs = [torch.randn(L, 3, dtype=torch.float64, requires_grad=True) for L in (4, 2, 3)]
    res = []
    for m in (ref, ours):
        out, _ = m(pack_sequence(seqs, enforce_sorted=False))
        g = torch.autograd.grad(out.data.sum(), seqs, create_graph=True)
        res.append(torch.autograd.grad(sum(t.pow(2).sum() for t in g), list(m.parameters())))
    for a, b in zip(res[1], res[0]):
        assert_close(a, b)


def test_stacked_layers_are_one_op_call(monkeypatch):
    """A stacked bidirectional layer is one call from Python into C++ (fastrnn::recurrent_stack,
    which loops over layers and directions), forward and backward: no Python per layer."""
    from fastrnn import functional as FR
    calls = []

    class Ops:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(torch.ops.fastrnn, name)

    from fastrnn.modules import rnn
    stack = rnn._STACK

    def fast_stack(*args):  # (the layers' fast path calls the op itself: _fast_states)
        calls.append("recurrent_stack")
        return stack(*args)

    monkeypatch.setattr(FR, "_ops", Ops())
    monkeypatch.setattr(rnn, "_STACK", fast_stack)
    # Batched input takes the fast path; unbatched input the general one (_prepare, FR.lstm).
    for x in (torch.randn(5, 2, 4), torch.randn(5, 4)):
        for cls in (fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN):
            m = cls(4, 6, num_layers=3, bidirectional=True)
            out, _ = m(x)
            out.sum().backward()
            assert m.weight_hh_l2_reverse.grad is not None
    assert calls == ["recurrent_stack"] * 6


@pytest.mark.parametrize("frozen", ["layer0", "layer1"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_partly_frozen_stack_matches_torch(kind, frozen):
    """A stack whose input needs no gradient, with one layer's parameters frozen: the stack op
    decides per layer whether a layer records a graph (layer 0 frozen: it runs below autograd and
    layer 1 records), so every gradient torch.nn gives must still come back, and no other."""
    ref, ours = make_pair(kind, 4, 6, num_layers=2, bidirectional=True)
    for m in (ref, ours):
        for name, p in m.named_parameters():
            p.requires_grad_(not name.endswith(("_l0", "_l0_reverse")) if frozen == "layer0"
                             else name.endswith(("_l0", "_l0_reverse")))
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    outs = [m(x) for m in (ref, ours)]
    cot = torch.randn_like(outs[0][0])
    for m, (out, _) in zip((ref, ours), outs):
        (out * cot).sum().backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert (p.grad is None) == (q.grad is None) == (not p.requires_grad), name
        if p.grad is not None:
            assert_close(q.grad, p.grad)
    assert_close(outs[1][0], outs[0][0])


def _grad_output(form, out):
    """The gradient arriving at a layer's output for each loss form: what out.sum() and out.mean()
    send is one value expanded (strides 0); "h_n" leaves the output's gradient undefined (a loss on
    the final state alone); "transposed" and "every_other" are views with other strides."""
    if form == "sum":
        return torch.ones((), dtype=out.dtype).expand(out.shape)
    if form == "mean":
        return torch.full((), 1.0 / out.numel(), dtype=out.dtype).expand(out.shape)
    if form == "transposed":
        return torch.randn(out.shape[::-1], dtype=out.dtype).permute(*range(out.dim() - 1, -1, -1))
    if form == "every_other":
        return torch.randn(*out.shape[:-1], 2 * out.shape[-1], dtype=out.dtype)[..., ::2]
    return None  # "h_n"


# (T, B, I, H) of the output-gradient test: "step" is a single step of few rows (the backward's
# one-step pass, as in streaming); "small" runs the backward's steps on the calling thread; on 2
# threads "rows" splits the batch rows over them (team.h's row split: a small W_hh,
# B >= 8) and "team" splits each step's product over a persistent team (W_hh of 512 KB and more in
# float64); "team-narrow" too, its last panel of W_hh partly past H (300 = 9 panels of 32 float64
# columns and 12), which the team's shares count for its occupied vectors. The large sizes take
# one-layer unidirectional layers (a bidirectional layer runs a direction a thread, each on the
# calling thread's loop, as "small" covers).
GRAD_SIZES = {"step": (1, 3, 4, 5), "small": (6, 3, 4, 5), "rows": (40, 8, 4, 64), "team": (6, 4, 4, 256),
              "team-narrow": (6, 4, 4, 300)}
GRAD_CFGS = [("LSTM", 1, False, False, True, 0), ("LSTM", 2, True, True, True, 0), ("LSTM", 1, False, False, True, 3),
             ("GRU", 2, True, False, True, 0), ("RNN", 1, False, True, True, 0)]
GRAD_CFGS_1L = [("LSTM", 1, False, False, True, 0), ("GRU", 1, False, True, True, 0), ("RNN", 1, False, False, True, 0)]
GRAD_CASES = [pytest.param(size, cfg, id=f"{size}-{cfg_id(cfg)}")
              for size in GRAD_SIZES for cfg in (GRAD_CFGS if size in ("step", "small") else GRAD_CFGS_1L)]


def _grad_case(size, cfg):
    """torch.nn's and fastrnn's layer of a GRAD_CFGS entry at GRAD_SIZES[size], a float64 input
    and the sequence lengths of its packed form."""
    T, B, I, H = GRAD_SIZES[size]
    ref, ours = make_pair(cfg[0], I, H, **kwargs_of(cfg))
    x0 = torch.randn(*((B, T, I) if ref.batch_first else (T, B, I)), dtype=torch.float64)
    return ref, ours, x0, [T - (T * i) // (B + 1) for i in range(B)]


@contextlib.contextmanager
def two_threads():
    """2 threads for the block: the backward's row split and team loops need them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("form", ["sum", "mean", "h_n", "transposed", "every_other"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("size,cfg", GRAD_CASES)
def test_grad_output_layouts_match_torch(size, cfg, form, packed):
    """The backward kernels read the output's gradient where it lies (strides, expanded scalars)
    and an unused output's gradient is an expanded zero: every gradient must still be torch.nn's,
    in each of the backward's step loops."""
    kind = cfg[0]
    ref, ours, x0, lengths = _grad_case(size, cfg)
    bf = ref.batch_first
    with two_threads():
        grads = []
        for m in (ref, ours):
            x = x0.clone().requires_grad_(True)
            inp = pack_padded_sequence(x, lengths, batch_first=bf) if packed else x
            out, h = m(inp)
            out = out.data if packed else out
            h_n = h[0] if kind == "LSTM" else h
            torch.manual_seed(1)  # the same random gradients for both sides
            g = _grad_output(form, out)
            gh = torch.randn_like(h_n)
            if g is None:
                torch.autograd.backward([h_n], [gh])
            else:
                torch.autograd.backward([out, h_n], [g, gh])
            grads.append([x.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(grads[1], grads[0]):
        assert_close(a, b)


# Which of a layer's inputs need a gradient: x (the input), h (the initial states), w (the
# parameters); the backward ops compute only those (their output_mask).
NEEDS = ["x", "h", "w", "xh", "xw", "hw"]


@pytest.mark.parametrize("needs", NEEDS)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("size,cfg", GRAD_CASES)
def test_gradients_of_some_inputs_match_torch(size, cfg, packed, needs):
    """A layer over data needs no grad_input, an initial state that needs no gradient spares the
    last step's recurrent product, a frozen layer needs no weight gradients: the backward skips
    each, and every gradient asked for must still be torch.nn's, in each of its step loops."""
    kind = cfg[0]
    ref, ours, x0, lengths = _grad_case(size, cfg)
    bf, D, L, H = ref.batch_first, 2 if ref.bidirectional else 1, ref.num_layers, ref.hidden_size
    B = x0.shape[0] if bf else x0.shape[1]
    h0 = torch.randn(L * D, B, ref.proj_size or H, dtype=torch.float64)
    c0 = torch.randn(L * D, B, H, dtype=torch.float64)
    with two_threads():
        grads = []
        for m in (ref, ours):
            for p in m.parameters():
                p.requires_grad_("w" in needs)
            x = x0.clone().requires_grad_("x" in needs)
            states = [t.clone().requires_grad_("h" in needs) for t in ((h0, c0) if kind == "LSTM" else (h0,))]
            inp = pack_padded_sequence(x, lengths, batch_first=bf) if packed else x
            out, h = m(inp, tuple(states) if kind == "LSTM" else states[0])
            out = out.data if packed else out
            torch.manual_seed(1)
            loss = (out * torch.randn_like(out)).sum() + (flat(h)[0] * torch.randn_like(flat(h)[0])).sum()
            wrt = ([x] if "x" in needs else []) + (states if "h" in needs else []) + \
                (list(m.parameters()) if "w" in needs else [])
            grads.append(torch.autograd.grad(loss, wrt))
    for a, b in zip(grads[1], grads[0]):
        assert_close(a, b)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_backward_skips_the_gradients_no_one_needs(kind, monkeypatch, capfd):
    """What the output_mask saves is work: FASTRNN_PROFILE names the backward's phases, and a layer
    over data runs no grad_input product, a frozen one no weight-gradient products."""
    monkeypatch.setenv("FASTRNN_PROFILE", "1")
    m = getattr(fastrnn, kind)(64, 64)
    x = torch.randn(20, 40, 64)

    def phases(x_grad, w_grad):
        for p in m.parameters():
            p.requires_grad_(w_grad)
        out, _ = m(x.clone().requires_grad_(x_grad))
        capfd.readouterr()
        out.sum().backward()
        return capfd.readouterr().err

    err = phases(True, True)
    assert "grad_input" in err and "dW_hh" in err
    err = phases(False, True)
    assert "grad_input" not in err and "dW_hh" in err
    err = phases(True, False)
    assert "grad_input" in err and "dW_hh" not in err


def test_constants_and_int_like_sizes_as_torch():
    """__constants__ as torch.nn's classes have them (RNNCell's lists nonlinearity), and sizes
    given as bools (ints to Python and to torch.nn) are taken as torch.nn takes them."""
    for name in ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"):
        assert getattr(fastrnn, name).__constants__ == getattr(nn, name).__constants__, name
    x = torch.randn(2, 1, 1, dtype=torch.float64)
    for kind in ("LSTM", "GRU"):  # (torch.nn.RNN(True, True) fails: torch.empty((True, True)))
        ref, ours = make_pair(kind, True, True, dtype=torch.float64)
        assert_close(ours(x)[0], ref(x)[0])


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_with_hidden_size_zero_as_torch(kind):
    """torch.nn's cells take hidden_size=0 and return empty states (its layers refuse it)."""
    ref, ours = getattr(nn, kind)(3, 0), getattr(fastrnn, kind)(3, 0)
    x = torch.randn(2, 3)
    for got, want in zip(flat(ours(x)), flat(ref(x))):
        assert got.shape == want.shape == (2, 0)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_forward_mode_ad_as_torch(kind):
    """Dual tensors (torch.autograd.forward_ad) through a layer or a cell give torch.nn's
    tangents: the fused ops have no forward derivative, so the layers run torch's implementation
    inside a dual level (the C++ autograd Function once raised "jvp is not implemented")."""
    import torch.autograd.forward_ad as fwAD
    cell = kind.endswith("Cell")
    gen = torch.Generator().manual_seed(0)
    ref = getattr(nn, kind)(3, 4).double()
    ours = getattr(fastrnn, kind)(3, 4).double()
    ours.load_state_dict(ref.state_dict())
    shape = (2, 3) if cell else (5, 2, 3)
    x, t = (torch.randn(shape, dtype=torch.float64, generator=gen) for _ in range(2))
    res = []
    for m in (ref, ours):
        with fwAD.dual_level():
            out = flat(m(fwAD.make_dual(x, t)))
            res.append([fwAD.unpack_dual(o) for o in out])
    for (p, tp), (q, tq) in zip(res[1], res[0]):
        assert_close(p, q)
        assert tp is not None
        assert_close(tp, tq)
    got = torch.autograd.functional.jacobian(lambda v: flat(ours(v))[0], x, strategy="forward-mode",
                                             vectorize=True) if kind == "RNN" else None  # (torch.nn's others
    # fail there: no batching rule for unsafe_split)
    if got is not None:
        want = torch.autograd.functional.jacobian(lambda v: flat(ref(v))[0], x)
        assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_step_inference_of_many_rows_matches_torch(dtype, monkeypatch, capfd):
    """One step with more rows than the single-step kernel takes (8) runs the fused
    step over cached packings instead of two GEMMs: the same values as torch.nn, for the LSTM,
    the RNN, the GRU (whose input product is a GEMM before the fused step; H=40: two full panels
    on the vector gate math, one partial on the scalar loop) and a cell, on batches that are not
    a multiple of the vector width, with and without a graph; 8 rows keep the single-step
    kernel (FASTRNN_PROFILE names the kernel that ran)."""
    monkeypatch.setenv("FASTRNN_PROFILE", "1")
    for kind, B in (("LSTM", 37), ("RNN", 64), ("GRU", 37), ("LSTM", 9), ("GRU", 17), ("RNN", 12), ("LSTM", 8),
                    ("GRU", 8)):
        ref, ours = make_pair(kind, 24, 40, dtype=dtype)
        gen = torch.Generator().manual_seed(B)
        x = torch.randn(1, B, 24, dtype=dtype, generator=gen)
        h = torch.randn(1, B, 40, dtype=dtype, generator=gen)
        hx = (h, torch.randn(1, B, 40, dtype=dtype, generator=gen)) if kind == "LSTM" else h
        capfd.readouterr()
        with torch.no_grad():
            got, want = flat(ours(x, hx)), flat(ref(x, hx))
        assert ("fused forward" in capfd.readouterr().err) == (B > 8)
        for g, w in zip(got, want):
            assert_close(g, w)
        got, want = flat(ours(x, hx)), flat(ref(x, hx))  # (recording a graph: the same rule)
        assert ("fused forward" in capfd.readouterr().err) == (B > 8)
        for g, w in zip(got, want):
            assert_close(g, w)
    for cell in ("LSTMCell", "GRUCell"):
        ref, ours = getattr(nn, cell)(24, 40).to(dtype), getattr(fastrnn, cell)(24, 40).to(dtype)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(48, 24, dtype=dtype)
        with torch.no_grad():
            for g, w in zip(flat(ours(x)), flat(ref(x))):
                assert_close(g, w)
        assert "fused forward" in capfd.readouterr().err, cell


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_single_step_of_many_rows_backward_matches_torch(dtype):
    """The backward of one step over more rows than the single-step kernel takes: every gradient,
    the initial states' included (the recurrent product dh = dG W_hh, and with proj_size
    dr = dh W_hr, run once, on BLAS as the weights lie), and without grad_hx (no recurrent
    product at all)."""
    for kind, kw in (("LSTM", {}), ("LSTM", {"proj_size": 5}), ("GRU", {}), ("RNN", {})):
        ref, ours = make_pair(kind, 24, 40, dtype=dtype, **kw)
        x = torch.randn(1, 17, 24, dtype=dtype, requires_grad=True)
        hx = states_for(kind, ref, 17, dtype)
        compare(ref, ours, x, hx, dtype, [x] + (list(hx) if kind == "LSTM" else [hx]))
        compare(ref, ours, x, None, dtype, [x])


def test_input_dtype_mismatch_raises_the_class_torch_raises():
    """An input of another dtype than the weights: torch.nn raises ValueError for the layers'
    dense and packed input, RuntimeError (from its kernels) for the cells and the packed LSTM;
    fastrnn raises the same class, with its own message (its ValueError once escaped an
    `except RuntimeError` around a packed LSTM or a cell)."""
    from torch.nn.utils.rnn import pack_sequence as pack
    x32 = torch.randn(4, 2, 3)
    calls = []
    for kind in ("LSTM", "GRU", "RNN"):
        ref, ours = make_pair(kind, 3, 5, dtype=torch.float64)
        calls += [(ref, ours, x32), (ref, ours, pack([x32[:, 0], x32[:3, 1]]))]
    for kind in ("LSTMCell", "GRUCell", "RNNCell"):
        ref, ours = getattr(nn, kind)(3, 5).double(), getattr(fastrnn, kind)(3, 5).double()
        calls.append((ref, ours, x32[0]))
    for ref, ours, x in calls:
        with pytest.raises((ValueError, RuntimeError)) as want:
            ref(x)
        with pytest.raises((ValueError, RuntimeError), match="input dtype") as got:
            ours(x)
        assert got.type is want.type


@pytest.mark.parametrize("kind, kw", [("LSTM", {}), ("GRU", {}), ("RNN", {}), ("LSTM", dict(bidirectional=True)),
                                      ("GRU", dict(bidirectional=True, num_layers=2)), ("LSTM", dict(proj_size=2))],
                         ids=["lstm", "gru", "rnn", "lstm_bi", "gru_bi2", "lstm_proj"])
def test_bias_edited_in_place_before_backward_as_torch(kind, kw):
    """torch.nn (float64, and its GRU/RNN/cells in float32) lets a bias be edited in place between
    forward and backward (an EMA or optimizer step taken first): its backward does not read the
    biases. fastrnn's ops saved them, so autograd's version check raised. The gradients are
    those of the forward that ran; a backward with create_graph=True, which recomputes through
    the biases, still refuses the edit."""
    ref, ours = make_pair(kind, 3, 4, dtype=torch.float64, **kw)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    got = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        out = m(xi)[0]
        with torch.no_grad():
            m.bias_hh_l0.add_(1.0)
            m.bias_ih_l0.mul_(0.5)
        out.pow(2).sum().backward()
        got.append([xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*got):
        assert_close(a, b)
    xi = x.clone().requires_grad_()
    out = ours(xi)[0]
    with torch.no_grad():
        ours.bias_ih_l0.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.pow(2).sum(), xi, create_graph=True)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_bias_edited_in_place_before_backward_as_torch(kind):
    torch.manual_seed(0)
    ref = getattr(nn, kind)(3, 4)
    ours = getattr(fastrnn, kind)(3, 4)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3)
    got = []
    for m in (ref, ours):
        out = m(x)
        out = out[0] if isinstance(out, tuple) else out
        with torch.no_grad():
            m.bias_hh.add_(1.0)
        out.pow(2).sum().backward()
        got.append([p.grad for p in m.parameters()])
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
