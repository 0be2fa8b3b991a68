"""A character-level language model (fastrnn.LSTM) on Python's own standard-library sources.

Data: a fixed list of modules read from the running Python's standard library (nothing
downloaded; the same files on every run). The last 10% of the text is held out. The model
(Embedding -> 2-layer fastrnn.LSTM, or GRU with --cell gru, -> Linear) is trained on random
100-character windows; the metric is bits per character on the held-out text. At the end it
samples Python-looking text.

    make example-charlm              # or: python examples/charlm.py [--steps N]
"""
from __future__ import annotations

import math
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import fastrnn  # noqa: E402

MODULES = ["textwrap.py", "heapq.py", "bisect.py", "fnmatch.py", "glob.py", "pprint.py", "functools.py",
           "contextlib.py", "abc.py", "copy.py", "string.py", "queue.py", "sched.py", "calendar.py",
           "dataclasses.py", "enum.py"]


def load_text() -> str:
    root = os.path.dirname(os.__file__)
    parts = []
    for name in MODULES:
        with open(os.path.join(root, name), encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)


class CharLM(nn.Module):
    """tokens [B, T] -> logits [B, T, V] (and the LSTM state, to carry on sampling)."""

    def __init__(self, vocab: int, embed: int = 64, hidden: int = 192, layers: int = 2, dropout: float = 0.1,
                 cell: str = "lstm"):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        layer = {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU}[cell]
        self.rnn = layer(embed, hidden, layers, batch_first=True, dropout=dropout)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens, state=None, return_state=False):
        out, state = self.rnn(self.embedding(tokens), state)
        logits = self.head(out)
        return (logits, state) if return_state else logits


@torch.no_grad()
def sample(model: CharLM, stoi: dict, itos: list, prompt: str, n: int, temperature: float, seed: int) -> str:
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.tensor([[stoi[c] for c in prompt]])
    logits, state = model(x, return_state=True)
    out = []
    for _ in range(n):
        probs = torch.softmax(logits[0, -1] / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        out.append(itos[nxt.item()])
        logits, state = model(nxt.view(1, 1), state, return_state=True)
    model.train()
    return prompt + "".join(out)


def main(argv=None) -> dict:
    p = _common.parser(__doc__.split("\n")[0], steps=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--sample-chars", type=int, default=400)
    p.add_argument("--cell", choices=["lstm", "gru"], default="lstm", help="the recurrent layer (default lstm)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.timed_steps, args.sample_chars, args.batch_size, args.seq_len = 5, 2, 40, 8, 32
    torch.manual_seed(args.seed)

    text = load_text()
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    data = torch.tensor([stoi[c] for c in text])
    split = int(len(data) * 0.9)
    train, held = data[:split], data[split:]
    print(f"{len(text)} characters from {len(MODULES)} standard-library modules, {len(itos)} distinct; "
          f"{len(held)} held out")

    T, B = args.seq_len, args.batch_size
    n_val = 16 if args.quick else len(held) // (T + 1)
    val = held[:n_val * (T + 1)].view(n_val, T + 1)

    def batch(gen: torch.Generator):
        starts = torch.randint(0, len(train) - T - 1, (B,), generator=gen)
        chunk = train[starts[:, None] + torch.arange(T + 1)[None, :]]
        return (chunk[:, :-1],), chunk[:, 1:]

    model = CharLM(len(itos), cell=args.cell)
    make_opt = lambda m: torch.optim.Adam(m.parameters(), lr=3e-3)  # noqa: E731
    opt = make_opt(model)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    ce = lambda logits, y: nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))  # noqa

    @torch.no_grad()
    def held_out_bpc():
        model.eval()
        loss = sum(ce(model(v[:, :-1]), v[:, 1:]).item() * len(v) for v in val.split(64)) / len(val)
        model.train()
        return loss / math.log(2)

    gen = torch.Generator().manual_seed(args.seed)
    hist = _common.train(model, opt, sched, args.steps, lambda step: batch(gen), ce, lambda: {"loss": held_out_bpc()},
                         n_evals=10, progress=not args.no_progress, clip=1.0, unit=1 / math.log(2))
    bpc = hist.evals["loss"][-1]
    print(f"held-out bits per character: {bpc:.3f} (uniform over the alphabet: {math.log2(len(itos)):.2f})")
    print("sample (temperature 0.8):\n" + "-" * 60)
    print(sample(model, stoi, itos, "def ", args.sample_chars, 0.8, args.seed))
    print("-" * 60)

    t = _common.time_against_torch(model, lambda i: batch(torch.Generator().manual_seed(10_000 + i)),
                                   lambda m, inp, y: ce(m(*inp), y), make_opt, args.timed_steps)
    _common.report_timing(t, f"2-layer {args.cell.upper()} 192, batch {B} x {T} characters")

    path = _common.save_loss_plot(
        os.path.join(args.out, "charlm.png" if args.cell == "lstm" else f"charlm_{args.cell}.png"),
        hist.curves(), "Character LM on stdlib sources", ylabel="bits per character")
    print(f"wrote {path}")
    return {"bpc": bpc, **t}


if __name__ == "__main__":
    main()
