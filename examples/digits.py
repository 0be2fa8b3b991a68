"""Classifying scikit-learn's bundled handwritten digits as sequences.

Data: sklearn.datasets.load_digits (1797 8x8 images, shipped with scikit-learn; nothing
downloaded), split 80/20 stratified with a fixed seed.

- default: each image is a sequence of its 8 rows (8 features per step), classified by
  fastrnn.models.LSTMAttentionClassifier (biLSTM, additive attention pooling over the rows).
- --video: each digit becomes a 10-frame clip on a 24x24 canvas, moving with a random velocity
  and bouncing off the edges, with noise on every frame; fastrnn.models.FrameCNNLSTM (a small
  CNN per frame, then an LSTM over the frames) classifies the clip.

The metric is the held-out accuracy.

    make example-digits | make example-digits-video   # or: python examples/digits.py [--video]
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from fastrnn.models import FrameCNNLSTM, LSTMAttentionClassifier  # noqa: E402


def load(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    return train_test_split(x, d.target, test_size=0.2, random_state=seed, stratify=d.target)


def moving_clips(images: np.ndarray, seed: int, frames: int = 10, size: int = 24, noise: float = 0.3) -> np.ndarray:
    """[N, 8, 8] digits -> [N, frames, 1, size, size] clips: each digit moves in a straight line
    (random start, velocity 1..2 pixels a frame on each axis, random signs), bouncing off the
    canvas edges, with Gaussian noise on every frame."""
    rng = np.random.default_rng(seed)
    n, h, w = images.shape
    span = size - h
    clips = np.zeros((n, frames, 1, size, size), np.float32)
    pos = rng.integers(0, span + 1, (n, 2))
    vel = rng.integers(1, 3, (n, 2)) * rng.choice([-1, 1], (n, 2))
    for t in range(frames):
        for i in range(n):
            r, c = pos[i]
            clips[i, t, 0, r:r + h, c:c + w] = images[i]
        pos = pos + vel
        for axis in range(2):  # bounce: reflect the position and the velocity at the edges
            low, high = pos[:, axis] < 0, pos[:, axis] > span
            pos[low, axis] = -pos[low, axis]
            pos[high, axis] = 2 * span - pos[high, axis]
            vel[low | high, axis] *= -1
    clips += rng.normal(0.0, noise, clips.shape).astype(np.float32)
    return clips


def main(argv=None) -> dict:
    p = _common.parser(__doc__.split("\n")[0], steps=None)
    p.add_argument("--video", action="store_true", help="moving-digit clips and FrameCNNLSTM")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (rows), 32 (--video)")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (32 if args.video else 64)
    args.steps = args.steps or (450 if args.video else 600)
    if args.quick:
        args.steps, args.timed_steps = 5, 2
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    x_tr, x_te, y_tr, y_te = load(args.seed)
    if args.quick:  # a slice of the data: the pipeline end to end, in seconds
        x_tr, x_te, y_tr, y_te = x_tr[:256], x_te[:64], y_tr[:256], y_te[:64]
    if args.video:
        x_tr, x_te = moving_clips(x_tr, args.seed), moving_clips(x_te, args.seed + 1)
        model = FrameCNNLSTM(1, 10, channels=(16, 32), hidden_size=128, dropout=0.1, global_pool="max")
        what = f"FrameCNNLSTM, batch {args.batch_size} clips of {x_tr.shape[1]} frames {x_tr.shape[-1]}x{x_tr.shape[-1]}"
        name = "digits_video"
    else:
        model = LSTMAttentionClassifier(8, 10, hidden_size=128, bidirectional=True, attention_size=64, dropout=0.1)
        what = f"LSTMAttentionClassifier, batch {args.batch_size} x 8 rows"
        name = "digits"
    x_tr, x_te = torch.from_numpy(x_tr), torch.from_numpy(x_te)
    y_tr, y_te = torch.from_numpy(y_tr).long(), torch.from_numpy(y_te).long()
    print(f"{name}: {len(x_tr)} training and {len(x_te)} held-out examples of shape {tuple(x_tr.shape[1:])}")

    make_opt = lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=1e-4)  # noqa: E731
    opt = make_opt(model)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    ce = nn.functional.cross_entropy

    @torch.no_grad()
    def evaluate():
        model.eval()
        logits = torch.cat([model(x) for x in x_te.split(256)])
        model.train()
        return {"loss": ce(logits, y_te).item(), "acc": (logits.argmax(-1) == y_te).float().mean().item()}

    def batch(gen: np.random.Generator):
        idx = torch.from_numpy(gen.choice(len(x_tr), args.batch_size, replace=False))
        return (x_tr[idx],), y_tr[idx]

    hist = _common.train(model, opt, sched, args.steps, lambda step: batch(rng), ce, evaluate,
                         n_evals=10 if args.video else 20, progress=not args.no_progress)
    acc = hist.evals["acc"][-1]
    print(f"held-out accuracy: {acc:.4f} ({round(acc * len(y_te))}/{len(y_te)})")

    t = _common.time_against_torch(model, lambda i: batch(np.random.default_rng(10_000 + i)),
                                   lambda m, inp, y: ce(m(*inp), y), make_opt, args.timed_steps)
    _common.report_timing(t, what)

    def accuracy_panel(ax):
        ax.plot(hist.eval_steps, hist.evals["acc"], color="C2", marker=".")
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"held-out accuracy (final {acc:.3f})")
        ax.grid(alpha=0.3)

    path = _common.save_loss_plot(
        os.path.join(args.out, f"{name}.png"),
        hist.curves(), f"{type(model).__name__} on {name.replace('_', ' ')} (cross-entropy)", extra=accuracy_panel, logy=True)
    print(f"wrote {path}")
    return {"accuracy": acc, **t}


if __name__ == "__main__":
    main()
