"""bfloat16: the fused LSTM/GRU/RNN kernels on bfloat16 tensors and under torch.autocast("cpu").

Every result is compared with a float64 truth computed from the same (bfloat16-valued) inputs,
weights and cotangents, normwise (conftest.assert_close_to_truth, TOL[torch.bfloat16]): the
kernels round to bfloat16 where torch.nn in bfloat16 does (the large GEMMs' operands, the
outputs), so elementwise comparison with nn.LSTM's own bfloat16 result would test which of two
roundings a value fell on. The error of nn.LSTM in bfloat16 against the same truth is checked
to sit within the same bound, as evidence that the bound is bfloat16's scale and not ours.
"""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import fastrnn
from fastrnn import functional as FR
from fastrnn import reference as R
import conftest
from conftest import TOL, assert_close_to_truth, flat, make_pair

BF16 = torch.bfloat16
CELLS = ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"]
PAIRS = conftest.layer_pairs()


def make_case(cell, T=12, B=5, I=24, H=32, P=16, packed=False):
    """bfloat16 leaves (requires_grad) of one layer-direction call; values of scale ~0.5."""
    G = {"lstm": 4, "lstm_proj": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}[cell]
    proj = cell == "lstm_proj"
    Ph = P if proj else H
    g = lambda *s: (torch.randn(*s) * 0.5).to(BF16).requires_grad_()
    w = dict(w_ih=g(G * H, I), w_hh=(torch.randn(G * H, Ph) / Ph ** 0.5).to(BF16).requires_grad_(),
             b_ih=g(G * H), b_hh=g(G * H))
    if proj:
        w["w_hr"] = (torch.randn(P, H) / H ** 0.5).to(BF16).requires_grad_()
    if packed:
        lengths = sorted([T] + [int(x) for x in torch.randint(1, T + 1, (B - 1,))], reverse=True)
        bsz = torch.tensor([sum(1 for L in lengths if L > t) for t in range(T)], dtype=torch.int64)
        x = g(int(bsz.sum()), I)
    else:
        bsz, x = None, g(T, B, I)
    st = dict(hx=g(B, Ph))
    if cell.startswith("lstm"):
        st["cx"] = g(B, H)
    return x, st, w, bsz


def _run(fns, cell, x, st, w, bsz, reverse):
    kind = cell.split("_")[0]
    states = [st["hx"], st["cx"]] if kind == "lstm" else [st["hx"]]
    weights = [w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"]] + ([w.get("w_hr")] if kind == "lstm" else [])
    extra = [cell.split("_")[1]] if kind == "rnn" else []
    return fns[kind](x, *states, *weights, bsz, reverse, *extra)


FUSED = {"lstm": FR.lstm_layer, "gru": FR.gru_layer, "rnn": FR.rnn_layer}
REFERENCE = {"lstm": R.lstm_layer_ref, "gru": R.gru_layer_ref, "rnn": R.rnn_layer_ref}


def to64(d):
    return {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in d.items()}


def relu_truth(x, hx, w_ih, w_hh, b_ih, b_hh, bsz, reverse, out):
    """The float64 ReLU RNN taking the kernel's branch of the kink: relu'(0) jumps, and a
    pre-activation within a rounding of 0 may land on either side of it in bfloat16, which moves
    that unit's gradient by its whole size. Each unit here is pre * [kernel's output > 0]; away
    from 0 that is relu(pre), near 0 the two differ by less than a rounding."""
    mask = out.detach() > 0
    sizes = [int(b) for b in bsz] if bsz is not None else [x.shape[1]] * x.shape[0]
    masks = list(mask.unbind(0)) if bsz is None else list(mask.split(sizes))
    order = iter([masks[t] for t in (reversed(range(len(sizes))) if reverse else range(len(sizes)))])

    def step(xt, h):
        return ((xt @ w_ih.T + h @ w_hh.T + b_ih + b_hh) * next(order),)
    o, (h,) = R._scan(step, x, (hx,), bsz, reverse)
    return o, h


def check_op(cell, x, st, w, bsz, reverse):
    """The fused op in bfloat16 vs the float64 reference on the same values: outputs and the
    gradient of every input, each in its input's dtype."""
    outs = _run(FUSED, cell, x, st, w, bsz, reverse)
    x64, st64, w64 = x.detach().double().requires_grad_(), to64(st), to64(w)
    if cell == "rnn_relu":
        truth = relu_truth(x64, st64["hx"], w64["w_ih"], w64["w_hh"], w64["b_ih"], w64["b_hh"], bsz, reverse,
                           outs[0])
    else:
        truth = _run(REFERENCE, cell, x64, st64, w64, bsz, reverse)
    for o, t in zip(outs, truth):
        assert o.dtype == BF16 and o.shape == t.shape
        assert_close_to_truth(o, t)
    cot = [torch.randn(t.shape).to(BF16) for t in truth]
    leaves = [t for t in [x, *st.values(), *w.values()] if t is not None]
    leaves64 = [t for t in [x64, *st64.values(), *w64.values()] if t is not None]
    grads = torch.autograd.grad(outs, leaves, cot)
    grads64 = torch.autograd.grad(truth, leaves64, [c.double() for c in cot])
    for leaf, gr, tr in zip(leaves, grads, grads64):
        assert gr.dtype == leaf.dtype == BF16 and gr.shape == leaf.shape
        assert_close_to_truth(gr, tr)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS)
def test_op_matches_float64_truth(cell, reverse, packed, isa):
    check_op(cell, *make_case(cell, packed=packed), reverse)


@pytest.mark.parametrize("cell", CELLS)
def test_gemm_paths(cell, gemm_backend):
    """Every in-loop GEMM path (fused panels, MKL packed, BLAS, at::mm, oneDNN) in bfloat16."""
    check_op(cell, *make_case(cell, T=7, B=9, I=20, H=24, P=8, packed=True), False)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_chunked_backward_and_projection(cell, monkeypatch):
    """Backward in many chunks (weight gradients summed over chunks in float32) and the input
    projection in chunks: FASTRNN_CHUNK_STEPS forces 3 steps a chunk."""
    monkeypatch.setenv("FASTRNN_CHUNK_STEPS", "3")
    check_op(cell, *make_case(cell, T=11, B=6, packed=True), True)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_single_step_and_large(cell):
    """T = 1 (the cells' and streaming shape), a size where oneDNN takes the large GEMMs and
    threads split the time loop, and one where the per-step product runs in bfloat16."""
    check_op(cell, *make_case(cell, T=1, B=2), False)
    check_op(cell, *make_case(cell, T=20, B=32, I=128, H=128), False)
    # B * G*H * H >= 16M multiply-adds a step: the recurrent product in bfloat16 (oneDNN)
    check_op(cell, *make_case(cell, T=4, B=64, I=64, H={"lstm": 256, "gru": 320, "rnn_tanh": 512}[cell]), True)


def test_workspace_is_float32_and_fakes_agree():
    x, st, w, _ = make_case("lstm")
    out = torch.ops.fastrnn.lstm_forward(x.detach(), w["w_ih"].detach(), w["w_hh"].detach(), w["b_ih"].detach(),
                                         w["b_hh"].detach(), None, st["hx"].detach(), st["cx"].detach(), None,
                                         False, True)
    assert [t.dtype for t in out] == [BF16, BF16, BF16, torch.float32, torch.float32, torch.float32]


def _opcheck_args(cell, train=True):
    x, st, w, bsz = make_case(cell, T=3, B=2, I=3, H=4, P=2, packed=cell == "gru")
    d = lambda t: t.detach().requires_grad_() if t is not None else None
    if cell.startswith("lstm"):
        return torch.ops.fastrnn.lstm_forward.default, (d(x), d(w["w_ih"]), d(w["w_hh"]), d(w["b_ih"]),
                                                        d(w["b_hh"]), d(w.get("w_hr")), d(st["hx"]), d(st["cx"]),
                                                        bsz, False, train)
    if cell == "gru":
        return torch.ops.fastrnn.gru_forward.default, (d(x), d(w["w_ih"]), d(w["w_hh"]), d(w["b_ih"]),
                                                       d(w["b_hh"]), d(st["hx"]), bsz, True, train)
    return torch.ops.fastrnn.rnn_forward.default, (d(x), d(w["w_ih"]), d(w["w_hh"]), d(w["b_ih"]), d(w["b_hh"]),
                                                   d(st["hx"]), bsz, False, False)


@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "gru", "rnn_tanh"])
def test_opcheck_bf16(cell):
    op, args = _opcheck_args(cell)
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------------- layers
def truth_of(module):
    """A float64 copy of a (bfloat16) torch.nn layer: the truth for its bfloat16 values."""
    import copy
    return copy.deepcopy(module).double()


def check_layer(kind, x_of, kw, nn_bf16_bound=True):
    """fastrnn's layer in bfloat16 vs the float64 truth: outputs, states and every gradient
    (input, states, weights). nn.LSTM/GRU/RNN in bfloat16 must sit within the same bound."""
    ref, ours = make_pair(kind, 16, 24, **kw)
    ref, ours = ref.to(BF16), ours.to(BF16)
    ours.load_state_dict(ref.state_dict())
    truth_m = truth_of(ref)
    x = x_of(BF16)
    x64 = x_of(torch.float64)
    o, t = ours(x), truth_m(x64)
    of, tf = flat(o), flat(t)
    for a, b in zip(of, tf):
        assert a.dtype == BF16
        assert_close_to_truth(a, b)
    cot = [torch.randn(b.shape).to(BF16) for b in tf]
    go = torch.autograd.grad(of, list(ours.parameters()), cot)
    gt = torch.autograd.grad(tf, list(truth_m.parameters()), [c.double() for c in cot])
    for (name, p), a, b in zip(ours.named_parameters(), go, gt):
        assert a.dtype == p.dtype == BF16, name
        assert_close_to_truth(a, b)
    if nn_bf16_bound:
        for a, b in zip(flat(ref(x)), tf):
            assert_close_to_truth(a, b)
    return ours


LAYER_CONFIGS = [
    ("LSTM", dict(num_layers=2, bidirectional=True)),
    ("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True, proj_size=8)),
    ("GRU", dict(num_layers=2, bidirectional=True)),
    ("RNN", dict(num_layers=2, bidirectional=True)),
]


@pytest.mark.parametrize("kind,kw", LAYER_CONFIGS, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}{int(x) if isinstance(x, bool) else x}" for k, x in v.items()))
def test_layer_dense(kind, kw):
    shape = (7, 9, 16) if kw.get("batch_first") else (9, 7, 16)
    base = torch.randn(*shape)
    check_layer(kind, lambda dt: base.to(BF16).to(dt).requires_grad_(), kw)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_layer_packed_bidirectional(kind):
    seqs = [torch.randn(n, 16) for n in (9, 6, 6, 2)]
    check_layer(kind, lambda dt: pack_sequence([s.to(BF16).to(dt) for s in seqs], enforce_sorted=True),
                dict(num_layers=2, bidirectional=True))


def test_input_gradient_and_states():
    """Gradients of the input and of the initial states (h0, c0) of a 2-layer bidirectional LSTM."""
    ref, ours = make_pair("LSTM", 16, 24, num_layers=2, bidirectional=True)
    ours = ours.to(BF16)
    truth_m = truth_of(ours)
    base = [torch.randn(9, 5, 16), torch.randn(4, 5, 24), torch.randn(4, 5, 24)]
    leaves = [b.to(BF16).requires_grad_() for b in base]
    leaves64 = [b.to(BF16).double().requires_grad_() for b in base]
    o = flat(ours(leaves[0], tuple(leaves[1:])))
    t = flat(truth_m(leaves64[0], tuple(leaves64[1:])))
    cot = [torch.randn(b.shape).to(BF16) for b in t]
    for a, b in zip(torch.autograd.grad(o, leaves, cot), torch.autograd.grad(t, leaves64, [c.double() for c in cot])):
        assert a.dtype == BF16
        assert_close_to_truth(a, b)


# ------------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("kind,kw,packed", [("LSTM", dict(num_layers=2, bidirectional=True), False),
                                            ("LSTM", dict(batch_first=True), False),
                                            ("RNN", dict(bidirectional=True), False),
                                            ("RNN", dict(num_layers=2), True)])
def test_autocast_matches_torch(kind, kw, packed):
    """float32 layers under torch.autocast("cpu") where torch.nn returns bfloat16 (the dense LSTM,
    the RNN): bfloat16 results on fastrnn's kernels, within bfloat16's tolerance of torch.nn's
    (each is within TOL of the truth; the bound checked is 2x, the two errors can add up); the
    float32 parameters get float32 gradients. On a CPU where oneDNN has no bfloat16 (AVX2 alone),
    torch.nn's LSTM fails under autocast ("could not create a primitive descriptor"); there the
    reference is what autocast asks for, the layer cast to bfloat16 on the bfloat16 input."""
    ref, ours = make_pair(kind, 16, 24, **kw)
    x = torch.randn(9, 5, 16)
    if packed:
        x = pack_sequence([torch.randn(n, 16) for n in (9, 7, 3)])
    ref_params = list(ref.parameters())
    with torch.autocast("cpu", dtype=BF16):
        o = ours(x)
        try:
            r = ref(x)
        except RuntimeError:
            if torch.ops.mkldnn._is_mkldnn_bf16_supported() or packed:
                raise
            r = None
    if r is None:
        ref_bf = copy.deepcopy(ref).to(BF16)
        ref_params = list(ref_bf.parameters())
        r = ref_bf(x.to(BF16))
    rf, of = flat(r), flat(o)
    for a, b in zip(of, rf):
        assert a.dtype == b.dtype == BF16
        assert_close_to_truth_2x(a, b)
    cot = [torch.randn(b.shape).to(BF16) for b in rf]
    gr = [g.float() for g in torch.autograd.grad(rf, ref_params, cot)]
    go = torch.autograd.grad(of, list(ours.parameters()), cot)
    for a, b in zip(go, gr):
        assert a.dtype == b.dtype == torch.float32
        assert_close_to_truth_2x(a.to(BF16), b)


def assert_close_to_truth_2x(a, b):
    """Two bfloat16 results, each within TOL[bfloat16] of the truth: within twice that of each other."""
    err = (a.double() - b.double()).abs().max().item()
    assert err <= 2 * TOL[BF16]["rtol"] * b.double().abs().max().item(), err


@pytest.mark.parametrize("kind,packed", [("GRU", False), ("GRU", True), ("LSTM", True)])
def test_autocast_float32_results_are_torchs(kind, packed):
    """Where torch.nn returns float32 under autocast (its GRU, its packed LSTM), fastrnn calls
    torch's implementation: the same dtypes and values, bit for bit."""
    ref, ours = make_pair(kind, 16, 24)
    x = pack_sequence([torch.randn(n, 16) for n in (9, 7, 3)]) if packed else torch.randn(9, 5, 16)
    with torch.autocast("cpu", dtype=BF16):
        r, o = ref(x), ours(x)
    for a, b in zip(flat(o), flat(r)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_autocast_projection_is_torchs():
    """nn.LSTM with proj_size under autocast runs torch's default implementation (oneDNN has no
    projection) and returns float32: fastrnn.LSTM calls the same implementation, bit for bit."""
    ref, ours = make_pair("LSTM", 16, 24, proj_size=8)
    x = torch.randn(9, 5, 16)
    with torch.autocast("cpu", dtype=BF16), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r, o = ref(x), ours(x)
    for a, b in zip(flat(o), flat(r)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _spy_stack(monkeypatch):
    """The inputs of the fastrnn::recurrent_stack calls fastrnn.functional makes from now on."""
    calls = []

    class Ops:
        def __getattr__(self, name):
            return getattr(torch.ops.fastrnn, name)

        def recurrent_stack(self, mode, input, *rest):
            calls.append(input)
            return torch.ops.fastrnn.recurrent_stack(mode, input, *rest)

    monkeypatch.setattr(FR, "_ops", Ops())
    return calls


def test_autocast_runs_the_fused_kernel(monkeypatch):
    """Under bfloat16 autocast the fused op runs (not torch's fallback)."""
    calls = _spy_stack(monkeypatch)
    with torch.autocast("cpu", dtype=BF16):
        out, _ = fastrnn.LSTM(4, 8)(torch.randn(3, 2, 4))
    assert [c.dtype for c in calls] == [BF16] and out.dtype == BF16


def test_large_inference_runs_torchs_lstm_and_training_the_kernel(monkeypatch):
    """bfloat16 LSTM inference with steps of 16M multiply-adds or more runs torch's oneDNN LSTM
    (faster there): torch.nn's values exactly. Training, and smaller steps, run the kernels; so
    does every step on a CPU where oneDNN has no bfloat16 (AVX2), where torch's LSTM is slow."""
    calls = _spy_stack(monkeypatch)
    ref = nn.LSTM(16, 512).to(BF16)
    ours = fastrnn.LSTM(16, 512).to(BF16)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 16, 16, dtype=BF16)  # 16 * 4*512 * 512 = 16M multiply-adds a step
    torchs = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert fastrnn.functional._onednn_bf16() == torchs
    with torch.no_grad():
        for a, b in zip(flat(ours(x)), flat(ref(x))):
            if torchs:
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            else:
                assert_close_to_truth_2x(a, b)
        assert len(calls) == (0 if torchs else 1)
        ours(x[:, :15])  # 15 rows: under the threshold, the kernel
        assert len(calls) == (1 if torchs else 2)
    out, _ = ours(x)
    out.float().sum().backward()
    assert len(calls) == (2 if torchs else 3) and ours.weight_hh_l0.grad is not None


def test_float16_falls_back():
    """float16 (no kernel) still runs torch's implementation, bit for bit, and so does
    autocast to float16."""
    ref, ours = make_pair("LSTM", 4, 8)
    ref, ours = ref.half(), ours.half()
    x = torch.randn(5, 3, 4, dtype=torch.float16)
    for a, b in zip(flat(ours(x)), flat(ref(x))):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref, ours = make_pair("GRU", 4, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        for a, b in zip(flat(ours(x.float())), flat(ref(x.float()))):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- bad input
def test_mixed_dtypes_raise_like_torch():
    ref, ours = make_pair("LSTM", 4, 8)
    x = torch.randn(5, 3, 4, dtype=BF16)
    with pytest.raises(ValueError, match="dtype"):
        ref(x)
    with pytest.raises(ValueError, match="dtype"):
        ours(x)
    x, st, w, bsz = make_case("lstm", T=3, B=2, I=3, H=4)
    with pytest.raises(ValueError, match="w_hh and input must have the same dtype"):
        torch.ops.fastrnn.lstm_forward(x, w["w_ih"], w["w_hh"].float(), None, None, None, st["hx"], st["cx"], None,
                                       False, False)


# ------------------------------------------------------------------------------------- compile
def test_compile_fullgraph_bf16_and_autocast():
    torch._dynamo.reset()
    m = fastrnn.LSTM(8, 16, num_layers=2).to(BF16)
    x = torch.randn(6, 3, 8, dtype=BF16)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True)(x)
    for a, b in zip(flat(compiled), flat(eager)):
        assert a.dtype == BF16
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    m32 = fastrnn.RNN(8, 16)
    f = torch.compile(lambda x: m32(x), fullgraph=True)
    with torch.autocast("cpu", dtype=BF16):
        out, h = f(x.float())
        out_e, h_e = m32(x.float())
    assert out.dtype == h.dtype == BF16
    torch.testing.assert_close(out, out_e, rtol=0, atol=0)
