"""`ttm-bench demo [--preset tiny|small|default] [--out DIR]`: the whole study once, offline.

Runs the grid `ablations/demo.yaml` (Transformer vs Prefix SiMBA at matched parameter
count and the same step budget) into DIR: dataset build -> codec fit -> tokenize ->
train both -> generate for test-split captions -> evaluate -> DIR/report.md (+ .html).
Everything, the dataset included, lives under DIR; rerunning resumes.
"""

from __future__ import annotations

import argparse
import time
from importlib.resources import files
from pathlib import Path

from ablations.runner import run_grid

SPEC = Path(str(files("ablations") / "demo.yaml"))  # package data


def run_demo(preset: str = "default", out: Path = Path("runs/demo"), workers: int | None = None,
             progress: bool = True) -> Path:
    out = Path(out)
    t0 = time.perf_counter()
    grid_dir = run_grid(SPEC, out_dir=out, preset=preset, workers=workers, progress=progress,
                        overrides={"data.root": str((out / "data").resolve())})
    report = Path(grid_dir) / "report.md"
    if not report.exists():
        raise RuntimeError(f"the demo finished without a report at {report}")
    print(f"demo ({preset}) finished in {time.perf_counter() - t0:.0f} s")
    return report


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ttm-bench demo", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default", help="tiny (tests, ~minutes), small, default")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--workers", type=int, default=None,
                    help="cells trained in parallel processes (default: one single-threaded worker per core "
                    "on a machine with <= 4 cores)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    report = run_demo(a.preset, Path(a.out), a.workers, progress=not a.no_progress)
    print(report)
    return 0
