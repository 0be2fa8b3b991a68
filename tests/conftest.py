"""Shared test settings. Tolerances live here and only here, per dtype.

float64: kernel and reference compute the same formulas in a different order, so they agree
to a few ulps; 1e-10 relative leaves room for sums over hundreds of steps.
float32: the kernel's vectorised exp/tanh are within ~2 ulp of libm; 1e-5 is float rounding
accumulated over a sequence.
"""
import pytest
import torch

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
}


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"{msg}\n{m}" if msg else m)


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


@pytest.fixture(params=["auto", "baseline"])
def isa(request):
    """Runs a test with the pointwise loops built for this CPU's widest ISA, and with the
    baseline x86-64 build that CPUs without AVX2/AVX-512 get."""
    from fastrnn import _C
    old = _C.get_isa()
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(old)
