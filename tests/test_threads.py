"""Threads and determinism: concurrent calls on one module, thread-count independence, bitwise
reproducibility (in one process and across processes, dropout included) and GIL release by the
kernels.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import fastrnn
from conftest import assert_close, flat, run_threads

F64 = torch.float64


def _inputs(seed, I, packed, dtype, T=12, B=5):
    g = torch.Generator().manual_seed(seed)
    if packed:
        lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
        return pack_sequence([torch.randn(n, I, dtype=dtype, generator=g) for n in lengths], enforce_sorted=False)
    return torch.randn(T, B, I, dtype=dtype, generator=g)


def _step(model, x, seed):
    """Forward and every parameter gradient (autograd.grad: nothing accumulates in .grad, so
    concurrent calls on one module do not interfere through it)."""
    outs = flat(model(x))
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(t.shape, dtype=t.dtype, generator=g) for t in outs]
    grads = torch.autograd.grad(outs, list(model.parameters()), cot)
    return [t.detach() for t in outs] + list(grads)


MODELS = {
    "lstm": lambda: fastrnn.LSTM(16, 24, num_layers=2, bidirectional=True),
    "lstm_proj": lambda: fastrnn.LSTM(16, 24, proj_size=8),
    "gru": lambda: fastrnn.GRU(16, 40, num_layers=2),
    "rnn": lambda: fastrnn.RNN(16, 33, bidirectional=True, nonlinearity="relu"),
}


# ------------------------------------------------------------------------------ concurrency
@pytest.mark.parametrize("name,dtype", [("lstm", torch.float32), ("lstm_proj", F64), ("gru", F64),
                                        ("rnn", torch.float32)])
def test_four_threads_on_one_module_equal_serial(name, dtype):
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype)
    jobs = [(t, k) for t in range(4) for k in range(3)]  # thread t, iteration k (odd k: packed input)
    inputs = {j: _inputs(100 * j[0] + j[1], 16, packed=(j[1] % 2 == 1), dtype=dtype) for j in jobs}
    serial = {j: _step(model, inputs[j], 7 + j[1]) for j in jobs}

    results = {}
    barrier = threading.Barrier(4)

    def worker(t):
        barrier.wait(timeout=30)
        for k in range(3):
            results[(t, k)] = _step(model, inputs[(t, k)], 7 + k)

    run_threads(worker, 4)
    for j in jobs:
        for a, b in zip(results[j], serial[j]):
            assert_close(a, b, msg=f"thread {j[0]} iteration {j[1]}")


def test_threads_churning_the_packed_weight_cache():
    """More live weights than the packed-W_hh cache holds, used from 4 threads at once: every
    result still equals its serial value (evictions never hand a thread someone else's weights)."""
    torch.manual_seed(0)
    models = [fastrnn.GRU(8, 24).double() for _ in range(24)]
    x = _inputs(3, 8, packed=False, dtype=F64, T=6, B=2)
    with torch.no_grad():
        serial = [m(x)[0] for m in models]
    results = {}

    def worker(t):
        with torch.no_grad():
            for rep in range(3):
                for i in range(t, len(models), 2):  # overlapping subsets
                    results[(t, rep, i)] = models[i](x)[0]

    run_threads(worker, 4)
    assert len(results) == 3 * sum(len(range(t, len(models), 2)) for t in range(4))
    for (t, rep, i), out in results.items():
        assert_close(out, serial[i], msg=f"thread {t} rep {rep} model {i}")


# ------------------------------------------------------------------------------ thread count
@pytest.mark.parametrize("layout", ["H96-bi", "H96", "H16", "H200", "H320"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_results_do_not_depend_on_num_threads(name, dtype, packed, layout):
    """torch.set_num_threads(1) vs 2: sizes large enough that the kernels split rows and panels
    over threads (bidirectional: a direction a thread; unidirectional at B=24 with a small W_hh:
    each thread its rows through every step, team.h's row split, also where H=16 is a single
    panel; H=200 at B=5: 13 panels of W_hh split in half panels, the middle one by rows).
    float64 agrees to conftest's 1e-10, and the 2-thread results also with torch.nn's; float32
    forward values agree bitwise and gradients to float32 rounding (torch's own reductions sum in
    a thread-dependent order)."""
    torch.manual_seed(0)
    kind = {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU, "rnn": fastrnn.RNN}[name]
    hidden = int(layout.split("-")[0][1:])
    model = kind(48, hidden, num_layers=2, bidirectional=layout.endswith("-bi")).to(dtype)
    x = _inputs(1, 48, packed, dtype, T=16, B={16: 64, 200: 5}.get(hidden, 24))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _step(model, x, 5)
        torch.set_num_threads(2)
        two = _step(model, x, 5)
        again = _step(model, x, 5)
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(a, b) for a, b in zip(two, again)), "two 2-thread runs differ"
    n_out = 3 if name == "lstm" else 2
    for i, (a, b) in enumerate(zip(two, one)):
        if dtype == torch.float32 and i < n_out:
            assert torch.equal(a, b), f"forward output {i} depends on the thread count"
        assert_close(a, b, msg=f"result {i}")
    if dtype == F64:  # the split kernels against torch.nn (parameters in the same order)
        torch.set_num_threads(2)
        try:
            ref = _step(fastrnn.to_torch(copy.deepcopy(model)), x, 5)
        finally:
            torch.set_num_threads(n)
        assert len(ref) == len(two)
        for i, (a, b) in enumerate(zip(two, ref)):
            assert_close(a, b, msg=f"result {i} against torch.nn")


# ------------------------------------------------------------------------------ reproducibility
def _seeded_digest_run() -> dict:
    """Trains-mode forward (dropout between layers) and backward of each layer kind from a fixed
    seed; returns a digest of every output and gradient byte."""
    digests = {}
    for name, make in [("lstm", lambda: fastrnn.LSTM(16, 24, num_layers=3, dropout=0.4, bidirectional=True)),
                       ("gru", lambda: fastrnn.GRU(16, 24, num_layers=2, dropout=0.5)),
                       ("rnn", lambda: fastrnn.RNN(16, 24, num_layers=2, dropout=0.5, nonlinearity="relu")),
                       ("lstm_cell", lambda: fastrnn.LSTMCell(16, 24))]:
        for packed in (False, True):
            if name == "lstm_cell" and packed:
                continue
            torch.manual_seed(1234)
            model = make().train()
            x = _inputs(5, 16, packed, torch.float32)
            if name == "lstm_cell":
                x = x[0]
            res = _step(model, x, 9)
            h = hashlib.sha256()
            for t in res:
                h.update(t.contiguous().numpy().tobytes())
            digests[f"{name}-{'packed' if packed else 'dense'}"] = h.hexdigest()
    return digests


def test_same_seed_bitwise_identical_in_process():
    a = _seeded_digest_run()
    b = _seeded_digest_run()
    assert a == b
    # dropout really is active: another seed gives other values
    torch.manual_seed(1)
    m = fastrnn.LSTM(16, 24, num_layers=3, dropout=0.4).train()
    x = _inputs(5, 16, False, torch.float32)
    torch.manual_seed(2)
    o1 = m(x)[0]
    torch.manual_seed(3)
    o2 = m(x)[0]
    assert not torch.equal(o1, o2)


def test_same_seed_bitwise_identical_across_processes():
    """Two fresh processes (different heap and stack addresses under ASLR, so different buffer
    alignments) produce the same bits."""
    cmd = [sys.executable, os.path.abspath(__file__), "--digest"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))) for _ in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            pytest.fail(f"digest child timed out: {err[-2000:]}")
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0] == outs[1]
    assert len(outs[0]) == 7


# ------------------------------------------------------------------------------ GIL
def _releases_gil(fn, n=20000) -> bool:
    """True if `fn` lets another Python thread run while it executes.

    The switch interval is raised to 100 s, so a thread running Python code never hands the GIL
    over on its own; a waiting probe thread can then only run while `fn` is inside code that
    released the GIL. The probe runs n Python iterations and then looks at whether `fn` has
    returned: not yet means it ran during `fn`. No clocks are involved."""
    start = threading.Event()
    state = {"done": False, "seen_done": None, "error": None}

    def worker():
        try:
            start.set()
            fn()
        except BaseException as e:  # noqa: BLE001
            state["error"] = repr(e)
        state["done"] = True

    def probe():
        start.wait()
        k = 0
        for _ in range(n):
            k += 1
        state["seen_done"] = state["done"]

    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        tp = threading.Thread(target=probe)
        tw = threading.Thread(target=worker)
        tp.start()
        tw.start()
        tw.join(timeout=120)
        tp.join(timeout=120)
    finally:
        sys.setswitchinterval(old)
    assert state["error"] is None, state["error"]
    assert state["done"] and state["seen_done"] is not None
    return not state["seen_done"]


def test_gil_probe_tells_holding_from_releasing():
    def python_loop():
        k = 0
        for _ in range(300000):
            k += 1

    assert not _releases_gil(python_loop)
    assert _releases_gil(lambda: threading.Event().wait(0.05))


def _raw_op_calls(cell):
    """(forward inference, forward with autograd, backward) calls of one raw op, inputs built
    up front so the call is the op and nothing else."""
    ops = torch.ops.fastrnn
    G = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    # About the same work per cell (an RNN step is a quarter of an LSTM's), so that each call
    # lasts long enough for the probe thread to be scheduled during it on a busy machine.
    T, B, I, H = 2400 // G, 4, 32, 96
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, I, generator=g)
    w_ih, w_hh = torch.randn(G * H, I, generator=g) * 0.1, torch.randn(G * H, H, generator=g) * 0.1
    hx, cx = torch.zeros(B, H), torch.zeros(B, H)
    w_req = w_ih.clone().requires_grad_()
    if cell == "lstm":
        fwd = lambda w, train: ops.lstm_forward(x, w, w_hh, None, None, None, hx, cx, None, False, train)  # noqa: E731
        o = fwd(w_ih, True)
        bwd = lambda: ops.lstm_backward(o[0], o[1], o[2], x, w_ih, w_hh, None, hx, cx, None, False, o[0], o[3],  # noqa
                                        o[4], o[5])
    elif cell == "gru":
        fwd = lambda w, train: ops.gru_forward(x, w, w_hh, None, None, hx, None, False, train)  # noqa: E731
        o = fwd(w_ih, True)
        bwd = lambda: ops.gru_backward(o[0], o[1], x, w_ih, w_hh, hx, None, False, o[0], o[2], o[3])  # noqa: E731
    else:
        fwd = lambda w, train: ops.rnn_forward(x, w, w_hh, None, None, hx, None, False, False)  # noqa: E731
        o = fwd(w_ih, False)
        bwd = lambda: ops.rnn_backward(o[0], o[1], x, w_ih, w_hh, hx, None, False, False, o[0])  # noqa: E731
    return {"forward": lambda: fwd(w_ih, False), "forward_autograd": lambda: fwd(w_req, True), "backward": bwd}


@pytest.mark.parametrize("call", ["forward", "forward_autograd", "backward"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_kernels_release_the_gil(cell, call):
    """A call that holds the GIL can never be observed releasing it, but a call that releases it
    is only observed doing so if the OS schedules the probe thread during the call; on a busy
    machine that can miss, so a few attempts are allowed (one thread for the kernel leaves the
    probe a core)."""
    fn = _raw_op_calls(cell)[call]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        released = any(_releases_gil(fn) for _ in range(12))
    finally:
        torch.set_num_threads(n)
    assert released, f"fastrnn {cell} {call} holds the GIL for the whole call"


if __name__ == "__main__":
    if sys.argv[1:] == ["--digest"]:
        print(json.dumps(_seeded_digest_run()))
