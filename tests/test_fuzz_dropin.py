"""Seeded randomized sweep: fastrnn's layers and cells against torch.nn on random configurations.

Every case draws its configuration from random.Random(seed) (fixed seeds: the same cases every
run) and compares outputs, final states and the gradients of the input, the initial states and
every parameter against torch.nn holding the same state_dict, with conftest.TOL. Beside the
sweep: dropout, convert(), bad input (both must raise), the module API that training scripts
touch (flatten_parameters, .double(), deepcopy, pickle, hooks, weight attributes, re-assigned or
in-place edited parameters), non-contiguous / expanded / view inputs, no_grad and inference_mode,
and in-place edits of the returned output before backward.
"""
from __future__ import annotations

import contextlib
import copy
import io
import itertools
import math
import pickle
import random
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastrnn
from conftest import TOL, assert_close, flat

F32, F64 = torch.float32, torch.float64
KINDS = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]
CELL_KINDS = ["LSTMCell", "GRUCell", "RNNCell_tanh", "RNNCell_relu"]


@pytest.fixture(autouse=True)
def _one_thread():
    """The cases are tiny: on a loaded machine torch's own OpenMP regions (torch.nn's side) cost
    ~100 ms a call in waits with two threads, against ~1 ms with one. Threads are test_threads.py's."""
    old = torch.get_num_threads()
    _one_thread.default_threads = old
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------ helpers
def make_pair(kind, I, H, dtype=F64, **kw):
    """(torch.nn layer, fastrnn layer) of `kind` ("LSTM", "GRU", "RNN_TANH", "RNN_RELU") with the
    fastrnn one loaded from the torch.nn one's state_dict."""
    name = kind.split("_")[0]
    if name == "RNN":
        kw["nonlinearity"] = kind.split("_")[1].lower()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(nn, name)(I, H, **kw).to(dtype)
        ours = getattr(fastrnn, name)(I, H, **kw).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def call(m, x, hx):
    return m(x) if hx is None else m(x, hx)


def compare_outputs(o, r, dtype):
    of, rf = flat(o), flat(r)
    assert len(of) == len(rf)
    for a, b in zip(of, rf):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        assert_close(a, b, dtype=dtype)
    if isinstance(r[0], PackedSequence):
        assert isinstance(o[0], PackedSequence)
        assert torch.equal(o[0].batch_sizes, r[0].batch_sizes)
        for a, b in ((o[0].sorted_indices, r[0].sorted_indices), (o[0].unsorted_indices, r[0].unsorted_indices)):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


@contextlib.contextmanager
def num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def compare_grads(o, r, ours, ref, leaves, dtype, seed, ours_threads=None):
    """Gradients of a random cotangent on every returned tensor, w.r.t. leaves and parameters.
    fastrnn's backward runs on ours_threads threads (default: the current count)."""
    rf, of = flat(r), flat(o)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(t.shape, dtype=t.dtype, generator=g) for t in rf]
    # every output, or (one seed in two) a random non-empty subset: the others get no gradient
    used = [True] * len(rf)
    if seed % 2 and len(rf) > 1:
        rng = random.Random(seed)
        used = [rng.random() < 0.5 for _ in rf]
        used[rng.randrange(len(rf))] = True
    rp = [p for p in ref.parameters() if p.requires_grad]
    op = [p for p in ours.parameters() if p.requires_grad]
    names = [f"leaf{i}" for i in range(len(leaves))] + [n for n, p in ref.named_parameters() if p.requires_grad]
    outs_r = [(t, c) for t, c, u in zip(rf, cot, used) if t.requires_grad and u]
    outs_o = [(t, c) for t, c, u in zip(of, cot, used) if t.requires_grad and u]
    assert len(outs_r) == len(outs_o)
    if not outs_r:
        return
    gr = torch.autograd.grad([t for t, _ in outs_r], list(leaves) + rp, [c for _, c in outs_r], allow_unused=True,
                             retain_graph=True)
    with num_threads(ours_threads):
        go = torch.autograd.grad([t for t, _ in outs_o], list(leaves) + op, [c for _, c in outs_o],
                                 allow_unused=True)
    for name, a, b in zip(names, go, gr):
        if a is None or b is None:  # B = 0 or unreachable: the other side must be absent or zero
            other = a if a is not None else b
            assert other is None or not other.any(), name
            continue
        assert_close(a, b, dtype=dtype, msg=name)


# ------------------------------------------------------------------------------ layer sweep
def draw_layer_case(seed):
    rng = random.Random(seed)
    kind = rng.choice(KINDS)
    H = rng.choice([1, 1, 2, 3, 5, 8, 13])
    c = dict(seed=seed, kind=kind, I=rng.choice([1, 2, 3, 7, 10]), H=H, num_layers=rng.randint(1, 3),
             bias=rng.random() < 0.7, batch_first=rng.random() < 0.5, bidirectional=rng.random() < 0.5,
             proj_size=0, dtype=rng.choice([F64, F64, F32]), T=rng.choice([1, 1, 2, 3, 5]),
             mode=rng.choice(["dense", "dense", "unbatched", "packed", "packed"]),
             with_hx=rng.random() < 0.5, x_grad=rng.random() < 0.7, hx_grad=rng.random() < 0.6,
             params_grad=rng.random() < 0.85, layout=rng.choice(["contiguous", "contiguous", "strided", "expanded"]))
    if kind == "LSTM" and H > 1 and rng.random() < 0.7:
        c["proj_size"] = rng.randint(1, H - 1)
    c["B"] = rng.choice([1, 1, 2, 3, 4])
    if c["mode"] == "dense" and rng.random() < 0.1:
        c["B"] = 0  # torch.nn accepts an empty batch: empty outputs, zero gradients
    if c["mode"] == "packed":
        T = c["T"]
        shape = rng.choice(["random", "equal", "ones"])
        c["lengths"] = ([T] * c["B"] if shape == "equal" else [1] * c["B"] if shape == "ones"
                        else [rng.randint(1, T) for _ in range(c["B"])])
        c["lengths"][rng.randrange(c["B"])] = T if shape != "ones" else 1
        c["enforce_sorted"] = rng.random() < 0.5
        if c["enforce_sorted"]:
            c["lengths"].sort(reverse=True)
    return c


def make_input(shape, dtype, layout, gen):
    """A tensor of `shape` laid out as asked: contiguous, a strided view (every other element of
    a larger tensor, transposed storage) or expanded along its first dimension (stride 0)."""
    if layout == "strided":
        big = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, generator=gen)
        return big[..., ::2]
    if layout == "expanded" and len(shape) >= 2:
        return torch.randn(1, *shape[1:], dtype=dtype, generator=gen).expand(*shape)
    return torch.randn(*shape, dtype=dtype, generator=gen)


def run_layer_case(c, ours_threads=None):
    torch.manual_seed(c["seed"])
    gen = torch.Generator().manual_seed(c["seed"])
    dtype = c["dtype"]
    kw = dict(num_layers=c["num_layers"], bias=c["bias"], batch_first=c["batch_first"],
              bidirectional=c["bidirectional"])
    if c["proj_size"]:
        kw["proj_size"] = c["proj_size"]
    ref, ours = make_pair(c["kind"], c["I"], c["H"], dtype, **kw)
    if not c["params_grad"]:
        ref.requires_grad_(False)
        ours.requires_grad_(False)
    T, B, I = c["T"], c["B"], c["I"]
    leaves = []
    if c["mode"] == "packed":
        padded = make_input((B, T, I), dtype, c["layout"], gen).requires_grad_(c["x_grad"])
        x = pack_padded_sequence(padded, torch.tensor(c["lengths"]), batch_first=True,
                                 enforce_sorted=c["enforce_sorted"])
        if c["x_grad"]:
            leaves.append(padded)
    else:
        shape = (T, I) if c["mode"] == "unbatched" else (B, T, I) if c["batch_first"] else (T, B, I)
        x = make_input(shape, dtype, c["layout"], gen)
        if c["x_grad"]:
            x = x.detach().requires_grad_(True) if c["layout"] == "contiguous" else x.requires_grad_(True)
            leaves.append(x)
    hx = None
    if c["with_hx"]:
        D = 2 if c["bidirectional"] else 1
        lead = (c["num_layers"] * D,) + (() if c["mode"] == "unbatched" else (B,))
        P = c["proj_size"] or c["H"]
        states = [make_input((*lead, P), dtype, c["layout"], gen)]
        if c["kind"] == "LSTM":
            states.append(make_input((*lead, c["H"]), dtype, c["layout"], gen))
        if c["hx_grad"]:
            states = [s.requires_grad_(True) for s in states]
            leaves += states
        hx = tuple(states) if c["kind"] == "LSTM" else states[0]
    r = call(ref, x, hx)
    with num_threads(ours_threads):
        o = call(ours, x, hx)
    compare_outputs(o, r, dtype)
    compare_grads(o, r, ours, ref, leaves, dtype, c["seed"], ours_threads)


SWEEP_SEEDS = list(range(320))


@pytest.mark.parametrize("chunk", range(8))
def test_layer_sweep(chunk):
    for seed in SWEEP_SEEDS[chunk::8]:
        c = draw_layer_case(seed)
        try:
            run_layer_case(c)
        except AssertionError as e:
            raise AssertionError(f"case {c}: {e}") from None


# ------------------------------------------------------------------------------ dropout
@pytest.mark.parametrize("seed", range(6))
def test_dropout_eval_equal_train_shapes(seed):
    rng = random.Random(1000 + seed)
    kind = KINDS[seed % 4]
    kw = dict(num_layers=rng.randint(2, 3), dropout=rng.choice([0.2, 0.5, 1.0]), bidirectional=rng.random() < 0.5,
              batch_first=rng.random() < 0.5)
    if kind == "LSTM" and rng.random() < 0.5:
        kw["proj_size"] = 2
    ref, ours = make_pair(kind, 3, 5, **kw)
    x = torch.randn(4, 3, 3, dtype=F64, requires_grad=True)
    ref.eval(), ours.eval()
    r, o = ref(x), ours(x)
    compare_outputs(o, r, F64)
    compare_grads(o, r, ours, ref, [x], F64, seed)
    ref.train(), ours.train()
    torch.manual_seed(seed)
    r = ref(x)
    torch.manual_seed(seed)
    o = ours(x)
    assert [t.shape for t in flat(o)] == [t.shape for t in flat(r)]
    compare_outputs(o, r, F64)  # the same dropout masks: the same RNG draws in the same order
    sum(t.sum() for t in flat(o)).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in ours.parameters())


# ------------------------------------------------------------------------------ cells
def make_cell_pair(kind, I, H, dtype=F64, bias=True):
    name, _, nl = kind.partition("_")
    kw = dict(bias=bias)
    if nl:
        kw["nonlinearity"] = nl
    ref = getattr(nn, name)(I, H, **kw).to(dtype)
    ours = getattr(fastrnn, name)(I, H, **kw).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("seed", range(40))
def test_cell_sweep(seed):
    rng = random.Random(2000 + seed)
    kind = CELL_KINDS[seed % 4]
    I, H, B = rng.choice([1, 3, 6]), rng.choice([1, 2, 5, 9]), rng.choice([None, None, 0, 1, 3])
    dtype = rng.choice([F64, F32])
    ref, ours = make_cell_pair(kind, I, H, dtype, bias=rng.random() < 0.7)
    lead = () if B is None else (B,)
    layout = rng.choice(["contiguous", "strided", "expanded"])
    gen = torch.Generator().manual_seed(seed)
    x = make_input((*lead, I), dtype, layout, gen).requires_grad_(True)
    leaves = [x]
    hx = None
    if rng.random() < 0.6:
        states = [make_input((*lead, H), dtype, layout, gen).requires_grad_(rng.random() < 0.7)
                  for _ in range(2 if kind == "LSTMCell" else 1)]
        leaves += [s for s in states if s.requires_grad]
        hx = tuple(states) if kind == "LSTMCell" else states[0]
    r, o = call(ref, x, hx), call(ours, x, hx)
    r, o = (r if isinstance(r, tuple) else (r,)), (o if isinstance(o, tuple) else (o,))
    compare_outputs(o, r, dtype)
    compare_grads(o, r, ours, ref, leaves, dtype, seed)


# ------------------------------------------------------------------------------ convert
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True, proj_size=3)
        self.gru = nn.GRU(6, 5, batch_first=True)
        self.blocks = nn.ModuleList([nn.RNN(5, 4, nonlinearity="relu", batch_first=True), nn.Linear(4, 4)])
        self.cell = nn.GRUCell(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        out, _ = self.lstm(self.emb(tokens))
        out, _ = self.gru(out)
        out, h = self.blocks[0](out)
        h = self.cell(self.blocks[1](out[:, -1]), h[0])
        return self.head(h)


def test_convert_model_outputs_and_state_dict():
    torch.manual_seed(5)
    model = Mixed().double()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict().keys())
    tokens = torch.randint(0, 11, (3, 7))
    fastrnn.convert(model)
    assert isinstance(model.lstm, fastrnn.LSTM) and isinstance(model.blocks[0], fastrnn.RNN)
    assert isinstance(model.cell, fastrnn.GRUCell)
    assert list(model.state_dict().keys()) == keys
    r, o = ref(tokens), model(tokens)
    assert_close(o, r)
    r.sum().backward()
    o.sum().backward()
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        assert_close(b.grad, a.grad, msg=n)
    ref.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(ref.state_dict(), strict=True)


# ------------------------------------------------------------------------------ bad input
def lstm_hx(L, B, P, H, dtype=F32):
    return (torch.zeros(L, B, P, dtype=dtype), torch.zeros(L, B, H, dtype=dtype))


# (kind, constructor kwargs, input, hx): torch.nn rejects every one of these calls.
BAD_CALLS = [
    ("LSTM", {}, torch.randn(5, 2, 4), None),                          # wrong input_size
    ("GRU", dict(batch_first=True), torch.randn(2, 5, 7), None),
    ("RNN_TANH", {}, torch.randn(5, 7), None),                          # unbatched, wrong input_size
    ("LSTM", {}, torch.randn(5, 2, 3, 1), None),                       # wrong rank
    ("GRU", {}, torch.randn(3), None),
    ("RNN_RELU", {}, torch.randn(2, 3, 3, 3), None),
    ("LSTM", {}, torch.randn(5, 2, 3, dtype=F64), None),               # input/weight dtype
    ("GRU", {}, torch.randn(5, 3, dtype=F64), None),
    ("RNN_TANH", {}, torch.ones(5, 2, 3, dtype=torch.long), None),
    ("LSTM", {}, torch.randn(0, 2, 3), None),                          # zero-length sequence
    ("GRU", dict(batch_first=True), torch.randn(2, 0, 3), None),
    ("RNN_TANH", {}, torch.randn(0, 3), None),
    ("LSTM", {}, torch.randn(5, 2, 3), lstm_hx(1, 3, 4, 4)),           # hx batch mismatch
    ("LSTM", {}, torch.randn(5, 2, 3), lstm_hx(2, 2, 4, 4)),           # hx layers mismatch
    ("LSTM", dict(proj_size=2), torch.randn(5, 2, 3), lstm_hx(1, 2, 4, 4)),   # h must be [.., P]
    ("LSTM", dict(proj_size=2), torch.randn(5, 2, 3), lstm_hx(1, 2, 2, 2)),   # c must be [.., H]
    ("LSTM", {}, torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4, dtype=F64))),
    ("LSTM", {}, torch.randn(5, 2, 3), (torch.zeros(1, 2, 4, dtype=F64), torch.zeros(1, 2, 4))),
    ("LSTM", {}, torch.randn(5, 2, 3), (torch.zeros(2, 4), torch.zeros(2, 4))),     # 2-D states, 3-D input
    ("LSTM", {}, torch.randn(5, 3), (torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))),  # 3-D states, 2-D input
    ("LSTM", {}, torch.randn(5, 2, 3), torch.zeros(2, 2, 4)),                       # a tensor, not (h, c)
    ("GRU", {}, torch.randn(5, 2, 3), torch.zeros(1, 3, 4)),                        # hx batch mismatch
    ("GRU", dict(bidirectional=True), torch.randn(5, 2, 3), torch.zeros(1, 2, 4)),
    ("GRU", {}, torch.randn(5, 2, 3), torch.zeros(1, 2, 5)),
    ("GRU", {}, torch.randn(5, 2, 3), torch.zeros(1, 2, 4, dtype=F64)),
    ("GRU", {}, torch.randn(5, 3), torch.zeros(1, 2, 4)),
    ("RNN_TANH", {}, torch.randn(5, 2, 3), torch.zeros(2, 4)),
    ("RNN_RELU", dict(num_layers=2), torch.randn(5, 2, 3), torch.zeros(1, 2, 4)),
    ("RNN_TANH", {}, torch.randn(5, 2, 3), torch.zeros(1, 2, 4, dtype=torch.long)),
    # packed input: torch.nn skips its argument checks and fails inside the kernel; so do we, earlier
    ("LSTM", {}, pack_padded_sequence(torch.randn(3, 2, 5), torch.tensor([3, 2])), None),
    ("GRU", {}, pack_padded_sequence(torch.randn(3, 2, 3), torch.tensor([3, 2])), torch.zeros(1, 3, 4)),
    ("LSTM", {}, pack_padded_sequence(torch.randn(3, 2, 3), torch.tensor([3, 2])), lstm_hx(1, 3, 4, 4)),
]


def _kind_ctor(kind):
    name = kind.split("_")[0]
    return name, ({"nonlinearity": kind.split("_")[1].lower()} if name == "RNN" else {})


@pytest.mark.parametrize("case", range(len(BAD_CALLS)))
def test_bad_input_raises_like_torch(case):
    kind, kw, x, hx = BAD_CALLS[case]
    name, extra = _kind_ctor(kind)
    ref = getattr(nn, name)(3, 4, **kw, **extra)
    ours = getattr(fastrnn, name)(3, 4, **kw, **extra)
    with pytest.raises(Exception) as r:
        call(ref, x, hx)
    # (TypeError where torch.nn's own call raises it: a tensor where (h_0, c_0) is expected)
    with pytest.raises((ValueError, RuntimeError, TypeError)) as o:
        call(ours, x, hx)
    if r.type in (ValueError, RuntimeError, TypeError):
        assert o.type is r.type, (o.value, r.value)
    assert len(str(o.value)) > 10


BAD_CELL_CALLS = [
    ("LSTMCell", torch.randn(2, 5), None),                       # wrong input_size
    ("GRUCell", torch.randn(2, 2, 3), None),                     # wrong rank
    ("RNNCell_tanh", torch.randn(2, 3, dtype=F64), None),         # input/weight dtype
    ("GRUCell", torch.randn(2, 3), torch.zeros(3, 4)),           # hx batch mismatch
    ("GRUCell", torch.randn(2, 3), torch.zeros(2, 5)),           # hx size
    ("RNNCell_relu", torch.randn(2, 3), torch.zeros(1, 2, 4)),   # hx rank
    ("GRUCell", torch.randn(2, 3), torch.zeros(2, 4, dtype=F64)),  # hx dtype
    ("LSTMCell", torch.randn(2, 3), (torch.zeros(2, 4), torch.zeros(3, 4))),
    ("LSTMCell", torch.randn(2, 3), (torch.zeros(2, 4, dtype=F64), torch.zeros(2, 4))),
    ("LSTMCell", torch.randn(3), (torch.zeros(2, 4), torch.zeros(2, 4))),
    ("GRUCell", torch.randn(2, 3), torch.zeros(4)),
]


@pytest.mark.parametrize("case", range(len(BAD_CELL_CALLS)))
def test_bad_cell_input_raises(case):
    kind, x, hx = BAD_CELL_CALLS[case]
    ref, ours = make_cell_pair(kind, 3, 4, F32)
    with pytest.raises(Exception) as r:
        call(ref, x, hx)
    with pytest.raises((ValueError, RuntimeError)) as o:
        call(ours, x, hx)
    if r.type is ValueError:
        assert o.type is r.type, (o.value, r.value)


def test_lstm_cell_float64_cx_promotes_like_torch():
    """torch.nn.LSTMCell accepts a float64 c_0 beside float32 input and h_0 and returns float64
    states (type promotion in c' = f c + i g); a drop-in must not reject what torch.nn runs."""
    ref, ours = make_cell_pair("LSTMCell", 3, 4, F32)
    x, h, c = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4, dtype=F64)
    r, o = ref(x, (h, c)), ours(x, (h, c))
    for a, b in zip(o, r):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL[F32])


# ------------------------------------------------------------------------------ module API
@pytest.mark.parametrize("kind", KINDS)
def test_module_api_like_torch(kind):
    kw = dict(num_layers=2, bidirectional=True, proj_size=2) if kind == "LSTM" else dict(num_layers=2)
    ref, ours = make_pair(kind, 3, 5, F32, **kw)
    x = torch.randn(4, 2, 3)
    ours.flatten_parameters()
    ref.flatten_parameters()
    compare_outputs(ours(x), ref(x), F32)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert ours._flat_weights_names == ref._flat_weights_names
    assert all(a is b for a, b in zip(ours._flat_weights, [getattr(ours, n) for n in ours._flat_weights_names]))
    assert [[tuple(p.shape) for p in w] for w in ours.all_weights] == [[tuple(p.shape) for p in w]
                                                                         for w in ref.all_weights]
    assert ours.weight_ih_l0 is ours.all_weights[0][0]
    # dtype moves: .double(), .to(float64), .float()
    for move in (lambda m: m.double(), lambda m: m.to(F64), lambda m: m.to(dtype=F64)):
        r2, o2 = move(copy.deepcopy(ref)), move(copy.deepcopy(ours))
        xd = x.double().requires_grad_(True)
        ro, oo = r2(xd), o2(xd)
        compare_outputs(oo, ro, F64)
        assert all(w.dtype == F64 for w in o2._flat_weights)
        compare_grads(oo, ro, o2, r2, [xd], F64, 0)
    back = copy.deepcopy(ours).double().float()
    compare_outputs(back(x), ref(x), F32)
    # deepcopy, pickle, torch.save of the whole module, state_dict round trip
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        compare_outputs(clone(x), ref(x), F32)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    compare_outputs(torch.load(buf, weights_only=False)(x), ref(x), F32)
    fresh = make_pair(kind, 3, 5, F32, **kw)[1]
    fresh.load_state_dict(ours.state_dict(), strict=True)
    compare_outputs(fresh(x), ref(x), F32)
    # hooks
    seen = []
    handle = ours.register_forward_hook(lambda m, args, out: seen.append((len(args), type(out))))
    pre = ours.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    o = ours(x)
    handle.remove(), pre.remove()
    compare_outputs(o, ref(x * 2), F32)
    assert seen == [(1, tuple)]
    # repr, train/eval
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]
    assert ours.eval() is ours and not ours.training
    # torch.nn.RNNBase's public helpers
    P = getattr(ref, "proj_size", 0) or 5
    D = 2 if ref.bidirectional else 1
    good = (torch.zeros(2 * D, 2, P), torch.zeros(2 * D, 2, 5)) if kind == "LSTM" else torch.zeros(2 * D, 2, 5)
    bad = (torch.zeros(2 * D, 3, P), torch.zeros(2 * D, 3, 5)) if kind == "LSTM" else torch.zeros(2 * D, 3, 5)
    for m in (ref, ours):
        m.check_forward_args(x, good, None)
        with pytest.raises(RuntimeError, match="Expected hidden"):
            m.check_forward_args(x, bad, None)
    perm = torch.tensor([1, 0])
    for a, b in zip(flat(ours.permute_hidden(good, perm)), flat(ref.permute_hidden(good, perm))):
        assert torch.equal(a, b)
    assert ours.permute_hidden(good, None) is good
    assert ours.get_expected_hidden_size(x, None) == ref.get_expected_hidden_size(x, None)


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_reassignment_and_inplace_edits(kind):
    """fastrnn keeps packed copies of W_hh between calls: any new value of a parameter, however
    it got there, must be what the next forward uses."""
    ref, ours = make_pair(kind, 3, 6, F64, num_layers=2)
    x = torch.randn(7, 2, 3, dtype=F64)
    edits = [
        lambda m: m.weight_hh_l0.mul_(0.5),
        lambda m: m.weight_hh_l1.data.mul_(-1.0),
        lambda m: m.weight_hh_l0.copy_(torch.linspace(-0.3, 0.3, m.weight_hh_l0.numel()).view_as(m.weight_hh_l0)),
        lambda m: setattr(m, "weight_hh_l0", nn.Parameter(m.weight_hh_l0.detach().flip(0).clone())),
        lambda m: setattr(m, "weight_hh_l1", nn.Parameter(m.weight_hh_l1.detach().roll(1, 1).clone())),
        lambda m: m.weight_hh_l0.__setattr__("data", m.weight_hh_l0.data * 0.9),
        lambda m: m.weight_hh_l0[0].fill_(0.25),
        lambda m: m.weight_ih_l0.add_(0.1),
        lambda m: m.bias_hh_l0.zero_(),
        lambda m: m.load_state_dict({k: v * 1.1 for k, v in m.state_dict().items()}),
    ]
    for step, edit in enumerate(edits):
        ours(x)  # warm whatever is cached for the current values
        with torch.no_grad():
            edit(ref)
            edit(ours)
        compare_outputs(ours(x), ref(x), F64)
        with torch.inference_mode():
            compare_outputs(ours(x), ref(x), F64)
    # an optimizer step between forwards updates W_hh in place
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.5)
    for _ in range(3):
        for m, opt in ((ref, opt_r), (ours, opt_o)):
            opt.zero_grad()
            m(x)[0].pow(2).sum().backward()
            opt.step()
        compare_outputs(ours(x), ref(x), F64)


@pytest.mark.parametrize("kind", KINDS)
def test_noncontiguous_parameters(kind):
    """Parameters that are views with odd strides (a transposed storage, a slice) compute as
    contiguous ones, forward and backward."""
    ref, ours = make_pair(kind, 3, 4, F64, num_layers=1)
    for name in list(ours._flat_weights_names):
        w = getattr(ours, name).detach()
        big = torch.zeros(*w.shape[:-1], 2 * w.shape[-1], dtype=F64) if w.dim() == 2 else torch.zeros(2 * w.numel(), dtype=F64)
        if w.dim() == 2:
            big[:, ::2] = w
            view = big[:, ::2]
        else:
            big[::2] = w
            view = big[::2]
        setattr(ours, name, nn.Parameter(view))
        assert not getattr(ours, name).is_contiguous()
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    r, o = ref(x), ours(x)
    compare_outputs(o, r, F64)
    compare_grads(o, r, ours, ref, [x], F64, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_no_grad_and_inference_mode(kind):
    ref, ours = make_pair(kind, 3, 5, F64, num_layers=2, bidirectional=True)
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            r, o = ref(x), ours(x)
        compare_outputs(o, r, F64)
        assert all(not t.requires_grad for t in flat(o))
        assert all(t.is_inference() == (ctx is torch.inference_mode) for t in flat(o))
    with torch.inference_mode():
        xi = torch.randn(4, 2, 3, dtype=F64)
        compare_outputs(ours(xi), ref(xi), F64)


@pytest.mark.parametrize("kind, cfg", [(k, c) for k in KINDS
                                        for c in ("plain", "batch_first", "two_layers", "proj", "packed", "unbatched")
                                        if c != "proj" or k == "LSTM"])  # proj_size is LSTM's
def test_inplace_edit_of_output_before_backward(kind, cfg):
    """Training code edits outputs in place (nn.ReLU(inplace=True), out += residual, masked_fill_):
    torch.nn's native kernels allow it before backward, so the drop-in must too (and differentiate
    the edited graph correctly)."""
    kw = dict(batch_first=cfg == "batch_first", num_layers=2 if cfg == "two_layers" else 1)
    if cfg == "proj":
        kw["proj_size"] = 2
    ref, ours = make_pair(kind, 3, 4, F64, **kw)
    x0 = torch.randn(5, 2, 3, dtype=F64)
    grads = []
    for m in (ref, ours):
        x = x0.clone().requires_grad_(True)
        inp = x[:, 0] if cfg == "unbatched" else x
        if cfg == "packed":
            inp = pack_padded_sequence(x, torch.tensor([5, 3]), enforce_sorted=True)
        out, state = m(inp)
        h = state[0] if isinstance(state, tuple) else state
        if cfg == "packed":
            out.data.relu_()
        else:
            out.relu_()
        h.mul_(2.0)
        data = out.data if cfg == "packed" else out
        (data.pow(2).sum() + h.sum()).backward()
        grads.append([x.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(grads[1], grads[0]):
        assert_close(a, b, dtype=F64)


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_inplace_edit_of_cell_output_before_backward(kind):
    ref, ours = make_cell_pair(kind, 3, 4, F64)
    x0 = torch.randn(2, 3, dtype=F64)
    grads = []
    for m in (ours, ref):
        x = x0.clone().requires_grad_(True)
        h = m(x)
        h = m(x, h)
        for t in (h if isinstance(h, tuple) else (h,)):
            t.relu_()
        try:
            sum(t.pow(2).sum() for t in (h if isinstance(h, tuple) else (h,))).backward()
        except RuntimeError as e:  # torch.nn.RNNCell saves its tanh/relu output: stricter than fastrnn
            assert m is ref and "inplace" in str(e) and kind.startswith("RNNCell")
            return
        grads.append([x.grad] + [p.grad for p in m.parameters()])
    grads.reverse()
    for a, b in zip(grads[1], grads[0]):
        assert_close(a, b, dtype=F64)


# ------------------------------------------------------------------------------ medium sizes
# Sizes past the kernels' thresholds (threaded steps, W_hh beyond the cache-resident panels),
# fastrnn on the process's default thread count (torch.nn on one, see _one_thread); float64 so
# the tolerance stays float rounding.
MEDIUM = [
    dict(kind="LSTM", I=33, H=96, B=8, T=9, num_layers=2, bidirectional=True, batch_first=True, mode="dense"),
    dict(kind="LSTM", I=20, H=130, B=5, T=6, num_layers=1, bidirectional=False, proj_size=41, mode="packed"),
    dict(kind="GRU", I=17, H=140, B=7, T=7, num_layers=2, bidirectional=True, mode="packed"),
    dict(kind="GRU", I=9, H=200, B=1, T=12, num_layers=1, mode="unbatched"),
    dict(kind="RNN_RELU", I=31, H=300, B=9, T=5, num_layers=2, mode="dense"),
    dict(kind="RNN_TANH", I=8, H=257, B=16, T=4, num_layers=1, bidirectional=True, mode="dense"),
]


@pytest.mark.parametrize("case", range(len(MEDIUM)))
def test_medium_sizes_default_threads(case):
    c = dict(seed=3000 + case, bias=True, batch_first=False, bidirectional=False, proj_size=0, dtype=F64,
             with_hx=True, x_grad=True, hx_grad=True, params_grad=True, layout="contiguous")
    c.update(MEDIUM[case])
    if c["mode"] == "packed":
        rng = random.Random(c["seed"])
        c["lengths"] = [c["T"]] + [rng.randint(1, c["T"]) for _ in range(c["B"] - 1)]
        c["enforce_sorted"] = False
    run_layer_case(c, ours_threads=_one_thread.default_threads)


@pytest.mark.parametrize("kind", KINDS + CELL_KINDS)
def test_torch_func_grad_like_torch(kind):
    """torch.func.grad over functional_call (meta-learning, per-sample gradients) works on
    torch.nn's layers, so it must on the drop-ins."""
    if "Cell" in kind:
        ref, ours = make_cell_pair(kind, 3, 4, F64)
        x = torch.randn(2, 3, dtype=F64)
    else:
        ref, ours = make_pair(kind, 3, 4, F64, num_layers=2)
        x = torch.randn(5, 2, 3, dtype=F64)
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def loss(m):
        def f(p, x):
            out = torch.func.functional_call(m, p, (x,))
            return flat(out)[0].pow(2).sum()
        return f

    gr = torch.func.grad(loss(ref), argnums=(0, 1))(params, x)
    go = torch.func.grad(loss(ours), argnums=(0, 1))(params, x)
    for k in params:
        assert_close(go[0][k], gr[0][k], msg=k)
    assert_close(go[1], gr[1])


@pytest.mark.parametrize("kind", KINDS)
def test_training_patterns_like_torch(kind):
    """What training scripts do around a recurrent layer: carry the state across batches with
    and without detaching it (truncated BPTT), backward twice with retain_graph, accumulate
    gradients, activation checkpointing (both flavours) and saved-tensor offloading."""
    from torch.utils.checkpoint import checkpoint
    ref, ours = make_pair(kind, 3, 4, F64, num_layers=2)
    gen = torch.Generator().manual_seed(11)
    xs = [torch.randn(4, 2, 3, dtype=F64, generator=gen) for _ in range(3)]

    def detach(h):
        return tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()

    def patterns(m):
        grads = []

        def take():
            grads.extend(p.grad.clone() for p in m.parameters())
            m.zero_grad()

        h, loss = None, 0
        for x in xs:  # state carried, one graph through all batches
            out, h = call(m, x, h)
            loss = loss + out.pow(2).sum()
        loss.backward()
        take()
        h = None
        for x in xs:  # truncated BPTT
            out, h = call(m, x, None if h is None else detach(h))
            out.pow(2).sum().backward()
            take()
        loss = m(xs[0])[0].sin().sum()
        loss.backward(retain_graph=True)
        loss.backward()
        take()
        for reentrant in (True, False):
            x = xs[1].clone().requires_grad_(True)
            checkpoint(lambda x: m(x)[0], x, use_reentrant=reentrant).pow(2).sum().backward()
            grads.append(x.grad)
            take()
        with torch.autograd.graph.save_on_cpu():
            out = m(xs[2])[0]
        out.pow(2).sum().backward()
        take()
        return grads

    for a, b in zip(patterns(ours), patterns(ref)):
        assert_close(a, b, dtype=F64)


# ------------------------------------------------------------------------------ raw ops
def test_ops_reject_none_tensor_with_a_meta_argument():
    """A None for a Tensor argument, with another argument on the meta device (which sends the
    call to the fake kernel), raises a clear error like the CPU kernels, not an AttributeError."""
    import test_malformed_ops as M
    for op in M.OPS:
        args = M.base_args(op, M._variants(op)[0])  # ("dense", or recurrent_stack's first configuration)
        schema = {a.name: str(a.type) for a in getattr(torch.ops.fastrnn, op).default._schema.arguments}
        keys = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
        for k in (k for k in keys if schema[k] == "Tensor"):
            for meta in (False, True) if len(keys) > 1 else (False,):  # (state_copy: one tensor)
                a = dict(args, **{k: None})
                if meta:
                    other = next(kk for kk in keys if kk != k)
                    a[other] = a[other].to("meta")
                with pytest.raises(RuntimeError):
                    getattr(torch.ops.fastrnn, op)(*a.values())


# ------------------------------------------------------------------------------ non-finite values
def assert_as_accurate_as_torch(ours, theirs, truth, msg):
    """Element by element, ours is within TOL of the float64 truth, or no farther from it than
    torch.nn's worst element of the tensor is (twice: the two round in different orders, and at
    these magnitudes which element loses its digits to cancellation is down to that order)."""
    err, their_err = (ours.double() - truth).abs(), (theirs.double() - truth).abs()
    tol = TOL[ours.dtype]
    bound = (tol["rtol"] * truth.abs() + tol["atol"]).clamp_min(2 * their_err.max().item())
    assert bool((err <= bound).all()), \
        f"{msg}: max error {err.max().item():.3e} (torch.nn's {their_err.max().item():.3e})"


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_values_propagate_like_torch(kind, dtype, gemm_backend, isa):
    """A NaN or inf in the input, the state or a weight gives NaN/inf where torch.nn's does (a
    diverging training run must show up in the loss), finite values elsewhere, in the outputs
    and the gradients; under every in-loop GEMM path and pointwise ISA build."""
    for where, val in itertools.product(["input", "hx", "weight_hh_l0"], [float("nan"), float("inf"), -float("inf"),
                                                                          1e30, -1e30]):
        ref, ours = make_pair(kind, 3, 4, dtype)
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(4, 2, 3, dtype=dtype, generator=gen)
        h = torch.randn(1, 2, 4, dtype=dtype, generator=gen)
        if where == "input":
            x[1, 0, 1] = val
        elif where == "hx":
            h[0, 1, 2] = val
        else:
            with torch.no_grad():
                ref.weight_hh_l0[2, 1] = val
                ours.weight_hh_l0[2, 1] = val
        x.requires_grad_(True)
        h.requires_grad_(True)
        def hx():  # c_0 = h_0 * 1: a graph of its own for each model
            return (h, h * 1) if kind == "LSTM" else h

        o, r = flat(ours(x, hx())), flat(ref(x, hx()))
        go = torch.autograd.grad(sum(t.sum() for t in o), [x, h, *ours.parameters()])
        gr = torch.autograd.grad(sum(t.sum() for t in r), [x, h, *ref.parameters()])
        truth = [None] * len(o + list(go))
        if math.isfinite(val) and dtype == F32:
            # +-1e30 in float32: sums of terms near 1e27 that cancel, whose rounding depends on the
            # order (torch.nn's misses the float64 truth by 1e-5 relative on an element, AVX2 build)
            ref64 = copy.deepcopy(ref).double()
            x64, h64 = x.detach().double().requires_grad_(True), h.detach().double().requires_grad_(True)
            r64 = flat(ref64(x64, (h64, h64 * 1) if kind == "LSTM" else h64))
            truth = r64 + list(torch.autograd.grad(sum(t.sum() for t in r64), [x64, h64, *ref64.parameters()]))
        for i, (a, b, t) in enumerate(zip(o + list(go), r + list(gr), truth)):
            msg = f"{where}={val}" + (", gradient" if i >= len(o) else "")
            if t is None:
                torch.testing.assert_close(a, b, **TOL[dtype], equal_nan=True, msg=msg)
            else:
                assert_as_accurate_as_torch(a, b, t, msg)
