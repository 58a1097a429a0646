"""`ttm-bench results`: rerun the shipped grids, ship their small files, rebuild the findings page.

    ttm-bench results [--runs runs/results] [--out reports/results] [--only study,zoo] [--workers N]

The grids are those of reports.findings.GRIDS (spec and preset per shipped folder), run in that order
into RUNS/<name> with one shared dataset (RUNS/data); a grid reuses the finished cells of the grids
before it that have the same config hash (the zoo's transformer and prefix-simba cells are the
study's quarter-size cells). Rerunning resumes: finished cells are recorded, not retrained.
Then each grid's small files go to OUT/<name> (reports.shipped.ship) and OUT/README.md is rebuilt.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ablations.runner import run_grid
from reports.findings import GRIDS, build
from reports.shipped import ship
from ttm.util import atomic_write_json

REPO = Path(__file__).resolve().parents[1]


def run_results(runs: Path = Path("runs/results"), out: Path = Path("reports/results"),
                only: list[str] | None = None, workers: int | None = None, progress: bool = True,
                cell_fn=None) -> Path:
    names = list(GRIDS) if not only else only
    unknown = [n for n in names if n not in GRIDS]
    if unknown:
        raise ValueError(f"--only: unknown grid(s) {', '.join(unknown)} (shipped grids: {', '.join(GRIDS)})")
    runs, out = Path(runs), Path(out)
    data_root = str((runs / "data").resolve())
    done: list[Path] = []
    times: dict[str, float] = {}
    for name in GRIDS:  # the declared order: later grids reuse the cells of earlier ones
        grid_dir = runs / name
        if name in names:
            spec, preset = GRIDS[name]
            t0 = time.perf_counter()
            run_grid(REPO / spec, out_dir=grid_dir, preset=preset, workers=workers, progress=progress,
                     overrides={"data.root": data_root}, reuse=[d for d in done if d.is_dir()], report=False,
                     cell_fn=cell_fn)
            times[name] = time.perf_counter() - t0
            ship(grid_dir, out / name)
            print(f"{name}: {times[name] / 60:.1f} min, shipped to {out / name}")
        if grid_dir.is_dir():
            done.append(grid_dir)
    page = build(out)
    atomic_write_json(runs / "results_times.json", times)
    print(f"findings: {page} ({sum(times.values()) / 60:.1f} min of grids)")
    return page


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ttm-bench results", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="runs/results", help="where the grids run (git-ignored)")
    ap.add_argument("--out", default="reports/results", help="where the small files are shipped")
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(GRIDS)}")
    ap.add_argument("--workers", type=int, default=None,
                    help="grid workers (default: one single-threaded worker per core on <= 4 cores)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    run_results(Path(a.runs), Path(a.out), a.only.split(",") if a.only else None, a.workers,
                progress=not a.no_progress)
    return 0
