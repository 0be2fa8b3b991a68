#!/usr/bin/env python
"""Side-by-side CPU benchmark: torch.nn LSTM/GRU/RNN (baseline) against fastrnn.

Every number this prints is measured in this one process, with baseline and fastrnn run
interleaved (A B A B ...) on the same input tensor and the same weights (the torch module's
state_dict loaded into the fastrnn module), at the same thread count, after warm-up. Each side
reports the median of the timed rounds, its min and max, and the speedup is the ratio of the two
medians (baseline / fastrnn). See benchmarks/README.md.

    .venv/bin/python benchmarks/bench.py                   # the standard grid (make bench)
    .venv/bin/python benchmarks/bench.py --cells LSTM --cases mid --modes training --rounds 15
    .venv/bin/python benchmarks/bench.py --quick --cases small-batch --out /tmp/benchquick
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch import nn

import fastrnn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import extras  # noqa: E402
import variants as V  # noqa: E402  (variant cells: eager loop vs fastrnn variant vs fastrnn.LSTM/GRU)
import bf16 as BF  # noqa: E402  (bfloat16: fastrnn vs torch.nn in bfloat16, and vs fastrnn in float32)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"

# (T, B, I, H): steps, batch, input size, hidden size.
CASES: dict[str, tuple[int, int, int, int]] = {
    "fastrnns-default": (100, 64, 512, 512),
    "small-batch": (100, 1, 256, 256),
    "mid": (100, 16, 256, 256),
    "large-hidden": (50, 32, 1024, 1024),
    "long-seq": (1000, 8, 128, 128),
}
# Extra cases: name -> (base case, cell, num_layers, bidirectional). Only run for that cell.
EXTRA_CASES: dict[str, tuple[str, str, int, bool]] = {
    "mid-2L-bi": ("mid", "LSTM", 2, True),
}
# Variable-length batches: name -> (T, B, I, H, shortest length). Lengths are drawn uniformly in
# [shortest, T] (the first is T) and the batch is packed (enforce_sorted=False) inside each call,
# on both sides; FLOPs count the real tokens only.
PACKED_CASES: dict[str, tuple[int, int, int, int, int]] = {
    "packed-varlen": (200, 32, 128, 256, 20),
}
CELLS = ("LSTM", "GRU", "RNN")
MODES = ("inference", "training")
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}

MIN_ROUND_S = 0.020      # a round of a very fast case repeats the call until it takes about this long
MAX_INNER = 10_000
QUICK_T = 4              # --quick: sequence length used for every case
SEED = 1234
# Correctness sanity check (done once per row before timing; not a test, a guard against timing
# something that computes the wrong thing). Flagged in the table if exceeded.
CHECK_ATOL = 1e-3
CHECK_RTOL = 1e-3
# A row whose max/min round time on either side exceeds this is marked "noisy" in the table.
NOISY_RATIO = 1.5
# A row during which other processes (or the hypervisor: steal time) used more than this many CPU
# cores on average is marked "contended": its numbers say more about the neighbours than about us.
CONTENDED_CORES = 0.15


class CpuWatch:
    """CPU used by everything except this process between start() and stop(), in cores (Linux)."""

    def __init__(self):
        self.tck = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                v = [int(t) for t in f.readline().split()[1:]]
            busy = sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # all but idle and iowait (steal counts)
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            own = int(fields[11]) + int(fields[12])  # utime + stime, all threads
            return busy, own, time.perf_counter()
        except (OSError, ValueError, IndexError):
            return None

    def start(self):
        self.s = self._read()

    def stop(self):
        e = self._read()
        if self.s is None or e is None or e[2] <= self.s[2]:
            return None
        others = max(0, (e[0] - self.s[0]) - (e[1] - self.s[1])) / self.tck
        return others / (e[2] - self.s[2])


# --------------------------------------------------------------------------------------------
# progress bar (stderr): tqdm when importable, else a small fallback
# --------------------------------------------------------------------------------------------
class _SimpleBar:
    def __init__(self, total: int, desc: str = "", file=sys.stderr, width: int = 28):
        self.total, self.n, self.desc, self.file, self.width = total, 0, desc, file, width
        self.postfix = ""
        self.t0 = time.perf_counter()
        self._draw()

    def _draw(self) -> None:
        frac = self.n / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        el = time.perf_counter() - self.t0
        line = f"\r{self.desc}: {frac * 100:5.1f}% |{bar}| {self.n}/{self.total} [{el:6.1f}s] {self.postfix}"
        self.file.write(line[:160].ljust(100))
        self.file.flush()

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s
        self._draw()

    def update(self, k: int = 1) -> None:
        self.n += k
        self._draw()

    def close(self) -> None:
        self._draw()
        self.file.write("\n")
        self.file.flush()


def make_bar(total: int, desc: str):
    try:
        from tqdm import tqdm  # optional; never a dependency
    except Exception:
        return _SimpleBar(total, desc)
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)


# --------------------------------------------------------------------------------------------
# machine info
# --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    bi = fastrnn.build_info()
    cuda = None
    if torch.cuda.is_available():
        cuda = {"count": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0)}
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpu_isa": bi.get("cpu_isa"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastrnn": getattr(fastrnn, "__version__", "?"),
        "fastrnn_build_info": bi,
        "cuda_device": cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": _loadavg(),
    }


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def sgemm_peak_gflops(reps: int, n: int = 1024) -> dict:
    """Median GFLOP/s of torch.mm on two n x n float32 matrices (current thread count)."""
    g = torch.Generator().manual_seed(SEED)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    flops = 2.0 * n ** 3
    return {"n": n, "reps": reps, "median_ms": med * 1e3, "gflops": flops / med / 1e9,
            "best_gflops": flops / min(times) / 1e9, "onednn_gflops": onednn_gemm_gflops(a, b, reps)}


def onednn_gemm_gflops(a: torch.Tensor, b: torch.Tensor, reps: int):
    """Same GEMM through oneDNN (what torch.nn.LSTM uses on CPU), for reference only: with MKL on
    AMD CPUs torch.mm can run well below the machine's fp32 rate. None where unavailable (private
    API)."""
    try:
        am, bm = a.to_mkldnn(), b.to_mkldnn()
        f = torch._C._nn.mkldnn_linear
        for _ in range(3):
            f(am, bm)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f(am, bm)
            times.append(time.perf_counter() - t0)
        return 2.0 * a.shape[0] ** 3 / statistics.median(times) / 1e9
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# one row: (case, cell, mode)
# --------------------------------------------------------------------------------------------
@dataclass
class Spec:
    case: str
    cell: str
    T: int
    B: int
    I: int
    H: int
    num_layers: int = 1
    bidirectional: bool = False
    lengths: tuple = ()  # packed cases: the sequence lengths

    @property
    def shape(self) -> str:
        s = f"({self.T},{self.B},{self.I},{self.H})"
        if self.num_layers != 1 or self.bidirectional:
            s += f" {self.num_layers}L{' bi' if self.bidirectional else ''}"
        if self.lengths:
            s += f" packed, mean len {sum(self.lengths) / len(self.lengths):.0f}"
        return s

    def forward_flops(self) -> float:
        """GEMM flops of one forward pass: 2*T*B*G*H*(I_l+H) per layer and direction."""
        G = GATES[self.cell]
        D = 2 if self.bidirectional else 1
        total = 0.0
        rows = sum(self.lengths) if self.lengths else self.T * self.B
        for layer in range(self.num_layers):
            in_l = self.I if layer == 0 else D * self.H
            total += D * 2.0 * rows * G * self.H * (in_l + self.H)
        return total

    def flops(self, mode: str) -> float:
        return self.forward_flops() * (3.0 if mode == "training" else 1.0)


def build_specs(cells, cases, quick: bool) -> list[Spec]:
    specs = []
    for case in cases:
        if case in CASES:
            T, B, I, H = CASES[case]
            for cell in cells:
                specs.append(Spec(case, cell, min(T, QUICK_T) if quick else T, B, I, H))
        elif case in PACKED_CASES:
            T, B, I, H, shortest = PACKED_CASES[case]
            T = min(T, QUICK_T) if quick else T
            g = torch.Generator().manual_seed(SEED + 2)
            lengths = [T] + torch.randint(min(shortest, T), T + 1, (B - 1,), generator=g).tolist()
            for cell in cells:
                specs.append(Spec(case, cell, T, B, I, H, lengths=tuple(lengths)))
        else:
            base, cell, L, bi = EXTRA_CASES[case]
            if cell not in cells:
                continue
            T, B, I, H = CASES[base]
            specs.append(Spec(case, cell, min(T, QUICK_T) if quick else T, B, I, H, L, bi))
    return specs


class Packed(nn.Module):
    """Runs a recurrent layer on a padded batch packed with fixed lengths (packing included in
    the timed call, as in a training loop) and returns (output.data, state)."""

    def __init__(self, rnn: nn.Module, lengths):
        super().__init__()
        self.rnn = rnn
        self.lengths = torch.tensor(lengths)

    def forward(self, x):
        out, state = self.rnn(pack_padded_sequence(x, self.lengths, enforce_sorted=False))
        return out.data, state


def make_modules(spec: Spec):
    torch.manual_seed(SEED)
    kw = dict(num_layers=spec.num_layers, bidirectional=spec.bidirectional)
    if spec.cell == "RNN":
        kw["nonlinearity"] = "tanh"
    base = getattr(nn, spec.cell)(spec.I, spec.H, **kw)
    fast = getattr(fastrnn, spec.cell)(spec.I, spec.H, **kw)
    fast.load_state_dict(base.state_dict())
    base.eval()   # no dropout anyway; eval() only to make the intent explicit
    fast.eval()
    if spec.lengths:
        return Packed(base, spec.lengths), Packed(fast, spec.lengths)
    return base, fast


def make_input(spec: Spec) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(spec.T, spec.B, spec.I, generator=g)


def make_runner(m: nn.Module, x: torch.Tensor, mode: str):
    """Returns a zero-argument callable that does one unit of work for this mode."""
    if mode == "inference":
        def run():
            with torch.no_grad():
                m(x)
        return run

    params = list(m.parameters())

    def run_train():
        x.grad = None
        for p in params:
            p.grad = None
        out, _ = m(x)
        out.sum().backward()
    return run_train


def _flatten_state(h):
    return list(h) if isinstance(h, tuple) else [h]


def check_outputs(base: nn.Module, fast: nn.Module, x: torch.Tensor, mode: str):
    """Compares the two sides' results (outputs, final states, and in training mode the input and
    weight gradients). Returns (max abs diff, max relative diff, ok) where the relative diff of a
    tensor is max|a-b| / max|a| (a = torch.nn's), and ok means torch.allclose for every tensor.
    A shape mismatch or NaN gives inf/nan and ok=False."""
    pairs = []
    if mode == "inference":
        with torch.no_grad():
            ob, hb = base(x)
            of, hf = fast(x)
        pairs += [(ob, of)] + list(zip(_flatten_state(hb), _flatten_state(hf)))
    else:
        res = []
        for m in (base, fast):
            xi = x.detach().clone().requires_grad_(True)
            m.zero_grad(set_to_none=True)
            out, h = m(xi)
            out.sum().backward()
            grads = [xi.grad] + [p.grad for _, p in m.named_parameters()]
            res.append(([out.detach()] + [t.detach() for t in _flatten_state(h)], grads))
            m.zero_grad(set_to_none=True)
        (vb, gb), (vf, gf) = res
        pairs += list(zip(vb, vf)) + list(zip(gb, gf))
    worst = worst_rel = 0.0
    ok = True
    for a, b in pairs:
        if a is None or b is None or a.shape != b.shape:
            return float("inf"), float("inf"), False
        if a.numel() == 0:
            continue
        dmax = (a - b).abs().max().item()
        if math.isnan(dmax):
            return float("nan"), float("nan"), False
        worst = max(worst, dmax)
        worst_rel = max(worst_rel, dmax / max(a.abs().max().item(), 1e-12))
        if not torch.allclose(b, a, rtol=CHECK_RTOL, atol=CHECK_ATOL):
            ok = False
    return worst, worst_rel, ok


def time_pair(run_a, run_b, rounds: int, warmup: int, min_round_s: float):
    """Interleaved A B A B ... timing. Returns (times_a, times_b, inner) in seconds per call."""
    # warm-up (also used to pick the inner repeat count; the same count for both sides)
    ta = tb = float("inf")
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter(); run_a(); ta = time.perf_counter() - t0
        t0 = time.perf_counter(); run_b(); tb = time.perf_counter() - t0
    fastest = max(min(ta, tb), 1e-7)
    inner = 1 if fastest >= min_round_s else min(MAX_INNER, math.ceil(min_round_s / fastest))

    times_a, times_b = [], []
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for run, sink in ((run_a, times_a), (run_b, times_b)):
                t0 = time.perf_counter()
                for _ in range(inner):
                    run()
                sink.append((time.perf_counter() - t0) / inner)
    finally:
        if gc_was:
            gc.enable()
    return times_a, times_b, inner


def bench_row(spec: Spec, mode: str, x: torch.Tensor, base, fast, args, peak_gflops: float) -> dict:
    err, rel_err, ok = check_outputs(base, fast, x, mode)

    if mode == "training":
        x = x.detach().clone().requires_grad_(True)
    run_a = make_runner(base, x, mode)
    run_b = make_runner(fast, x, mode)
    watch = CpuWatch()
    watch.start()
    ta, tb, inner = time_pair(run_a, run_b, args.rounds, args.warmup, 0.0 if args.quick else MIN_ROUND_S)
    others = watch.stop()
    base.zero_grad(set_to_none=True)
    fast.zero_grad(set_to_none=True)

    med_a, med_b = statistics.median(ta), statistics.median(tb)
    flops = spec.flops(mode)
    gf_a, gf_b = flops / med_a / 1e9, flops / med_b / 1e9
    paired = [a / b for a, b in zip(ta, tb)]
    return {
        "case": spec.case, "cell": spec.cell, "mode": mode,
        "T": spec.T, "B": spec.B, "I": spec.I, "H": spec.H,
        "num_layers": spec.num_layers, "bidirectional": spec.bidirectional,
        "shape": spec.shape,
        "rounds": len(ta), "warmup": args.warmup, "inner_repeats": inner,
        "baseline_ms": med_a * 1e3, "fastrnn_ms": med_b * 1e3,
        "speedup": med_a / med_b,
        "baseline_min_ms": min(ta) * 1e3, "baseline_max_ms": max(ta) * 1e3,
        "fastrnn_min_ms": min(tb) * 1e3, "fastrnn_max_ms": max(tb) * 1e3,
        "paired_speedup_min": min(paired), "paired_speedup_max": max(paired),
        "flops": flops,
        "baseline_gflops": gf_a, "fastrnn_gflops": gf_b,
        "fastrnn_frac_sgemm_peak": gf_b / peak_gflops if peak_gflops > 0 else None,
        "max_abs_diff": err, "max_rel_diff": rel_err, "check_ok": ok,
        "noisy": max(ta) / min(ta) > NOISY_RATIO or max(tb) / min(tb) > NOISY_RATIO,
        "other_cpu_cores": others,
        "contended": others is not None and others > CONTENDED_CORES,
        "baseline_times_ms": [t * 1e3 for t in ta], "fastrnn_times_ms": [t * 1e3 for t in tb],
    }


def error_row(spec: Spec, mode: str, exc: BaseException) -> dict:
    return {"case": spec.case, "cell": spec.cell, "mode": mode, "T": spec.T, "B": spec.B, "I": spec.I,
            "H": spec.H, "num_layers": spec.num_layers, "bidirectional": spec.bidirectional,
            "shape": spec.shape, "error": f"{type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def markdown_table(rows: list[dict]) -> str:
    hdr = ["case", "cell", "shape (T,B,I,H)", "mode", "baseline ms", "fastrnn ms", "speedup",
           "baseline spread ms", "fastrnn spread ms", "baseline GFLOP/s", "fastrnn GFLOP/s",
           "fastrnn / sgemm peak", "max rel diff", "notes"]
    lines = ["| " + " | ".join(hdr) + " |",
             "|" + "|".join(["---"] * 4 + ["---:"] * (len(hdr) - 4)) + "|"]
    for r in rows:
        if "error" in r:
            cells = [r["case"], r["cell"], r["shape"], r["mode"]] + [""] * 9 + [f"ERROR: {r['error']}"]
        else:
            frac = r["fastrnn_frac_sgemm_peak"]
            notes = ([] if r["check_ok"] else ["MISMATCH"]) + (["noisy"] if r["noisy"] else [])
            if r["contended"]:
                notes.append(f"contended ({r['other_cpu_cores']:.2f} cores used by others)")
            cells = [r["case"], r["cell"], r["shape"], r["mode"],
                     _ms(r["baseline_ms"]), _ms(r["fastrnn_ms"]), f"{r['speedup']:.2f}x",
                     f"{_ms(r['baseline_min_ms'])}–{_ms(r['baseline_max_ms'])}",
                     f"{_ms(r['fastrnn_min_ms'])}–{_ms(r['fastrnn_max_ms'])}",
                     f"{r['baseline_gflops']:.1f}", f"{r['fastrnn_gflops']:.1f}",
                     "n/a" if frac is None else f"{frac * 100:.1f}%", f"{r['max_rel_diff']:.1e}",
                     ", ".join(notes)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def machine_text(info: dict, peak: dict, args, cmdline: str) -> str:
    cuda = info["cuda_device"]
    cuda_s = "none" if cuda is None else f"{cuda['name']} (x{cuda['count']})"
    return "\n".join([
        f"- CPU: {info['cpu_model']} ({info['logical_cpus']} logical CPUs)",
        f"- ISA (fastrnn build): {info['cpu_isa']}",
        f"- threads in use: {info['threads']} (torch.get_num_threads(), both sides)",
        f"- torch: {info['torch']}; fastrnn {info['fastrnn']}; Python {info['python']}; {info['platform']}",
        f"- fastrnn.build_info(): `{json.dumps(info['fastrnn_build_info'], sort_keys=True)}`",
        f"- CUDA device: {cuda_s}",
        f"- sgemm peak (torch.mm {peak['n']}x{peak['n']} fp32, median of {peak['reps']}): "
        f"{peak['gflops']:.1f} GFLOP/s at start"
        + (f", {peak['end_gflops']:.1f} at end" if peak.get("end_gflops") else "")
        + ("" if peak.get("onednn_gflops") is None else
           f"; for reference, the same GEMM through oneDNN: {peak['onednn_gflops']:.1f} GFLOP/s"),
        f"- CPU used by other processes at start: "
        + ("unknown" if info.get("other_cpu_cores_at_start") is None else
           f"{info['other_cpu_cores_at_start']:.2f} cores")
        + f"; load average (1/5/15 min) at start: {info['loadavg_at_start']}"
        + (f", at end: {info['loadavg_at_end']}" if info.get("loadavg_at_end") else ""),
        f"- method: interleaved baseline/fastrnn, {args.warmup} warm-up, {args.rounds} timed rounds each, "
        f"median reported{' (QUICK smoke-test run: numbers are meaningless)' if args.quick else ''}",
        f"- command: `{cmdline}`",
    ])


def write_plot(rows: list[dict], path: Path, info: dict) -> bool:
    ok_rows = [r for r in rows if "error" not in r]
    if not ok_rows:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # matplotlib is a dev dependency; don't die without it
        print(f"warning: no plot written ({type(e).__name__}: {e})", file=sys.stderr)
        return False
    labels = [f"{r['case']} / {r['cell']} / {r['mode']}" for r in ok_rows]
    vals = [r["speedup"] for r in ok_rows]
    colors = ["tab:blue" if r["mode"] == "inference" else "tab:orange" for r in ok_rows]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(ok_rows) + 1.6))
    y = list(range(len(ok_rows)))[::-1]
    ax.barh(y, vals, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    for yi, v in zip(y, vals):
        ax.text(v, yi, f" {v:.2f}x", va="center", fontsize=7)
    ax.set_xlabel("speedup = torch.nn median / fastrnn median  (>1: fastrnn faster)")
    ax.set_title(f"fastrnn vs torch.nn — {info['cpu_model']}, {info['threads']} threads, "
                 f"torch {info['torch']}", fontsize=9)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color="tab:blue", label="inference"), Patch(color="tab:orange", label="training")],
              loc="lower right", fontsize=8)
    ax.set_xlim(0, max(vals + [1.0]) * 1.18)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
VARIANT_NOTE = ("Variant cells: eager loop = the same cell as a plain-PyTorch Python loop over time (input projection "
                "hoisted out of the loop), sharing the variant layer's parameters; plain fastrnn = fastrnn.LSTM (GRU "
                "for LayerNormGRU) on the same shape; variant and plain interleaved in one process, the loop's rounds timed just before "
                "them on their own (its autograd churn slowed whichever side followed it), median of the rounds. "
                "speedup vs loop = loop / variant; variant / plain = variant / plain fastrnn (lower is better). "
                "max rel diff: loop vs variant outputs, checked once before timing.")


def parse_list(s: str, allowed, what: str, parser) -> list[str]:
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        parser.error(f"unknown {what}: {', '.join(bad) or '(empty)'}; choose from {', '.join(allowed)}")
    return items


def main(argv=None) -> int:
    all_cases = list(CASES) + list(EXTRA_CASES) + list(PACKED_CASES)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default=",".join(CELLS), help="comma list of LSTM,GRU,RNN (default: all)")
    p.add_argument("--cases", default=",".join(all_cases), help=f"comma list of {','.join(all_cases)} "
                                                                "(default: all)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of inference,training (default: both)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per side (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up rounds per side (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) (default: torch's)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: 1 warm-up, 1 round, T<={QUICK_T}; numbers are meaningless")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default benchmarks/results)")
    p.add_argument("--no-extras", action="store_true",
                   help="skip the streaming (T=1), cell-step and training peak-memory measurements")
    p.add_argument("--no-variants", action="store_true",
                   help=f"skip the variant-cell rows ({', '.join(V.VARIANT_CELLS)} at "
                        f"{', '.join(V.VARIANT_CASES)}, when those cases are selected)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help=f"bfloat16 rows: fastrnn vs torch.nn both in bfloat16, and vs fastrnn in float32 "
                        f"({', '.join(BF.BF16_CELLS)} at {', '.join(BF.BF16_CASES)}, when those cells and cases are "
                        f"selected; default on, --no-bf16 skips them)")
    p.add_argument("--no-grid", action="store_true",
                   help="skip the float32 grid rows (with --no-extras --no-variants: only the bfloat16 rows)")
    args = p.parse_args(argv)

    cells = parse_list(args.cells, CELLS, "cell", p)
    cases = parse_list(args.cases, all_cases, "case", p)
    modes = parse_list(args.modes, MODES, "mode", p)
    if args.quick:
        args.rounds, args.warmup = 1, 1
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if not args.quick and args.rounds < 7:
        print(f"note: --rounds {args.rounds} is below the 7 rounds BENCHMARKS.md asks for", file=sys.stderr)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmdline = " ".join(shlex.quote(a) for a in [sys.executable, sys.argv[0]] + (sys.argv[1:] if argv is None
                                                                                else list(argv)))
    t_start = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    info = machine_info()
    w = CpuWatch()
    w.start()
    time.sleep(0.3)   # idle: whatever CPU is used now is someone else's
    info["other_cpu_cores_at_start"] = w.stop()
    peak = sgemm_peak_gflops(reps=3 if args.quick else 15)
    print("## Machine\n")
    print(machine_text(info, peak, args, cmdline))
    print(flush=True)
    if info["other_cpu_cores_at_start"] is not None and info["other_cpu_cores_at_start"] > CONTENDED_CORES:
        print(f"warning: other processes are using {info['other_cpu_cores_at_start']:.2f} CPU cores: "
              "timings will be disturbed (rows are marked 'contended')", file=sys.stderr)

    specs = [] if args.no_grid else build_specs(cells, cases, args.quick)
    if not specs and not args.no_grid:
        print("warning: the selected --cells/--cases give no rows (mid-2L-bi is LSTM only)", file=sys.stderr)
    rows: list[dict] = []
    bar = make_bar(len(specs) * len(modes), "bench")
    try:
        for spec in specs:
            try:
                base, fast = make_modules(spec)
                x = make_input(spec)
            except Exception as e:
                for mode in modes:
                    rows.append(error_row(spec, mode, e))
                    bar.update(1)
                continue
            for mode in modes:
                bar.set_postfix_str(f"{spec.case} {spec.cell} {mode}")
                try:
                    rows.append(bench_row(spec, mode, x, base, fast, args, peak["gflops"]))
                except Exception as e:  # report, keep going: a crash is a result too
                    rows.append(error_row(spec, mode, e))
                bar.update(1)
    finally:
        bar.close()

    stream_rows, cell_rows, mem_rows = [], [], []
    if not args.no_extras:
        print("streaming, cell and peak-memory measurements ...", file=sys.stderr, flush=True)
        stream_rows = extras.streaming_rows(time_pair, args.rounds, args.warmup,
                                            0.0 if args.quick else MIN_ROUND_S, args.quick)
        cell_rows = extras.cell_rows(time_pair, args.rounds, args.warmup, 0.0 if args.quick else MIN_ROUND_S,
                                     args.quick)
        mem_rows = extras.peak_memory_rows(args.quick)
    def side_rows(label, side_cases, side_cells, bench_fn):
        """Rows of a side table (variant cells, bfloat16): bench_fn(cell, case, shape, mode, ...) per
        case, mode and cell; a crash is recorded as that row's result."""
        rows: list[dict] = []
        if not side_cases or not side_cells:
            return rows
        sbar = make_bar(len(side_cases) * len(modes) * len(side_cells), label)
        try:
            for case in side_cases:
                T, B, I, H = CASES[case]
                shape = (min(T, QUICK_T) if args.quick else T, B, I, H)
                for mode in modes:
                    for cell in side_cells:
                        sbar.set_postfix_str(f"{case} {cell} {mode}")
                        try:
                            rows.append(bench_fn(cell, case, shape, mode, args.rounds, args.warmup,
                                                 0.0 if args.quick else MIN_ROUND_S, CpuWatch, make_runner))
                        except Exception as e:  # a crash is a result too
                            rows.append({"cell": cell, "case": case, "mode": mode, "error": f"{type(e).__name__}: {e}"})
                        sbar.update(1)
        finally:
            sbar.close()
        return rows

    vcases = [] if args.no_variants else [c for c in cases if c in V.VARIANT_CASES]
    variant_rows = side_rows("variants", vcases, V.VARIANT_CELLS, V.bench_variant)
    bcases = [c for c in cases if c in BF.BF16_CASES] if args.bf16 else []
    bf16_rows = side_rows("bf16", bcases, [c for c in cells if c in BF.BF16_CELLS], BF.bench_bf16)

    # again at the end: a different sgemm rate means the machine's speed changed during the run
    end_peak = sgemm_peak_gflops(reps=3 if args.quick else 15)
    peak["end_gflops"] = end_peak["gflops"]
    info["loadavg_at_end"] = _loadavg()
    elapsed = time.perf_counter() - t_start
    table = markdown_table(rows)
    print("## Results\n")
    print(table)
    print(f"\nspeedup = baseline median / fastrnn median; spread = min–max over {args.rounds} rounds; "
          f"GFLOP/s from GEMM flops (training = 3x forward); sgemm peak {peak['gflops']:.1f} GFLOP/s at start, "
          f"{peak['end_gflops']:.1f} at end; max rel diff = max|torch.nn - fastrnn| / max|torch.nn| over "
          f"outputs, states (and gradients in training); noisy = max/min > {NOISY_RATIO} on a side; "
          f"contended = other processes used > {CONTENDED_CORES} cores during the row. "
          f"Total time {elapsed:.1f}s.")
    extra_md = []
    if stream_rows:
        extra_md += ["## Streaming: one step a call (T=1, B=1, carried state)", "", extras.streaming_table(stream_rows),
                     "", "Per call, median of the timed rounds, interleaved; the LSTMCell pairing is timed separately "
                     "(its own fastrnn column). Training = forward + backward of the output's sum.", ""]
    if cell_rows:
        extra_md += ["## Cells: one step over a batch (a decoder's step, carried state)", "",
                     extras.cell_table(cell_rows), "", "torch.nn.LSTMCell / GRUCell / RNNCell against fastrnn's, per "
                     "call, median of the timed rounds, interleaved. Training = forward + backward of the output's "
                     "sum.", ""]
    if mem_rows:
        extra_md += ["## Training peak memory", "", extras.memory_table(mem_rows), "",
                     "Peak resident memory of a steady-state forward+backward (the third) above the resident memory "
                     "before the first, each side in a fresh process: memory a layer keeps between calls (caches, "
                     "packed weights, fastrnn's workspace pool) counts (benchmarks/extras.py).", ""]
    if extra_md:
        print("\n" + "\n".join(extra_md))
    vtable = V.markdown(variant_rows) if variant_rows else ""
    if vtable:
        print("\n## Variant cells\n")
        print(vtable)
        print(f"\n{VARIANT_NOTE}")
    btable = BF.markdown(bf16_rows) if bf16_rows else ""
    if btable:
        print("\n## bfloat16\n")
        print(btable)
        print(f"\n{BF.NOTE}")

    result = {
        "started_utc": started, "elapsed_s": elapsed, "command": cmdline,
        "settings": {"rounds": args.rounds, "warmup": args.warmup, "quick": args.quick, "threads": info["threads"],
                     "min_round_s": 0.0 if args.quick else MIN_ROUND_S, "seed": SEED,
                     "check_atol": CHECK_ATOL, "check_rtol": CHECK_RTOL},
        "machine": info, "sgemm_peak": peak, "rows": rows, "variant_rows": variant_rows, "streaming": stream_rows,
        "cells": cell_rows,
        "peak_memory": mem_rows, "bf16_rows": bf16_rows,
    }
    with open(out_dir / "results.json", "w") as f:
        json.dump(result, f, indent=2, default=str)
    have_png = write_plot(rows, out_dir / "speedup.png", info)
    md = ["# fastrnn benchmark results", "",
          f"Generated {started} by `benchmarks/bench.py` in {elapsed:.0f}s.", "",
          "## Machine", "", machine_text(info, peak, args, cmdline), "",
          "## Results", "", table, "",
          f"speedup = baseline (torch.nn) median / fastrnn median, measured interleaved in one process on the "
          f"same inputs and weights; spread = min–max over {args.rounds} timed rounds per side. GFLOP/s counts "
          f"GEMM flops only: forward 2·T·B·G·H·(I+H) per layer and direction (G = 4 LSTM, 3 GRU, 1 RNN), "
          f"training = 3x forward; `fastrnn / sgemm peak` divides by the torch.mm 1024x1024 rate measured at "
          f"the start of the run. `max rel diff` = max|torch.nn - fastrnn| / max|torch.nn| over outputs, "
          f"final states and (training) input and weight gradients, checked once before timing; MISMATCH = "
          f"not allclose(rtol={CHECK_RTOL}, atol={CHECK_ATOL}); noisy = max/min round time above "
          f"{NOISY_RATIO} on either side; contended = other processes (or hypervisor steal) used more than {CONTENDED_CORES} "
          f"CPU cores on average while the row ran. Don't quote noisy or contended rows: rerun them on a "
          f"quiet machine.", ""]
    md += extra_md
    if vtable:
        md += ["## Variant cells", "", vtable, "", VARIANT_NOTE, ""]
    if btable:
        md += ["## bfloat16", "", btable, "", BF.NOTE, ""]
    if have_png:
        md += ["![speedup per case and mode](speedup.png)", "", "[speedup.png](speedup.png)", ""]
    (out_dir / "RESULTS.md").write_text("\n".join(md))
    print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'RESULTS.md'}"
          + (f", {out_dir / 'speedup.png'}" if have_png else ""), file=sys.stderr)

    n_err = sum(1 for r in rows + variant_rows + bf16_rows if "error" in r)
    n_bad = sum(1 for r in rows + variant_rows + bf16_rows if "error" not in r and not r["check_ok"])
    n_noisy = sum(1 for r in rows if r.get("noisy"))
    n_cont = sum(1 for r in rows if r.get("contended"))
    if n_cont:
        print(f"warning: {n_cont} row(s) contended: other processes used > {CONTENDED_CORES} CPU cores while "
              "they ran; rerun on a quiet machine before quoting them", file=sys.stderr)
    if n_noisy:
        print(f"warning: {n_noisy} row(s) noisy (max/min > {NOISY_RATIO}); rerun those before quoting them",
              file=sys.stderr)
    if abs(peak["end_gflops"] - peak["gflops"]) > 0.2 * max(peak["gflops"], peak["end_gflops"]):
        print(f"warning: sgemm rate changed during the run ({peak['gflops']:.1f} -> {peak['end_gflops']:.1f} "
              "GFLOP/s): the machine was not steady", file=sys.stderr)
    if n_err or n_bad:
        print(f"warning: {n_err} row(s) raised, {n_bad} row(s) failed the output check", file=sys.stderr)
    return 1 if (n_err or n_bad) else 0


if __name__ == "__main__":
    sys.exit(main())
