"""Seaborn plots for the comparison report. Each function returns PNG bytes (None when there is
nothing to plot) and never invents data: missing values are left out of the plot.
"""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

sns.set_theme(style="whitegrid", context="notebook")
_DPI = 80


def t_interval(values) -> tuple[float, float]:
    """95% Student-t interval of the mean (the table's rule); a point when there is one value."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        m = float(v.mean()) if len(v) else math.nan
        return m, m
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return float(v.mean()) - half, float(v.mean()) + half


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=_DPI)
    plt.close(fig)
    return buf.getvalue()


def _floor_line(ax, floor: float | None, label: str = "noise floor") -> None:
    if floor is not None and math.isfinite(floor):
        ax.axhline(floor, color="black", linestyle="--", linewidth=1.2, label=label)


def _legend(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize="small", loc="best")


def loss_curves(curves: pd.DataFrame, x: str, hue: str = "label") -> bytes | None:
    """Validation loss vs `x` ("step" or "flops"), mean over seeds with a 95% t-interval band.

    curves: one row per (run, validation step): step, flops, val_loss, label, seed.
    """
    d = curves.dropna(subset=[x, "val_loss"])
    if d.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=d, x=x, y="val_loss", hue=hue, errorbar=t_interval, marker="o", ax=ax)
    if x == "flops":
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
    else:
        ax.set_xlabel("training step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"Validation loss vs {'FLOPs' if x == 'flops' else 'steps'}")
    _legend(ax)
    return _png(fig)


def metric_bars(
    rows: pd.DataFrame, metric_col: str, title: str, floor: float | None, hue: str = "label"
) -> bytes | None:
    """One bar per group: mean over seeds with a 95% CI, and the metric's noise floor as a line."""
    d = rows.dropna(subset=[metric_col])
    if d.empty:
        return None
    order = list(dict.fromkeys(d[hue]))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(order) + 2), 3.8))
    sns.barplot(data=d, x=hue, y=metric_col, order=order, errorbar=t_interval, ax=ax, color="#4c72b0")
    _floor_line(ax, floor)
    ax.set_xlabel("")
    ax.set_ylabel(title)
    ax.set_title(title + " (mean over seeds, 95% CI)")
    ax.tick_params(axis="x", rotation=30)
    for lab in ax.get_xticklabels():
        lab.set_horizontalalignment("right")
    _legend(ax)
    return _png(fig)


def metric_vs(
    rows: pd.DataFrame,
    x: str,
    metric_col: str,
    title: str,
    floor: float | None,
    hue: str = "family",
    log_x: bool = False,
    xlabel: str | None = None,
) -> bytes | None:
    """A metric against steps (several step budgets) or parameter count (scaling down), per family."""
    d = rows.dropna(subset=[x, metric_col])
    if d.empty or d[x].nunique() < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=d, x=x, y=metric_col, hue=hue, errorbar=t_interval, marker="o", ax=ax)
    _floor_line(ax, floor)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(title)
    ax.set_title(f"{title} vs {xlabel or x}")
    _legend(ax)
    return _png(fig)
