"""Shared test settings. Tolerances live here and only here, per dtype.

float64: kernel and reference compute the same formulas in a different order, so they agree
to a few ulps; 1e-10 relative leaves room for sums over hundreds of steps.
float32: the kernel's vectorised exp is within ~1 ulp of libm and its tanh within 4.9 ulp (6.9
without FMA: 4.1e-7 relative; measured on every float, fastrnn/cells.h); 1e-5 is float rounding
accumulated over a sequence.
bfloat16 (normwise, against a float64 truth on the same bfloat16 values: assert_close_to_truth):
8 significant bits, so one rounding costs up to u = 2^-8 of a value. A result is rounded a few
times on its way: the input projection X W_ih^T (a bfloat16 GEMM's output), the output/state
rounded to bfloat16 (and fed to backward as such), the gradient of the gates rounded for the
bfloat16 weight-gradient GEMMs, and the final rounding; the gate math, states and every GEMM's
accumulation are float32 (~1e-7, negligible). Four roundings: rtol = 4u = 2^-6, relative to the
tensor's largest element. nn.LSTM/GRU/RNN in bfloat16 meet the same bound (tests/test_bf16.py
checks it).
float16 (CUDA kernels; normwise against float64 truth, as bfloat16): 11 significant bits, so
u = 2^-11 and the same four roundings give rtol = 2^-9. nn.LSTM/GRU/RNN in float16 on cuDNN meet
the same bound (tests/test_cuda.py checks it).
"""
import warnings

import pytest
import torch

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2.0 ** -6, atol=2.0 ** -8),
    torch.float16: dict(rtol=2.0 ** -9, atol=2.0 ** -11),
}


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"{msg}\n{m}" if msg else m)


def assert_close_to_truth(actual, truth):
    """actual (any dtype) against a float64 ground truth, relative to the tensor's scale:
    max|actual - truth| <= rtol(actual.dtype) * max|truth|. For float32 gradients that sum many
    terms of large magnitude, where elementwise 1e-5 would test rounding of near-zero elements
    rather than the kernel: a float32 reference computed in another order misses by the same."""
    err = (actual.double() - truth).abs().max().item() if truth.numel() else 0.0
    scale = truth.abs().max().item() if truth.numel() else 0.0
    bound = TOL[actual.dtype]["rtol"] * scale + TOL[actual.dtype]["atol"] * (scale == 0)
    assert err <= bound, f"max abs error {err:.3e} > {bound:.3e} (scale {scale:.3e})"


def flat(o):
    """Every tensor of a layer's return value, in order (PackedSequence -> its data)."""
    from torch.nn.utils.rnn import PackedSequence
    if isinstance(o, PackedSequence):
        return [o.data]
    if isinstance(o, (tuple, list)):
        return [t for x in o for t in flat(x)]
    return [o]


def layer_pairs():
    """{kind: (torch.nn class, fastrnn class)} for the LSTM, GRU and RNN."""
    import fastrnn
    from torch import nn
    return {"LSTM": (nn.LSTM, fastrnn.LSTM), "GRU": (nn.GRU, fastrnn.GRU), "RNN": (nn.RNN, fastrnn.RNN)}


def make_pair(kind, *args, dtype=None, device=None, **kw):
    """(torch.nn layer, fastrnn layer) of kind "LSTM"/"GRU"/"RNN", built with the same arguments,
    moved to device/dtype when given, and fastrnn's loaded from torch.nn's state_dict."""
    tcls, fcls = layer_pairs()[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = tcls(*args, **kw)
        ours = fcls(*args, **kw)
    if dtype is not None or device is not None:
        ref, ours = ref.to(device, dtype), ours.to(device, dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


# A layer configuration of the parametrised layer tests:
# (kind, num_layers, bidirectional, batch_first, bias, proj_size).
def cfg_id(c):
    return f"{c[0]}-L{c[1]}{'-bi' if c[2] else ''}{'-bf' if c[3] else ''}{'' if c[4] else '-nobias'}" + (
        f"-proj{c[5]}" if c[5] else "")


def kwargs_of(c, nonlinearity=None):
    kind, L, bi, bf, bias, proj = c
    kw = dict(num_layers=L, bidirectional=bi, batch_first=bf, bias=bias)
    if proj:
        kw["proj_size"] = proj
    if nonlinearity:
        kw["nonlinearity"] = nonlinearity
    return kw


class Tagger(torch.nn.Module):
    """Embedding -> recurrent layer -> Linear over every step: the small model the compile,
    export and serialization tests trace. Returns the logits, and the final h when return_state."""

    def __init__(self, rnn, return_state=False):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.rnn = rnn
        self.return_state = return_state
        D = 2 if rnn.bidirectional else 1
        P = getattr(rnn, "proj_size", 0) or rnn.hidden_size
        self.head = torch.nn.Linear(D * P, 5)

    def forward(self, tokens):
        out, state = self.rnn(self.emb(tokens))
        if not self.return_state:
            return self.head(out)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(out), h


def run_threads(worker, n, timeout=120):
    """Runs worker(t) for t < n on n threads; fails on a hung thread or any exception."""
    import threading
    errors = []

    def wrapped(t):
        try:
            worker(t)
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=wrapped, args=(t,)) for t in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=timeout)
    assert not any(th.is_alive() for th in threads), "a worker thread hung"
    assert not errors, errors


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["auto", "blas", "generic", "onednn", "fused"])
def gemm_backend(request):
    """Runs a test under each in-loop GEMM path (the generic one is what non-MKL torch builds get)."""
    from fastrnn import _C
    old = _C.get_gemm_backend()
    _C.set_gemm_backend(request.param)
    yield request.param
    _C.set_gemm_backend(old)


def isa_builds():
    """The kernel builds this CPU can run, by fastrnn._C.set_isa name: 'auto' (the widest),
    'baseline' (x86-64 without AVX), and 'avx2' where that differs from 'auto' (AVX-512 CPUs)."""
    from fastrnn import _C
    old = _C.get_isa()
    try:
        _C.set_isa("auto")
        widest = _C.kernel_vector_bytes()
    finally:
        _C.set_isa(old)
    return ["auto", "baseline"] + (["avx2"] if widest > 32 else [])


@pytest.fixture(params=isa_builds())
def isa(request):
    """Runs a test with the kernels built for this CPU's widest ISA, with the baseline x86-64
    build that CPUs without AVX2 get, and on AVX-512 CPUs with the AVX2 build."""
    from fastrnn import _C
    old = _C.get_isa()
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(old)
