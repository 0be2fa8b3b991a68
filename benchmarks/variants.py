"""Variant cells in the benchmark (imported by bench.py): each fastrnn variant layer against an
eager plain-PyTorch loop of the same cell (what a user writes without fastrnn) and against
fastrnn's own plain layer (fastrnn.LSTM / fastrnn.GRU) on the same shape.

The variant and the plain layer run interleaved (A B A B ...) in one process on the same input,
after warm-up, and the loop's rounds run before them, on their own (see bench_variant); the loop shares the variant layer's parameters and is checked against it once before timing. The
eager loop is written as a careful user would: the input projection of all steps is one matmul
before the loop, only the recurrent part runs per step.
"""
from __future__ import annotations

import gc
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastrnn

# case name -> (T, B, I, H) comes from bench.CASES; these are the cases with variant rows.
VARIANT_CASES = ("fastrnns-default", "small-batch")
VARIANT_CELLS = ("LayerNormLSTM", "PeepholeLSTM", "LayerNormGRU")


class EagerLoop(nn.Module):
    """The cell of `layer` (a one-layer fastrnn variant) as a Python loop over time, sharing its
    parameters. Returns (output [T, B, H], final state) like the layer."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.kind = type(layer).__name__

    def forward(self, x):
        m, H = self.layer, self.layer.hidden_size
        T, B = x.shape[0], x.shape[1]
        p = lambda n: getattr(m, n + "_l0")  # noqa: E731
        h = x.new_zeros(B, H)
        c = x.new_zeros(B, H)
        gx = x @ p("weight_ih").T
        outs = []
        if self.kind == "LayerNormGRU":
            gx = F.layer_norm(gx, (3 * H,), p("ln_ih_weight"), p("ln_ih_bias")) + p("bias_ih")
            for t in range(T):
                gh = F.layer_norm(h @ p("weight_hh").T, (3 * H,), p("ln_hh_weight"), p("ln_hh_bias")) + p("bias_hh")
                i_r, i_z, i_n = gx[t].chunk(3, 1)
                h_r, h_z, h_n = gh.chunk(3, 1)
                r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
                n = torch.tanh(i_n + r * h_n)
                h = (1 - z) * n + z * h
                outs.append(h)
            return torch.stack(outs), h.unsqueeze(0)
        ln = self.kind == "LayerNormLSTM"
        if ln:
            gx = F.layer_norm(gx, (4 * H,), p("ln_ih_weight"), p("ln_ih_bias"))
        gx = gx + p("bias_ih") + p("bias_hh")
        for t in range(T):
            gh = h @ p("weight_hh").T
            if ln:
                gh = F.layer_norm(gh, (4 * H,), p("ln_hh_weight"), p("ln_hh_bias"))
            i, f, g, o = (gx[t] + gh).chunk(4, 1)
            if not ln:  # peephole
                i, f = i + p("weight_ci") * c, f + p("weight_cf") * c
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            if not ln:
                o = o + p("weight_co") * c
            cc = F.layer_norm(c, (H,), p("ln_c_weight"), p("ln_c_bias")) if ln else c
            h = torch.sigmoid(o) * torch.tanh(cc)
            outs.append(h)
        return torch.stack(outs), (h.unsqueeze(0), c.unsqueeze(0))


def _time3(runs, rounds, warmup, min_round_s):
    ts = [float("inf")] * len(runs)
    for _ in range(max(warmup, 1)):
        for k, r in enumerate(runs):
            t0 = time.perf_counter()
            r()
            ts[k] = time.perf_counter() - t0
    inner = 1 if min(ts) >= min_round_s else max(1, min(1000, int(min_round_s / max(min(ts), 1e-7)) + 1))
    times = [[] for _ in runs]
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for k, r in enumerate(runs):
                t0 = time.perf_counter()
                for _ in range(inner):
                    r()
                times[k].append((time.perf_counter() - t0) / inner)
    finally:
        if gc_was:
            gc.enable()
    return times


def bench_variant(cell: str, case: str, shape, mode: str, rounds: int, warmup: int, min_round_s: float,
                  watch_cls, make_runner) -> dict:
    """One row; watch_cls and make_runner are bench.py's CpuWatch and make_runner."""
    T, B, I, H = shape
    torch.manual_seed(1234)
    fast = getattr(fastrnn, cell)(I, H).eval()
    with torch.no_grad():  # LayerNorm gains/biases and peepholes away from their initial values
        for name, q in fast.named_parameters():
            if name.startswith("ln_") or name.startswith("weight_c"):
                q.add_(0.1 * torch.randn_like(q))
    plain = (fastrnn.GRU if cell.endswith("GRU") else fastrnn.LSTM)(I, H).eval()
    loop = EagerLoop(fast)
    g = torch.Generator().manual_seed(1235)
    x = torch.randn(T, B, I, generator=g)
    with torch.no_grad():
        a, b = loop(x)[0], fast(x)[0]
    rel = ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
    ok = torch.allclose(a, b, rtol=1e-3, atol=1e-3)
    if mode == "training":
        x = x.clone().requires_grad_(True)
    watch = watch_cls()
    watch.start()
    # The variant and the plain layer (the 1.3x comparison) alternate round by round; the loop runs
    # its rounds first, on its own: its autograd graph churns through gigabytes, and whichever side
    # ran right after it was measured slower (by up to 2x at fastrnns-default training).
    (t_loop,) = _time3([make_runner(loop, x, mode)], rounds, warmup, min_round_s)
    gc.collect()
    t_fast, t_plain = _time3([make_runner(fast, x, mode), make_runner(plain, x, mode)], rounds, warmup, min_round_s)
    others = watch.stop()
    med = [statistics.median(t) * 1e3 for t in (t_loop, t_fast, t_plain)]
    spread = lambda t: max(t) / min(t)  # noqa: E731
    return {"cell": cell, "case": case, "mode": mode, "T": T, "B": B, "I": I, "H": H,
            "shape": f"({T},{B},{I},{H})", "rounds": rounds,
            "loop_ms": med[0], "variant_ms": med[1], "plain_ms": med[2],
            "loop_min_ms": min(t_loop) * 1e3, "variant_min_ms": min(t_fast) * 1e3, "plain_min_ms": min(t_plain) * 1e3,
            "speedup_vs_loop": med[0] / med[1], "ratio_to_plain": med[1] / med[2],
            "plain_name": type(plain).__name__, "max_rel_diff": rel, "check_ok": ok,
            "noisy": max(spread(t_loop), spread(t_fast), spread(t_plain)) > 1.5,
            "other_cpu_cores": others, "contended": others is not None and others > 0.15}


def side_markdown(hdr: list[str], rows: list[dict], cells) -> str:
    """A side-table in markdown (the variant and bfloat16 tables): hdr's first four columns are
    cell, case, shape and mode, its last notes, the ones between numbers (cells(row) gives them);
    error rows and the MISMATCH / noisy / contended notes are the same for every table."""
    n_num = len(hdr) - 5
    lines = ["| " + " | ".join(hdr) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * n_num + ["---"]) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['cell']} | {r['case']} | | {r['mode']} |" + " |" * n_num + f" ERROR: {r['error']} |")
            continue
        notes = ([] if r["check_ok"] else ["MISMATCH"]) + (["noisy"] if r["noisy"] else [])
        if r["contended"]:
            notes.append(f"contended ({r['other_cpu_cores']:.2f} cores used by others)")
        lines.append(f"| {r['cell']} | {r['case']} | {r['shape']} | {r['mode']} | " + " | ".join(cells(r)) +
                     f" | {', '.join(notes)} |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    hdr = ["cell", "case", "shape (T,B,I,H)", "mode", "eager loop ms", "variant ms", "plain fastrnn ms",
           "speedup vs loop", "variant / plain", "max rel diff", "notes"]
    return side_markdown(hdr, rows, lambda r: [
        f"{r['loop_ms']:.2f}", f"{r['variant_ms']:.2f}", f"{r['plain_ms']:.2f} ({r['plain_name']})",
        f"{r['speedup_vs_loop']:.2f}x", f"{r['ratio_to_plain']:.2f}x", f"{r['max_rel_diff']:.1e}"])
