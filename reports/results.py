"""Results of a grid, demo dir or run dir: one flat row per run (results.csv / results.jsonl)."""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ttm.rundir import RunDir
from ttm.util import atomic_write_text, flatten, read_jsonl_objects

# summary.json fields copied into a results row as they are
SUMMARY_FIELDS = (
    "backbone",
    "conditioning",
    "pattern",
    "params",
    "non_embedding_params",
    "target_params",
    "steps",
    "tokens",
    "flops",
    "flops_per_step",
    "val_loss",
    "best_val_loss",
    "val_info_gain",  # text information gain (nats/token): null-caption minus true-caption val loss
    "val_info_gain_n",
    "train_time_s",
)
LOWER_IS_BETTER_PREFIXES = ("val_loss", "loss", "fd", "fad", "kl", "mmd")
HIGHER_IS_BETTER_PREFIXES = ("clap", "adherence", "accuracy", "probe_acc")


# ----------------------------------------------------------------------------- reading runs


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return out


def _yaml(path: Path) -> dict:
    try:
        d = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return d if isinstance(d, dict) else {}


def find_runs(root: Path) -> list[Path]:
    """Run dirs under `root`: root itself when it is a run, else root/cells/* and root/runs/*."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    if RunDir(root).summary_file.is_file():
        return [root]
    runs = []
    for sub in ("cells", "runs"):
        d = root / sub
        if d.is_dir():
            runs += sorted(p for p in d.iterdir() if p.is_dir())
    return runs


def _flatten(d: dict) -> dict[str, Any]:
    """Dotted keys; list and mapping leaves as JSON text (one table cell each)."""
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v for k, v in flatten(d).items()}


def as_number(v: Any) -> float | None:
    """A finite number as float (numpy scalars included), else None."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return None
    return float(v) if math.isfinite(float(v)) else None


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1].strip()[:300] if lines else "unknown error"


def run_row(
    run_dir: Path, root: Path, cell: dict | None = None, failed: dict | None = None
) -> dict[str, Any]:
    """One flat results row for a run dir (which may not exist yet)."""
    run_dir = Path(run_dir)
    cell = cell or read_json(run_dir / "cell.json") or {}
    row: dict[str, Any] = {
        "run": run_dir.name,
        "run_dir": str(run_dir.relative_to(root)) if run_dir != root else ".",
    }
    rd = RunDir(run_dir)
    summary = read_json(rd.summary_file) if rd.summary_file.is_file() else None
    config = _yaml(rd.config_file) or _yaml(run_dir / "cell.yaml") or cell.get("config") or {}
    row["seed"] = cell.get("seed", config.get("seed"))
    row["group"] = cell.get("group")
    for a, v in (cell.get("axes") or {}).items():
        row[f"axis.{a}"] = v
    for k, v in (cell.get("params") or {}).items():
        row[f"search.{k}"] = v
    err = None
    if (run_dir / "cell_error.txt").is_file():
        err = _last_line((run_dir / "cell_error.txt").read_text())
    if failed and run_dir.name in failed and failed[run_dir.name] not in ("waiting", "running", "failed"):
        err = _last_line(str(failed[run_dir.name]))
    run_status = summary.get("status") if isinstance(summary, dict) else None
    if isinstance(run_status, str) and run_status != "ok":  # e.g. diverged: ended for good, no metrics
        row["status"] = run_status
        err = str(summary.get("message") or run_status)
    elif isinstance(summary, dict) and isinstance(summary.get("metrics"), dict):
        row["status"] = "complete"
    elif isinstance(summary, dict):
        row["status"] = "failed" if err else "not evaluated"
    else:
        row["status"] = "failed" if err else ("not run" if not run_dir.exists() else "incomplete")
    row["error"] = err
    if isinstance(summary, dict):
        row["run_status"] = summary.get("status")
        for k in SUMMARY_FIELDS:
            row[k] = summary.get(k)
        ci = summary.get("val_info_gain_ci")  # the interval over validation clips
        if isinstance(ci, list) and len(ci) == 2:
            row["val_info_gain.ci_low"], row["val_info_gain.ci_high"] = as_number(ci[0]), as_number(ci[1])
        b = summary.get("budget") or {}
        if isinstance(b, dict):
            for k in ("kind", "limit", "used", "binding"):
                row[f"budget.{k}"] = b.get(k)
        for name, m in (summary.get("metrics") or {}).items():
            m = m if isinstance(m, dict) else {"value": m}
            v = as_number(m.get("value"))
            row[f"metric.{name}"] = v
            for k in ("ci_low", "ci_high", "n", "resolvable_difference"):
                if as_number(m.get(k)) is not None:
                    row[f"metric.{name}.{k}"] = as_number(m.get(k))
            for fk, fv in (m.get("floors") or {}).items():
                fv = fv.get("value") if isinstance(fv, dict) else fv
                if as_number(fv) is not None:
                    row[f"metric.{name}.floor.{fk}"] = as_number(fv)
            if v is None:
                row[f"metric.{name}.reason"] = str(
                    m.get("reason") or m.get("error") or f"value is {m.get('value')!r}"
                )
            if isinstance(m.get("direction"), str):
                row[f"metric.{name}.direction"] = m["direction"]
            elif isinstance(m.get("higher_is_better"), bool):
                row[f"metric.{name}.direction"] = "higher" if m["higher_is_better"] else "lower"
    row["_config"] = config
    return row


def list_runs(root: Path) -> list[tuple[Path, dict | None]]:
    """(run dir, its cell record or None) for every run under `root`: a grid's cells in grid.json
    order (dirs that do not exist yet included), else `find_runs`."""
    root = Path(root)
    manifest = read_json(root / "grid.json") if (root / "grid.json").is_file() else None
    if manifest and manifest.get("cells"):
        out = []
        for c in manifest["cells"]:
            c = c if isinstance(c, dict) else {"name": c}
            d = root / "cells" / c["name"]
            out.append((d, read_json(d / "cell.json") or c))
        return out
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"{root}: no runs found (looked for summary.json, cells/*, runs/*)")
    return [(d, None) for d in runs]


def run_config(run_dir: Path, cell: dict | None = None) -> dict:
    """The config a run was made from: its grid cell's (cell.json `config`), else cell.yaml, else the
    run's config.yaml; {} when none is recorded (a cell that has not started)."""
    run_dir = Path(run_dir)
    cell = cell if cell is not None else (read_json(run_dir / "cell.json") or {})
    return cell.get("config") or _yaml(run_dir / "cell.yaml") or _yaml(RunDir(run_dir).config_file) or {}


def run_configs(root: Path) -> dict[str, dict]:
    """{run name: its recorded config} for the runs under `root` that have one (`run_config`)."""
    out = {}
    for d, cell in list_runs(root):
        c = run_config(d, cell)
        if c:
            out[d.name] = c
    return out


def collect(root: Path) -> pd.DataFrame:
    """All runs under `root` as a DataFrame (one row per run; `axis.*` columns define the groups)."""
    root = Path(root)
    manifest = read_json(root / "grid.json") if (root / "grid.json").is_file() else None
    failed = (manifest or {}).get("failed") or {}
    rows = [run_row(d, root, cell, failed) for d, cell in list_runs(root)]
    df = pd.DataFrame(rows)
    if not any(c.startswith("axis.") for c in df.columns):
        _infer_axes(df)
    df = df.drop(columns="_config")
    axes = axis_columns(df)
    df["label"] = [(" / ".join(str(r[a]) for a in axes) if axes else r["run"]) for _, r in df.iterrows()]
    df["group"] = [
        g if isinstance(g, str) and g else ("|".join(f"{a[5:]}={r[a]}" for a in axes) or "all")
        for g, (_, r) in zip(df["group"], df.iterrows())
    ]
    if "backbone" in df:
        cond = df["conditioning"] if "conditioning" in df else pd.Series([None] * len(df))
        df["family"] = [
            (f"{c} {b}" if isinstance(c, str) else str(b)) if isinstance(b, str) else None
            for b, c in zip(df["backbone"], cond)
        ]
    else:
        df["family"] = None
    return df


def _infer_axes(df: pd.DataFrame) -> None:
    """Runs that are not grid cells: the config keys that differ between runs (but the seed) are the axes."""
    flats = [_flatten(c) if isinstance(c, dict) else {} for c in df["_config"]]
    if len(flats) < 2:
        return
    keys = sorted(set().union(*flats))
    for k in keys:
        if k in ("seed", "name"):
            continue
        vals = [f.get(k) for f in flats]
        if len({json.dumps(v, sort_keys=True, default=str) for v in vals}) > 1:
            df[f"axis.{k}"] = [
                "" if v is None else (f"{v:g}" if isinstance(v, float) else str(v)) for v in vals
            ]


def axis_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("axis.")]


def metric_names(df: pd.DataFrame) -> list[str]:
    return sorted({c.split(".")[1] for c in df.columns if c.startswith("metric.") and c.count(".") == 1})


CURVE_COLUMNS = ["run", "step", "flops", "val_loss", "val_info_gain", "label", "family", "seed"]


def curves(df: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Validation rows of every run's log.jsonl: step, flops, val_loss, text info gain, label, seed."""
    out = []
    for _, r in df.iterrows():
        for row in read_jsonl(RunDir(Path(root) / r["run_dir"]).log_file):
            if as_number(row.get("val_loss")) is None:
                continue
            out.append({
                "run": r["run"],
                "step": row.get("step"),
                "flops": as_number(row.get("flops")),
                "val_loss": row["val_loss"],
                "val_info_gain": as_number(row.get("val_info_gain")),
                "label": r["label"],
                "family": r.get("family"),
                "seed": r.get("seed"),
            })
    return pd.DataFrame(out, columns=CURVE_COLUMNS)


def write_results(root: Path) -> tuple[Path, Path]:
    """`results.csv` and `results.jsonl`: one flat row per cell/run, loadable with pandas; and
    `curves.csv`: the validation rows of every run's training log (loss and text info gain by step)."""
    root = Path(root)
    df = collect(root)
    atomic_write_text(root / "curves.csv", curves(df, root).to_csv(index=False))
    return write_frame(df, root)


def write_frame(df: pd.DataFrame, root: Path) -> tuple[Path, Path]:
    """Write results rows (a `collect` frame) as `root/results.csv` and `root/results.jsonl`."""
    root = Path(root)
    csv_path, jsonl_path = root / "results.csv", root / "results.jsonl"
    atomic_write_text(csv_path, df.to_csv(index=False))
    recs = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        for r in df.to_dict(orient="records")
    ]
    atomic_write_text(jsonl_path, "".join(json.dumps(r, default=str) + "\n" for r in recs))
    return csv_path, jsonl_path


def read_results(root: Path) -> pd.DataFrame:
    """The rows `write_frame` wrote to `root/results.jsonl`, as a DataFrame."""
    path = Path(root) / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected the results of a grid or `ttm-bench ship`)")
    rows = [r for _, r in read_jsonl_objects(path)]
    if not rows:
        raise ValueError(f"{path}: no result rows")
    return pd.DataFrame(rows)
