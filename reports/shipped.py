"""Shipped results: the small result files of a finished grid, and a new grid compared beside them.

    ttm-bench ship GRID_DIR --out reports/results/NAME [--allow-incomplete]
    ttm-bench report GRID --beside reports/results/NAME [--out DIR]

A shipped folder holds only small files: `results.csv` / `results.jsonl` (the grid's rows, no
absolute path of the machine that ran it), `settings.json` (the spec and preset, and per cell its
config hash, settings hash, axes, seed and config), `baseline.json` (for `ttm-bench regress`, with
the settings hashes of each group) and `report.md` with its PNG plots (no audio, no HTML).

A new grid (e.g. one new backbone) is compared with shipped results only when each of its runs
was made at the settings of shipped runs (`ttm.config.settings_hash`: the same config but for
model.backbone, model.backbone_kwargs and seed); otherwise the error names the differing keys.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from reports.build import report_parser, run_report, write_report
from reports.regress import write_baseline
from reports.results import axis_columns, collect, curves, read_json, read_results, run_configs, write_frame
from ttm.config import IDENTITY_KEYS, check_settings_match, config_hash, config_view, settings_hash
from ttm.util import atomic_write_json, atomic_write_text, code_version, get_dotted

FORMAT = "ttm-bench-shipped/1"
SHIPPED_FILES = ("results.csv", "results.jsonl", "curves.csv", "settings.json", "baseline.json", "report.md")
FILES_DIR = "report_files"  # the report's PNG plots
REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- shipping a grid


def _spec_path(spec: str | None) -> str | None:
    """The grid's spec path (as grid.json gives it) relative to the repository when it lies inside."""
    if not spec:
        return spec
    p = Path(spec)
    try:
        return (p if p.is_absolute() else Path.cwd() / p).resolve().relative_to(REPO).as_posix()
    except (ValueError, OSError):
        return spec


def _local_paths(grid: Path, configs: dict[str, dict]) -> list[tuple[str, str]]:
    """(absolute path of this machine, what it reads as in shipped files), longest first."""
    subs = {
        str(grid.absolute()): "<grid>",
        str(grid.resolve()): "<grid>",
        str(REPO): "<repo>",
        str(Path.home()): "~",
    }
    for c in configs.values():
        root = get_dotted(c, "data.root")
        if isinstance(root, str) and root:
            for p in {Path(root).absolute(), Path(root).resolve()}:
                subs.setdefault(str(p), "<data.root>")
    return sorted(((k, v) for k, v in subs.items() if len(k) > 1), key=lambda kv: -len(kv[0]))


def _scrub_text(text: str, subs: list[tuple[str, str]]) -> str:
    """`text` with each whole path `subs` names (not a longer name it begins) replaced."""
    for old, new in subs:
        text = re.sub(re.escape(old) + r"(?![\w.-])", lambda _m, new=new: new, text)
    return text


def _scrub(df: pd.DataFrame, subs: list[tuple[str, str]]) -> pd.DataFrame:
    """`df` with the paths `subs` names replaced in every text value (error messages, reasons)."""
    out = df.copy()
    for col in out.columns:
        if pd.api.types.is_object_dtype(out[col]) or pd.api.types.is_string_dtype(out[col]):
            out[col] = out[col].map(lambda v: _scrub_text(v, subs) if isinstance(v, str) else v)
    return out


def _check_out_dir(out: Path, grid: Path) -> None:
    """`out` is empty, new, or a shipped folder (files `ship` writes and nothing else)."""
    if out.resolve() == grid.resolve():
        raise ValueError(f"--out {out}: is the grid itself; ship into another folder (reports/results/NAME)")
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    for p in out.iterdir():
        ok = p.name in SHIPPED_FILES and p.is_file()
        if p.name == FILES_DIR and p.is_dir():
            ok = all(q.is_file() and q.suffix == ".png" for q in p.iterdir())
        if not ok:
            raise ValueError(
                f"--out {out}: holds {p.name!r}, which `ttm-bench ship` does not write; "
                "ship into an empty folder or an earlier shipped one"
            )


def ship_settings(grid: Path, configs: dict[str, dict], df: pd.DataFrame) -> dict:
    """settings.json of a grid: what it was run from, and per cell what it computed."""
    manifest = read_json(grid / "grid.json") or {}
    rows = {r["run"]: r for r in df.to_dict(orient="records")}
    cells = []
    for name, c in configs.items():
        r = rows.get(name, {})
        cells.append(
            {
                "name": name,
                "config_hash": config_hash(c),
                "settings_hash": settings_hash(c),
                "axes": {a.removeprefix("axis."): r[a] for a in axis_columns(df) if _present(r.get(a))},
                "seed": c.get("seed", r.get("seed")),
                "group": r.get("group"),
                "config": config_view(c),  # validated, without name and data.root
            }
        )
    return {
        "format": FORMAT,
        "name": manifest.get("name") or grid.name,
        "spec": _spec_path(manifest.get("spec")),
        "preset": manifest.get("preset"),
        "mode": manifest.get("mode"),
        "identity_keys": list(IDENTITY_KEYS),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "code": code_version(),
        "run": {k: manifest.get(k) for k in ("started", "finished", "workers", "threads_per_worker")}
        | {"wall_s": _wall_s(manifest)},
        "cells": cells,
    }


def _wall_s(manifest: dict) -> float | None:
    """Seconds from the grid's start to its finish (grid.json), None when either is missing."""
    try:
        t0, t1 = (time.mktime(time.strptime(manifest[k], "%Y-%m-%dT%H:%M:%S")) for k in ("started", "finished"))
    except (KeyError, TypeError, ValueError):
        return None
    return t1 - t0


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def ship(grid_dir: str | Path, out_dir: str | Path, allow_incomplete: bool = False) -> Path:
    """Write the small shipped files of a finished grid into `out_dir` (see the module doc).
    A grid with cells that did not complete is refused unless `allow_incomplete`."""
    grid, out = Path(grid_dir), Path(out_dir)
    if not (grid / "grid.json").is_file():
        raise FileNotFoundError(
            f"{grid}: not a grid directory (no grid.json); ship the output of `ttm-bench grid`"
        )
    _check_out_dir(out, grid)
    df = collect(grid)
    bad = df[df["status"] != "complete"]
    if not bad.empty and not allow_incomplete:
        listed = "; ".join(
            f"{r['run']}: {r['status']}" + (f" ({r['error']})" if r["error"] else "")
            for _, r in bad.iterrows()
        )
        raise ValueError(
            f"{grid}: {len(bad)} of {len(df)} cell(s) did not complete ({listed}); rerun the grid "
            "to finish them, or pass --allow-incomplete to ship the rest"
        )
    done = df[df["status"] == "complete"]
    empty = sorted(set(df["group"]) - set(done["group"]))
    if empty:
        raise ValueError(
            f"{grid}: group(s) {', '.join(empty)} have no complete cell: nothing to ship for them"
        )
    configs = run_configs(grid)
    settings = ship_settings(grid, configs, df)
    cv = curves(df, grid)  # from the run logs, before their paths are scrubbed
    subs = _local_paths(grid, configs)
    df = _scrub(df, subs)
    if settings["spec"]:  # the spec path too, when it lies outside the repository
        settings["spec"] = _scrub_text(settings["spec"], subs)
    label = f"grid {settings['name']} (spec {settings['spec']}, preset {settings['preset'] or 'none'})"

    out.mkdir(parents=True, exist_ok=True)
    write_frame(df, out)
    atomic_write_text(out / "curves.csv", cv.to_csv(index=False))
    atomic_write_json(out / "settings.json", settings)
    done_names = set(done["run"])
    hashes: dict[str, list[str]] = {}
    refs: dict[str, dict] = {}
    for c in settings["cells"]:
        if c["name"] in done_names:
            hashes.setdefault(str(c["group"]), [])
            if c["settings_hash"] not in hashes[str(c["group"])]:
                hashes[str(c["group"])].append(c["settings_hash"])
            refs.setdefault(c["settings_hash"], {"cell": c["name"], "config": c["config"]})
    write_baseline(
        grid,
        out / "baseline.json",
        source=f"{label}, shipped in {out.name}/",
        settings={"file": "settings.json", "groups": hashes, "configs": refs},
    )
    md = write_report(
        df,
        grid,
        out,
        f"Comparison report: {settings['name']}",
        f"Shipped results of {label}, written by `ttm-bench ship`.",
        read_json(grid / "grid.json"),
        listen=False,
        html=False,
    )
    text = md.read_text()
    for png in (out / FILES_DIR).glob("*.png"):  # plots of an earlier shipping that this one has not
        if f"{FILES_DIR}/{png.name}" not in text:
            png.unlink()
    return out


# ----------------------------------------------------------------------------- comparing with shipped results


def load_settings(shipped_dir: str | Path) -> dict:
    """A shipped folder's settings.json, checked: errors name the file and the field."""
    path = Path(shipped_dir) / "settings.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {shipped_dir} is not a shipped folder (`ttm-bench ship`)"
        )
    s = read_json(path)
    if not isinstance(s, dict) or s.get("format") != FORMAT:
        raise ValueError(f"{path}: not a shipped settings file (expected format {FORMAT!r})")
    cells = s.get("cells")
    if not isinstance(cells, list) or not cells:
        raise ValueError(f"{path}: cells: expected a non-empty list")
    for i, c in enumerate(cells):
        if (
            not isinstance(c, dict)
            or not isinstance(c.get("name"), str)
            or not isinstance(c.get("config"), dict)
        ):
            raise ValueError(  # noqa: TRY004 -- bad input: one line, exit 2
                f"{path}: cells[{i}]: expected an object with a 'name' and a 'config' mapping"
            )
    return s


def _configs_of(user: str | Path | Iterable | dict) -> dict[str, dict]:
    """{name: config} of a grid or run dir (its runs with a recorded config), a mapping name ->
    config, or cells (dicts with `name` and `config`, or objects with those attributes)."""
    if isinstance(user, (str, Path)):
        configs = run_configs(Path(user))
        if not configs:
            raise ValueError(f"{user}: no run with a recorded config (cell.json, cell.yaml or config.yaml)")
        return configs
    if isinstance(user, dict):
        return dict(user)
    out = {}
    for c in user:
        name, config = (c.get("name"), c.get("config")) if isinstance(c, dict) else (c.name, c.config)
        out[str(name)] = config
    if not out:
        raise ValueError("no cells to check")
    return out


def check_settings(
    user_grid_or_cells: str | Path | Iterable | dict, shipped_dir: str | Path
) -> dict[str, str]:
    """Every user run's settings hash must be a shipped cell's; else a ValueError names each user cell
    made at other settings, the nearest shipped cell and the differing keys with both values.
    Returns {user run: its settings hash}."""
    shipped = load_settings(shipped_dir)
    configs = _configs_of(user_grid_or_cells)
    check_settings_match(configs, {c["name"]: c["config"] for c in shipped["cells"]}, "shipped")
    return {name: settings_hash(c) for name, c in configs.items()}


def _label(v: Any) -> str:
    """An axis value as grid cells label it (ablations/spec.py)."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_label(x) for x in v) + "]"
    return str(v)


def _fill_axes(df: pd.DataFrame, axes: list[str], configs: dict[str, dict]) -> pd.DataFrame:
    """Axis values a source's rows lack, read from their configs where the axis is a config key."""
    df = df.copy()
    for a in axes:
        have = df[a] if a in df else pd.Series([None] * len(df), index=df.index)
        vals = []
        for run, v in zip(df["run"], have):
            if not _present(v):
                v = get_dotted(configs.get(run, {}), a.removeprefix("axis."))
                v = _label(v) if v is not None else ""
            vals.append(v)
        df[a] = vals
    return df


def beside(user_grid: str | Path, shipped_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """The report of `user_grid`'s runs beside the shipped results in `shipped_dir`, after
    `check_settings`: results.csv/jsonl with both sources' rows (column `source`: "shipped" or the
    user grid's name) and report.md (tables with intervals, plots) in `out_dir`
    (default USER_GRID/beside-<shipped folder name>). Returns the report.md path."""
    user_grid, shipped_dir = Path(user_grid), Path(shipped_dir)
    out = Path(out_dir) if out_dir is not None else user_grid / f"beside-{shipped_dir.resolve().name}"
    for d, what in ((user_grid, "the grid"), (shipped_dir, "the shipped folder")):
        if d.exists() and out.resolve() == d.resolve():
            raise ValueError(f"--out {out}: is {what}; write the combined report to another folder")
    settings = load_settings(shipped_dir)
    check_settings(user_grid, shipped_dir)
    manifest = read_json(user_grid / "grid.json") or {}
    name = str(manifest.get("name") or user_grid.resolve().name)
    if name == "shipped":
        name = "shipped (new)"

    shipped = read_results(shipped_dir)
    user = collect(user_grid)
    axes = list(dict.fromkeys(axis_columns(shipped) + axis_columns(user)))
    shipped = _fill_axes(shipped, axes, {c["name"]: c["config"] for c in settings["cells"]})
    user = _fill_axes(user, axes, run_configs(user_grid))
    shipped["source"], user["source"] = "shipped", name
    shipped["group"] = "shipped: " + shipped["group"].astype(str)
    user["group"] = f"{name}: " + user["group"].astype(str)
    user["label"] = user["label"].astype(str) + f" ({name})"
    # the user's run dirs as absolute paths, so that the report reads their training curves
    user["run_dir"] = [str((user_grid / d).resolve()) for d in user["run_dir"]]
    df = pd.concat([shipped, user], ignore_index=True)
    df = df[["source"] + [c for c in df.columns if c != "source"]]

    out.mkdir(parents=True, exist_ok=True)
    write_frame(df, out)
    return write_report(
        df,
        out,
        out,
        f"{name} beside the shipped {settings.get('name')} results",
        f"Sources: shipped results in {shipped_dir} (grid {settings.get('name')}, "
        f"spec {settings.get('spec')}, "
        f"preset {settings.get('preset') or 'none'}) and the grid {user_grid}.",
        notes=[
            (
                f"Settings checked: every run of {name} was made at the settings of shipped runs "
                "(the same config but for model.backbone, model.backbone_kwargs and seed; "
                "ttm.config.settings_hash)."
            ),
            (
                f"The training curves below are {name}'s runs only; the shipped runs' curves are in "
                f"{shipped_dir / 'report.md'}."
            ),
        ],
        listen=False,
        html=False,
    )


# ----------------------------------------------------------------------------- command line


def ship_cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="ttm-bench ship",
        description="Write the small shipped result files of a finished grid (results, settings, baseline, "
        "report.md with plots; no audio, checkpoints or HTML).",
    )
    ap.add_argument("grid", help="a grid dir (the --out of `ttm-bench grid`)")
    ap.add_argument("--out", required=True, help="the shipped folder, e.g. reports/results/NAME")
    ap.add_argument(
        "--allow-incomplete", action="store_true", help="ship a grid with failed or unfinished cells"
    )
    a = ap.parse_args(argv)
    out = ship(a.grid, a.out, a.allow_incomplete)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files ({size / 1e3:.0f} kB) to {out}")
    return 0


def report_cli(argv: list[str]) -> int:
    """`ttm-bench report`: reports/build.py's, plus --beside."""
    ap = report_parser()
    ap.add_argument(
        "--beside",
        metavar="SHIPPED",
        help="compare the grid with shipped results (reports/results/NAME) in one report "
        "(default --out: DIR/beside-NAME)",
    )
    a = ap.parse_args(argv)
    if a.beside is None:
        return run_report(a)
    md = beside(a.dir, a.beside, a.out)
    print(f"wrote {md} and {md.parent / 'results.csv'}")
    return 0
