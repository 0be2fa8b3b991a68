"""The benchmark harness runs end to end (one tiny round; timings are not asserted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--cases", "small-batch",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "| small-batch" in r.stdout
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {row["cell"] for row in rows} == {"LSTM", "GRU", "RNN"}
    assert (tmp_path / "speedup.png").stat().st_size > 0
    assert (tmp_path / "RESULTS.md").read_text().count("small-batch") >= 6
    # the variant cells against their eager loop and fastrnn.LSTM/GRU
    vrows = json.loads((tmp_path / "results.json").read_text())["variant_rows"]
    assert {row["cell"] for row in vrows} == {"LayerNormLSTM", "PeepholeLSTM", "LayerNormGRU"}
    assert all(row.get("check_ok") for row in vrows), vrows
    assert "## Variant cells" in r.stdout
    # bfloat16: fastrnn.LSTM vs torch.nn.LSTM in bfloat16 (and fastrnn in float32)
    brows = json.loads((tmp_path / "results.json").read_text())["bf16_rows"]
    assert {(row["cell"], row["mode"]) for row in brows} == {("LSTM", "inference"), ("LSTM", "training")}
    assert all(row.get("check_ok") for row in brows), brows
    assert "## bfloat16" in (tmp_path / "RESULTS.md").read_text()
    # one cell step over a batch, torch.nn's cells against fastrnn's
    crows = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert {(row["cell"], row["mode"]) for row in crows} == {(c, m) for c in ("LSTMCell", "GRUCell")
                                                            for m in ("inference", "training")}
    assert all(row["fastrnn_us"] > 0 for row in crows)
    assert "## Cells: one step over a batch" in (tmp_path / "RESULTS.md").read_text()


def test_bench_attention_quick_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--quick", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads((tmp_path / "attention_results.json").read_text())["rows"]
    assert {row["case"] for row in rows} == {"sdpa", "sdpa-causal", "mha", "additive"}
    assert all(row["fastrnn_ms"] > 0 and row["baseline_ms"] > 0 for row in rows)
    assert "| additive" in (tmp_path / "ATTENTION_RESULTS.md").read_text()
