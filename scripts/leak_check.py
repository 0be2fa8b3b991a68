"""Memory-leak check: resident set size across many forward+backward iterations of each fastrnn
layer and cell, dense and packed.

For each case the script runs a warm-up (allocator caches, packed-weight cache, lazy init),
collects garbage, reads RSS from /proc/self/statm, runs the measured iterations, collects
garbage and reads RSS again. A leak of one tensor per iteration shows up as steady growth; a
clean kernel stays flat up to allocator noise.

    python scripts/leak_check.py                  # 2000 iterations per case, printed report
    python scripts/leak_check.py --iters 300 --json
    python scripts/leak_check.py --iters 300 --inject-leak-kb 32   # adds a leaking case: must FAIL

Exit status 1 when any case grows by --max-growth-mb (default 5) or more.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
from torch.nn.utils.rnn import pack_sequence

import fastrnn

PAGE = os.sysconf("SC_PAGE_SIZE")
T, B, I, H = 16, 8, 32, 64


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _packed(g):
    lengths = [T, T - 1, 12, 9, 9, 5, 2, 1]
    return pack_sequence([torch.randn(n, I, generator=g) for n in lengths], enforce_sorted=False)


def _layer_case(make, packed, train=True):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = make()
    x = _packed(g) if packed else torch.randn(T, B, I, generator=g)
    data = x.data if packed else x
    data.requires_grad_(train)

    def step():
        if not train:
            with torch.no_grad():
                m(x)
            return
        out, state = m(x)
        o = out.data if packed else out
        h = state[0] if isinstance(state, tuple) else state
        (o.sum() + h.square().sum()).backward()
        m.zero_grad(set_to_none=True)
        data.grad = None
    return step


def _cell_case(make, lstm=False):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = make()
    xs = torch.randn(6, B, I, generator=g, requires_grad=True)

    def step():
        state = None
        loss = 0
        for t in range(xs.shape[0]):
            state = m(xs[t], state)
            loss = loss + (state[0] if lstm else state).sum()
        loss.backward()
        m.zero_grad(set_to_none=True)
        xs.grad = None
    return step


def _fresh_module_case():
    """A new module every iteration: the packed-W_hh cache must drop entries of dead weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, 2, I, generator=g)

    def step():
        m = fastrnn.GRU(I, H)
        with torch.no_grad():
            m(x)
    return step


CASES = {
    "lstm_dense": lambda: _layer_case(lambda: fastrnn.LSTM(I, H, num_layers=2, bidirectional=True), False),
    "lstm_packed": lambda: _layer_case(lambda: fastrnn.LSTM(I, H, num_layers=2, bidirectional=True), True),
    "lstm_proj_dense": lambda: _layer_case(lambda: fastrnn.LSTM(I, H, proj_size=24), False),
    "lstm_proj_packed": lambda: _layer_case(lambda: fastrnn.LSTM(I, H, proj_size=24), True),
    "gru_dense": lambda: _layer_case(lambda: fastrnn.GRU(I, H, num_layers=2), False),
    "gru_packed": lambda: _layer_case(lambda: fastrnn.GRU(I, H, num_layers=2), True),
    "rnn_dense": lambda: _layer_case(lambda: fastrnn.RNN(I, H, bidirectional=True), False),
    "rnn_packed": lambda: _layer_case(lambda: fastrnn.RNN(I, H, nonlinearity="relu"), True),
    "lstm_inference": lambda: _layer_case(lambda: fastrnn.LSTM(I, H), False, train=False),
    "lstm_cell": lambda: _cell_case(lambda: fastrnn.LSTMCell(I, H), lstm=True),
    "gru_cell": lambda: _cell_case(lambda: fastrnn.GRUCell(I, H)),
    "rnn_cell": lambda: _cell_case(lambda: fastrnn.RNNCell(I, H)),
    "fresh_module_each_iter": _fresh_module_case,
}

_leaked = []


def _injected_leak_case(kb):
    """A deliberate leak of `kb` KiB per iteration (--inject-leak-kb): shows the check catches one."""
    inner = _layer_case(lambda: fastrnn.GRU(I, H), False, train=False)

    def step():
        inner()
        _leaked.append(torch.ones(kb * 256))  # float32: 256 elements per KiB
    return step


def measure(name, iters, warmup, inject_kb=0):
    step = _injected_leak_case(inject_kb) if name == "injected_leak" else CASES[name]()
    for _ in range(warmup):
        step()
    gc.collect()
    before = rss_bytes()
    peak = before
    t0 = time.perf_counter()
    for i in range(iters):
        step()
        if i % 50 == 49:
            peak = max(peak, rss_bytes())
    gc.collect()
    after = rss_bytes()
    return {"case": name, "iters": iters, "warmup": warmup, "rss_before_mb": before / 2 ** 20,
            "rss_after_mb": after / 2 ** 20, "peak_mb": max(peak, after) / 2 ** 20,
            "growth_mb": (after - before) / 2 ** 20, "bytes_per_iter": (after - before) / iters,
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=2000, help="measured iterations per case (default 2000)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default: iters/10, at least 20)")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--max-growth-mb", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--inject-leak-kb", type=int, default=0,
                    help="add a case 'injected_leak' that leaks this many KiB per iteration (a self-test)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else max(20, args.iters // 10)

    cases = list(args.cases) + (["injected_leak"] if args.inject_leak_kb else [])
    rows = [measure(c, args.iters, warmup, args.inject_leak_kb) for c in cases]
    bad = [r["case"] for r in rows if r["growth_mb"] >= args.max_growth_mb]
    if args.json:
        print(json.dumps({"rows": rows, "failed": bad, "max_growth_mb": args.max_growth_mb,
                          "threads": torch.get_num_threads(), "torch": torch.__version__}))
    else:
        print(f"fastrnn leak check: {args.iters} iterations per case after {warmup} warm-up, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}")
        print(f"{'case':24s} {'RSS before':>11s} {'RSS after':>10s} {'growth':>9s} {'B/iter':>8s} {'time':>7s}")
        for r in rows:
            print(f"{r['case']:24s} {r['rss_before_mb']:9.1f}MB {r['rss_after_mb']:8.1f}MB "
                  f"{r['growth_mb']:+7.2f}MB {r['bytes_per_iter']:8.0f} {r['seconds']:6.1f}s")
        total = rows[-1]["rss_after_mb"] - rows[0]["rss_before_mb"]
        print(f"whole run: RSS {rows[0]['rss_before_mb']:.1f} MB -> {rows[-1]['rss_after_mb']:.1f} MB "
              f"({total:+.2f} MB, includes each case's set-up and warm-up)")
        print("FAIL: " + ", ".join(bad) if bad else f"OK: every case grew by less than {args.max_growth_mb} MB")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
