"""No memory leaks: RSS stays flat over repeated forward+backward of every layer and cell, dense
and packed (scripts/leak_check.py, short run in a subprocess so the measurement starts from a
clean interpreter and nothing else the suite does lands in it)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ITERS = 300
MAX_GROWTH_MB = 5.0


def test_rss_does_not_grow():
    # A deliberately leaking case runs alongside (32 KiB per iteration, ~9 MB over the run): the
    # measurement must flag it, so a pass cannot come from a measurement that sees nothing.
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "leak_check.py"), "--iters", str(ITERS), "--json",
                        "--max-growth-mb", str(MAX_GROWTH_MB), "--inject-leak-kb", "32"],
                       capture_output=True, text=True, timeout=300, cwd=str(ROOT / "scripts"),
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.stdout.strip(), r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    rows = {row["case"]: row for row in report["rows"]}
    assert rows["injected_leak"]["growth_mb"] >= MAX_GROWTH_MB, rows["injected_leak"]
    real = {k: v for k, v in rows.items() if k != "injected_leak"}
    assert len(real) == 13
    grown = {k: round(v["growth_mb"], 2) for k, v in real.items() if v["growth_mb"] >= MAX_GROWTH_MB}
    assert not grown, f"RSS grew over {ITERS} iterations (MB): {grown}"
    assert report["failed"] == ["injected_leak"]


_POOL_SCRIPT = r"""
import torch, fastrnn
torch.manual_seed(0)
m = fastrnn.LSTM(64, 256)
outs = []
for T in (40, 37, 44, 40):  # sizes the pool serves from blocks of other calls (up to 1.5x)
    x = torch.randn(T, 16, 64, requires_grad=True)
    y, _ = m(x)
    y.square().sum().backward()
    outs.append(torch.cat([y.detach().flatten(), x.grad.flatten()] + [p.grad.flatten() for p in m.parameters()]))
    m.zero_grad()
torch.save(outs, __import__("sys").argv[1])
"""


def test_workspace_pool_does_not_change_results(tmp_path):
    # Workspace blocks are reused across calls (csrc/cpu/workspace.h); FASTRNN_POOL_MB=0 turns
    # the pool off. Same values either way, over calls of varying length.
    results = []
    for mb in ("256", "0"):
        out = tmp_path / f"pool{mb}.pt"
        r = subprocess.run([sys.executable, "-c", _POOL_SCRIPT, str(out)], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "FASTRNN_POOL_MB": mb})
        assert r.returncode == 0, r.stderr[-3000:]
        results.append(torch.load(out))
    for a, b in zip(*results):
        assert torch.equal(a, b)
