"""Variant cells (SEMANTICS.md, "Variants"): LayerNorm LSTM/GRU, peephole LSTM, zoneout and
recurrent DropConnect. Fused ops vs the plain-PyTorch references (forward, every gradient,
gradcheck, opcheck), the layers and cells, train/eval semantics, mask statistics, p = 0."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from fastrnn import functional as FR
from fastrnn import reference as R
from conftest import Tagger, assert_close

LSTM_FEATURES = ["ln", "peep", "ln_peep", "zoneout_mask", "zoneout_eval", "ln_zoneout"]
GRU_FEATURES = ["ln", "zoneout_mask", "zoneout_eval", "ln_zoneout"]


def make_case(cell, features, T=5, B=4, I=4, H=None, dtype=torch.float64, bias=True, packed=False):
    """Arguments of the variant layer function (and its reference) for `features`."""
    G = 4 if cell == "lstm" else 3
    # LayerNorm statistics over a handful of units are noisy (a near-zero variance amplifies
    # rounding without bound); 16 units keep the normalisation, and float32, well conditioned
    H = H or (16 if "ln" in features else 6)
    g = lambda *s: (torch.randn(*s, dtype=dtype) * 0.5).requires_grad_()  # noqa: E731
    if packed:
        lengths = sorted([T] + [int(x) for x in torch.randint(1, T + 1, (B - 1,))], reverse=True)
        bsz = torch.tensor([sum(1 for L in lengths if L > t) for t in range(T)], dtype=torch.int64)
        x = g(int(bsz.sum()), I)
    else:
        bsz = None
        x = g(T, B, I)
    kw = dict(w_ih=g(G * H, I), w_hh=g(G * H, H), b_ih=g(G * H) if bias else None, b_hh=g(G * H) if bias else None)
    if "ln" in features:
        # LayerNorm divides by the std of W_ih x and W_hh h: inputs and weights of unit scale keep
        # 1/std near 1, so gradients stay O(1) and float32 rounding is not amplified by the case
        with torch.no_grad():
            x.mul_(2)
            kw["w_ih"].mul_(2)
            kw["w_hh"].mul_(2)
        # gains around 1 so the normalised values matter, biases small
        n = 6 if cell == "lstm" else 4
        sizes = [G * H] * 4 + [H, H]
        kw["ln"] = tuple((1 + 0.3 * torch.randn(sizes[k], dtype=dtype) if k % 2 == 0 else
                          0.2 * torch.randn(sizes[k], dtype=dtype)).requires_grad_() for k in range(n))
    if "peep" in features:
        kw["w_peep"] = g(3, H)
    if "zoneout" in features:
        S = 2 if cell == "lstm" else 1
        if features == "zoneout_eval":
            kw["zoneout_p"] = 0.35
        else:
            kw["zoneout_mask"] = torch.bernoulli(torch.full((*x.shape[:-1], S * H), 0.4, dtype=dtype))
            kw["zoneout_p"] = 0.4
    states = dict(hx=g(B, H))
    if cell == "lstm":
        states["cx"] = g(B, H)
    return x, states, kw, bsz


def run(cell, impl, x, states, kw, bsz, reverse):
    if cell == "lstm":
        fn = FR.variant_lstm_layer if impl == "fused" else R.variant_lstm_layer_ref
        return fn(x, states["hx"], states["cx"], **kw, batch_sizes=bsz, reverse=reverse)
    fn = FR.variant_gru_layer if impl == "fused" else R.variant_gru_layer_ref
    return fn(x, states["hx"], **kw, batch_sizes=bsz, reverse=reverse)


def leaves(x, states, kw):
    out = [x, *states.values()]
    for v in kw.values():
        if isinstance(v, tuple):
            out += list(v)
        elif isinstance(v, torch.Tensor) and v.requires_grad:
            out.append(v)
    return out


CASES = [("lstm", f) for f in LSTM_FEATURES] + [("gru", f) for f in GRU_FEATURES]


# float64: every direction and layout; float32: two of them (the same kernels, other rounding).
LAYOUTS = [(False, False, torch.float64), (True, False, torch.float64), (False, True, torch.float64),
           (True, True, torch.float64), (False, False, torch.float32), (True, True, torch.float32)]


@pytest.mark.parametrize("reverse,packed,dtype", LAYOUTS,
                         ids=[f"{'rev' if r else 'fwd'}-{'packed' if p else 'dense'}-{str(d)[6:]}" for r, p, d in LAYOUTS])
@pytest.mark.parametrize("cell,features", CASES, ids=[f"{c}-{f}" for c, f in CASES])
def test_fused_matches_reference(cell, features, reverse, packed, dtype):
    x, st, kw, bsz = make_case(cell, features, dtype=dtype, packed=packed)
    outs = run(cell, "fused", x, st, kw, bsz, reverse)
    refs = run(cell, "ref", x, st, kw, bsz, reverse)
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert_close(o, r)
    cot = [torch.randn_like(r) for r in refs]
    ps = leaves(x, st, kw)
    for gf, gr in zip(torch.autograd.grad(outs, ps, cot), torch.autograd.grad(refs, ps, cot)):
        assert_close(gf, gr)


@pytest.mark.parametrize("cell,features", [("lstm", "ln_peep"), ("gru", "ln")])
def test_no_bias_and_baseline_isa(cell, features, isa):
    x, st, kw, bsz = make_case(cell, features + "_zoneout", bias=False, T=4, B=3, H=20)
    outs = run(cell, "fused", x, st, kw, bsz, False)
    refs = run(cell, "ref", x, st, kw, bsz, False)
    for o, r in zip(outs, refs):
        assert_close(o, r)
    ps = leaves(x, st, kw)
    for gf, gr in zip(torch.autograd.grad(outs[0].sum(), ps), torch.autograd.grad(refs[0].sum(), ps)):
        assert_close(gf, gr)


# With LayerNorm a step is GEMM then row pass; without, small products run the fused panel forward.
PATHS = [("lstm", "ln_peep_zoneout"), ("lstm", "peep_zoneout"), ("gru", "ln_zoneout"), ("gru", "zoneout_mask")]


@pytest.mark.parametrize("cell,features", PATHS)
def test_float32_every_gemm_path(cell, features, gemm_backend):
    """Every in-loop GEMM path (panels, oneDNN, packed MKL, BLAS, at::mm); float32 vs the float64
    reference."""
    x, st, kw, bsz = make_case(cell, features, T=4, B=16, I=64, H=64, dtype=torch.float32)
    outs = run(cell, "fused", x, st, kw, bsz, False)
    d64 = lambda v: (tuple(t.detach().double() for t in v) if isinstance(v, tuple) else  # noqa: E731
                     v.detach().double() if isinstance(v, torch.Tensor) else v)
    refs = run(cell, "ref", d64(x), {k: d64(v) for k, v in st.items()}, {k: d64(v) for k, v in kw.items()}, bsz,
               False)
    for o, r in zip(outs, refs):
        assert_close(o.double(), r, dtype=torch.float32)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("cell,features", [("lstm", "ln_peep_zoneout"), ("lstm", "zoneout_eval"),
                                           ("gru", "ln_zoneout")])
def test_gradcheck(cell, features, packed):
    x, st, kw, bsz = make_case(cell, features, T=3, B=3, I=2, H=3, packed=packed)
    ps = leaves(x, st, kw)

    def f(*vals):
        it = iter(vals)
        xx = next(it)
        ss = {k: next(it) for k in st}
        kk = {}
        for k, v in kw.items():
            if isinstance(v, tuple):
                kk[k] = tuple(next(it) for _ in v)
            elif isinstance(v, torch.Tensor) and v.requires_grad:
                kk[k] = next(it)
            else:
                kk[k] = v
        return run(cell, "fused", xx, ss, kk, bsz, True)

    assert torch.autograd.gradcheck(f, tuple(ps), eps=1e-6, atol=1e-8, rtol=1e-6)


def _op_args(cell, features, train, packed=False):
    x, st, kw, bsz = make_case(cell, features, T=3, B=2, I=3, H=4, packed=packed)
    ln = kw.get("ln", (None,) * (6 if cell == "lstm" else 4))
    mask, p = kw.get("zoneout_mask"), kw.get("zoneout_p", 0.0)
    if cell == "lstm":
        args = (x, kw["w_ih"], kw["w_hh"], kw["b_ih"], kw["b_hh"], *ln, kw.get("w_peep"), st["hx"], st["cx"], mask, p,
                bsz, False, train)
    else:
        args = (x, kw["w_ih"], kw["w_hh"], kw["b_ih"], kw["b_hh"], *ln, st["hx"], mask, p, bsz, True, train)
    if not train:
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    return args


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("cell,features", [("lstm", "ln_peep_zoneout"), ("lstm", "zoneout_eval"), ("gru", "ln"),
                                           ("gru", "zoneout_mask")])
def test_opcheck_forward(cell, features, packed):
    op = getattr(torch.ops.fastrnn, f"variant_{cell}_forward").default
    for train in (True, False):
        torch.library.opcheck(op, _op_args(cell, features, train, packed))


@pytest.mark.parametrize("cell,features", [("lstm", "ln_peep_zoneout"), ("lstm", "peep"), ("gru", "ln_zoneout")])
def test_opcheck_backward(cell, features):
    ops = torch.ops.fastrnn
    a = [t.detach() if isinstance(t, torch.Tensor) else t for t in _op_args(cell, features, True)]
    if cell == "lstm":
        out, hy, cy, gates, cells, norm, stats = ops.variant_lstm_forward(*a)
        args = (torch.randn_like(out), torch.randn_like(hy), torch.randn_like(cy), a[0], a[1], a[2], *a[5:11], a[11],
                a[12], a[13], a[14], a[15], a[16], a[17], out, gates, cells, norm, stats)
        torch.library.opcheck(ops.variant_lstm_backward.default, args)
    else:
        out, hy, gates, hn, norm, stats = ops.variant_gru_forward(*a)
        args = (torch.randn_like(out), torch.randn_like(hy), a[0], a[1], a[2], *a[5:9], a[9], a[10], a[11], a[12],
                a[13], out, gates, hn, norm, stats)
        torch.library.opcheck(ops.variant_gru_backward.default, args)


def test_inference_saves_nothing_and_backward_then_fails_clearly():
    args = _op_args("lstm", "ln_peep", train=False)
    res = torch.ops.fastrnn.variant_lstm_forward(*args)
    assert all(t.numel() == 0 for t in res[3:])
    targs = list(_op_args("lstm", "ln_peep", train=True))
    targs[-1] = False
    out = torch.ops.fastrnn.variant_lstm_forward(*targs)
    with pytest.raises(RuntimeError, match="train=False"):
        out[0].sum().backward()


def test_double_backward_through_reference():
    x, st, kw, bsz = make_case("lstm", "ln_peep_zoneout", T=3, B=2, I=3, H=4)
    ps = leaves(x, st, kw)
    for impl in ("fused", "ref"):
        out = run("lstm", impl, x, st, kw, bsz, False)[0]
        (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        gg = torch.autograd.grad(gx.sum(), ps[1:])
        if impl == "fused":
            fused = gg
        else:
            for a, b in zip(fused, gg):
                assert_close(a, b)


# ------------------------------------------------------------------------------ argument errors
def test_op_argument_errors_name_the_argument():
    ops = torch.ops.fastrnn
    args = list(_op_args("lstm", "ln_peep", train=False))
    bad = list(args)
    bad[15] = 1.5  # zoneout_p
    with pytest.raises(ValueError, match="zoneout_p"):
        ops.variant_lstm_forward(*bad)
    bad = list(args)
    bad[10] = None  # ln_c_b missing
    with pytest.raises(RuntimeError, match="LayerNorm .* all be given"):
        ops.variant_lstm_forward(*bad)
    bad = list(args)
    bad[11] = args[11][:2]  # w_peep [2, H]
    with pytest.raises(RuntimeError, match="w_peep"):
        ops.variant_lstm_forward(*bad)
    bad = list(args)
    bad[14] = torch.zeros(3, 2, 4, dtype=torch.float64)  # zoneout mask of width H, not 2H
    with pytest.raises(RuntimeError, match="zoneout_mask"):
        ops.variant_lstm_forward(*bad)


@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.LayerNormLSTM, fastrnn.LayerNormGRU,
                                 fastrnn.PeepholeLSTM])
@pytest.mark.parametrize("arg", ["zoneout", "weight_drop"])
def test_bad_probabilities_raise_value_error(cls, arg):
    for v in (-0.1, 1.5, "0.3", True):
        with pytest.raises(ValueError, match=arg):
            cls(4, 6, **{arg: v})


def test_zoneout_with_projection_is_rejected():
    with pytest.raises(ValueError, match="proj_size"):
        fastrnn.LSTM(4, 6, proj_size=3, zoneout=0.1)


# ------------------------------------------------------------------------------ layers and cells
def _layer_params(m):
    """Per layer/direction tuples for the references, and the kwargs for each."""
    return [[getattr(m, n) for n in names] for names in m._all_weights]


def layer_ref(m, x, hx=None, batch_sizes=None):
    """The reference stack for a variant module in eval mode (no dropout between layers)."""
    lstm = isinstance(m, (fastrnn.LayerNormLSTM, fastrnn.PeepholeLSTM))
    D = 2 if m.bidirectional else 1
    B = int(batch_sizes[0]) if batch_sizes is not None else x.shape[0 if m.batch_first else 1]
    H = m.hidden_size
    if hx is None:
        z = torch.zeros(m.num_layers * D, B, H, dtype=x.dtype)
        hx = (z, z) if lstm else z
    ln_on = isinstance(m, (fastrnn.LayerNormLSTM, fastrnn.LayerNormGRU))
    nb = 4 if m.bias else 2

    def layer(inp, st, p, bsz, rev):
        w_ih, w_hh = p[0], p[1]
        b_ih, b_hh = (p[2], p[3]) if m.bias else (None, None)
        extra = p[nb:]
        zp = m.zoneout
        if lstm:
            ln = tuple(extra[:6]) if ln_on else None
            peep = torch.stack(extra[-3:]) if isinstance(m, fastrnn.PeepholeLSTM) else None
            return R.variant_lstm_layer_ref(inp, st[0], st[1], w_ih, w_hh, b_ih, b_hh, ln, peep, None, zp, bsz, rev)
        return R.variant_gru_layer_ref(inp, st[0], w_ih, w_hh, b_ih, b_hh, tuple(extra[:4]), None, zp, bsz, rev)

    states = list(hx) if lstm else [hx]
    out, finals = R._stack_ref(layer, x, states, _layer_params(m), m.num_layers, m.bidirectional, m.batch_first,
                               batch_sizes)
    return out, tuple(finals) if lstm else finals[0]


VARIANT_LAYERS = {"ln_lstm": fastrnn.LayerNormLSTM, "peep_lstm": fastrnn.PeepholeLSTM, "ln_gru": fastrnn.LayerNormGRU}


def _perturb(m):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))  # LN gains/biases away from 1/0, so they matter
    return m


@pytest.mark.parametrize("name,batch_first", [("ln_lstm", True), ("peep_lstm", False), ("ln_gru", True)])
def test_layer_matches_reference(name, batch_first):
    m = _perturb(VARIANT_LAYERS[name](5, 7, num_layers=2, bidirectional=True, batch_first=batch_first,
                                      zoneout=0.2, dtype=torch.float64)).eval()
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    lstm = name.endswith("lstm")
    h0 = torch.randn(4, 3 if batch_first else 4, 7, dtype=torch.float64)
    hx = (h0, torch.randn_like(h0)) if lstm else h0
    out, st = m(x, hx)
    ref_out, ref_st = layer_ref(m, x, hx)
    assert_close(out, ref_out)
    for a, b in zip(st if lstm else [st], ref_st if lstm else [ref_st]):
        assert_close(a, b)
    ps = [x] + list(m.parameters())
    for a, b in zip(torch.autograd.grad(out.sum(), ps), torch.autograd.grad(ref_out.sum(), ps)):
        assert_close(a, b)


@pytest.mark.parametrize("name", list(VARIANT_LAYERS))
def test_layer_packed_unbatched_and_parameter_names(name):
    cls = VARIANT_LAYERS[name]
    m = _perturb(cls(4, 6, dtype=torch.float64))
    names = [n for n, _ in m.named_parameters()]
    expected = {"ln_lstm": ["ln_ih_weight_l0", "ln_ih_bias_l0", "ln_hh_weight_l0", "ln_hh_bias_l0", "ln_c_weight_l0",
                            "ln_c_bias_l0"],
                "peep_lstm": ["weight_ci_l0", "weight_cf_l0", "weight_co_l0"],
                "ln_gru": ["ln_ih_weight_l0", "ln_ih_bias_l0", "ln_hh_weight_l0", "ln_hh_bias_l0"]}[name]
    assert names == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"] + expected
    fresh = cls(4, 6)
    for n, p in fresh.named_parameters():
        if n.startswith("ln_") and "_weight" in n:
            assert torch.equal(p, torch.ones_like(p))
        elif n.startswith("ln_"):
            assert torch.equal(p, torch.zeros_like(p))
    # PackedSequence: same as running each sequence alone
    lengths = [5, 3, 2]
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    out, st = m(pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False))
    padded, _ = pad_packed_sequence(out)
    h_n = st[0] if isinstance(st, tuple) else st
    for b, L in enumerate(lengths):
        o1, s1 = m(x[:L, b])  # unbatched
        assert_close(padded[:L, b], o1)
        assert_close(h_n[:, b], s1[0] if isinstance(s1, tuple) else s1)


CELLS = {"ln_lstm": (fastrnn.LayerNormLSTMCell, fastrnn.LayerNormLSTM),
         "peep_lstm": (fastrnn.PeepholeLSTMCell, fastrnn.PeepholeLSTM),
         "ln_gru": (fastrnn.LayerNormGRUCell, fastrnn.LayerNormGRU)}


@pytest.mark.parametrize("name", list(CELLS))
def test_cell_is_one_step_of_the_layer(name):
    cell_cls, layer_cls = CELLS[name]
    cell = _perturb(cell_cls(4, 6, dtype=torch.float64))
    layer = layer_cls(4, 6, dtype=torch.float64)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            p.copy_(getattr(cell, n[:-3]))  # drop "_l0"
    x = torch.randn(3, 4, dtype=torch.float64)
    lstm = name.endswith("lstm")
    h = torch.randn(3, 6, dtype=torch.float64)
    hx = (h, torch.randn_like(h)) if lstm else h
    got = cell(x, hx)
    _, want = layer(x.unsqueeze(0), tuple(s.unsqueeze(0) for s in hx) if lstm else h.unsqueeze(0))
    for a, b in zip(got if lstm else [got], want if lstm else [want]):
        assert_close(a, b.squeeze(0))
    single = cell(x[0], tuple(s[0] for s in hx) if lstm else h[0])  # unbatched
    for a, b in zip(single if lstm else [single], got if lstm else [got]):
        assert_close(a, b[0])


# ------------------------------------------------------------------------------ zoneout and DropConnect
@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.LayerNormLSTM])
def test_zero_probabilities_are_the_plain_layer_exactly(cls):
    torch.manual_seed(1)
    a = cls(5, 8, num_layers=2, zoneout=0.0, weight_drop=0.0)
    torch.manual_seed(1)
    b = cls(5, 8, num_layers=2)
    assert list(a.state_dict()) == list(b.state_dict())
    x = torch.randn(6, 3, 5)
    for train in (True, False):
        a.train(train)
        b.train(train)
        oa, sa = a(x)
        ob, sb = b(x)
        assert torch.equal(oa, ob)
    if cls in (fastrnn.LSTM, fastrnn.GRU):
        ref = getattr(torch.nn, cls.__name__)(5, 8, num_layers=2)
        ref.load_state_dict(a.state_dict(), strict=True)  # still a drop-in


def test_variant_op_without_features_equals_plain_lstm():
    x, st, kw, bsz = make_case("lstm", "none")
    outs = FR.variant_lstm_layer(x, st["hx"], st["cx"], **kw)
    plain = FR.lstm_layer(x, st["hx"], st["cx"], kw["w_ih"], kw["w_hh"], kw["b_ih"], kw["b_hh"])
    for a, b in zip(outs, plain):
        assert_close(a, b)


@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.LayerNormLSTM, fastrnn.PeepholeLSTM,
                                 fastrnn.LayerNormGRU])
def test_zoneout_eval_is_deterministic_expectation(cls):
    m = cls(5, 8, zoneout=0.3, weight_drop=0.4).double().eval()
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    o1, _ = m(x)
    o2, _ = m(x)
    assert torch.equal(o1, o2)
    ref, _ = layer_ref(m, x) if cls not in (fastrnn.LSTM, fastrnn.GRU) else (None, None)
    if ref is None:  # plain cell with eval zoneout h' = p h + (1 - p) h~, W_hh unchanged
        p = [m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0]
        h0 = torch.zeros(3, 8, dtype=torch.float64)
        if cls is fastrnn.LSTM:
            ref = R.variant_lstm_layer_ref(x, h0, h0, *p, zoneout_p=0.3)[0]
        else:
            ref = R.variant_gru_layer_ref(x, h0, *p, zoneout_p=0.3)[0]
    assert_close(o1, ref)


@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.LayerNormLSTM])
def test_zoneout_training_mask_rate_and_reproducibility(cls):
    p = 0.3
    m = cls(6, 32, zoneout=p).train()
    x = torch.randn(10, 16, 6)
    torch.manual_seed(123)
    out, _ = m(x)
    torch.manual_seed(123)
    again, _ = m(x)
    assert torch.equal(out, again)  # reproducible under torch.manual_seed
    other, _ = m(x)
    assert not torch.equal(out, other)  # and a fresh draw otherwise
    # A zoned-out unit keeps its previous value bit for bit; count them (h_{-1} = 0 for step 0).
    prev = torch.cat([torch.zeros_like(out[:1]), out[:-1]])
    rate = (out == prev).double().mean().item()
    n = out.numel()
    assert abs(rate - p) < 6 * (p * (1 - p) / n) ** 0.5 + 1e-3, rate
    # and training zoneout differs from eval's expectation
    m.eval()
    assert not torch.allclose(m(x)[0], out)


def test_zoneout_training_equals_reference_with_the_same_mask():
    m = fastrnn.LayerNormLSTM(4, 6, zoneout=0.5).double().train()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    torch.manual_seed(7)
    out, (h, c) = m(x)
    torch.manual_seed(7)
    mask = torch.bernoulli(torch.full((5, 3, 12), 0.5, dtype=torch.float64))
    p = _layer_params(m)[0]
    z = torch.zeros(3, 6, dtype=torch.float64)
    ref = R.variant_lstm_layer_ref(x, z, z, *p[:4], tuple(p[4:]), None, mask, 0.5)
    for a, b in zip((out, h[0], c[0]), ref):
        assert_close(a, b)


@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.LayerNormLSTM])
def test_weight_drop_training(cls):
    p = 0.4
    m = cls(5, 32, weight_drop=p).double().train()
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    torch.manual_seed(11)
    out, _ = m(x)
    out.sum().backward()
    # dropped weights get exactly zero gradient: their rate is the drop rate
    g = m.weight_hh_l0.grad
    rate = (g == 0).double().mean().item()
    assert abs(rate - p) < 6 * (p * (1 - p) / g.numel()) ** 0.5, rate
    # the output is the plain cell run with W_hh * m / (1 - p), the mask drawn by F.dropout
    torch.manual_seed(11)
    w_eff = F.dropout(m.weight_hh_l0.detach(), p, training=True)
    assert torch.equal(w_eff == 0, g == 0)
    h0 = torch.zeros(4, 32, dtype=torch.float64)
    params = [getattr(m, n).detach() for n in m._all_weights[0]]
    params[1] = w_eff
    if cls is fastrnn.GRU:
        ref = R.gru_layer_ref(x, h0, *params)[0]
    elif cls is fastrnn.LSTM:
        ref = R.lstm_layer_ref(x, h0, h0, *params)[0]
    else:
        ref = R.variant_lstm_layer_ref(x, h0, h0, *params[:4], tuple(params[4:]))[0]
    assert_close(out.detach(), ref)
    # eval: W_hh unchanged
    m.eval()
    plain = cls(5, 32).double().eval()
    plain.load_state_dict(m.state_dict())
    assert torch.equal(m(x)[0], plain(x)[0])


def test_compile_fullgraph_layer_norm_lstm():
    torch._dynamo.reset()
    model = Tagger(fastrnn.LayerNormLSTM(8, 12, num_layers=2, bidirectional=True, batch_first=True, zoneout=0.1))
    model.eval()
    tokens = torch.randint(0, 20, (3, 7))
    eager = model(tokens)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(tokens)
    out.sum().backward()
    assert_close(out, eager)
    for p, e in zip(model.parameters(), eager_grads):
        assert_close(p.grad, e)


@pytest.mark.parametrize("loop", ["team", "per-step", "rows"])
@pytest.mark.parametrize("cell,features", PATHS)
def test_persistent_team_and_per_step_loops_agree(cell, features, loop, monkeypatch):
    """Small products run on W_hh packed in panels, split over a persistent team of threads (one
    parallel region for the whole loop) or, with FASTRNN_NO_TEAM, one call per step; with 16 rows
    (and a W_hh this small) each thread takes 8 rows through every step (team.h's row split)."""
    if loop == "per-step":
        monkeypatch.setenv("FASTRNN_NO_TEAM", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        T, B = (16, 16) if loop == "rows" else (6, 7)
        x, st, kw, bsz = make_case(cell, features, T=T, B=B, I=5, H=40, packed=True)
        for reverse in (False, True):
            outs = run(cell, "fused", x, st, kw, bsz, reverse)
            refs = run(cell, "ref", x, st, kw, bsz, reverse)
            for o, r in zip(outs, refs):
                assert_close(o, r)
            ps = leaves(x, st, kw)
            for gf, gr in zip(torch.autograd.grad(outs[0].sum(), ps), torch.autograd.grad(refs[0].sum(), ps)):
                assert_close(gf, gr)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("cell,features", PATHS)
def test_chunked_input_projection(cell, features, monkeypatch):
    """The input projection runs a few steps at a time: chunk edges (both directions, packed rows
    of shrinking batches) must not change any result."""
    monkeypatch.setenv("FASTRNN_CHUNK_STEPS", "2")
    x, st, kw, bsz = make_case(cell, features, T=7, B=5, packed=True)
    for reverse in (False, True):
        outs = run(cell, "fused", x, st, kw, bsz, reverse)
        refs = run(cell, "ref", x, st, kw, bsz, reverse)
        for o, r in zip(outs, refs):
            assert_close(o, r)


@pytest.mark.parametrize("mutate", ["data", "no_grad_inplace"])
def test_packed_weight_cache_sees_every_write(mutate):
    """Small products keep W_hh packed between calls; any write to W_hh must invalidate it."""
    m = fastrnn.LayerNormLSTM(8, 16).double()
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    m(x)  # packs and caches
    if mutate == "data":
        m.weight_hh_l0.data[3, 5] += 0.25  # .data writes do not bump the version counter
    else:
        with torch.no_grad():
            m.weight_hh_l0.mul_(1.5)
    out, _ = m(x)
    assert_close(out, layer_ref(m, x)[0])


def test_variant_details_found_by_review():
    """repr names each option once (it named zoneout/weight_drop twice); the variant cells refuse
    hidden_size=0 with a ValueError, as the variant layers (a ZeroDivisionError once); the stacked
    variant functions check zoneout, weight_drop and the parameter count before any kernel."""
    assert repr(fastrnn.LayerNormLSTM(3, 5, zoneout=0.1, weight_drop=0.2)) == (
        "LayerNormLSTM(3, 5, zoneout=0.1, weight_drop=0.2)")
    assert repr(fastrnn.PeepholeLSTM(3, 5, weight_drop=0.3)) == "PeepholeLSTM(3, 5, weight_drop=0.3)"
    for cls in (fastrnn.LayerNormLSTMCell, fastrnn.LayerNormGRUCell, fastrnn.PeepholeLSTMCell):
        with pytest.raises(ValueError, match="hidden_size must be greater than zero, got 0"):
            cls(3, 0)
    T, B, I, H = 3, 2, 3, 4
    x, h, c = torch.randn(T, B, I), torch.randn(1, B, H), torch.randn(1, B, H)
    P = [torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H)]
    for train in (True, False):
        with pytest.raises(ValueError, match="zoneout must be a probability in"):
            FR.variant_lstm(x, (h, c), P, True, 1, 0.0, train, False, False, zoneout=2.0)
        with pytest.raises(ValueError, match="weight_drop must be a probability in"):
            FR.variant_gru(x, h, [p[:3 * H] for p in P], True, 1, 0.0, train, False, False, weight_drop=-1.0)
    with pytest.raises(ValueError, match="params: expected 4 tensors"):
        FR.variant_gru(x, h, [p[:3 * H] for p in P[:3]], True, 1, 0.0, False, False, False)
    with pytest.raises(ValueError, match="params: expected 10 tensors"):
        FR.variant_lstm(x, (h, c), P, True, 1, 0.0, False, False, False, layer_norm=True)

