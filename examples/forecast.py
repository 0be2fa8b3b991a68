"""Forecasting a real time series with fastrnn.models.CNNRNN.

Data: statsmodels' bundled datasets (nothing downloaded): the Mauna Loa weekly CO2 record
1958-2001 (`--dataset co2`, default; 2284 weeks, missing weeks interpolated) or the yearly
sunspot numbers 1700-2008 (`--dataset sunspots`).

Task: from the last `window` observations, forecast the next `horizon` ones (direct
multi-horizon: one output per horizon step). The model sees the normalised level and its
first difference per step and predicts each future value's change from the last observation.
The last 20% of the series is held out; the metric is the RMSE over all horizons on it, in the
data's units, next to two classical baselines (persistence, and seasonal naive with drift).

    make example-forecast            # or: python examples/forecast.py [--dataset sunspots]
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from fastrnn.models import CNNRNN  # noqa: E402

DATASETS = {  # window, horizon, season (in steps), units
    "co2": dict(window=104, horizon=13, season=52, units="ppm"),
    "sunspots": dict(window=33, horizon=4, season=11, units="sunspots"),
}


def load_series(name: str) -> np.ndarray:
    import statsmodels.api as sm

    if name == "co2":
        return sm.datasets.co2.load_pandas().data["co2"].interpolate().to_numpy(np.float64)
    return sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(np.float64)


class Windows:
    """Every (past window, future horizon) pair of a series, as normalised tensors."""

    def __init__(self, series: np.ndarray, window: int, horizon: int, split: int):
        self.series, self.window, self.horizon = series, window, horizon
        train = series[:split]
        self.mu, self.sd = train.mean(), train.std()
        changes = np.concatenate([train[h:] - train[:-h] for h in range(1, horizon + 1)])
        self.delta_sd = changes.std()
        level = (series - self.mu) / self.sd
        diff = np.concatenate([[0.0], np.diff(series)]) / self.delta_sd
        self.features = torch.tensor(np.stack([level, diff], axis=1), dtype=torch.float32)
        # Forecast origins t (last observed index): the target t+1..t+horizon must lie in the
        # training part for training windows, and in the held-out part for test windows.
        self.train_t = np.arange(window - 1, split - horizon)
        self.test_t = np.arange(split - 1, len(series) - horizon)

    def batch(self, origins: np.ndarray):
        idx = torch.as_tensor(origins)[:, None] + torch.arange(-self.window + 1, 1)[None, :]
        x = self.features[idx]  # [B, window, 2]
        last = torch.tensor(self.series[origins])[:, None]
        fut = torch.tensor(np.stack([self.series[t + 1:t + 1 + self.horizon] for t in origins]))
        y = ((fut - last) / self.delta_sd).float()  # [B, horizon]
        return x, y, last

    def to_units(self, pred: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return last + pred.double() * self.delta_sd


def baselines(series: np.ndarray, origins: np.ndarray, horizon: int, season: int) -> dict:
    fut = np.stack([series[t + 1:t + 1 + horizon] for t in origins])
    last = series[origins][:, None]
    persistence = np.repeat(last, horizon, axis=1)
    h = np.arange(1, horizon + 1)
    # seasonal naive with drift: the value one season before the target, plus the last season's change
    snaive = np.stack([series[t + h - season] + (series[t] - series[t - season]) for t in origins])
    rmse = lambda p: float(np.sqrt(np.mean((p - fut) ** 2)))  # noqa: E731
    return {"persistence": rmse(persistence), "seasonal naive + drift": rmse(snaive)}


def main(argv=None) -> dict:
    p = _common.parser(__doc__.split("\n")[0], steps=400)
    p.add_argument("--dataset", choices=list(DATASETS), default="co2")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.timed_steps, args.batch_size = 5, 2, 16
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = DATASETS[args.dataset]
    series = load_series(args.dataset)
    split = int(len(series) * 0.8)
    data = Windows(series, cfg["window"], cfg["horizon"], split)
    if args.quick:
        data.test_t = data.test_t[:32]
    print(f"{args.dataset}: {len(series)} observations, {len(data.train_t)} training windows, "
          f"{len(data.test_t)} held-out forecasts (window {cfg['window']}, horizon {cfg['horizon']})")

    model = CNNRNN(2, cfg["horizon"], conv_channels=(32,), kernel_size=5, hidden_size=64, bidirectional=True)
    make_opt = lambda m: torch.optim.Adam(m.parameters(), lr=3e-3)  # noqa: E731
    opt = make_opt(model)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    mse = nn.functional.mse_loss

    x_test, y_test, last_test = data.batch(data.test_t)

    def evaluate():
        model.eval()
        with torch.no_grad():
            pred = model(x_test)
        model.train()
        rmse = torch.sqrt(((data.to_units(pred, last_test) - data.to_units(y_test, last_test)) ** 2).mean()).item()
        return mse(pred, y_test).item(), rmse, pred

    def batch(gen: np.random.Generator):
        x, y, _ = data.batch(gen.choice(data.train_t, args.batch_size))
        return (x,), y

    hist = _common.train(model, opt, sched, args.steps, lambda step: batch(rng), mse,
                         lambda: {"loss": evaluate()[0]}, n_evals=10, progress=not args.no_progress)

    _, rmse, pred = evaluate()
    base = baselines(series, data.test_t, cfg["horizon"], cfg["season"])
    print(f"held-out RMSE over horizons 1..{cfg['horizon']}: {rmse:.3f} {cfg['units']}  (baselines: "
          + ", ".join(f"{k} {v:.3f}" for k, v in base.items()) + ")")

    t = _common.time_against_torch(model, lambda i: batch(np.random.default_rng(10_000 + i)),
                                   lambda m, inp, y: mse(m(*inp), y), make_opt, args.timed_steps)
    _common.report_timing(t, f"CNNRNN, batch {args.batch_size} x {cfg['window']} steps")

    def forecast_panel(ax):
        years = np.arange(len(series))
        ax.plot(years[split - 3 * cfg["season"]:], series[split - 3 * cfg["season"]:], color="0.3", lw=1,
                label="observed")
        full = data.to_units(pred, last_test).numpy()
        for j, t0 in enumerate(data.test_t[::cfg["horizon"]]):
            k = j * cfg["horizon"]
            ax.plot(np.arange(t0 + 1, t0 + 1 + cfg["horizon"]), full[k], color="C1", lw=1.5,
                    label="forecast (from each origin)" if j == 0 else None)
        ax.axvline(split, color="C2", ls="--", lw=1, label="held-out from here")
        ax.set_xlabel("step (weeks)" if args.dataset == "co2" else "step (years)")
        ax.set_ylabel(cfg["units"])
        ax.set_title(f"{args.dataset}: {cfg['horizon']}-step forecasts, RMSE {rmse:.2f}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)

    path = _common.save_loss_plot(
        os.path.join(args.out, f"forecast_{args.dataset}.png"),
        hist.curves(), f"CNNRNN on {args.dataset} (MSE, normalised)", extra=forecast_panel, logy=True)
    print(f"wrote {path}")
    return {"rmse": rmse, **base, **t}


if __name__ == "__main__":
    main()
