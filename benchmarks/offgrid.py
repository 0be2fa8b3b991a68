"""Off-grid sweep: torch.nn against fastrnn on shapes outside the standard grid (odd sizes, large
batches with small hidden sizes, stacked and bidirectional layers, single steps over a batch),
interleaved as bench.py does (its Spec, make_modules and time_pair), 9 rounds a side, medians.
Prints one line per shape and mode; the README's "Off the grid" numbers come from it.

    .venv/bin/python benchmarks/offgrid.py --ab       # one step over a batch: fused step vs GEMMs
    .venv/bin/python benchmarks/offgrid.py --data     # the grid's training over data (see data_input)
    .venv/bin/python benchmarks/offgrid.py            # every shape
    .venv/bin/python benchmarks/offgrid.py 0 1 11     # shapes by index
"""
import os
import statistics
import sys
from pathlib import Path

import torch

import fastrnn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

# cell, T, B, I, H, layers, bidirectional
SHAPES = [
    ("LSTM", 5, 1024, 32, 32, 1, False),
    ("LSTM", 100, 16, 100, 300, 1, False),
    ("LSTM", 50, 4, 64, 64, 1, False),
    ("LSTM", 200, 32, 40, 128, 1, False),
    ("LSTM", 30, 128, 300, 200, 1, False),
    ("LSTM", 20, 256, 64, 96, 1, False),
    ("LSTM", 100, 2, 512, 512, 1, False),
    ("LSTM", 10, 64, 128, 1024, 1, False),
    ("LSTM", 50, 8, 80, 48, 3, False),
    ("LSTM", 64, 32, 128, 128, 2, True),
    ("LSTM", 300, 1, 40, 100, 1, False),
    ("LSTM", 16, 512, 16, 16, 1, False),
    ("GRU", 5, 1024, 32, 32, 1, False),
    ("GRU", 100, 16, 100, 300, 1, False),
    ("RNN", 100, 16, 100, 300, 1, False),
    ("GRU", 50, 64, 256, 256, 2, True),
    ("LSTM", 1, 64, 256, 256, 1, False),
    ("LSTM", 1, 256, 256, 256, 1, False),
]


# T=1 inference over a batch: (B, I, H)
SINGLE_STEPS = [(32, 256, 256), (64, 256, 256), (256, 256, 256), (128, 128, 128), (64, 128, 256), (512, 64, 64)]


def single_step_ab():
    """fastrnn against itself: one LSTM step of inference over a batch on the fused step (the
    default from 32 rows) and on the two GEMMs it replaced (FASTRNN_FUSE_INPUT=0, read per call),
    interleaved as the shapes above, 15 rounds a side."""
    def run(m, x, hx, fuse):
        def f():
            os.environ["FASTRNN_FUSE_INPUT"] = fuse
            with torch.no_grad():
                m(x, hx)
        return f

    print("one step of inference (T=1): GEMM path ms, fused step ms, speedup")
    try:
        for B, I, H in SINGLE_STEPS:
            torch.manual_seed(0)
            m = fastrnn.LSTM(I, H)
            x, hx = torch.randn(1, B, I), (torch.randn(1, B, H), torch.randn(1, B, H))
            ta, tb, _ = bench.time_pair(run(m, x, hx, "0"), run(m, x, hx, ""), 15, 3, 0.05)
            a, b = statistics.median(ta), statistics.median(tb)
            print(f"B={B:4d} I={I:4d} H={H:4d}  gemms {a * 1e3:7.3f}  fused {b * 1e3:7.3f}  {a / b:5.2f}x", flush=True)
    finally:
        os.environ.pop("FASTRNN_FUSE_INPUT", None)


def data_input():
    """Training where the layer's input is data (needs no gradient, as in a model whose first
    layer is the RNN): the backward ops then skip grad_input (their output_mask), and torch.nn's
    LSTM (oneDNN) computes it anyway. bench.py's training rows give the input requires_grad, so
    they time grad_input on both sides. Per grid shape and cell, both sides interleaved, 9 rounds."""
    print("training, input needs no gradient: nn ms, fastrnn ms, speedup (nn / fastrnn)")
    for cell in ("LSTM", "GRU", "RNN"):
        for case, (T, B, I, H) in bench.CASES.items():  # (the grid's single-layer shapes)
            spec = bench.Spec(case, cell, T, B, I, H)
            base, fast = bench.make_modules(spec)
            x = bench.make_input(spec)  # (requires no grad)
            ta, tb, _ = bench.time_pair(bench.make_runner(base, x, "training"),
                                        bench.make_runner(fast, x, "training"), 9, 2, 0.05)
            a, b = statistics.median(ta), statistics.median(tb)
            print(f"{cell:4s} {case:16s} {spec.shape:20s} nn {a * 1e3:8.3f}  fastrnn {b * 1e3:8.3f}  {a / b:5.2f}x",
                  flush=True)


def main(argv):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if argv == ["--ab"]:
        return single_step_ab()
    if argv == ["--data"]:
        return data_input()
    pick = {int(a) for a in argv}
    print(f"threads {torch.get_num_threads()}; nn ms, fastrnn ms, speedup (nn / fastrnn)")
    for i, (cell, T, B, I, H, L, bi) in enumerate(SHAPES):
        if pick and i not in pick:
            continue
        spec = bench.Spec("offgrid", cell, T, B, I, H, L, bi)
        base, fast = bench.make_modules(spec)
        x = bench.make_input(spec)
        for mode in ("inference", "training"):
            xm = x.detach().clone().requires_grad_(mode == "training")
            ta, tb, _ = bench.time_pair(bench.make_runner(base, xm, mode), bench.make_runner(fast, xm, mode), 9, 2,
                                        0.05)
            a, b = statistics.median(ta), statistics.median(tb)
            print(f"{i:2d} {cell} {spec.shape:22s} {mode:9s} nn {a * 1e3:8.3f}  fastrnn {b * 1e3:8.3f}  {a / b:5.2f}x",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
