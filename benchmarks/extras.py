"""Measurements beside the main grid (../shared/BENCHMARKS.md, issue 4):

* streaming: one call with T=1, B=1 and a carried state (a frame at a time), fastrnn.LSTM
  against nn.LSTM and nn.LSTMCell, interleaved in one process, inference and training;
* cells: one step of nn.LSTMCell / GRUCell / RNNCell against fastrnn's over a batch with a
  carried state (a decoder's step), interleaved, inference and training;
* training peak memory at fastrnns-default: each side in its own fresh process, peak resident
  memory (VmHWM, reset through /proc/self/clear_refs) above the resident memory just before the
  measured forward+backward, with glibc told to return freed blocks at once
  (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_) so the resident size tracks live memory.
"""
from __future__ import annotations

import gc
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import fastrnn

STREAM_H = 256
MEMORY_SHAPE = (100, 64, 512, 512)  # fastrnns-default (T, B, I, H)


def _step(m, inp, state, train: bool):
    """One call of m on (inp, state): under no_grad, or (train) with the backward of its output's sum."""
    def run():
        if not train:
            with torch.no_grad():
                m(inp, state)
        else:
            out = m(inp, state)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
    return run


def streaming_rows(time_pair, rounds: int, warmup: int, min_round_s: float, quick: bool) -> list[dict]:
    H = 32 if quick else STREAM_H
    torch.manual_seed(0)
    base = nn.LSTM(H, H)
    fast = fastrnn.LSTM(H, H)
    fast.load_state_dict(base.state_dict())
    cell = nn.LSTMCell(H, H)
    cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh = (base.weight_ih_l0, base.weight_hh_l0,
                                                                   base.bias_ih_l0, base.bias_hh_l0)
    x = torch.randn(1, 1, H)
    state = (torch.zeros(1, 1, H), torch.zeros(1, 1, H))
    cstate = (state[0][0], state[1][0])
    rows = []
    for mode in ("inference", "training"):
        train = mode == "training"
        run_nn, run_fast = _step(base, x, state, train), _step(fast, x, state, train)
        run_cell = _step(cell, x[0], cstate, train)
        ta, tb, _ = time_pair(run_nn, run_fast, rounds, warmup, min_round_s)
        tc, tb2, _ = time_pair(run_cell, run_fast, rounds, warmup, min_round_s)
        nn_us, f_us = statistics.median(ta) * 1e6, statistics.median(tb) * 1e6
        cell_us, f2_us = statistics.median(tc) * 1e6, statistics.median(tb2) * 1e6
        rows.append({"mode": mode, "shape": f"(1,1,{H},{H})", "nn_lstm_us": nn_us, "fastrnn_us": f_us,
                     "speedup_vs_lstm": nn_us / f_us, "nn_cell_us": cell_us, "fastrnn_us_2": f2_us,
                     "speedup_vs_cell": cell_us / f2_us})
    return rows


# One cell step over a batch, as a decoder takes it (cell, B, I, H): one row, a batch of a
# seq2seq model, a larger batch; LSTM, GRU and tanh RNN.
CELL_SHAPES = [("LSTMCell", 1, 256, 256), ("LSTMCell", 32, 256, 512), ("GRUCell", 32, 256, 512),
               ("RNNCell", 64, 128, 256), ("LSTMCell", 128, 512, 512)]
QUICK_CELL_SHAPES = [("LSTMCell", 3, 8, 16), ("GRUCell", 12, 8, 16)]


def cell_rows(time_pair, rounds: int, warmup: int, min_round_s: float, quick: bool) -> list[dict]:
    rows = []
    for cell, B, I, H in QUICK_CELL_SHAPES if quick else CELL_SHAPES:
        torch.manual_seed(0)
        base = getattr(nn, cell)(I, H)
        fast = getattr(fastrnn, cell)(I, H)
        fast.load_state_dict(base.state_dict())
        x = torch.randn(B, I)
        h = torch.randn(B, H)
        state = (h, torch.randn(B, H)) if cell == "LSTMCell" else h
        for mode in ("inference", "training"):
            train = mode == "training"
            ta, tb, _ = time_pair(_step(base, x, state, train), _step(fast, x, state, train), rounds, warmup,
                                  min_round_s)
            nn_us, f_us = statistics.median(ta) * 1e6, statistics.median(tb) * 1e6
            rows.append({"cell": cell, "mode": mode, "shape": f"(B={B}, I={I}, H={H})", "nn_us": nn_us,
                         "fastrnn_us": f_us, "speedup": nn_us / f_us})
    return rows


def cell_table(rows: list[dict]) -> str:
    out = ["| cell | mode | shape | torch.nn µs | fastrnn µs | speedup |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['cell']} | {r['mode']} | {r['shape']} | {r['nn_us']:.1f} | {r['fastrnn_us']:.1f} | "
                   f"{r['speedup']:.2f}x |")
    return "\n".join(out)


def streaming_table(rows: list[dict]) -> str:
    out = ["| mode | shape (T,B,I,H) | nn.LSTM µs | fastrnn.LSTM µs | speedup | nn.LSTMCell µs | fastrnn.LSTM µs "
           "(paired) | speedup vs cell |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['mode']} | {r['shape']} | {r['nn_lstm_us']:.1f} | {r['fastrnn_us']:.1f} | "
                   f"{r['speedup_vs_lstm']:.2f}x | {r['nn_cell_us']:.1f} | {r['fastrnn_us_2']:.1f} | "
                   f"{r['speedup_vs_cell']:.2f}x |")
    return "\n".join(out)


def _hwm_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _memory_child(which: str, T: int, B: int, I: int, H: int) -> None:
    torch.manual_seed(0)
    m = nn.LSTM(I, H) if which == "nn" else fastrnn.LSTM(I, H)
    x = torch.randn(T, B, I, requires_grad=True)
    gc.collect()
    # Measured from before the first call: what a layer keeps between calls (primitive caches,
    # packed weights, fastrnn's pool of freed workspace blocks) counts, as it stays resident
    # while the training loop runs. The peak is the steady-state call's, after two warm-ups.
    before = _hwm_mb("VmRSS")
    for _ in range(2):
        y, _ = m(x)
        y.sum().backward()
    x.grad = None
    m.zero_grad(set_to_none=True)
    del y
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    y, _ = m(x)
    y.sum().backward()
    print(f"{_hwm_mb('VmHWM') - before:.3f}")


def peak_memory_rows(quick: bool) -> list[dict]:
    T, B, I, H = (4, 8, 32, 32) if quick else MEMORY_SHAPE
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    res = {}
    for which in ("nn", "fastrnn"):
        try:
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-child", which,
                                str(T), str(B), str(I), str(H)], env=env, capture_output=True, text=True, timeout=600)
            res[which] = float(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
            res[which] = None
    ratio = res["fastrnn"] / res["nn"] if res["nn"] and res["fastrnn"] is not None else None
    return [{"case": "fastrnns-default" if not quick else "quick", "shape": f"({T},{B},{I},{H})",
             "nn_mb": res["nn"], "fastrnn_mb": res["fastrnn"], "ratio": ratio}]


def memory_table(rows: list[dict]) -> str:
    f = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
    out = ["| case | shape (T,B,I,H) | nn.LSTM peak MB | fastrnn.LSTM peak MB | fastrnn / nn |",
           "|---|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['case']} LSTM training | {r['shape']} | {f(r['nn_mb'], '.1f')} | "
                   f"{f(r['fastrnn_mb'], '.1f')} | {f(r['ratio'], '.2f')} |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--memory-child":
        _memory_child(sys.argv[2], *map(int, sys.argv[3:]))
    else:
        sys.exit("usage: extras.py --memory-child nn|fastrnn T B I H (run by bench.py)")
