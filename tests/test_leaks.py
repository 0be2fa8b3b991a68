"""No memory leaks: RSS stays flat over repeated forward+backward of every layer and cell, dense
and packed (scripts/leak_check.py, short run in a subprocess so the measurement starts from a
clean interpreter and nothing else the suite does lands in it)."""
import json
import os
import subprocess
import sys
from pathlib import Path

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
