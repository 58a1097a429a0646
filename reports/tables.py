"""Statistics and the comparison table: means over seeds with Student-t intervals, formatting."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from reports.results import as_number, axis_columns, metric_names

# ----------------------------------------------------------------------------- statistics


def mean_ci(values) -> tuple[float, float, float, int] | None:
    """Mean and 95% Student-t interval over seeds; (mean, nan, nan, 1) for one value; None for none."""
    v = np.asarray([x for x in values if as_number(x) is not None], float)  # finite numbers only
    n = len(v)
    if n == 0:
        return None
    m = float(v.mean())
    if n == 1:
        return m, math.nan, math.nan, 1
    from scipy import stats

    half = float(stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return m, m - half, m + half, n


def diff_ci(a, b, level: float = 0.95) -> tuple[float, float, float] | None:
    """mean(a) - mean(b) with Welch's t-interval (independent runs, unequal variances); None when
    either side has fewer than 2 finite values (no spread to build an interval from)."""
    x = np.asarray([v for v in a if as_number(v) is not None], float)
    y = np.asarray([v for v in b if as_number(v) is not None], float)
    if len(x) < 2 or len(y) < 2:
        return None
    from scipy import stats

    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    d = float(x.mean() - y.mean())
    se = math.sqrt(va + vb)
    if se == 0:
        return d, d, d
    dof = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, dof) * se)
    return d, d - half, d + half


def fmt(x: float | None, kind: str = "num") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if kind == "count":
        for unit, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(x) >= 0.9995 * unit:  # 999,793 and 1,000,564 both read "1.00M" (three digits)
                return f"{x / unit:#.3g}".rstrip(".") + s
        return f"{x:.0f}"
    if kind == "sci":
        return f"{x:.3g}"
    return f"{x:.4g}"


def _reason(g: pd.DataFrame, col: str) -> str:
    """Why a group has no value for `col`."""
    done = _source(g, col)
    if done.empty:  # e.g. "n/a (failed)", "n/a (not run)"; the errors are listed under "Runs not complete"
        return "n/a (" + ", ".join(sorted(set(g["status"]))) + ")"
    rcol = f"{col}.reason"
    if rcol in g:
        reasons = [r for r in done[rcol].dropna()]
        if reasons:
            return f"n/a ({reasons[0]})"
    if col.startswith("metric."):
        return "n/a (not in this run's evaluation)"
    return f"n/a ({col} not recorded)"


def _source(g: pd.DataFrame, col: str) -> pd.DataFrame:
    """Rows that count for `col`: evaluated runs for metrics; runs whose training ended "ok" otherwise
    (a run that trained but failed in evaluation still has its params, FLOPs and val loss)."""
    if col.startswith("metric."):
        return g[g["status"] == "complete"]
    return g[g["run_status"] == "ok"] if "run_status" in g else g.iloc[:0]


def _cell(g: pd.DataFrame, col: str, kind: str = "num", ci: bool = True, one_seed_ci: str = "eval CI") -> str:
    done = _source(g, col)
    if col not in g or done[col].dropna().empty:
        return _reason(g, col)
    mc = mean_ci(done[col].tolist())
    m, lo, hi, n = mc
    if not ci:
        return fmt(m, kind)
    if n >= 2:
        return f"{fmt(m, kind)} [{fmt(lo, kind)}, {fmt(hi, kind)}]"
    lo_c, hi_c = f"{col}.ci_low", f"{col}.ci_high"
    if lo_c in done and hi_c in done and not done[lo_c].dropna().empty:
        lo1, hi1 = done[lo_c].dropna().iloc[0], done[hi_c].dropna().iloc[0]
        return f"{fmt(m, kind)} [{fmt(lo1, kind)}, {fmt(hi1, kind)}] ({one_seed_ci}, 1 seed)"
    return f"{fmt(m, kind)} (1 seed)"


def metric_floor(g: pd.DataFrame, metric: str, kind: str = "noise") -> float | None:
    col = f"metric.{metric}.floor.{kind}"
    if col not in g or g[col].dropna().empty:
        return None
    return float(g[col].dropna().mean())


def group_table(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The comparison table: one row per group (all axes but the seed); results from several sources
    (a `source` column, e.g. shipped results beside a new grid) lead with it."""
    axes = (["source"] if "source" in df else []) + axis_columns(df)
    metrics = metric_names(df)
    headers = [a.removeprefix("axis.") for a in axes] or ["run"]
    headers += ["seeds done", "params", "FLOPs", "steps", "binding budget", "train time (s)", "val loss"]
    gain = "val_info_gain" in df and not df["val_info_gain"].dropna().empty
    if gain:
        headers.append("text info gain (nats/token)")
    for m in metrics:
        headers += [m, f"{m} noise floor", f"{m} resolvable diff"]
    rows = []
    for _, g in df.groupby("group", sort=False):
        first = g.iloc[0]
        r = [str(first[a]) for a in axes] if axes else [str(first["run"])]
        r.append(f"{int((g['status'] == 'complete').sum())}/{len(g)}")
        r.append(_cell(g, "params", "count", ci=False))
        r.append(_cell(g, "flops", "sci", ci=False))
        r.append(_cell(g, "steps", "count", ci=False))
        r.append(_budget(g))
        r.append(_cell(g, "train_time_s", ci=False))
        r.append(_cell(g, "val_loss"))
        if gain:  # over seeds; with one seed, the interval over validation clips
            r.append(_cell(g, "val_info_gain", one_seed_ci="clip CI"))
        for m in metrics:
            r.append(_cell(g, f"metric.{m}"))
            fl = metric_floor(g, m)
            r.append(
                fmt(fl)
                if fl is not None
                else _reason(g, f"metric.{m}.floor")
                if (g["status"] != "complete").all()
                else "n/a (no floor reported)"
            )
            r.append(_cell(g, f"metric.{m}.resolvable_difference", ci=False))  # eval: smallest resolvable diff
        rows.append(r)
    return headers, rows


def unequal_n(df: pd.DataFrame) -> dict[str, list[int]]:
    """Metrics whose evaluation n (clips scored) differs between runs: {metric: sorted distinct n}."""
    out = {}
    for m in metric_names(df):
        col = f"metric.{m}.n"
        ns = sorted({int(v) for v in df[col].dropna()}) if col in df else []
        if len(ns) > 1:
            out[m] = ns
    return out


def _budget(g: pd.DataFrame) -> str:
    if "budget.binding" not in g or g["budget.binding"].dropna().empty:
        return _reason(g, "budget") if (g["status"] != "complete").all() else "n/a (no budget recorded)"
    parts = []
    for _, r in g.dropna(subset=["budget.binding"]).drop_duplicates("budget.binding").iterrows():
        used, lim = as_number(r.get("budget.used")), as_number(r.get("budget.limit"))
        kind = r.get("budget.kind")
        s = str(r["budget.binding"])
        if used is not None and lim is not None:
            s += f" ({fmt(used, 'sci')}/{fmt(lim, 'sci')} {kind})"
        parts.append(s)
    return "; ".join(parts)
