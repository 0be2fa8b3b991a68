"""The CUDA kernels (csrc/cuda): kernel vs plain-PyTorch reference vs torch.nn on cuDNN, forward
and backward, every dtype, the persistent small-batch kernel, gradcheck in float64, opcheck, and
bad input. Runs where a GPU is present and fastrnn was built with its CUDA kernels; skipped
otherwise, with the reason."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
import fastrnn.functional as FR
import conftest
from conftest import assert_close, assert_close_to_truth, cfg_id, flat, kwargs_of

HAS_GPU = torch.cuda.is_available()
BUILT = fastrnn._C.build_info()["cuda"]
pytestmark = [
    pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU on this machine"),
    pytest.mark.skipif(HAS_GPU and not BUILT, reason="fastrnn was built without its CUDA kernels "
                       "(no CUDA compiler or a CPU-only torch at build time)"),
]

DEV = "cuda"
PAIRS = conftest.layer_pairs()


@pytest.fixture(autouse=True)
def exact_float32():
    """cuDNN and cuBLAS in full float32 (no TF32), so float32 comparisons test the kernels."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def make_pair(kind, *args, dtype=torch.float32, **kw):
    return conftest.make_pair(kind, *args, dtype=dtype, device=DEV, **kw)


def cuda_kernels(fn):
    """Names of the CUDA kernels fn() launches."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


def run(module, x, hx, cot_dtype=None, leaf=None):
    """Outputs and every gradient (input, states, parameters) for fixed cotangents: drawn in
    float32 (randn's stream depends on the dtype), rounded to cot_dtype (the low-precision run's
    dtype, so its float64 truth gets the same values), then cast to each output's dtype. leaf: the
    tensor x was made from (a PackedSequence's padded source)."""
    out = module(x, hx) if hx is not None else module(x)
    outs = flat(out)
    g = torch.Generator(device=DEV).manual_seed(0)
    cot = [torch.randn(t.shape, device=DEV, dtype=torch.float32, generator=g).to(cot_dtype or t.dtype).to(t.dtype)
           for t in outs]
    leaves = [x if leaf is None else leaf] + ([*hx] if isinstance(hx, tuple) else [hx] if hx is not None else []) + list(module.parameters())
    # retain_graph: the caller runs several modules on one PackedSequence (one packing graph)
    grads = torch.autograd.grad(outs, leaves, cot, allow_unused=True, retain_graph=True)
    return outs, grads


def inputs(kind, ref, T, B, I, dtype, packed=False, with_hx=True, seed=0):
    torch.manual_seed(seed)
    D = 2 if ref.bidirectional else 1
    P = getattr(ref, "proj_size", 0) or ref.hidden_size
    shape = (B, T, I) if ref.batch_first else (T, B, I)
    x = torch.randn(*shape, device=DEV, dtype=dtype, requires_grad=True)
    hx = None
    if with_hx:
        h = torch.randn(ref.num_layers * D, B, P, device=DEV, dtype=dtype, requires_grad=True)
        hx = (h, torch.randn(ref.num_layers * D, B, ref.hidden_size, device=DEV, dtype=dtype, requires_grad=True)) \
            if kind == "LSTM" else h
    if packed:
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T
        x_in = pack_padded_sequence(x, lengths, batch_first=ref.batch_first, enforce_sorted=False)
        return x, x_in, hx
    return x, x, hx


def double_copy(module):
    import copy
    return copy.deepcopy(module).double()


def as_double(x_in, x, batch_first):
    """x_in (x itself, or a PackedSequence made from x) rebuilt from a float64 leaf copy of x."""
    xd = x.detach().double().requires_grad_()
    if isinstance(x_in, torch.nn.utils.rnn.PackedSequence):
        return pack_padded_sequence(xd, pad_lengths(x_in), batch_first=batch_first, enforce_sorted=False), xd
    return xd, xd


def compare_modules(ref, ours, x, x_in, hx, dtype):
    """ours against torch.nn (cuDNN): float64 to rounding; float32 outputs elementwise and the
    gradients normwise against the float64 truth (cuDNN's float32 gradients are no truth: both
    sides' rounding is of the bound's size)."""
    ro, rg = run(ref, x_in, hx, leaf=x)
    oo, og = run(ours, x_in, hx, leaf=x)
    for a, b in zip(oo, ro):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        assert_close(a, b, dtype=dtype)
    if dtype == torch.float64:
        truth = rg
    else:
        xd_in, xd = as_double(x_in, x, ref.batch_first)
        hd = tuple(h.detach().double().requires_grad_() for h in hx) if isinstance(hx, tuple) else (
            hx.detach().double().requires_grad_() if hx is not None else None)
        _, truth = run(double_copy(ref), xd_in, hd, cot_dtype=dtype, leaf=xd)
    for a, b, r in zip(og, truth, rg):
        assert (a is None) == (r is None)
        if a is not None and b is not None:
            if dtype == torch.float64:
                assert_close(a, b, dtype=dtype)
            else:
                assert_close_to_truth(a, b)


CONFIGS = [
    # kind, num_layers, bidirectional, batch_first, bias, proj_size
    ("LSTM", 1, False, False, True, 0),
    ("LSTM", 2, True, False, True, 0),
    ("LSTM", 2, False, True, False, 0),
    ("LSTM", 2, True, True, True, 3),
    ("GRU", 1, False, False, True, 0),
    ("GRU", 2, True, True, True, 0),
    ("GRU", 1, False, False, False, 0),
    ("RNN", 1, False, False, True, 0),
    ("RNN", 2, True, True, False, 0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_layers_match_cudnn(cfg, dtype, packed):
    """Training: outputs, final states and every gradient equal torch.nn's (cuDNN)."""
    ref, ours = make_pair(cfg[0], 5, 7, dtype=dtype, **kwargs_of(cfg))
    x, x_in, hx = inputs(cfg[0], ref, 6, 4, 5, dtype, packed=packed)
    compare_modules(ref, ours, x, x_in, hx, dtype)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_nonlinearity_and_no_hx(nonlinearity):
    ref, ours = make_pair("RNN", 4, 6, nonlinearity=nonlinearity, num_layers=2, dtype=torch.float64)
    x, x_in, hx = inputs("RNN", ref, 5, 3, 4, torch.float64, with_hx=False)
    compare_modules(ref, ours, x, x_in, hx, torch.float64)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_unbatched_and_empty_batch(kind):
    ref, ours = make_pair(kind, 3, 5, dtype=torch.float64)
    x = torch.randn(4, 3, device=DEV, dtype=torch.float64)
    for a, b in zip(flat(ours(x)), flat(ref(x))):
        assert_close(a, b)
    x0 = torch.randn(4, 0, 3, device=DEV, dtype=torch.float64, requires_grad=True)
    o, r = flat(ours(x0)), flat(ref.cpu()(x0.detach().cpu()))  # (torch.nn's CPU path takes B = 0)
    for a, b in zip(o, r):
        assert a.shape == b.shape and a.device.type == "cuda"
    o[0].sum().backward()
    assert x0.grad.shape == x0.shape


# ---------------------------------------------------------------------- the persistent kernel
PERSISTENT = [(1, 256), (4, 512), (16, 1024), (3, 100), (7, 33), (16, 64), (2, 700)]


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("B,H", PERSISTENT, ids=[f"B{b}-H{h}" for b, h in PERSISTENT])
def test_persistent_inference_matches_cudnn(kind, B, H):
    """Small dense batches in inference run the persistent kernel (checked by name) and match
    torch.nn, in both directions."""
    ref, ours = make_pair(kind, 24, H, bidirectional=True)
    x = torch.randn(9, B, 24, device=DEV)
    hx = torch.randn(2, B, H, device=DEV)
    hx = (hx, torch.randn(2, B, H, device=DEV)) if kind == "LSTM" else hx
    with torch.no_grad():
        names = cuda_kernels(lambda: ours(x, hx))
        o = flat(ours(x, hx))
        hd = tuple(h.double() for h in hx) if isinstance(hx, tuple) else hx.double()
        t = flat(double_copy(ref)(x.double(), hd))
    assert any("persistent_kernel" in n for n in names), names
    for a, b in zip(o, t):
        assert_close_to_truth(a, b)


def test_persistent_not_used_in_training_or_when_large():
    ref, ours = make_pair("LSTM", 8, 64)
    x = torch.randn(5, 2, 8, device=DEV, requires_grad=True)
    assert not any("persistent_kernel" in n for n in cuda_kernels(lambda: ours(x)))
    with torch.no_grad():
        big = torch.randn(5, 17, 8, device=DEV)
        assert not any("persistent_kernel" in n for n in cuda_kernels(lambda: ours(big)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_persistent_low_precision(kind, dtype):
    ref, ours = make_pair(kind, 16, 128, dtype=dtype)
    truth = PAIRS[kind][0](16, 128).to(DEV, torch.float64)
    truth.load_state_dict(ref.state_dict())
    x = torch.randn(12, 4, 16, device=DEV, dtype=dtype)
    with torch.no_grad():
        names = cuda_kernels(lambda: ours(x))
        o, t = flat(ours(x)), flat(truth(x.double()))
    assert any("persistent_kernel" in n for n in names)
    for a, b in zip(o, t):
        assert a.dtype == dtype
        assert_close_to_truth(a, b)


# --------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[3], CONFIGS[5], CONFIGS[8]], ids=cfg_id)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_low_precision_training(cfg, dtype, packed):
    """float16/bfloat16 outputs and gradients against the float64 truth on the same values,
    within the stated bound (conftest.TOL), which torch.nn on cuDNN meets too."""
    kw = kwargs_of(cfg)
    ref, ours = make_pair(cfg[0], 16, 32, dtype=dtype, **kw)
    truth = PAIRS[cfg[0]][0](16, 32, **kw).to(DEV, torch.float64)
    truth.load_state_dict(ref.state_dict())
    x, x_in, hx = inputs(cfg[0], ref, 10, 6, 16, dtype, packed=packed)
    xd = x.detach().double().requires_grad_()
    hd = tuple(h.detach().double().requires_grad_() for h in hx) if isinstance(hx, tuple) else \
        hx.detach().double().requires_grad_()
    xd_in = pack_padded_sequence(xd, pad_lengths(x_in), batch_first=cfg[3], enforce_sorted=False) if packed else xd
    to, tg = run(truth, xd_in, hd, cot_dtype=dtype, leaf=xd)
    for module in (ours, ref):
        oo, og = run(module, x_in, hx, leaf=x)
        for a, b in zip(oo, to):
            assert a.dtype == dtype
            assert_close_to_truth(a, b)
        for a, b in zip(og, tg):
            if a is not None:
                assert_close_to_truth(a, b)


def pad_lengths(packed):
    from torch.nn.utils.rnn import pad_packed_sequence
    return pad_packed_sequence(packed)[1]


# ------------------------------------------------------------------------- cells and others
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_match_torch(kind):
    ref = getattr(nn, kind)(6, 9).to(DEV, torch.float64)
    ours = getattr(fastrnn, kind)(6, 9).to(DEV, torch.float64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 6, device=DEV, dtype=torch.float64, requires_grad=True)
    o, r = flat(ours(x)), flat(ref(x))
    for a, b in zip(o, r):
        assert_close(a, b)
    ga = torch.autograd.grad(sum(t.sum() for t in o), [x, *ours.parameters()])
    gb = torch.autograd.grad(sum(t.sum() for t in r), [x, *ref.parameters()])
    for a, b in zip(ga, gb):
        assert_close(a, b)


def test_variants_and_attention_run_on_cuda():
    """Layers without CUDA kernels run their plain-PyTorch form on CUDA, with the CPU's values."""
    torch.manual_seed(0)
    for m, x in ((fastrnn.LayerNormLSTM(5, 7), torch.randn(4, 3, 5)),
                 (fastrnn.PeepholeLSTM(5, 7), torch.randn(4, 3, 5)),
                 (fastrnn.LayerNormGRU(5, 7), torch.randn(4, 3, 5))):
        m = m.double().eval()
        x = x.double()
        cpu = flat(m(x))
        gpu = flat(m.to(DEV)(x.to(DEV)))
        for a, b in zip(gpu, cpu):
            assert a.device.type == "cuda"
            assert_close(a.cpu(), b)
    q, k, v = (torch.randn(2, 3, 4, 8, dtype=torch.float64) for _ in range(3))
    assert_close(FR.scaled_dot_product_attention(q.to(DEV), k.to(DEV), v.to(DEV)).cpu(),
                 FR.scaled_dot_product_attention(q, k, v))


# ------------------------------------------------------------------------ gradcheck, opcheck
def _layer_cases():
    """(name, fused function, its plain-PyTorch reference, float64 CUDA leaves): every op, both
    directions, dense and packed, with and without projection."""
    from fastrnn import reference as R
    g = torch.Generator().manual_seed(1)

    def t(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(DEV).requires_grad_()

    T, B, I, H, P = 3, 2, 3, 4, 2
    bsz = torch.tensor([2, 2, 1])
    cases = []

    def case(name, fused, ref, args, **kw):
        cases.append((name, lambda *a: fused(*a, **kw), lambda *a: ref(*a, **kw), args))

    for rev in (False, True):
        case("lstm", FR.lstm_layer, R.lstm_layer_ref,
             (t(T, B, I), t(B, H), t(B, H), t(4 * H, I), t(4 * H, H), t(4 * H), t(4 * H)), reverse=rev)
        case("lstm-proj-packed", FR.lstm_layer, R.lstm_layer_ref,
             (t(5, I), t(B, P), t(B, H), t(4 * H, I), t(4 * H, P), t(4 * H), t(4 * H), t(P, H)), batch_sizes=bsz,
             reverse=rev)
        case("gru-packed", FR.gru_layer, R.gru_layer_ref,
             (t(5, I), t(B, H), t(3 * H, I), t(3 * H, H), t(3 * H), t(3 * H)), batch_sizes=bsz, reverse=rev)
        case("gru", FR.gru_layer, R.gru_layer_ref,
             (t(T, B, I), t(B, H), t(3 * H, I), t(3 * H, H), t(3 * H), t(3 * H)), reverse=rev)
        for nl in ("tanh", "relu"):
            case(f"rnn-{nl}", FR.rnn_layer, R.rnn_layer_ref, (t(T, B, I), t(B, H), t(H, I), t(H, H), t(H), t(H)),
                 reverse=rev, nonlinearity=nl)
    return cases


@pytest.mark.parametrize("case", range(12))
def test_kernel_matches_reference(case):
    """Each CUDA op against fastrnn's plain-PyTorch reference on the same float64 values: outputs,
    final states and the gradient of every input, to float64 rounding."""
    name, fused, ref, args = _layer_cases()[case]
    out, want = fused(*args), ref(*args)
    g = torch.Generator(device=DEV).manual_seed(2)
    cot = [torch.randn(o.shape, device=DEV, dtype=o.dtype, generator=g) for o in want]
    for a, b in zip(out, want):
        assert_close(a, b, msg=name)
    for a, b in zip(torch.autograd.grad(out, args, cot), torch.autograd.grad(want, args, cot)):
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("case", range(12))
def test_gradcheck_float64(case):
    name, fused, _, args = _layer_cases()[case]
    assert torch.autograd.gradcheck(fused, args), name


def test_double_backward():
    name, fused, _, args = _layer_cases()[0]
    assert torch.autograd.gradgradcheck(fused, args), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("op", ["lstm", "gru", "rnn"])
def test_opcheck(op, dtype):
    ops = torch.ops.fastrnn
    T, B, I, H = 3, 2, 4, 5
    G = {"lstm": 4, "gru": 3, "rnn": 1}[op]

    def t(*s):
        return torch.randn(*s, device=DEV, dtype=dtype)

    x, h, c, wi, wh, bi, bh = t(T, B, I), t(B, H), t(B, H), t(G * H, I), t(G * H, H), t(G * H), t(G * H)
    if op == "lstm":
        args = (x, wi, wh, bi, bh, None, h, c, None, False, True)
        fwd = ops.lstm_forward
    elif op == "gru":
        args = (x, wi, wh, bi, bh, h, None, False, True)
        fwd = ops.gru_forward
    else:
        args = (x, wi, wh, bi, bh, h, None, False, False)
        fwd = ops.rnn_forward
    torch.library.opcheck(fwd.default, args, test_utils=("test_schema", "test_faketensor"))
    res = fwd(*args)
    if op == "lstm":
        bargs = (t(T, B, H), t(B, H), t(B, H), x, wi, wh, None, h, c, None, False, res[0], res[3], res[4], res[5])
        bwd = ops.lstm_backward
    elif op == "gru":
        bargs = (t(T, B, H), t(B, H), x, wi, wh, h, None, False, res[0], res[2], res[3])
        bwd = ops.gru_backward
    else:
        bargs = (t(T, B, H), t(B, H), x, wi, wh, h, None, False, False, res[0])
        bwd = ops.rnn_backward
    torch.library.opcheck(bwd.default, bargs, test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the CUDA ops through their fake kernels."""
    torch._dynamo.reset()
    ref, ours = make_pair("LSTM", 6, 8, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 6, device=DEV)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for a, b in zip(flat(compiled(x)), flat(ref(x))):
        assert_close(a, b)


# -------------------------------------------------------------------------------- bad input
def bad_input_checks():
    ops = torch.ops.fastrnn
    x = torch.randn(3, 2, 4, device=DEV)
    wi, wh, h, c = (torch.randn(16, 4, device=DEV), torch.randn(16, 4, device=DEV), torch.randn(2, 4, device=DEV),
                    torch.randn(2, 4, device=DEV))
    with pytest.raises(RuntimeError, match="w_ih"):
        ops.lstm_forward(x, wi.cpu(), wh, None, None, None, h, c, None, False, False)
    with pytest.raises(RuntimeError, match="hx"):
        ops.lstm_forward(x, wi, wh, None, None, None, h.cpu(), c, None, False, False)
    with pytest.raises(ValueError, match="dtype"):
        ops.lstm_forward(x, wi.double(), wh, None, None, None, h, c, None, False, False)
    with pytest.raises(RuntimeError, match="hx must have shape"):
        ops.lstm_forward(x, wi, wh, None, None, None, h[:1], c, None, False, False)
    with pytest.raises(RuntimeError, match="zero-length"):
        ops.lstm_forward(x[:0], wi, wh, None, None, None, h, c, None, False, False)
    with pytest.raises(RuntimeError, match="batch_sizes"):
        ops.lstm_forward(x[0], wi, wh, None, None, None, h, c, torch.tensor([1, 2]), False, False)
    with pytest.raises(RuntimeError, match="batch_sizes"):  # batch_sizes stays on the CPU, as in PackedSequence
        ops.lstm_forward(x[0], wi, wh, None, None, None, h, c, torch.tensor([2], device=DEV), False, False)
    with pytest.raises(RuntimeError, match="train=False"):
        res = ops.lstm_forward(x, wi, wh, None, None, None, h, c, None, False, False)
        ops.lstm_backward(res[0], h, c, x, wi, wh, None, h, c, None, False, res[0], res[3], res[4], res[5])
    ref, ours = make_pair("GRU", 4, 5)
    with pytest.raises(RuntimeError):
        ours(torch.randn(3, 2, 6, device=DEV))  # wrong input size, as torch.nn
    with pytest.raises((RuntimeError, ValueError)):
        ours(torch.randn(3, 2, 4, device=DEV), torch.randn(1, 2, 5))  # hx on the CPU
    torch.cuda.synchronize()


def test_bad_input_is_rejected():
    """Each bad argument raises an exception naming it, before any kernel runs. In a child
    process: a crash there (a build whose error formatting segfaults: one with libstdc++ linked
    statically, as the GPU machine's /opt/gcc toolchain does) fails this test instead of taking the
    whole test run down with it."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_cuda; test_cuda.bad_input_checks()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit status {r.returncode} (negative: killed by that signal)\n{r.stderr[-3000:]}"
