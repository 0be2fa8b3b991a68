"""bfloat16 rows of the benchmark (imported by bench.py; skipped with --no-bf16): fastrnn.LSTM in
bfloat16 against torch.nn.LSTM in bfloat16 (oneDNN's LSTM primitive, AVX512-BF16 where the CPU has
it), and against fastrnn.LSTM in float32 on the same shape.

The three sides run interleaved round by round (A B C A B C ...) in one process on the same
input values and weights, after warm-up. Before timing, each row compares the bfloat16 sides
with a float64 truth on the same bfloat16 values (outputs, final states and, in training, input
and weight gradients): max|side - truth| / max|truth|, worst over the tensors. A side beyond
4 bfloat16 roundings (2^-6, tests/conftest.py's TOL) is a MISMATCH.
"""
from __future__ import annotations

import copy
import statistics

import torch
from torch import nn

import fastrnn
from variants import _time3, side_markdown

# case name -> (T, B, I, H) comes from bench.CASES; these are the cases with bfloat16 rows.
BF16_CASES = ("fastrnns-default", "small-batch")
BF16_CELLS = ("LSTM",)
REL_BOUND = 2.0 ** -6


def _results(m, x, mode):
    if mode == "inference":
        with torch.no_grad():
            out, st = m(x)
        return [out] + list(st if isinstance(st, tuple) else (st,))
    x = x.detach().clone().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    out, st = m(x)
    (out.float().sum()).backward()
    res = [out.detach()] + [s.detach() for s in (st if isinstance(st, tuple) else (st,))]
    res += [x.grad] + [p.grad for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    return res


def _rel_err(side, truth):
    worst = 0.0
    for a, t in zip(side, truth):
        scale = t.abs().max().item()
        worst = max(worst, (a.double() - t).abs().max().item() / max(scale, 1e-30))
    return worst


def bench_bf16(cell: str, case: str, shape, mode: str, rounds: int, warmup: int, min_round_s: float,
               watch_cls, make_runner) -> dict:
    """One row; watch_cls and make_runner are bench.py's CpuWatch and make_runner."""
    T, B, I, H = shape
    torch.manual_seed(1234)
    base32 = getattr(nn, cell)(I, H).eval()
    fast32 = getattr(fastrnn, cell)(I, H).eval()
    fast32.load_state_dict(base32.state_dict())
    base = copy.deepcopy(base32).to(torch.bfloat16)
    fast = copy.deepcopy(fast32).to(torch.bfloat16)
    truth = copy.deepcopy(base).double()
    g = torch.Generator().manual_seed(1235)
    x = torch.randn(T, B, I, generator=g).to(torch.bfloat16)
    x32 = x.float()
    ref = _results(truth, x.double(), mode)
    err_base = _rel_err(_results(base, x, mode), ref)
    err_fast = _rel_err(_results(fast, x, mode), ref)
    if mode == "training":
        x, x32 = x.clone().requires_grad_(True), x32.clone().requires_grad_(True)
    watch = watch_cls()
    watch.start()
    t_base, t_fast, t_32 = _time3([make_runner(base, x, mode), make_runner(fast, x, mode),
                                   make_runner(fast32, x32, mode)], rounds, warmup, min_round_s)
    others = watch.stop()
    med = [statistics.median(t) * 1e3 for t in (t_base, t_fast, t_32)]
    spread = lambda t: max(t) / min(t)  # noqa: E731
    return {"cell": cell, "case": case, "mode": mode, "T": T, "B": B, "I": I, "H": H,
            "shape": f"({T},{B},{I},{H})", "rounds": rounds,
            "torch_bf16_ms": med[0], "fastrnn_bf16_ms": med[1], "fastrnn_fp32_ms": med[2],
            "torch_bf16_min_ms": min(t_base) * 1e3, "fastrnn_bf16_min_ms": min(t_fast) * 1e3,
            "fastrnn_fp32_min_ms": min(t_32) * 1e3,
            "speedup": med[0] / med[1], "speedup_vs_fp32": med[2] / med[1],
            "torch_bf16_rel_err": err_base, "fastrnn_bf16_rel_err": err_fast,
            "check_ok": err_fast <= REL_BOUND,
            "noisy": max(spread(t_base), spread(t_fast), spread(t_32)) > 1.5,
            "other_cpu_cores": others, "contended": others is not None and others > 0.15}


def markdown(rows: list[dict]) -> str:
    hdr = ["cell", "case", "shape (T,B,I,H)", "mode", "nn bf16 ms", "fastrnn bf16 ms", "fastrnn fp32 ms",
           "speedup vs nn bf16", "bf16 vs fp32 fastrnn", "rel err nn bf16", "rel err fastrnn bf16", "notes"]
    return side_markdown(hdr, rows, lambda r: [
        f"{r['torch_bf16_ms']:.2f}", f"{r['fastrnn_bf16_ms']:.2f}", f"{r['fastrnn_fp32_ms']:.2f}",
        f"{r['speedup']:.2f}x", f"{r['speedup_vs_fp32']:.2f}x", f"{r['torch_bf16_rel_err']:.1e}",
        f"{r['fastrnn_bf16_rel_err']:.1e}"])


NOTE = ("bfloat16: torch.nn.LSTM and fastrnn.LSTM both converted with .to(torch.bfloat16) (same weights), input "
        "in bfloat16; fastrnn fp32 = fastrnn.LSTM in float32 on the same values. The three run interleaved round "
        "by round; medians. speedup vs nn bf16 = nn bf16 / fastrnn bf16; bf16 vs fp32 fastrnn = fastrnn fp32 / "
        "fastrnn bf16 (>1: bfloat16 is faster). rel err = max|side - truth| / max|truth|, worst over outputs, "
        "states (and input/weight gradients in training), truth = float64 on the same bfloat16 values; "
        f"MISMATCH above {REL_BOUND:.4g} (4 bfloat16 roundings).")
