"""Regression checks: compare a candidate run or grid with a baseline written from a grid.

    ttm-bench regress --write-baseline --baseline FILE --candidate GRID_DIR [--k 3] [--rel-eps 0.02]
    ttm-bench regress --baseline FILE --candidate RUN_OR_GRID [--metrics val_loss fd_probe] [--group KEY]
                      [--shared]

Baseline JSON (format "ttm-bench-baseline/1"): per group key (the grid's axis values, e.g.
"model.backbone=transformer"), per metric: mean and std over seeds, n, noise floor and direction
("lower" or "higher" is better). `val_loss` is compared like the evaluation metrics.

Rule: a candidate group's mean (over its complete seeds) regresses when it is worse than the
baseline mean by more than
    tolerance = max(k * baseline seed std, noise floor (lower-is-better only), rel_eps * |baseline mean|)
The noise floor of a distance metric (FD, KL, ...) is its value between two halves of the reference set,
so a change smaller than it is not meaningful; a higher-is-better score's floor (the reference's own score)
is a ceiling, not a noise scale, and is not used. Exit 1 on any regression or on a baseline group or
metric that the candidate lacks (`--shared`: only the groups the candidate has); 0 otherwise.

A baseline written by `ttm-bench ship` also records the settings hash (ttm.config.settings_hash) of
each group's runs: a candidate made at other settings is refused (exit 2) with the differing keys.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from reports.results import (
    HIGHER_IS_BETTER_PREFIXES,
    LOWER_IS_BETTER_PREFIXES,
    collect,
    metric_names,
    run_configs,
)
from ttm.config import check_settings_match
from ttm.util import atomic_write_text

FORMAT = "ttm-bench-baseline/1"
DEFAULT_K = 3.0
DEFAULT_REL_EPS = 0.02


def direction_of(name: str, declared: str | None = None) -> str:
    """ "lower" or "higher" (is better): declared by the metric, else by its name."""
    if declared in ("lower", "higher"):
        return declared
    if name.startswith(HIGHER_IS_BETTER_PREFIXES):
        return "higher"
    if name.startswith(LOWER_IS_BETTER_PREFIXES):
        return "lower"
    raise ValueError(f"metric {name!r}: unknown direction; pass --direction {name}=lower|higher")


def _columns(df) -> dict[str, str]:
    """metric name -> results column ("val_loss" and every "metric.<name>")."""
    cols = {"val_loss": "val_loss"} if "val_loss" in df else {}
    cols.update({m: f"metric.{m}" for m in metric_names(df)})
    return cols


def _stats(df, metrics: list[str] | None, directions: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per group key: label, n, and per metric mean/std/n/floor/direction over complete seeds."""
    done = df[df["status"] == "complete"]
    cols = _columns(df)
    if metrics:
        unknown = [m for m in metrics if m not in cols]
        if unknown:
            raise ValueError(f"--metrics: {', '.join(unknown)} not found (have: {', '.join(cols) or 'none'})")
        cols = {m: cols[m] for m in metrics}
    out: dict[str, dict[str, Any]] = {}
    for key, g in df.groupby("group", sort=False):
        gd = done[done["group"] == key]
        entry: dict[str, Any] = {"label": str(g["label"].iloc[0]), "n": len(gd), "metrics": {}}
        for name, col in cols.items():
            if col not in gd:
                continue
            v = np.asarray(
                [x for x in gd[col].tolist() if isinstance(x, (int, float)) and math.isfinite(x)], float
            )
            if len(v) == 0:
                continue
            dcol = f"{col}.direction"
            declared = next((d for d in gd[dcol].dropna()), None) if dcol in gd else None
            fcol = f"{col}.floor.noise"
            floor = float(gd[fcol].dropna().mean()) if fcol in gd and not gd[fcol].dropna().empty else None
            ncol = f"{col}.n"  # clips each evaluation scored (eval.json n)
            eval_n = sorted({int(x) for x in gd[ncol].dropna()}) if ncol in gd else []
            entry["metrics"][name] = {
                "mean": float(v.mean()),
                "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "n": len(v),
                "eval_n": eval_n,
                "floor": floor,
                "direction": directions.get(name) or direction_of(name, declared),
            }
        out[str(key)] = entry
    return out


def write_baseline(
    grid: Path,
    out: Path,
    metrics: list[str] | None = None,
    k: float = DEFAULT_K,
    rel_eps: float = DEFAULT_REL_EPS,
    directions: dict[str, str] | None = None,
    source: str | None = None,
    settings: dict | None = None,
) -> dict:
    """Write the baseline of grid `grid` to `out`. `source` names the grid (default its path);
    `settings` ({"groups": {group: [settings hashes]}, "configs": {settings hash: {"cell": name,
    "config": config}}}, as `ttm-bench ship` writes it) makes `compare` refuse a candidate made at
    other settings."""
    df = collect(Path(grid))
    groups = _stats(df, metrics, directions or {})
    if not any(g["metrics"] for g in groups.values()):
        raise ValueError(f"{grid}: no complete run with metrics to make a baseline from")
    base = {
        "format": FORMAT,
        "source": str(grid) if source is None else source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rule": "tolerance = max(k * std, noise floor (lower-is-better only), rel_eps * |mean|)",
        "k": k,
        "rel_eps": rel_eps,
        "groups": groups,
    }
    if settings is not None:
        base["settings"] = settings
    atomic_write_text(out, json.dumps(base, indent=2) + "\n")
    return base


def load_baseline(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"baseline {path} does not exist (write one with --write-baseline)")
    try:
        b = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(b, dict) or b.get("format") != FORMAT or not isinstance(b.get("groups"), dict):
        raise ValueError(f"{path}: not a baseline (expected format {FORMAT!r} with a 'groups' mapping)")
    validate_baseline(b, str(path))
    return b


def validate_baseline(b: dict, source: str) -> None:
    """Every group has metrics, every group the same metric names, every entry finite numbers."""
    groups = b["groups"]
    if not groups:
        raise ValueError(f"{source}: baseline has no groups (nothing to compare against)")
    names: set[str] = set()
    for key, g in groups.items():
        ms = g.get("metrics") if isinstance(g, dict) else None
        if not isinstance(ms, dict) or not ms:
            raise ValueError(f"{source}: group {key!r} has no metrics")
        names |= set(ms)
    for key, g in groups.items():
        missing = sorted(names - set(g["metrics"]))
        if missing:
            raise ValueError(f"{source}: group {key!r} lacks metric(s) {', '.join(missing)} that other groups have")
        for name, m in g["metrics"].items():
            where = f"{source}: groups[{key!r}].metrics[{name!r}]"
            if not isinstance(m, dict):
                raise ValueError(f"{where}: expected an object")
            for f in ("mean", "std"):
                v = m.get(f)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"{where}.{f}: expected a finite number, got {v!r}")
            if m["std"] < 0:
                raise ValueError(f"{where}.std: expected >= 0, got {m['std']!r}")
            if not isinstance(m.get("n"), int) or m["n"] < 1:
                raise ValueError(f"{where}.n: expected an integer >= 1, got {m.get('n')!r}")
            if m.get("direction") not in ("lower", "higher"):
                raise ValueError(f"{where}.direction: expected 'lower' or 'higher', got {m.get('direction')!r}")
            fl = m.get("floor")
            if fl is not None and (not isinstance(fl, (int, float)) or not math.isfinite(fl)):
                raise ValueError(f"{where}.floor: expected a finite number or null, got {fl!r}")
    if "settings" in b:
        _validate_settings(b["settings"], source)


def _validate_settings(st: Any, source: str) -> None:
    """The optional `settings` record (written by `ttm-bench ship`)."""
    where = f"{source}: settings"
    if not (isinstance(st, dict) and all(isinstance(st.get(k), dict) for k in ("groups", "configs"))):
        raise ValueError(f"{where}: expected an object with 'groups' and 'configs' mappings")
    for h, c in st["configs"].items():
        if not isinstance(c, dict) or not isinstance(c.get("config"), dict):
            raise ValueError(  # noqa: TRY004 -- bad input: exit 2
                f"{where}.configs[{h!r}]: expected an object with a 'config' mapping"
            )
    for key, hs in st["groups"].items():
        if not isinstance(hs, list) or not hs or any(h not in st["configs"] for h in hs):
            raise ValueError(f"{where}.groups[{key!r}]: expected a non-empty list of settings.configs keys")


def check_candidate_settings(baseline: dict, candidate: Path, df, keymap: dict[str, str]) -> None:
    """Refuse (ValueError naming the differing keys) a candidate whose runs were made at settings
    the baseline's runs were not: each candidate group compared with a baseline group must match
    that group's settings; any other group, one of the baseline's. No-op for a baseline without a
    `settings` record (written by `regress --write-baseline`)."""
    st = baseline.get("settings")
    if not st:
        return
    refs = {h: c["config"] for h, c in st["configs"].items()}
    names = {h: c.get("cell") or h for h, c in st["configs"].items()}
    group_of = dict(zip(df["run"], df["group"]))
    runs = run_configs(Path(candidate))  # a cell that never started has no config (and no numbers)
    if not runs:
        raise ValueError(f"{candidate}: no run with a recorded config (cell.json, cell.yaml or config.yaml)")
    by_ref: dict[tuple[str, ...], dict[str, dict]] = {}
    for name, c in runs.items():
        key = keymap.get(str(group_of.get(name)))
        hs = tuple(st["groups"].get(key) or st["configs"]) if key is not None else tuple(st["configs"])
        by_ref.setdefault(hs, {})[name] = c
    for hs, configs in by_ref.items():
        check_settings_match(configs, {names[h]: refs[h] for h in hs}, "baseline")


def tolerance(m: dict, k: float, rel_eps: float) -> float:
    floor = m.get("floor") if m.get("direction") == "lower" else None
    return max(k * float(m.get("std") or 0.0), float(floor or 0.0), rel_eps * abs(float(m["mean"])))


def compare(
    baseline: dict,
    candidate: Path,
    metrics: list[str] | None = None,
    group: str | None = None,
    k: float | None = None,
    rel_eps: float | None = None,
    shared: bool = False,
) -> list[dict[str, Any]]:
    """One row per (baseline group, metric): baseline, candidate, delta, tolerance, verdict.
    `shared`: only the baseline groups the candidate has (a candidate that reruns some of them).
    A baseline with a `settings` record first refuses a candidate made at other settings."""
    k = float(baseline.get("k", DEFAULT_K) if k is None else k)
    rel_eps = float(baseline.get("rel_eps", DEFAULT_REL_EPS) if rel_eps is None else rel_eps)
    df = collect(Path(candidate))
    bgroups: dict[str, dict] = baseline["groups"]
    directions = {n: m["direction"] for g in bgroups.values() for n, m in g["metrics"].items()}
    cand = _stats(df, None, directions)
    keymap = {key: key for key in cand if key in bgroups}  # candidate group -> baseline group
    if group is not None:
        if group not in bgroups:
            raise ValueError(f"--group {group!r}: not in the baseline (groups: {', '.join(bgroups)})")
        if len(cand) != 1:
            raise ValueError(f"--group needs a candidate with one group; {candidate} has {len(cand)}")
        keymap = {next(iter(cand)): group}
        cand = {group: next(iter(cand.values()))}
        bgroups = {group: bgroups[group]}
    elif len(bgroups) == 1 and len(cand) == 1:
        keymap = {next(iter(cand)): next(iter(bgroups))}
        cand = {next(iter(bgroups)): next(iter(cand.values()))}
    check_candidate_settings(baseline, Path(candidate), df, keymap)
    if shared:
        bgroups = {key: g for key, g in bgroups.items() if key in cand}
        if not bgroups:
            have = ", ".join(baseline["groups"])
            raise ValueError(f"--shared: {candidate} has none of the baseline's groups ({have})")
    rows = []
    for key, bg in bgroups.items():
        for name, bm in bg["metrics"].items():
            if metrics and name not in metrics:
                continue
            cm = (cand.get(key) or {}).get("metrics", {}).get(name)
            tol = tolerance(bm, k, rel_eps)
            row = {
                "group": key,
                "metric": name,
                "direction": bm["direction"],
                "baseline": bm["mean"],
                "baseline_std": bm["std"],
                "baseline_n": bm["n"],
                "tolerance": tol,
            }
            if cm is None:
                row.update(
                    candidate=None,
                    candidate_n=0,
                    delta=None,
                    verdict="MISSING" if key in cand else "MISSING GROUP",
                )
            elif bm.get("eval_n") and cm.get("eval_n") and bm["eval_n"] != cm["eval_n"]:
                # FD at n and every interval depend on the number of clips: refuse to compare
                row.update(candidate=cm["mean"], candidate_n=cm["n"], delta=None,
                           verdict=f"N DIFFERS ({bm['eval_n']} vs {cm['eval_n']} clips)")
            else:
                delta = cm["mean"] - bm["mean"]
                worse = delta if bm["direction"] == "lower" else -delta
                verdict = "REGRESSION" if worse > tol else ("improved" if -worse > tol else "ok")
                row.update(candidate=cm["mean"], candidate_n=cm["n"], delta=delta, verdict=verdict)
            rows.append(row)
    if metrics:
        have = {r["metric"] for r in rows}
        missing = [m for m in metrics if m not in have]
        if missing:
            raise ValueError(f"--metrics: {', '.join(missing)} not in the baseline")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def f(x):
        return "-" if x is None else f"{x:.4g}"

    head = [
        "group",
        "metric",
        "better",
        "baseline (std, n)",
        "candidate (n)",
        "delta",
        "tolerance",
        "verdict",
    ]
    body = [
        [
            r["group"],
            r["metric"],
            r["direction"],
            f"{f(r['baseline'])} ({f(r['baseline_std'])}, {r['baseline_n']})",
            f"{f(r['candidate'])} ({r['candidate_n']})",
            f(r["delta"]),
            f(r["tolerance"]),
            r["verdict"],
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _parse_metrics(items: list[str] | None) -> list[str] | None:
    if not items:
        return None
    return [m for it in items for m in it.split(",") if m]


def _parse_directions(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        name, _, d = it.partition("=")
        if d not in ("lower", "higher") or not name:
            raise ValueError(f"--direction expects NAME=lower|higher, got {it!r}")
        out[name] = d
    return out


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="ttm-bench regress",
        description=__doc__.split("\n\n")[0],
        epilog="tolerance = max(k * baseline seed std, noise floor (lower-is-better "
        "metrics), rel_eps * |baseline mean|); exit 1 on any regression",
    )
    ap.add_argument(
        "--baseline", required=True, help="baseline JSON (read, or written with --write-baseline)"
    )
    ap.add_argument("--candidate", required=True, help="a run dir, a grid dir or a demo dir")
    ap.add_argument("--metrics", nargs="+", help="metrics to check (default: all in the baseline)")
    ap.add_argument("--group", help="baseline group to compare a single-group candidate against")
    ap.add_argument("--shared", action="store_true",
                    help="compare only the baseline groups the candidate has (default: missing ones fail)")
    ap.add_argument(
        "--write-baseline", action="store_true", help="write --baseline from --candidate (a grid)"
    )
    ap.add_argument("--k", type=float, default=None, help=f"seed-std multiplier (default {DEFAULT_K})")
    ap.add_argument(
        "--rel-eps", type=float, default=None, help=f"relative epsilon (default {DEFAULT_REL_EPS})"
    )
    ap.add_argument(
        "--direction",
        action="append",
        default=[],
        metavar="NAME=lower|higher",
        help="direction of a metric the suite does not know",
    )
    a = ap.parse_args(argv)
    metrics = _parse_metrics(a.metrics)
    if a.write_baseline:
        b = write_baseline(
            Path(a.candidate),
            Path(a.baseline),
            metrics,
            DEFAULT_K if a.k is None else a.k,
            DEFAULT_REL_EPS if a.rel_eps is None else a.rel_eps,
            _parse_directions(a.direction),
        )
        n = sum(len(g["metrics"]) for g in b["groups"].values())
        print(f"wrote {a.baseline}: {len(b['groups'])} group(s), {n} metric entries")
        return 0
    baseline = load_baseline(Path(a.baseline))
    rows = compare(baseline, Path(a.candidate), metrics, a.group, a.k, a.rel_eps, a.shared)
    if not rows:
        raise ValueError(f"{a.baseline}: no (group, metric) pair to compare")
    print(format_table(rows))
    bad = [r for r in rows if r["verdict"] not in ("ok", "improved")]
    print(f"\n{len(rows) - len(bad)} ok, {len(bad)} regressed or missing")
    return 1 if bad else 0
