"""Fused ops vs the plain-PyTorch references: forward, every gradient, gradcheck, opcheck."""
import os
import pytest
import torch

import fastrnn
from fastrnn import functional as FR
from fastrnn import reference as R
from conftest import assert_close, assert_close_to_truth, isa_builds

CELLS = ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"]


def make_case(cell, T=5, B=3, I=4, H=6, P=3, dtype=torch.float64, bias=True, packed=False):
    G = {"lstm": 4, "lstm_proj": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}[cell]
    proj = cell == "lstm_proj"
    Ph = P if proj else H
    g = lambda *s: (torch.randn(*s, dtype=dtype) * 0.5).requires_grad_()
    w = dict(w_ih=g(G * H, I), w_hh=g(G * H, Ph), b_ih=g(G * H) if bias else None, b_hh=g(G * H) if bias else None)
    if proj:
        w["w_hr"] = g(P, H)
    if packed:
        lengths = sorted([T] + [int(x) for x in torch.randint(1, T + 1, (B - 1,))], reverse=True)
        batch_sizes = torch.tensor([sum(1 for L in lengths if L > t) for t in range(T)], dtype=torch.int64)
        x = g(int(batch_sizes.sum()), I)
    else:
        batch_sizes = None
        x = g(T, B, I)
    st = dict(hx=g(B, Ph))
    if cell.startswith("lstm"):
        st["cx"] = g(B, H)
    return x, st, w, batch_sizes


# The fused layer functions and their references take the same arguments in the same order.
FUSED = {"lstm": FR.lstm_layer, "gru": FR.gru_layer, "rnn": FR.rnn_layer}
REFERENCE = {"lstm": R.lstm_layer_ref, "gru": R.gru_layer_ref, "rnn": R.rnn_layer_ref}


def _run(impls, cell, x, st, w, batch_sizes, reverse):
    kind = cell.split("_")[0]
    states = [st["hx"], st["cx"]] if kind == "lstm" else [st["hx"]]
    weights = [w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"]] + ([w.get("w_hr")] if kind == "lstm" else [])
    extra = [cell.split("_")[1]] if kind == "rnn" else []
    return impls[kind](x, *states, *weights, batch_sizes, reverse, *extra)


def run_fused(cell, x, st, w, batch_sizes, reverse):
    return _run(FUSED, cell, x, st, w, batch_sizes, reverse)


def run_ref(cell, x, st, w, batch_sizes, reverse):
    return _run(REFERENCE, cell, x, st, w, batch_sizes, reverse)


def leaves(x, st, w):
    return [t for t in [x, *st.values(), *w.values()] if t is not None]


def check_both_directions(cell, x, st, w, bsz, dtype=None, scale_relative=False):
    """The fused op against the float64 reference in both directions: every output, and every
    input's gradient for random cotangents on all outputs. dtype: run the fused op on copies cast
    to it (checked against the truth with that dtype's bound). scale_relative: float64 too is
    checked relative to each tensor's largest element (assert_close_to_truth), for gradients that
    sum thousands of terms, where the reference's own rounding exceeds the elementwise atol."""
    if (dtype is None or dtype == torch.float64) and scale_relative:
        xd, std, wd, check = x, st, w, assert_close_to_truth
    elif dtype is None or dtype == torch.float64:
        xd, std, wd, check = x, st, w, assert_close
    else:
        cast = lambda t: t.detach().to(dtype).requires_grad_()  # noqa: E731
        xd, std, wd = cast(x), {k: cast(v) for k, v in st.items()}, {k: None if v is None else cast(v)
                                                                      for k, v in w.items()}
        check = assert_close_to_truth
    for reverse in (False, True):
        outs = run_fused(cell, xd, std, wd, bsz, reverse)
        refs = run_ref(cell, x, st, w, bsz, reverse)
        for o, r in zip(outs, refs):
            check(o, r)
        cot = [torch.randn_like(r) for r in refs]
        for gf, gr in zip(torch.autograd.grad(outs, leaves(xd, std, wd), [c.to(o.dtype) for c, o in zip(cot, outs)]),
                          torch.autograd.grad(refs, leaves(x, st, w), cot)):
            check(gf, gr)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell", CELLS)
def test_fused_matches_reference(cell, bias, reverse, packed, dtype, isa):
    x, st, w, bsz = make_case(cell, dtype=dtype, bias=bias, packed=packed, B=4)
    outs = run_fused(cell, x, st, w, bsz, reverse)
    refs = run_ref(cell, x, st, w, bsz, reverse)
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert_close(o, r)
    # every gradient, with a random cotangent on every output
    cot = [torch.randn_like(r) for r in refs]
    ps = leaves(x, st, w)
    g_fused = torch.autograd.grad(outs, ps, cot)
    g_ref = torch.autograd.grad(refs, ps, cot)
    for gf, gr in zip(g_fused, g_ref):
        assert_close(gf, gr)


@pytest.mark.parametrize("cell", CELLS)
def test_gemm_backends_agree(cell, gemm_backend):
    # Larger than the packing threshold so the packed MKL path, plain BLAS and at::mm all run.
    x, st, w, bsz = make_case(cell, T=7, B=5, I=9, H=16, P=5, dtype=torch.float64, packed=True)
    outs = run_fused(cell, x, st, w, bsz, False)
    refs = run_ref(cell, x, st, w, bsz, False)
    for o, r in zip(outs, refs):
        assert_close(o, r)
    g1 = torch.autograd.grad(outs[0].sum(), leaves(x, st, w))
    g2 = torch.autograd.grad(refs[0].sum(), leaves(x, st, w))
    for a, b in zip(g1, g2):
        assert_close(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_float32_packed_gemm_path(cell, gemm_backend, isa):
    # float32 is where MKL's packed GEMM is used; compare to the float64 reference, relative to
    # each output's scale (conftest's float32-against-truth bound): the ReLU RNN's outputs grow to
    # ~300 over these 6 steps at make_case's weight scale, so an element near 0 carries the
    # rounding of sums of hundreds (~1e-4), which an elementwise atol of 1e-5 does not allow for
    # in any order of summation (the fused input product's order happened to cross it).
    x, st, w, bsz = make_case(cell, T=6, B=8, I=32, H=32, P=16, dtype=torch.float32)
    outs = run_fused(cell, x, st, w, bsz, False)
    to64 = lambda d: {k: (v.detach().double() if v is not None else None) for k, v in d.items()}
    refs = run_ref(cell, x.detach().double(), to64(st), to64(w), bsz, False)
    for o, r in zip(outs, refs):
        assert_close_to_truth(o, r)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("B", [1, 3, 8, 9])
@pytest.mark.parametrize("cell", CELLS)
def test_single_step_backward(cell, B, reverse, isa):
    # T = 1 with up to 8 rows runs its own backward (one pass over the weights, split over
    # threads by gate rows); 9 rows take the general one. gradcheck in float64, and float32
    # against the float64 reference with sizes that split unevenly over the threads.
    x, st, w, bsz = make_case(cell, T=1, B=B, I=3, H=4, P=2)
    names = list(st) + [k for k, v in w.items() if v is not None]
    vals = [st.get(k, w.get(k)) for k in names]

    def f(x, *vals):
        d = dict(zip(names, vals))
        return run_fused(cell, x, {k: d[k] for k in st}, {k: d.get(k) for k in w}, bsz, reverse)

    assert torch.autograd.gradcheck(f, (x, *vals), eps=1e-6, atol=1e-8, rtol=1e-6)
    x, st, w, bsz = make_case(cell, T=1, B=B, I=67, H=131, P=37, dtype=torch.float32)
    to64 = lambda d: {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in d.items()}
    x64, st64, w64 = x.detach().double().requires_grad_(), to64(st), to64(w)
    refs = run_ref(cell, x64, st64, w64, bsz, reverse)
    cot = [torch.randn_like(r) for r in refs]
    g_ref = torch.autograd.grad(refs, leaves(x64, st64, w64), cot)
    outs = run_fused(cell, x, st, w, bsz, reverse)
    g = torch.autograd.grad(outs, leaves(x, st, w), [c.float() for c in cot])
    for a, b in zip(g, g_ref):
        assert_close(a.double(), b, dtype=torch.float32)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm_proj"])
def test_float32_weight_gradients_through_transposes(cell, packed, isa):
    # oneDNN's weight-gradient GEMMs take transposed dG, X and h_prev (cpu/transpose.h: AVX2
    # tiles in 256x16 blocks; the scalar blocks on the baseline ISA; h_prev gathered row by row
    # for packed batches). Sizes off every tile and block edge, more rows than one block, and
    # several backward chunks (FASTRNN_CHUNK_STEPS is read per call), against the float64
    # reference. Twice: the second call runs in the scratch buffers the first one left.
    import os
    from fastrnn import _C
    old_b, old_env = _C.get_gemm_backend(), os.environ.get("FASTRNN_CHUNK_STEPS")
    _C.set_gemm_backend("onednn")
    os.environ["FASTRNN_CHUNK_STEPS"] = "8"
    try:
        x, st, w, bsz = make_case(cell, T=11, B=37, I=13, H=9, P=5, dtype=torch.float32, packed=packed)  # 296-row chunks
        to64 = lambda d: {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in d.items()}
        x64, st64, w64 = x.detach().double().requires_grad_(), to64(st), to64(w)
        refs = run_ref(cell, x64, st64, w64, bsz, False)
        cot = [torch.randn_like(r) for r in refs]
        g_ref = torch.autograd.grad(refs, leaves(x64, st64, w64), cot)
        for _ in range(2):
            outs = run_fused(cell, x, st, w, bsz, False)
            g = torch.autograd.grad(outs, leaves(x, st, w), [c.float() for c in cot])
            for a, b in zip(g, g_ref):
                assert_close(a.double(), b, dtype=torch.float32)
    finally:
        _C.set_gemm_backend(old_b)
        if old_env is None:
            os.environ.pop("FASTRNN_CHUNK_STEPS", None)
        else:
            os.environ["FASTRNN_CHUNK_STEPS"] = old_env


# FASTRNN_FUSE_INPUT=1: the LSTM's and RNN's input product inside the steps, which the default
# takes only from 4 rows up (these cases have 2 or 3).
FUSE_MODES = pytest.mark.parametrize("fuse", ["", "1"], ids=["default", "fused-input"])


@FUSE_MODES
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck(cell, reverse, packed, fuse, monkeypatch):
    monkeypatch.setenv("FASTRNN_FUSE_INPUT", fuse)
    x, st, w, bsz = make_case(cell, T=3, B=3, I=2, H=3, P=2, packed=packed)
    names = list(st) + [k for k, v in w.items() if v is not None]
    vals = [st.get(k, w.get(k)) for k in names]

    def f(x, *vals):
        d = dict(zip(names, vals))
        s = {k: d[k] for k in st}
        ww = {k: d.get(k) for k in w}
        return run_fused(cell, x, s, ww, bsz, reverse)

    assert torch.autograd.gradcheck(f, (x, *vals), eps=1e-6, atol=1e-8, rtol=1e-6)


OPCHECK_CASES = {
    "lstm": lambda: make_case("lstm", T=3, B=2, I=3, H=4),
    "lstm_proj": lambda: make_case("lstm_proj", T=3, B=2, I=3, H=4, P=2),
    "gru": lambda: make_case("gru", T=3, B=2, I=3, H=4),
    "rnn": lambda: make_case("rnn_tanh", T=3, B=2, I=3, H=4),
    # T = 1 with few rows: the single-step forward and backward kernels
    "lstm_step": lambda: make_case("lstm", T=1, B=3, I=3, H=4),
    "gru_step": lambda: make_case("gru", T=1, B=3, I=3, H=4),
}


@FUSE_MODES
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck_forward(name, packed, fuse, monkeypatch):
    monkeypatch.setenv("FASTRNN_FUSE_INPUT", fuse)
    kind = name.replace("_step", "")
    x, st, w, bsz = OPCHECK_CASES[name]() if not packed else make_case(
        {"rnn": "rnn_tanh"}.get(kind, kind), T=3, B=2, I=3, H=4, P=2, packed=True)
    ops = torch.ops.fastrnn
    for train in (True, False):
        if name.startswith("lstm"):
            args = (x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], w.get("w_hr"), st["hx"], st["cx"], bsz, False,
                    train)
            op = ops.lstm_forward.default
        elif kind == "gru":
            args = (x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], st["hx"], bsz, True, train)
            op = ops.gru_forward.default
        else:
            args = (x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], st["hx"], bsz, False, train)
            op = ops.rnn_forward.default
        if not train:  # inference mode saves nothing, so autograd is not part of the contract
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)


# output_mask: (input, weights and biases, initial states)
MASKS = [(True, True, True), (False, True, True), (True, False, True), (True, True, False), (False, False, True),
         (False, True, False)]


def check_masked_results(op, args, names, groups):
    """op run with each output_mask: what the mask leaves out comes back empty, the rest equal to
    the full call's, and the fake kernel agrees (opcheck). groups: the result names of the
    input's, the weights', the states' gradients."""
    full = op(*args)
    for mask in MASKS:
        got = op(*args, list(mask))
        torch.library.opcheck(op, (*args, list(mask)))
        for name, g, f in zip(names, got, full):
            left_out = any(name in groups[k] and not mask[k] for k in range(3))
            if left_out:
                assert g.numel() == 0, (mask, name)
            else:
                assert torch.equal(g, f), (mask, name)


@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck_backward(name):
    x, st, w, bsz = OPCHECK_CASES[name]()
    kind = name.replace("_step", "")
    ops = torch.ops.fastrnn
    d = lambda t: t.detach()
    if name.startswith("lstm"):
        out, hy, cy, gates, cells, pin = ops.lstm_forward(x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], w.get("w_hr"),
                                                          st["hx"], st["cx"], None, False, True)
        args = (torch.randn_like(out), torch.randn_like(hy), torch.randn_like(cy), d(x), d(w["w_ih"]), d(w["w_hh"]),
                d(w["w_hr"]) if "w_hr" in w else None, d(st["hx"]), d(st["cx"]), None, False, d(out), d(gates),
                d(cells), d(pin))
        torch.library.opcheck(ops.lstm_backward.default, args)
        op = ops.lstm_backward.default
    elif kind == "gru":
        out, hy, gates, hn = ops.gru_forward(x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], st["hx"], None, False, True)
        args = (torch.randn_like(out), torch.randn_like(hy), d(x), d(w["w_ih"]), d(w["w_hh"]), d(st["hx"]), None, False,
                d(out), d(gates), d(hn))
        torch.library.opcheck(ops.gru_backward.default, args)
        op = ops.gru_backward.default
    else:
        out, hy = ops.rnn_forward(x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], st["hx"], None, False, False)
        args = (torch.randn_like(out), torch.randn_like(hy), d(x), d(w["w_ih"]), d(w["w_hh"]), d(st["hx"]), None, False,
                False, d(out))
        torch.library.opcheck(ops.rnn_backward.default, args)
        op = ops.rnn_backward.default
    names = [r.name for r in op._schema.returns]
    check_masked_results(op, args, names, (["grad_input"], [n for n in names if "_w_" in n or "_b_" in n],
                                           ["grad_hx", "grad_cx"]))


def test_inference_saves_nothing():
    x, st, w, _ = make_case("lstm")
    with torch.no_grad():
        out = torch.ops.fastrnn.lstm_forward(x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], None, st["hx"], st["cx"],
                                             None, False, False)
    assert all(t.numel() == 0 for t in out[3:])
    with torch.no_grad():
        out = torch.ops.fastrnn.gru_forward(x, w["w_ih"][:18], w["w_hh"][:18, :6], None, None, st["hx"], None, False,
                                            torch.is_grad_enabled())
    assert all(t.numel() == 0 for t in out[2:])


def test_backward_after_inference_forward_is_a_clear_error():
    x, st, w, _ = make_case("lstm")
    out = torch.ops.fastrnn.lstm_forward(x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], None, st["hx"], st["cx"],
                                         None, False, False)
    with pytest.raises(RuntimeError, match="train=False"):
        out[0].sum().backward()


def test_results_do_not_depend_on_thread_count():
    x, st, w, _ = make_case("lstm", T=8, B=16, I=32, H=64, dtype=torch.float32)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = run_fused("lstm", x, st, w, None, False)
        torch.set_num_threads(max(2, n))
        b = run_fused("lstm", x, st, w, None, False)
    finally:
        torch.set_num_threads(n)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_build_info():
    info = fastrnn.build_info()
    assert info["cpu_isa"] in {"avx512", "avx2", "sse", "aarch64", "generic"}
    assert info["num_threads"] == torch.get_num_threads()
    with pytest.raises(ValueError, match="gemm backend"):
        fastrnn._C.set_gemm_backend("fast")


def test_kernel_build_follows_the_cpu():
    """The kernels run the build for the CPU's widest vectors (AVX-512: 64 bytes, AVX2: 32, else
    16; every build used 64 until session 17, which made an AVX2 CPU's panel products 20x slow),
    and set_isa caps it."""
    from fastrnn import _C
    info, old = fastrnn.build_info(), _C.get_isa()
    try:
        _C.set_isa("auto")
        widest = _C.kernel_vector_bytes()
        assert info["kernel_vector_bytes"] == widest
        if not info["isa_builds"]:  # (clang, non-x86: the baseline build only)
            assert widest == 16
        elif os.path.exists("/proc/cpuinfo"):  # the x86-64-v4 / v3 levels' features, as Linux lists them
            flags = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":")[1].split())
            v3 = {"avx2", "fma", "bmi1", "bmi2"} <= flags
            v4 = v3 and {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
            assert widest == (64 if v4 else 32 if v3 else 16)
        else:
            assert widest in {"avx512": (64, 32), "avx2": (32, 16)}.get(info["cpu_isa"], (16,))
        _C.set_isa("avx2")
        assert (_C.get_isa(), _C.kernel_vector_bytes()) == ("avx2", min(widest, 32))
        _C.set_isa("baseline")
        assert (_C.get_isa(), _C.kernel_vector_bytes()) == ("baseline", 16)
        with pytest.raises(ValueError, match="isa must be"):
            _C.set_isa("avx9")
    finally:
        _C.set_isa(old)


@pytest.mark.parametrize("H", [16, 128], ids=["H16", "H128"])
@pytest.mark.parametrize("mutate", ["data", "no_grad_inplace", "inference_mode"])
def test_packed_weight_cache_sees_every_write(mutate, H, gemm_backend):
    """The fused path caches packed W_hh between calls; any write to W_hh must invalidate it.
    H=128 in float64: W_hh is 512 KB, compared with its cached copy in 256 KB pieces by the
    team's threads; the .data write lands in the last piece."""
    m = fastrnn.LSTM(8, H).double()
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    m(x)  # packs and caches
    w = m.weight_hh_l0
    if mutate == "data":
        w.data[-3, -5] += 0.25  # .data writes do not bump the version counter
    elif mutate == "no_grad_inplace":
        with torch.no_grad():
            w.mul_(1.5)
    else:
        with torch.inference_mode():
            out_before, _ = m(x)
        with torch.no_grad():
            w.add_(0.1)
    ref = torch.nn.LSTM(8, H).double()
    ref.load_state_dict(m.state_dict())
    ctx = torch.inference_mode() if mutate == "inference_mode" else torch.no_grad()
    with ctx:
        assert_close(m(x)[0], ref(x)[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_panel_products_past_one_k_block(dtype, isa):
    """Backward's dh = dG W_hh and grad_input = dG W_ih on the panel kernel with K = 4H = 2080 >
    2048 rows, which panel::gemm_impl takes 1024 rows at a time (the partial sums of each block
    kept in its tile; each block starts k0 rows into every stripe of a panel), and outputs of 520
    and 64 columns (a last panel with one occupied vector, and a single panel). Against torch.nn,
    forward and every gradient, in each kernel build."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(64, 520).double()
    m = fastrnn.LSTM(64, 520).double()
    m.load_state_dict(ref.state_dict())
    m = m.to(dtype)
    x = torch.randn(8, 5, 64, dtype=torch.float64)  # 40 rows: the panel products' minimum is 32
    outs, ref_outs = [], []
    for model, xin, sink in ((m, x.to(dtype), outs), (ref, x, ref_outs)):
        xin = xin.detach().requires_grad_()
        y, (h, c) = model(xin)
        g = torch.Generator().manual_seed(1)
        cot = [torch.randn(t.shape, dtype=torch.float64, generator=g).to(t.dtype) for t in (y, h, c)]
        grads = torch.autograd.grad((y, h, c), [xin, *model.parameters()], cot)
        sink += [t.detach() for t in (y, h, c, *grads)]
    assert len(outs) == len(ref_outs) == 3 + 1 + 4
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        assert a.dtype == dtype
        if dtype == torch.float64:
            assert_close(a, b, msg=f"result {i}")
        else:  # (float32 sums of 2080 terms: normwise against the float64 truth)
            assert_close_to_truth(a, b)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN", "PeepholeLSTM"])
def test_packed_weight_cache_keys_the_kernel_build(cell):
    """Packed panels are laid out for the kernel build that runs (panel::stripe_vecs: a panel's
    whole rows with AVX-512, 64-byte stripes below), so a packing cached under one build must not
    serve another: each build in turn, then the first again, on the same weights and cache. (Only
    AVX-512 CPUs have two layouts; on others every build shares one and this checks each build.)
    PeepholeLSTM, with zero peepholes, is an LSTM on the variant kernels' own packing."""
    from fastrnn import _C
    torch.manual_seed(0)
    ref = getattr(torch.nn, "LSTM" if cell == "PeepholeLSTM" else cell)(40, 48)
    m = getattr(fastrnn, cell)(40, 48)
    theirs = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(theirs[n]) if n in theirs else p.zero_()
    x = torch.randn(6, 9, 40)
    builds, old = isa_builds(), _C.get_isa()
    try:
        with torch.no_grad():
            want = ref(x)[0]
            for name in builds + builds[:1]:
                _C.set_isa(name)
                assert_close(m(x)[0], want, msg=name)
    finally:
        _C.set_isa(old)


@pytest.mark.parametrize("team", [True, False], ids=["team", "per-step"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_persistent_team_and_per_step_regions_agree(cell, packed, team, monkeypatch):
    """Hidden sizes with several panels, so the time loops run as one parallel region with
    barriers between steps (or, with FASTRNN_NO_TEAM, one region per step)."""
    if not team:
        monkeypatch.setenv("FASTRNN_NO_TEAM", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_both_directions(cell, *make_case(cell, T=7, B=5, I=12, H=80, packed=packed))
    finally:
        torch.set_num_threads(n)


def test_float_tanh_accuracy(isa):
    """The kernels' float tanh (fastrnn/cells.h's rational form) on 32768 values in [-12, 12]
    plus tiny ones, through a tanh RNN whose pre-activations are the inputs themselves
    (W_ih = 1, W_hh = 0, no bias: every output is tanh(x_t)); 80 units run a full panel's vector
    path and a partial panel's loop. Measured on every float: 2.9e-7 relative with FMA, 4.1e-7
    without (the baseline ISA); the bound is 4.5e-7, NaN stays NaN and +-inf gives +-1."""
    H = 80
    x = torch.cat([torch.linspace(-12, 12, 32768 - 64), torch.logspace(-12, -2, 60),
                   torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0])]).reshape(8, -1, 1)
    w_ih, w_hh = torch.ones(H, 1), torch.zeros(H, H)
    out = FR.rnn_layer(x, torch.zeros(x.shape[1], H), w_ih, w_hh, None, None, None, False, "tanh")[0]
    xs = x.expand(-1, -1, H)  # (the special values sit at the last step: no NaN reaches h)
    truth = torch.tanh(xs.double())
    ok = ~xs.isnan()
    rel = ((out.double() - truth).abs() / truth.abs())[ok & (truth != 0)]
    assert rel.max().item() <= 4.5e-7
    assert out[xs.isnan()].isnan().all()
    assert torch.equal(out[xs.isinf()], torch.sign(xs[xs.isinf()]))


# (threads, T, B, I, H, bias) of the fused-input test: "one" runs every step on the calling
# thread (B = 3, no bias: the steps add a zero bias row); "rows" splits 9 rows over 2 threads
# (team.h's row split); "team" splits each step's panels over a persistent team (B = 4, the
# LSTM's W_hh 17 panels of 8 float64 units).
FUSE_SIZES = {"one": (1, 6, 3, 5, 9, False), "rows": (2, 60, 9, 30, 48, True), "team": (2, 5, 4, 7, 130, True)}


@pytest.mark.parametrize("fuse", ["0", "1"], ids=["chunk-gemm", "fused"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh", "rnn_relu", "gru"])
@pytest.mark.parametrize("size", FUSE_SIZES)
def test_fused_input_product(size, cell, packed, fuse, monkeypatch, capfd):
    """Each step's x W_ih^T taken in the same pass as h W_hh^T, the folded bias added in the gate
    math (FASTRNN_FUSE_INPUT=1), or by the chunk GEMMs before the steps (=0), on each of the
    forward's step loops, forward and reverse, against the float64 reference. The GRU keeps its
    chunk projection (r scales only the recurrent part of n). The profile names the loop that ran.
    Gradients sum hundreds of terms here, so the bound is 1e-10 of each tensor's scale (a
    cancelling element of grad_input can miss the elementwise 1e-10 on either path)."""
    threads, T, B, I, H, bias = FUSE_SIZES[size]
    monkeypatch.setenv("FASTRNN_FUSE_INPUT", fuse)
    monkeypatch.setenv("FASTRNN_PROFILE", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, st, w, bsz = make_case(cell, T=T, B=B, I=I, H=H, bias=bias, packed=packed)
        # Weights near torch.nn's init scale: make_case's 0.5 makes the 60-step tanh RNN chaotic,
        # its gradients then moving by 1e-7 with the order of any sum (either path, the reference).
        w = {k: None if v is None else (v.detach() * 0.2).requires_grad_() for k, v in w.items()}
        check_both_directions(cell, x, st, w, bsz, scale_relative=True)
    finally:
        torch.set_num_threads(n)
    loops = [line for line in capfd.readouterr().err.splitlines() if "fused forward: time loop" in line]
    assert loops and all(("input fused" in line) == (fuse == "1" and cell != "gru") for line in loops)
    if size == "rows":
        assert all("rows split" in line for line in loops)


@pytest.mark.parametrize("B", [8, 14, 50])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_panel_row_blocks_and_long_panels(cell, packed, B):
    """The panel kernels' blocking: rows split into balanced blocks (8 rows as 4 + 4, 14 as
    5 + 5 + 4), more than 48 rows taken in groups, and backward's dh = dG W_hh over more than
    2048 gate rows (G*H > 2048) taken 1024 rows of the panel at a time, partial sums carried.
    The gradients here sum 2100 terms of magnitude up to ~100: torch's float64 reference itself
    moves by 2.3e-12 between 1 and 2 threads (measured on an Intel Xeon, GRU, B=50), above the
    elementwise atol of 1e-12, so the bound is 1e-10 of each tensor's scale."""
    H = {"lstm": 520, "gru": 700}[cell]
    check_both_directions(cell, *make_case(cell, T=3, B=B, I=4, H=H, packed=packed), scale_relative=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["auto", "fused", "onednn"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("cell", CELLS)
def test_chunked_input_projection(cell, packed, backend, dtype, monkeypatch):
    """The forward's input projection and the backward's weight gradients and grad_input run a
    few steps at a time; chunk edges (forward and reverse, packed rows of shrinking batches, and
    oneDNN's transposed float32 operands) must not change any result."""
    from fastrnn import _C
    monkeypatch.setenv("FASTRNN_CHUNK_STEPS", "3")
    old = _C.get_gemm_backend()
    _C.set_gemm_backend(backend)
    try:
        x, st, w, bsz = make_case(cell, T=8, B=5, I=6, H=20, P=7, packed=packed)  # float64 truth
        cast = lambda t: t.detach().to(dtype).requires_grad_()  # noqa: E731
        xd, std, wd = cast(x), {k: cast(v) for k, v in st.items()}, {k: cast(v) for k, v in w.items() if v is not None}
        for reverse in (False, True):
            outs = run_fused(cell, xd, std, wd, bsz, reverse)
            refs = run_ref(cell, x, st, w, bsz, reverse)
            check = assert_close if dtype == torch.float64 else assert_close_to_truth
            for o, r in zip(outs, refs):
                check(o, r)
            for gf, gr in zip(torch.autograd.grad(outs[0].sum(), leaves(xd, std, wd)),
                              torch.autograd.grad(refs[0].sum(), leaves(x, st, w))):
                check(gf, gr)
    finally:
        _C.set_gemm_backend(old)


# B, I, H, P: chunks of 3 steps of 36 rows (whole panels to a thread) or of 120 (panels split
# by rows, a thread's share ending inside a panel). The last panel of I, P and H (P = H without
# a projection) holds, in float32 (panels of 64 columns, vectors of 16), 8, 6 and 16 columns
# (one vector) in the first size and 36, 26 and 36 (three, two, three) in the second; in float64
# (panels of 32, vectors of 8) 8, 6, 16 and 4, 26, 4.
CHUNK_SIZES = [(12, 72, 80, 70), (40, 100, 100, 90)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("size", CHUNK_SIZES, ids=["whole-panels", "row-split"])
def test_panel_chunk_products(cell, packed, dtype, size, monkeypatch):
    """Inputs and states wide enough (I, P >= 64) for the chunk GEMMs on the panel kernel: the
    forward projection with its bias, grad_input, and the weight gradients accumulated in place
    over chunks of 3 steps (h_prev gathered from packed rows), forward and reverse, on 2 threads
    (each one's share weighted by the columns its panels hold: a last panel partly past N runs
    only its occupied vectors), against the float64 reference."""
    monkeypatch.setenv("FASTRNN_CHUNK_STEPS", "3")
    B, I, H, P = size
    x, st, w, bsz = make_case(cell, T=8, B=B, I=I, H=H, P=P, packed=packed)
    assert x.numel() // I >= 32  # rows enough for the panel path (fixed seed: conftest)
    # Weights at torch.nn's init scale (~1/sqrt(H)): make_case's 0.5 saturates every gate at this
    # width, where the gradients cancel (the same errors on every GEMM backend).
    w = {k: None if v is None else (v.detach() * 0.2).requires_grad_() for k, v in w.items()}
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_both_directions(cell, x, st, w, bsz, dtype)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B", [1, 3, 5, 8])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell", CELLS)
def test_single_step_matches_reference(cell, bias, B, dtype, isa):
    """T = 1 with few rows (a frame at a time, and the cells) runs the single-step kernel: dot
    products straight from the weights in blocks of 16 units. Sizes straddle its blocking: H not
    a multiple of 16 (a partial block), I and H not multiples of the vector width (scalar tails),
    B not a multiple of its 4-row groups; forward and every gradient vs the reference."""
    x, st, w, bsz = make_case(cell, T=1, B=B, I=37, H=35, P=7, dtype=dtype, bias=bias)
    outs = run_fused(cell, x, st, w, bsz, False)
    refs = run_ref(cell, x, st, w, bsz, False)
    for o, r in zip(outs, refs):
        assert_close(o, r)
    with torch.no_grad():
        for o, r in zip(run_fused(cell, x, st, w, bsz, False), refs):
            assert_close(o, r)
    cot = [torch.randn_like(r) for r in refs]
    ps = leaves(x, st, w)
    for gf, gr in zip(torch.autograd.grad(outs, ps, cot), torch.autograd.grad(refs, ps, cot)):
        assert_close(gf, gr)


# ------------------------------------------------------------- bidirectional layer ops (*_bidir_*)
def _bidir_case(cell, T, B, I, H, packed=False, dtype=torch.float64, bias=True):
    P = min(4, H - 1)  # (lstm_proj)
    x, st, w, bsz = make_case(cell, T=T, B=B, I=I, H=H, P=P, dtype=dtype, bias=bias, packed=packed)
    _, st_r, w_r, _ = make_case(cell, T=T, B=B, I=I, H=H, P=P, dtype=dtype, bias=bias, packed=packed)
    return x, (st, w), (st_r, w_r), bsz


def _bidir_args(cell, x, f, r, bsz, train):
    """The *_bidir_forward arguments; the last is train (LSTM, GRU) or relu (RNN)."""
    kind = cell.split("_")[0]

    def one(st, w):
        ws = [w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"]]
        return ws + [w.get("w_hr"), st["hx"], st["cx"]] if kind == "lstm" else ws + [st["hx"]]
    return (x, *one(*f), *one(*r), bsz, cell == "rnn_relu" if kind == "rnn" else train)


# The differentiable outputs (output and final states) of each direction, by index.
BIDIR_OUTS = {"lstm": ((0, 1, 2), (6, 7, 8)), "gru": ((0, 1), (4, 5)), "rnn": ((0, 1), (2, 3))}


def _bidir_op(cell):
    return getattr(torch.ops.fastrnn, cell.split("_")[0] + "_bidir_forward")


# Sizes on both sides of the threshold above which the two directions run at once (1M
# multiply-adds a direction): the sequential and the concurrent path.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("variant", ["dense", "packed", "nobias"])
@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"])
def test_bidir_op_matches_two_directions(cell, variant, size, threads):
    """*_bidir_forward and their backward give what the single-direction ops (reverse False, then
    True) give, every output and gradient, float64."""
    T, B, I, H = (4, 3, 5, 6) if size == "small" else (30, 16, 40, 48)
    kind = cell.split("_")[0]
    x, f, r, bsz = _bidir_case(cell, T, B, I, H, packed=variant == "packed", bias=variant != "nobias")
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        res = _bidir_op(cell)(*_bidir_args(cell, x, f, r, bsz, True))
        got_out = [res[i] for i in BIDIR_OUTS[kind][0] + BIDIR_OUTS[kind][1]]
        ref = []
        for (st, w), rev in ((f, False), (r, True)):
            ref += run_fused(cell, x, st, w, bsz, rev)
        for o, e in zip(got_out, ref):
            assert_close(o, e)
        cot = [torch.randn_like(e) for e in ref]
        inputs = leaves(x, *f) + [t for t in leaves(x, *r) if t is not x]
        for a, b in zip(torch.autograd.grad(got_out, inputs, cot), torch.autograd.grad(ref, inputs, cot)):
            assert_close(a, b)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("variant", ["dense", "packed"])
@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"])
def test_bidir_op_gradcheck(cell, variant):
    kind = cell.split("_")[0]
    x, f, r, bsz = _bidir_case(cell, 3, 2, 2, 3, packed=variant == "packed")
    args = _bidir_args(cell, x, f, r, bsz, True)
    idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def fn(*vals):
        a = list(args)
        for i, v in zip(idx, vals):
            a[i] = v
        out = _bidir_op(cell)(*a)
        return tuple(out[i] for i in BIDIR_OUTS[kind][0] + BIDIR_OUTS[kind][1])

    vals = [args[i] for i in idx]
    assert torch.autograd.gradcheck(fn, vals, eps=1e-6, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(fn, vals, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_bidir_opcheck(cell, packed):
    kind = cell.split("_")[0]
    x, f, r, bsz = _bidir_case(cell, 3, 2, 3, 4, packed=packed)
    for train in (True, False):
        args = _bidir_args(cell, x, f, r, bsz, train)
        if not train:
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(_bidir_op(cell).default, args)
    # the backward op, its arguments by schema name
    res = _bidir_op(cell)(*_bidir_args(cell, x, f, r, bsz, True))
    fwd_names = [a.name for a in _bidir_op(cell).default._schema.arguments]
    vals = {k: (v.detach() if isinstance(v, torch.Tensor) else v)
            for k, v in zip(fwd_names, _bidir_args(cell, x, f, r, bsz, True))}
    for ret, t in zip(_bidir_op(cell).default._schema.returns, res):
        vals[ret.name] = t.detach()
        vals["grad_" + ret.name] = torch.randn_like(t)
    bwd = getattr(torch.ops.fastrnn, kind + "_bidir_backward").default
    args = tuple(vals[a.name] for a in bwd._schema.arguments if a.name != "output_mask")
    torch.library.opcheck(bwd, args)
    names = [r.name for r in bwd._schema.returns]
    check_masked_results(bwd, args, names, (["grad_input"], [n for n in names if "_w_" in n or "_b_" in n],
                                            [n for n in names if n.startswith(("grad_hx", "grad_cx"))]))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_bidir_op_names_the_reverse_direction_in_errors(cell):
    """A malformed reverse-direction argument (the *_r ones) is rejected before either direction
    runs, and the message says which direction it was."""
    kind = cell.split("_")[0]
    x, f, r, bsz = _bidir_case(cell, 3, 2, 3, 4)
    args = list(_bidir_args(cell, x, f, r, bsz, False))
    names = [a.name for a in _bidir_op(cell).default._schema.arguments]
    good = _bidir_op(cell)(*args)
    assert good[0].shape[:2] == (3, 2)
    args[names.index("w_hh_r")] = args[names.index("w_hh_r")][:, :-1]  # one column short
    with pytest.raises(RuntimeError, match=r"reverse direction.*w_hh"):
        _bidir_op(cell)(*args)
    bad_fwd = list(_bidir_args(cell, x, f, r, bsz, False))
    bad_fwd[names.index("hx")] = bad_fwd[names.index("hx")][:1]  # batch 1, input batch 2
    with pytest.raises(RuntimeError, match=rf"fastrnn\.{kind}_bidir_forward: .*hx"):
        _bidir_op(cell)(*bad_fwd)


# ------------------------------------------------------------------------ recurrent_stack
STACK_MODES = {"lstm": "LSTM", "lstm_proj": "LSTM", "gru": "GRU", "rnn_tanh": "RNN_TANH", "rnn_relu": "RNN_RELU"}


def stack_case(cell, L=2, bidirectional=True, batch_first=False, packed=False, T=4, B=3, I=3, H=4, P=2):
    """recurrent_stack's arguments (float64, requiring grad) for a stack of L layers."""
    torch.manual_seed(7)
    D = 2 if bidirectional else 1
    Ph = P if cell == "lstm_proj" else H
    x, _, _, bsz = make_case(cell, T=T, B=B, I=I, H=H, P=P, packed=packed)
    if batch_first and not packed:
        x = x.detach().transpose(0, 1).contiguous().requires_grad_()
    params = []
    for layer in range(L):
        for _ in range(D):
            _, _, w, _ = make_case(cell, T=1, B=1, I=I if layer == 0 else D * Ph, H=H, P=P)
            params += [v for v in w.values() if v is not None]
    nb = int(bsz[0]) if packed else B
    g = lambda *s: (torch.randn(*s, dtype=torch.float64) * 0.5).requires_grad_()  # noqa: E731
    hx, cx = g(L * D, nb, Ph), (g(L * D, nb, H) if cell.startswith("lstm") else None)
    return (STACK_MODES[cell], x, hx, cx, params, True, L, 0.0, False, bidirectional, batch_first, bsz)


def _stack_ref(mode, x, hx, cx, params, has_biases, L, dropout, train, bidirectional, batch_first, bsz):
    """The same stack from fastrnn.reference's stacked references (dropout 0), as the op returns
    it: (output, h_n, c_n), c_n empty for the GRU and RNN."""
    D = 2 if bidirectional else 1
    per = len(params) // (L * D)
    groups = [tuple(params[k * per:(k + 1) * per]) for k in range(L * D)]
    if mode == "LSTM":
        groups = [g if len(g) == 5 else (*g, None) for g in groups]
        out, (h, c) = R.lstm_ref(x, (hx, cx), groups, L, bidirectional, batch_first, bsz)
        return out, h, c
    if mode == "GRU":
        out, h = R.gru_ref(x, hx, groups, L, bidirectional, batch_first, bsz)
    else:
        out, h = R.rnn_ref(x, hx, groups, L, bidirectional, batch_first, bsz, mode.split("_")[1].lower())
    return out, h, torch.empty(0, dtype=x.dtype)


@pytest.mark.parametrize("layout", ["dense", "batch_first", "packed", "one_layer"])
@pytest.mark.parametrize("cell", list(STACK_MODES))
def test_recurrent_stack_matches_the_layer_references(cell, layout):
    """The whole-stack op against the per-layer references, float64: outputs and every gradient."""
    args = stack_case(cell, batch_first=layout == "batch_first", packed=layout == "packed",
                      L=1 if layout == "one_layer" else 2, bidirectional=layout != "one_layer")
    got = torch.ops.fastrnn.recurrent_stack(*args)
    ref = _stack_ref(*args)
    for a, b in zip(got, ref):
        assert_close(a, b)
    inputs = [t for t in (args[1], args[2], args[3], *args[4]) if t is not None]
    cot = [torch.randn_like(r) for r in ref[:3 if cell.startswith("lstm") else 2]]
    for ga, gb in zip(torch.autograd.grad(got[:len(cot)], inputs, cot), torch.autograd.grad(ref[:len(cot)], inputs, cot)):
        assert_close(ga, gb)


@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "gru", "rnn_relu"])
def test_recurrent_stack_gradcheck_and_opcheck(cell):
    args = stack_case(cell, T=3, B=2, I=2, H=3, P=2)
    n_out = 3 if cell.startswith("lstm") else 2
    tensors = [args[1], args[2]] + ([args[3]] if args[3] is not None else []) + list(args[4])

    def fn(*ts):
        x, hx, *rest = ts
        cx = rest.pop(0) if args[3] is not None else None
        return torch.ops.fastrnn.recurrent_stack(args[0], x, hx, cx, list(rest), *args[5:])[:n_out]

    assert torch.autograd.gradcheck(fn, tensors)
    torch.library.opcheck(torch.ops.fastrnn.recurrent_stack.default, args)
    detached = tuple([p.detach() for p in a] if isinstance(a, list) else a.detach() if isinstance(a, torch.Tensor)
                     else a for a in args)
    torch.library.opcheck(torch.ops.fastrnn.recurrent_stack.default, detached)


def test_state_copy_op():
    """fastrnn::state_copy, what the layers give a layer op as its initial state while
    torch.compile traces (test_compile.py): a fresh contiguous copy with an identity gradient."""
    x = torch.randn(3, 5, dtype=torch.float64).t().requires_grad_()  # non-contiguous
    y = torch.ops.fastrnn.state_copy(x)
    assert y.is_contiguous() and torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    assert torch.autograd.gradcheck(torch.ops.fastrnn.state_copy, (x,))
    assert torch.autograd.gradgradcheck(torch.ops.fastrnn.state_copy, (x,))
    torch.library.opcheck(torch.ops.fastrnn.state_copy.default, (x,))


def test_state_copy_names_a_bad_argument():
    """state_copy given None or a tensor that is not dense names itself and the argument (once:
    "tensor does not have a device", a nested tensor's internal error)."""
    bad = [None, torch.ones(2, 2).to_sparse()]
    for x in bad:
        with pytest.raises(RuntimeError, match="fastrnn.state_copy: x must be"):
            torch.ops.fastrnn.state_copy(x)


BACKWARD_OPS = ("lstm_backward", "gru_backward", "rnn_backward", "lstm_bidir_backward", "gru_bidir_backward",
                "rnn_bidir_backward", "sdpa_backward", "additive_attention_backward", "variant_lstm_backward",
                "variant_gru_backward")


@pytest.mark.parametrize("op", BACKWARD_OPS)
def test_backward_ops_refuse_to_be_differentiated(op):
    """The *_backward ops have no gradient of their own: given an argument that requires grad
    under grad mode they raise, naming the op and the argument (once: outputs that required grad
    and, on backward, gradients left None with a deprecation warning; or, for w_ih, an internal
    "mm(): functions with out=..." error). Under no_grad the same call runs as before."""
    import test_malformed_ops as M
    assert set(BACKWARD_OPS) == {o for o in M.OPS if o.endswith("_backward")}
    args = M.base_args(op, "dense")
    fn = getattr(torch.ops.fastrnn, op)
    with torch.no_grad():
        expected = fn(*args.values())
    floats = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
    assert len(floats) >= 4
    for k in floats:
        a = dict(args, **{k: args[k].detach().clone().requires_grad_()})
        with pytest.raises(RuntimeError, match=f"fastrnn::{op} is not differentiable, and its argument {k} requires"):
            fn(*a.values())
        with torch.no_grad():
            got = fn(*a.values())
        for g, e in zip(got, expected):
            assert torch.equal(g, e) and not g.requires_grad


@pytest.mark.parametrize("H", [16, 33])
def test_saturated_lstm_gates_match_torch(H, isa):
    """Saturated pre-activations (|x| of 20, 1e4, inf) through a float32 LSTM of two steps (the
    multi-step kernels, vector path): the candidate gate is exactly +-1 as torch's tanh rounds it,
    so c_T and every gradient equal torch.nn's, NaN where its NaN is (0 * inf). The rational tanh
    once stopped 4 ulp short of 1 there: c_T = 1.9999995 and a g-gate gradient of 0.0095 at
    x = 1e4 where torch's is 0, inf where torch's is NaN."""
    ours, ref = fastrnn.LSTM(1, H), torch.nn.LSTM(1, H)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight_ih_l0.fill_(1.0)
            m.weight_hh_l0.zero_()
            m.bias_ih_l0.zero_()
            m.bias_hh_l0.zero_()
    for v in (20.0, -20.0, 1e4, float("inf")):
        x = torch.full((2, 3, 1), v)
        res = []
        for m in (ours, ref):
            out, (h, c) = m(x)
            res.append((out, c, *torch.autograd.grad(c.sum() + out.sum(), (m.weight_ih_l0, m.weight_hh_l0))))
        for got, want in zip(*res):
            assert torch.equal(got.isnan(), want.isnan()), v
            assert_close(got.nan_to_num(), want.nan_to_num())
