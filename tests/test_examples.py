"""examples/: each runs a few steps end to end (metric, PNG, timing against torch.nn), and the
data preparation each relies on is checked on its own."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import charlm  # noqa: E402
import digits  # noqa: E402
import forecast  # noqa: E402


def _check_run(result: dict, png: str):
    assert os.path.getsize(png) > 10_000  # a real figure, not an empty file
    assert result["fastrnn_s"] > 0 and result["torch_s"] > 0
    assert result["speedup"] == pytest.approx(result["torch_s"] / result["fastrnn_s"])
    # the torch.nn copy is the same model: same first-step loss
    assert result["loss_fastrnn"] == pytest.approx(result["loss_torch"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("dataset", ["co2", "sunspots"])
def test_forecast_quick(tmp_path, dataset):
    r = forecast.main(["--quick", "--no-progress", "--out", str(tmp_path), "--dataset", dataset])
    assert math.isfinite(r["rmse"]) and r["rmse"] > 0
    _check_run(r, tmp_path / f"forecast_{dataset}.png")


@pytest.mark.parametrize("video", [False, True])
def test_digits_quick(tmp_path, video):
    r = digits.main(["--quick", "--no-progress", "--out", str(tmp_path)] + (["--video"] if video else []))
    assert 0.0 <= r["accuracy"] <= 1.0
    _check_run(r, tmp_path / ("digits_video.png" if video else "digits.png"))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_charlm_quick(tmp_path, capsys, cell):
    r = charlm.main(["--quick", "--no-progress", "--out", str(tmp_path), "--cell", cell])
    assert 0 < r["bpc"] < 8
    _check_run(r, tmp_path / ("charlm.png" if cell == "lstm" else "charlm_gru.png"))
    out = capsys.readouterr().out
    assert "sample (temperature 0.8):\n" + "-" * 60 + "\ndef " in out


def test_command_line_prints_progress_metric_and_speedup(tmp_path):
    """What `make example-forecast EXAMPLE_ARGS="--quick --dataset sunspots"` runs: a progress bar
    on stderr, the metric and the speedup on stdout."""
    p = subprocess.run([sys.executable, os.path.join(EXAMPLES, "forecast.py"), "--quick", "--dataset", "sunspots",
                        "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "100%|" in p.stderr and "5/5" in p.stderr
    assert "held-out RMSE" in p.stdout
    assert "speedup" in p.stdout and "fastrnn" in p.stdout and "torch.nn" in p.stdout


# ---- the data each example builds ---------------------------------------------------------

def test_forecast_windows_line_up_with_the_series():
    series = forecast.load_series("co2")
    assert len(series) == 2284 and np.isfinite(series).all()  # missing weeks interpolated
    split = int(len(series) * 0.8)
    w = forecast.Windows(series, window=104, horizon=13, split=split)
    origins = np.array([w.train_t[0], w.train_t[-1], w.test_t[0], w.test_t[-1]])
    x, y, last = w.batch(origins)
    assert x.shape == (4, 104, 2) and y.shape == (4, 13)
    for i, t in enumerate(origins):
        # the last input step is the origin itself, the targets are the next 13 values
        assert x[i, -1, 0].item() == pytest.approx((series[t] - w.mu) / w.sd, rel=1e-5)
        np.testing.assert_allclose(w.to_units(y, last)[i].numpy(), series[t + 1:t + 14], rtol=1e-6)
    assert w.train_t[-1] + 13 < split <= w.test_t[0] + 1  # no training target in the held-out part
    assert w.test_t[-1] + 13 == len(series) - 1


def test_moving_clips_move_and_bounce_inside_the_canvas():
    rng = np.random.default_rng(0)
    images = rng.random((50, 8, 8)).astype(np.float32) + 0.1  # every pixel > 0: the digit's box is visible
    clips = digits.moving_clips(images, seed=3, frames=12, size=20, noise=0.0)
    assert clips.shape == (50, 12, 1, 20, 20)
    # the top-left corner follows the straight line p0 + v t folded into [0, span] (reflections)
    span, first = 12, []
    for i in range(50):
        corners = []
        for t in range(12):
            frame = clips[i, t, 0]
            rows, cols = np.nonzero(frame)
            r, c = rows.min(), cols.min()
            assert rows.max() - r == 7 and cols.max() - c == 7  # whole digit inside the canvas
            np.testing.assert_array_equal(frame[r:r + 8, c:c + 8], images[i])
            corners.append((r, c))
        corners = np.array(corners)
        v = corners[1] - corners[0]
        if (corners[0] < 2).any() or (corners[0] > span - 2).any():
            continue  # may bounce on the first step: the velocity cannot be read off it
        assert ((np.abs(v) >= 1) & (np.abs(v) <= 2)).all()
        line = corners[0][None, :] + np.arange(12)[:, None] * v[None, :]
        folded = np.abs((line + 2 * span) % (2 * span) - span)
        np.testing.assert_array_equal(span - folded, corners)
        first.append(i)
    assert len(first) > 10
    noisy = digits.moving_clips(images[:2], seed=3, frames=12, size=20)
    clean = digits.moving_clips(images[:2], seed=3, frames=12, size=20, noise=0.0)
    assert np.std(noisy - clean) == pytest.approx(0.3, rel=0.05)


def test_charlm_text_is_the_same_stdlib_sources_every_time():
    text = charlm.load_text()
    assert text == charlm.load_text()
    assert len(text) > 300_000
    assert "def dedent(text):" in text  # textwrap.py
    assert torch.tensor([ord(c) for c in text]).max() < 0x180  # source code, not binary
