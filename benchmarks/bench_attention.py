#!/usr/bin/env python
"""Side-by-side CPU benchmark of fastrnn's attention ops against the plain-PyTorch formula and
torch's built-ins (F.scaled_dot_product_attention, nn.MultiheadAttention).

Same rules as bench.py (benchmarks/README.md): both sides in this one process, interleaved
A B A B ... on the same inputs and weights, after warm-up; medians of the timed rounds, min/max,
speedup = baseline median / fastrnn median. Peak memory of a training step is measured in a
fresh child process per side (peak RSS growth over the process's footprint before the step).

    .venv/bin/python benchmarks/bench_attention.py                # make bench runs this too
    .venv/bin/python benchmarks/bench_attention.py --quick --out /tmp/attn
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402  (machine info, interleaved timing, progress bar)

import fastrnn  # noqa: E402
from fastrnn import functional as FR  # noqa: E402
from fastrnn import reference as R  # noqa: E402

SEED = 0


def sdpa_inputs(B, H, L, S, d, grad):
    g = torch.Generator().manual_seed(SEED)
    return [torch.randn(B, H, n, d, generator=g).requires_grad_(grad) for n in (L, S, S)]


def additive_inputs(B, T, S, D, grad):
    g = torch.Generator().manual_seed(SEED)
    shapes = [(B, T, D), (B, S, D), (B, S, D), (D, D), (D, D), (D,), (D,)]
    return [(torch.randn(*s, generator=g) / math.sqrt(s[-1])).requires_grad_(grad) for s in shapes]


def runner(fn, inputs, mode):
    if mode == "inference":
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run

    def run():
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
        for t in inputs:
            t.grad = None
    return run


def case_list(quick):
    s = 0.25 if quick else 1.0
    n = lambda v: max(8, int(v * s))  # noqa: E731
    sdpa_shape = (8, 8, n(512), n(512), 64)
    add_shape = (32 if not quick else 4, n(128), n(128), n(256))
    mha_shape = (8, n(256), 256, 8)
    cases = []
    for mode in ("inference", "training"):
        cases.append(dict(case="sdpa", shape=sdpa_shape, mode=mode, baseline="F.scaled_dot_product_attention"))
        cases.append(dict(case="sdpa", shape=sdpa_shape, mode=mode, baseline="plain formula"))
        cases.append(dict(case="sdpa-causal", shape=sdpa_shape, mode=mode, baseline="F.scaled_dot_product_attention"))
        cases.append(dict(case="mha", shape=mha_shape, mode=mode, baseline="nn.MultiheadAttention"))
        cases.append(dict(case="additive", shape=add_shape, mode=mode, baseline="plain formula"))
    return cases


def make_pair(c):
    grad = c["mode"] == "training"
    if c["case"].startswith("sdpa"):
        B, H, L, S, d = c["shape"]
        causal = c["case"] == "sdpa-causal"
        x = sdpa_inputs(B, H, L, S, d, grad)
        base_fn = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)) \
            if c["baseline"].startswith("F.") else (lambda q, k, v: R.scaled_dot_product_attention_ref(
                q, k, v, is_causal=causal))
        fast_fn = lambda q, k, v: FR.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
        flops = 4 * B * H * L * S * d * (0.5 if causal else 1.0) * (3.5 if grad else 1.0)
        return runner(base_fn, x, c["mode"]), runner(fast_fn, x, c["mode"]), flops
    if c["case"] == "mha":
        B, L, E, heads = c["shape"]
        torch.manual_seed(SEED)
        base = nn.MultiheadAttention(E, heads, batch_first=True)
        fast = fastrnn.MultiheadAttention(E, heads, batch_first=True)
        fast.load_state_dict(base.state_dict())
        x = [torch.randn(B, L, E).requires_grad_(grad)]
        if not grad:
            base.eval(), fast.eval()
        flops = (4 * B * L * L * E + 8 * B * L * E * E) * (3.5 if grad else 1.0)
        return (runner(lambda t: base(t, t, t, need_weights=False), x, c["mode"]),
                runner(lambda t: fast(t, t, t, need_weights=False), x, c["mode"]), flops)
    B, T, S, D = c["shape"]
    x = additive_inputs(B, T, S, D, grad)
    return runner(R.additive_attention_ref, x, c["mode"]), runner(FR.additive_attention, x, c["mode"]), None


def peak_memory_child(side, shape):
    """Runs one additive-attention training step in this (fresh) process; prints peak RSS growth."""
    B, T, S, D = shape
    x = additive_inputs(B, T, S, D, True)
    fn = R.additive_attention_ref if side == "plain" else FR.additive_attention
    # Warm-up on a tiny problem (loads libraries, starts threads) without raising the peak.
    runner(fn, additive_inputs(2, 4, 4, 8, True), "training")()
    # Not getrusage's ru_maxrss: Linux keeps it across execve, so a child of a large process (make
    # bench runs this after the other cases) starts with the parent's peak and measures nothing.
    # VmHWM, reset through /proc/self/clear_refs, is this process's own.
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    ctx, w = fn(*x)
    ctx.sum().backward()
    after = _status_kb("VmHWM")
    print(json.dumps({"peak_mb": (after - before) / 1024.0}))


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} missing from /proc/self/status")


def measure_peak(side, shape):
    r = subprocess.run([sys.executable, __file__, "--memory-child", side, "--shape", ",".join(map(str, shape))],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="small shapes, 2 rounds (a smoke run)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        peak_memory_child(args.memory_child, tuple(int(s) for s in args.shape.split(",")))
        return 0
    if args.quick:
        args.rounds, args.warmup = 2, 1
    torch.manual_seed(SEED)
    info = bench.machine_info()
    cases = case_list(args.quick)
    rows = []
    bar = bench.make_bar(len(cases) + 2, "attention")
    for c in cases:
        run_base, run_fast, flops = make_pair(c)
        ta, tb, inner = bench.time_pair(run_base, run_fast, args.rounds, args.warmup, 0.05)
        ma, mb = statistics.median(ta), statistics.median(tb)
        rows.append(dict(c, shape="x".join(map(str, c["shape"])), baseline_ms=ma * 1e3, fastrnn_ms=mb * 1e3,
                         baseline_min_ms=min(ta) * 1e3, baseline_max_ms=max(ta) * 1e3, fastrnn_min_ms=min(tb) * 1e3,
                         fastrnn_max_ms=max(tb) * 1e3, speedup=ma / mb, inner=inner,
                         fastrnn_gflops=flops / mb / 1e9 if flops else None))
        bar.update(1)
    add_shape = next(c["shape"] for c in cases if c["case"] == "additive")
    memory = {"shape": "x".join(map(str, add_shape)), "plain_peak_mb": measure_peak("plain", add_shape)}
    bar.update(1)
    memory["fastrnn_peak_mb"] = measure_peak("fastrnn", add_shape)
    memory["ratio"] = memory["fastrnn_peak_mb"] / memory["plain_peak_mb"] if memory["plain_peak_mb"] > 0 else None
    bar.update(1)
    bar.close()

    lines = [f"Machine: {info['cpu_model']}, ISA {info['cpu_isa']}, {info['threads']} threads, torch {info['torch']}, "
             f"load average at start {info['loadavg_at_start']}",
             "Training = forward + backward of output.sum(). SDPA GFLOP/s count 4*B*H*L*S*d per forward (half for "
             "causal) and 3.5x that for training (flash-attention's convention). mha: B x L x E x heads, "
             "need_weights=False, self-attention. additive: B x T x S x D.", "",
             "| case | shape | mode | baseline | baseline ms (min-max) | fastrnn ms (min-max) | speedup | "
             "fastrnn GFLOP/s |", "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        gf = f"{r['fastrnn_gflops']:.1f}" if r["fastrnn_gflops"] else "-"
        lines.append(f"| {r['case']} | {r['shape']} | {r['mode']} | {r['baseline']} | {r['baseline_ms']:.1f} "
                     f"({r['baseline_min_ms']:.1f}-{r['baseline_max_ms']:.1f}) | {r['fastrnn_ms']:.1f} "
                     f"({r['fastrnn_min_ms']:.1f}-{r['fastrnn_max_ms']:.1f}) | {r['speedup']:.2f}x | {gf} |")
    lines += ["", f"Peak memory of one additive-attention training step ({memory['shape']}), growth of peak RSS in a "
              f"fresh process: plain formula {memory['plain_peak_mb']:.0f} MB, fastrnn {memory['fastrnn_peak_mb']:.0f} "
              f"MB (ratio {memory['ratio'] if memory['ratio'] is None else round(memory['ratio'], 3)})."]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_results.json").write_text(json.dumps({"machine": info, "rows": rows, "memory": memory},
                                                           indent=1, default=str))
    (out / "ATTENTION_RESULTS.md").write_text("# Attention benchmark\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
