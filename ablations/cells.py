"""Grid cells: the cell function, a cell's run directory as the grid sees it, running one cell."""

from __future__ import annotations

import importlib
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ablations.spec import Cell, config_hash
from reports.results import run_config
from ttm.rundir import RunDir
from ttm.util import atomic_write_json, atomic_write_text

CellFn = Callable[[dict, Path], Any]
DEFAULT_CELL_FN = "ablations.pipeline:pipeline_cell"


# ----------------------------------------------------------------------------- cell functions


def resolve_cell_fn(cell_fn: CellFn | str | None) -> CellFn | str:
    """A callable, or "module:function" (kept as a string so that worker processes can import it)."""
    if cell_fn is None:
        return DEFAULT_CELL_FN
    if isinstance(cell_fn, str):
        mod, _, fn = cell_fn.partition(":")
        if not mod or not fn:
            raise ValueError(f"--cell-fn: expected module:function, got {cell_fn!r}")
    elif not callable(cell_fn):
        raise ValueError(f"cell_fn: expected a callable or 'module:function', got {cell_fn!r}")
    return cell_fn


def load_cell_fn(ref: CellFn | str) -> CellFn:
    if callable(ref):
        return ref
    mod, _, fn = ref.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cell function {ref!r} cannot be imported ({e})") from None


# ----------------------------------------------------------------------------- run dirs


def read_summary(run_dir: Path) -> dict | None:
    return RunDir(run_dir).read_summary()


def summary_complete(run_dir: Path) -> bool:
    """A run is finished when its summary.json carries the evaluation (`metrics`, possibly empty),
    or ended for good in training (a `status` other than "ok", e.g. "diverged")."""
    s = read_summary(run_dir)
    if s is None:
        return False
    st = s.get("status")
    return isinstance(s.get("metrics"), dict) or (isinstance(st, str) and st != "ok")


def headline(summary: dict) -> dict[str, Any]:
    """The few numbers stored on the Optuna trial (user attrs)."""
    out = {k: summary.get(k) for k in ("val_loss", "params", "flops", "steps", "status")}
    for name, m in (summary.get("metrics") or {}).items():
        out[f"metric.{name}"] = m.get("value") if isinstance(m, dict) else m
    return {k: v for k, v in out.items() if v is None or isinstance(v, (int, float, str, bool))}


def metric_of(summary: dict, metric: str) -> float | None:
    """`val_loss` (any numeric summary field) or `metrics.<name>` -> float, None when absent."""
    if metric.startswith("metrics."):
        m = (summary.get("metrics") or {}).get(metric.split(".", 1)[1])
        v = m.get("value") if isinstance(m, dict) else m
    else:
        v = summary.get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# ----------------------------------------------------------------------------- renamed cells


def recorded_hash(run_dir: Path) -> str | None:
    """The config hash of the config a cell directory was run with (reports.results.run_config),
    None when it records none. `name` is a location, not a setting."""
    c = run_config(run_dir)
    return config_hash({k: v for k, v in c.items() if k != "name"}) if c else None


def adopt_renamed(cell: Cell, cells_dir: Path) -> Path | None:
    """Hash migration: a directory of this cell under an older name (same slug, another hash: the
    hash was once taken on the raw config) whose recorded config has this cell's config hash is
    renamed to the cell's name, so a rerun keeps its work (finished, or resumable from a checkpoint).
    Returns the old path, or None. A finished directory is preferred over an unfinished one."""
    if (cells_dir / cell.name).exists() or not cells_dir.is_dir():
        return None
    slug = cell.name.rsplit("-", 1)[0]
    same = re.compile(re.escape(slug) + r"-[0-9a-f]{10}")
    found = [
        d for d in sorted(cells_dir.iterdir())
        if d.is_dir() and same.fullmatch(d.name) and recorded_hash(d) == cell.hash
    ]
    if not found:
        return None
    old = max(found, key=summary_complete)  # a finished one first
    old.rename(cells_dir / cell.name)
    rd = RunDir(cells_dir / cell.name)
    summary = rd.read_summary()
    if summary is not None and "config_hash" in summary:
        rd.write_summary({**summary, "config_hash": cell.hash, "renamed_from": old.name})
    return old


def reuse_finished(cells: list[Cell], cells_dir: Path, sources: list[Path]) -> dict[str, str]:
    """Copy finished cells from other grids (`sources`: grid dirs) whose recorded config has the same
    config hash as a cell of this grid that has no directory yet, so they are recorded, not rerun
    (grids that share cells, e.g. the zoo and the study's quarter size). Returns {cell: source dir}."""
    found: dict[str, Path] = {}
    for src in sources:
        src_cells = Path(src) / "cells"
        if not src_cells.is_dir():
            raise ValueError(f"--reuse {src}: not a grid directory (no cells/ folder)")
        for d in sorted(src_cells.iterdir()):
            h = recorded_hash(d) if d.is_dir() else None
            if h is not None and summary_complete(d):
                found.setdefault(h, d)
    out: dict[str, str] = {}
    for cell in cells:
        dst = cells_dir / cell.name
        src = found.get(cell.hash)
        if src is None or dst.exists():
            continue
        cells_dir.mkdir(parents=True, exist_ok=True)
        tmp = cells_dir / f".{cell.name}.reuse"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".lock"))
        atomic_write_json(tmp / "cell.json", {**cell.manifest(), "reused_from": str(src)})
        tmp.rename(dst)  # whole or not at all
        rd = RunDir(dst)
        rd.write_summary({**rd.read_summary(), "reused_from": str(src)})
        out[cell.name] = str(src)
    return out


# ----------------------------------------------------------------------------- one cell


def say(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


def run_one(cell: Cell, grid_dir: Path, fn: CellFn, tag: str = "") -> tuple[dict, bool]:
    """Run (or record) one cell in `grid_dir/cells/<name>`. Returns (summary, ran)."""
    run_dir = Path(grid_dir) / "cells" / cell.name
    old = adopt_renamed(cell, run_dir.parent)
    if old is not None:
        say(f"{tag}{cell.name}: adopted {old.name} (same config, named by the old config hash)")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "cell.json", {**cell.manifest(), **({"renamed_from": old.name} if old else {})})
    if summary_complete(run_dir):
        say(f"{tag}{cell.name}: already complete, recorded")
        return read_summary(run_dir), False
    atomic_write_text(run_dir / "cell.yaml", yaml.safe_dump(cell.run_config(), sort_keys=False))
    say(f"{tag}{cell.name}: started")
    t0 = time.time()
    try:
        fn(cell.run_config(), run_dir)
    except BaseException as e:
        atomic_write_text(run_dir / "cell_error.txt", "".join(traceback.format_exception(e)))
        raise
    if not summary_complete(run_dir):
        raise ValueError(
            f"{run_dir}: the cell function returned but summary.json is missing or has no "
            "`metrics` (it must be written last, after evaluation) and no final non-ok `status`"
        )
    (run_dir / "cell_error.txt").unlink(missing_ok=True)
    summary = read_summary(run_dir)
    vl = summary.get("val_loss")
    say(
        f"{tag}{cell.name}: done in {time.time() - t0:.1f}s"
        + (f", val_loss {vl:.4f}" if isinstance(vl, (int, float)) else "")
    )
    return summary, True
