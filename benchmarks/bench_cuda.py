"""GPU benchmark: fastrnn's CUDA kernels against torch.nn on cuDNN (../shared/BENCHMARKS.md, GPU).

Grid after lmnt-com/haste: T = 50, B in {1, 16, 64, 128}, H in {256, 512, 1024, 2048}, I = H,
plus B = 4 for inference (the persistent-kernel bar: B in {1, 4, 16}, H in {256, 512, 1024}).
Both sides get the same weights and inputs; times are CUDA events around a batch of calls, the
two sides interleaved round by round, median over rounds. float32 runs in full float32 on both
sides (TF32 off for cuDNN and cuBLAS), so the arithmetic is the same; float16 rows use each
side's float16 path. Inference runs under torch.no_grad(); training is forward + backward of the
output with a fixed random gradient.

    python benchmarks/bench_cuda.py [--quick] [--out benchmarks/results/CUDA.md]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import warnings

import torch
from torch import nn

import fastrnn

PAIRS = {"LSTM": (nn.LSTM, fastrnn.LSTM), "GRU": (nn.GRU, fastrnn.GRU), "RNN": (nn.RNN, fastrnn.RNN)}


def make(kind, H, dtype):
    tcls, fcls = PAIRS[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = tcls(H, H).to("cuda", dtype)
        ours = fcls(H, H).to("cuda", dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def step_fn(module, x, mode, grad):
    if mode == "inference":
        def fn():
            with torch.no_grad():
                module(x)
    else:
        def fn():
            out = module(x)[0]
            out.backward(grad)
    return fn


def time_batch(fn, n):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def bench(kind, T, B, H, mode, dtype, rounds, calls):
    torch.manual_seed(0)
    ref, ours = make(kind, H, dtype)
    x = torch.randn(T, B, H, device="cuda", dtype=dtype, requires_grad=(mode == "training"))
    grad = torch.randn(T, B, H, device="cuda", dtype=dtype)
    with torch.no_grad():
        err = (ours(x)[0].float() - ref(x)[0].float()).abs().max().item()
    fns = {"cudnn": step_fn(ref, x, mode, grad), "fastrnn": step_fn(ours, x, mode, grad)}
    for fn in fns.values():
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    times = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            times[k].append(time_batch(fns[k], calls))
    med = {k: statistics.median(v) for k, v in times.items()}
    return med["cudnn"], med["fastrnn"], err


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer shapes and rounds (smoke run)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA GPU; nothing to measure")
        return 0
    if not fastrnn.build_info()["cuda"]:
        print("bench_cuda: fastrnn was built without its CUDA kernels")
        return 1
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    rounds, calls = (3, 3) if args.quick else (9, 5)
    Bs, Hs = ([1, 64], [256, 1024]) if args.quick else ([1, 4, 16, 64, 128], [256, 512, 1024, 2048])
    rows = []
    cases = []
    for H in Hs:
        for B in Bs:
            for mode in ("inference", "training"):
                if B == 4 and (mode == "training" or H > 1024):
                    continue  # B = 4: the inference bar's extra batch size
                cases.append(("LSTM", 50, B, H, mode, torch.float32))
    extra_B = [1, 64] if args.quick else [1, 16, 64]
    for kind in ("GRU", "RNN"):
        for B in extra_B:
            for mode in ("inference", "training"):
                cases.append((kind, 50, B, 512, mode, torch.float32))
    for B in extra_B:
        for mode in ("inference", "training"):
            cases.append(("LSTM", 50, B, 1024, mode, torch.float16))
    for kind, T, B, H, mode, dtype in cases:
        t_ref, t_ours, err = bench(kind, T, B, H, mode, dtype, rounds, calls)
        row = (kind, str(dtype).replace("torch.", ""), T, B, H, mode, t_ref, t_ours, t_ref / t_ours, err)
        rows.append(row)
        print(f"{kind:5s} {row[1]:8s} T={T} B={B:4d} H={H:5d} {mode:9s} cuDNN {t_ref:8.3f} ms  fastrnn {t_ours:8.3f} ms"
              f"  speedup {t_ref / t_ours:5.2f}x  max|diff| {err:.1e}", flush=True)
    dev = torch.cuda.get_device_name()
    lines = [f"GPU: {dev}; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; "
             f"median of {rounds} interleaved rounds of {calls} calls (CUDA events); float32 with TF32 off on both "
             "sides. speedup = cuDNN time / fastrnn time (>1: fastrnn faster). max|diff| = largest output "
             "difference between the two.", "",
             "| cell | dtype | T | B | H | mode | cuDNN ms | fastrnn ms | speedup | max abs diff |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]:.3f} | {r[7]:.3f} | "
                     f"{r[8]:.2f}x | {r[9]:.1e} |")
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
