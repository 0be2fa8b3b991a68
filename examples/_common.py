"""What the examples share: arguments, a progress bar, the loss-curve PNG and the timing of the
same model on fastrnn's layers against torch.nn's (fastrnn.to_torch on a copy: same weights)."""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

import fastrnn

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parser(description: str, steps: int, timed_steps: int = 10) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=steps, help="training steps" + (f" (default {steps})" if steps else ""))
    p.add_argument("--quick", action="store_true", help="a few steps of everything, for CI")
    p.add_argument("--timed-steps", type=int, default=timed_steps,
                   help=f"training steps timed on each of fastrnn and torch.nn (default {timed_steps})")
    p.add_argument("--out", default=RESULTS, help="folder for the PNG (default examples/results)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


class Progress:
    """A one-line progress bar on stderr: `desc  37%|#######       | 370/1000 loss 1.234 [0:12<0:20]`."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, width: int = 28):
        self.total, self.desc, self.enabled, self.width = max(total, 1), desc, enabled, width
        self.n, self.start, self.last_draw, self.postfix = 0, time.perf_counter(), 0.0, ""

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if postfix:
            self.postfix = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in postfix.items())
        now = time.perf_counter()
        if self.enabled and (now - self.last_draw > 0.1 or self.n >= self.total):
            self.last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.n / self.total, 1.0)
        elapsed = now - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * int(frac * self.width)
        sys.stderr.write(f"\r{self.desc} {frac:4.0%}|{bar:<{self.width}}| {self.n}/{self.total} {self.postfix} "
                         f"[{_clock(elapsed)}<{_clock(eta)}]")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            sys.stderr.write("\n")
            sys.stderr.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def save_loss_plot(path: str, curves: dict, title: str, xlabel: str = "training step", ylabel: str = "loss",
                   extra=None, logy: bool = False) -> str:
    """Writes the loss curves ({label: (xs, ys)}) to `path`; `extra(ax)` may draw a second panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if extra is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.4 * ncols, 4.2), squeeze=False)
    ax = axes[0, 0]
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, lw=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if extra is not None:
        extra(axes[0, 1])
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class History:
    """Per-step training losses, and the held-out metrics at the steps they were measured."""

    def __init__(self):
        self.losses, self.eval_steps, self.evals = [], [], {}

    def curves(self, held_out: str = "loss") -> dict:
        return {"train (running mean)": (range(1, len(self.losses) + 1), smooth(self.losses)),
                "held-out": (self.eval_steps, self.evals[held_out])}


def train(model, opt, sched, steps: int, batch, loss_fn, evaluate, n_evals: int = 20, progress: bool = True,
          clip: float | None = None, unit: float = 1.0) -> History:
    """The examples' training loop, with a progress bar on stderr.

    batch(step) -> (inputs tuple, target); loss_fn(model(*inputs), target) -> loss;
    evaluate() -> dict of held-out metrics ("loss" first), run about n_evals times and after the
    last step; clip: gradient-norm clipping; unit: factor from the loss to the reported loss.
    """
    hist = History()
    every = max(steps // n_evals, 5)
    bar = Progress(steps, "train", enabled=progress)
    for step in range(steps):
        inputs, target = batch(step)
        loss = loss_fn(model(*inputs), target)
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        hist.losses.append(loss.item() * unit)
        if (step + 1) % every == 0 or step + 1 == steps:
            hist.eval_steps.append(step + 1)
            for k, v in evaluate().items():
                hist.evals.setdefault(k, []).append(v)
        shown = {k: v[-1] for k, v in hist.evals.items()} if hist.evals else {}
        bar.update(loss=hist.losses[-1], **{("val" if k == "loss" else k): v for k, v in shown.items()})
    bar.close()
    return hist


def smooth(values, k: int = 20):
    """Running mean over the last k values (for a readable per-step loss curve)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def time_against_torch(model: torch.nn.Module, batches, loss_fn, make_optimizer, steps: int) -> dict:
    """Times training steps of `model` (on fastrnn layers) and of a copy on torch.nn layers.

    The copy is `fastrnn.to_torch(copy.deepcopy(model))`: the same weights on nn.LSTM etc.
    Each takes `steps` timed steps (forward, backward, optimizer step) after one untimed warm-up,
    interleaved (fastrnn, torch.nn, fastrnn, ...) so drift of a shared machine hits both alike,
    on the same batches (`batches(i)` -> (inputs tuple, target)). `loss_fn(model, inputs, target)`.
    Returns median seconds per step of each, the speedup (torch.nn / fastrnn) and the first
    step's loss of each (equal to float rounding: a check that it is the same model).
    """
    fast = copy.deepcopy(model).train()
    ref = fastrnn.to_torch(copy.deepcopy(model)).train()
    n_fast = sum(isinstance(m, (fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN)) for m in fast.modules())
    n_ref = sum(type(m) in (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN) for m in ref.modules())
    assert n_fast > 0 and n_ref == n_fast, "the model must have fastrnn layers to compare"
    runs = {"fastrnn": (fast, make_optimizer(fast)), "torch.nn": (ref, make_optimizer(ref))}
    times = {k: [] for k in runs}
    first_loss = {}
    for i in range(steps + 1):
        inputs, target = batches(i)
        for name, (m, opt) in runs.items():
            torch.manual_seed(1000 + i)  # same dropout masks, where the model has dropout
            t0 = time.perf_counter()
            loss = loss_fn(m, inputs, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            if i == 0:
                first_loss[name] = loss.item()
            else:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"fastrnn_s": med["fastrnn"], "torch_s": med["torch.nn"], "speedup": med["torch.nn"] / med["fastrnn"],
            "loss_fastrnn": first_loss["fastrnn"], "loss_torch": first_loss["torch.nn"], "steps": steps}


def report_timing(t: dict, what: str) -> None:
    print(f"timing ({what}, {t['steps']} interleaved training steps each, median, "
          f"{torch.get_num_threads()} threads): fastrnn {t['fastrnn_s'] * 1e3:.1f} ms/step, "
          f"torch.nn {t['torch_s'] * 1e3:.1f} ms/step -> speedup {t['speedup']:.2f}x "
          f"(same weights: first-step loss {t['loss_fastrnn']:.6f} vs {t['loss_torch']:.6f}); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
