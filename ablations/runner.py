"""Run a grid spec: every cell is an Optuna trial in RDB storage, run exactly once across workers.

    ttm-bench grid SPEC [--out DIR] [--preset P] [--storage URL] [--workers N] [--no-report]

Grid mode: the first worker to create the study enqueues one WAITING trial per cell (param `cell` =
the cell index). A worker claims a cell by moving its trial WAITING -> RUNNING; the storage lets only
one worker make that move (PostgreSQL: row lock; SQLite: every transaction is BEGIN IMMEDIATE).
A claimed trial gets an Optuna heartbeat. A RUNNING trial whose heartbeat is older than the grace
period, or whose worker process on this machine is gone, is marked FAIL by the next worker that
looks, and a WAITING copy is enqueued, so the cell runs again (and resumes from its checkpoint).
A cell whose run dir already has a complete summary.json (one with a `metrics` key) is recorded,
not re-run. A cell function that raises marks its trial FAIL and enqueues a copy that other workers
(or a later invocation) retry; a worker never retries a cell that failed in its own process.

Search mode (spec.search): one study per group (axis combination), Optuna TPE over the declared
ranges, `n_trials` per group; the best config per group goes to `search_best.json`.

At the end: `results.csv` / `results.jsonl` (one flat row per cell) and the report.
Cell functions take `(config: dict, run_dir: Path) -> dict`; the default validates the config with
`ttm.config` and calls `ablations.pipeline.run_cell`.

This file is the driver and the CLI; the pieces: cells.py (cell functions, running one cell),
storage.py (Optuna storage, heartbeats, reaping), claims.py (grid mode), search.py (search mode).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

from ablations.cells import DEFAULT_CELL_FN, CellFn, load_cell_fn, resolve_cell_fn, reuse_finished
from ablations.claims import _study_name, grid_status, grid_study, work_grid
from ablations.launch import LAUNCHERS, SlurmOptions, run_jobs
from ablations.search import search_best, search_studies, work_search
from ablations.spec import (
    Cell,
    GridSpec,
    expand,
    expand_groups,
    load_spec,
    make_cell,
    preset_parts,
    resolve_base,
    validate_run_configs,
)
from ablations.storage import DEFAULT_HEARTBEAT_S, open_storage, redact
from reports.build import build_report
from reports.results import write_results
from ttm.config import parse_assignments
from ttm.progress import bar as progress_bar
from ttm.util import atomic_write_json

# ----------------------------------------------------------------------------- driver


def _cell_entry(c: Cell) -> dict[str, Any]:
    return {k: v for k, v in c.manifest().items() if k != "config"}


def _cells_for(spec: GridSpec, preset: str | None, overrides: dict | None) -> list[Cell]:
    return [] if spec.search is not None else expand(spec, preset, overrides)


def _worker_main(
    spec_path: str,
    grid_dir: str,
    preset: str | None,
    storage_url: str,
    fn_ref: CellFn | str,
    heartbeat_s: int,
    tag: str,
    overrides: dict | None = None,
    threads: int | None = None,
) -> dict[str, int]:
    _set_threads(threads)
    spec = load_spec(spec_path)
    storage = open_storage(storage_url, heartbeat_s)
    fn = load_cell_fn(fn_ref)
    if spec.search is not None:
        return work_search(storage, spec, preset, Path(grid_dir), fn, heartbeat_s, tag, overrides=overrides)
    cells = expand(spec, preset, overrides)
    study = grid_study(storage, _study_name(spec, preset_parts(spec, preset)[0], cells, "grid"), cells)
    return work_grid(storage, study, cells, Path(grid_dir), fn, heartbeat_s, tag)


def _worker_proc(args: tuple, q) -> None:
    try:
        q.put(("ok", _worker_main(*args)))
    except KeyboardInterrupt:
        q.put(("error", "interrupted"))
    except Exception as e:
        q.put(("error", f"{type(e).__name__}: {e}"))


SMALL_MACHINE_CORES = 4


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_layout(n_cells: int, n_cores: int | None = None) -> tuple[int, int]:
    """(workers, torch threads per worker) of a local run when --workers is not given.

    On a small machine (<= 4 cores) one single-threaded worker per core: at the demo's sizes a
    training step does not scale to 2 threads (benchmarks/cases_grid.py, 2 cores: 2 workers x 1
    thread ran 10 of the demo's steps per cell 1.4-1.6x faster than 1 worker x 2 threads, and the
    whole default demo 6 min 1 s vs 6 min 25 s, its generation and evaluation included). Larger
    machines: one worker with every thread (not measured here; pass --workers to choose)."""
    n = n_cores or cores()
    if n <= SMALL_MACHINE_CORES and n_cells > 1:
        w = min(n, n_cells)
        return w, max(1, n // w)
    return 1, n


def local_layout(workers: int | None, n_units: int, n_cores: int | None = None) -> tuple[int, int | None]:
    """(workers, torch threads per worker; None: torch's default) of a local run: `default_layout`
    when `workers` is None; else the cores split among the workers (each at torch's default, all
    the cores, would oversubscribe them: 2 workers x 2 threads on 2 cores trained the demo's cells
    ~6x slower per step than 2 x 1), torch's default for one worker."""
    if workers is None:
        return default_layout(n_units, n_cores)
    return workers, (max(1, (n_cores or cores()) // workers) if workers > 1 else None)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)  # a cell's train.threads, when set, still wins


def default_grid_dir(spec: GridSpec, preset: str | None) -> Path:
    return Path("runs") / "grids" / (spec.name + (f"-{preset}" if preset not in (None, "default") else ""))


def check_grid(spec, spec_path: Path, preset: str | None, overrides: dict | None, fn_ref) -> list[Cell]:
    """Everything a grid run checks before any cell runs (shared with --dry-run): the cells expand,
    every cell's config validates (with the default cell function), the cell function imports."""
    if not callable(fn_ref):
        load_cell_fn(fn_ref)
    cells = _cells_for(spec, preset, overrides)
    if fn_ref == DEFAULT_CELL_FN:
        if spec.search is not None:
            _, ov0 = expand_groups(spec, preset, overrides)[0]
            seeds = preset_parts(spec, preset)[2]
            probe = make_cell(
                0,
                resolve_base(spec),
                {},
                ov0,
                seeds[0],
                {
                    k: (
                        r.choices[0]
                        if r.type == "categorical"
                        else r.low
                        if r.type == "float"
                        else int(r.low)
                    )
                    for k, r in spec.search.params.items()
                },
            )
            validate_run_configs([probe], str(spec_path))
        else:
            validate_run_configs(cells, str(spec_path))
    return cells


def run_grid(
    spec_path: str | Path,
    out_dir: str | Path | None = None,
    preset: str | None = None,
    storage: str | None = None,
    workers: int | None = 1,
    cell_fn: CellFn | str | None = None,
    report: bool = True,
    heartbeat_s: int = DEFAULT_HEARTBEAT_S,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    launcher: str = "local",
    slurm: SlurmOptions | None = None,
    reuse: list[str | Path] | None = None,
) -> Path:
    """Run every cell of a grid (or the search) once; write results.csv/jsonl and the report.

    `overrides`: dotted config keys applied to every cell (over preset and axes), e.g. data.root.
    `launcher`: "local" (this process, or `workers` processes here) or "slurm"/"submitit-local"
    (`workers` jobs through submitit, see ablations/launch.py).

    `reuse`: other grid dirs whose finished cells with the same config hash are copied, not rerun.
    `workers` None: `default_layout` (one single-threaded worker per core on a small machine), or 1
    when the cell function is an in-process callable that cannot be sent to another process.

    Returns the grid dir. Cells that failed are listed in `grid.json` (`failed`) and printed; a rerun
    retries them and skips finished cells.
    """

    if not progress:  # cells (in this process and in worker processes) stay quiet too
        os.environ["TTM_BENCH_PROGRESS"] = "0"
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    used_preset = preset_parts(spec, preset)[0]
    grid_dir = Path(out_dir) if out_dir is not None else default_grid_dir(spec, used_preset)
    url = storage or f"sqlite:///{(grid_dir / 'grid.db').resolve()}"
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher: expected one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    fn_ref = resolve_cell_fn(cell_fn)
    picklable = True
    if callable(fn_ref):
        import pickle

        try:
            pickle.dumps(fn_ref)
        except Exception:
            picklable = False
    if ((workers or 1) > 1 or launcher != "local") and not picklable:
        raise ValueError(
            "--workers > 1 runs cells in new processes: pass the cell function as "
            "'module:function' (or a module-level function)"
        )
    cells = check_grid(spec, spec_path, preset, overrides, fn_ref)
    threads = None  # torch's default
    if launcher == "local" and picklable:
        workers, threads = local_layout(workers, len(cells) if spec.search is None else spec.search.n_trials)
    elif workers is None:
        workers = 1

    grid_dir.mkdir(parents=True, exist_ok=True)
    if reuse and spec.search is None:
        for name, src in reuse_finished(cells, grid_dir / "cells", [Path(r) for r in reuse]).items():
            print(f"{name}: reused from {src}")
    st = open_storage(url, heartbeat_s)  # creates the tables before any worker starts
    mode = "search" if spec.search is not None else "grid"
    if mode == "grid":
        study = grid_study(st, _study_name(spec, used_preset, cells, "grid"), cells)
        total = len(cells)

        def n_done() -> int:
            s = grid_status(study, cells)["status"]
            return sum(v == "complete" for v in s.values())
    else:
        studies = search_studies(st, spec, preset, overrides)
        total = spec.search.n_trials * len(studies)

        def n_done() -> int:
            from optuna.trial import TrialState

            return sum(
                t.state == TrialState.COMPLETE for _, _, s in studies for t in s.get_trials(deepcopy=False)
            )

    atomic_write_json(
        grid_dir / "grid.json",
        {
            "spec": str(spec_path),
            "name": spec.name,
            "preset": used_preset,
            "mode": mode,
            "axes": list(preset_parts(spec, preset)[2]),
            "storage": redact(url),
            "workers": workers,
            "threads_per_worker": threads,
            "cells": [_cell_entry(c) for c in cells],
            "search": spec.search.model_dump() if spec.search else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    print(
        f"grid {spec.name} ({mode}{', preset ' + used_preset if used_preset else ''}): {total} "
        f"{'cells' if mode == 'grid' else 'trials'} in {grid_dir}, storage {redact(url)}, "
        f"{workers} worker(s)" + (f" x {threads} thread(s)" if threads else "")
    )

    bar = progress_bar(
        total=total, initial=n_done(), desc=spec.name, unit="cell", disable=not progress, file=sys.stderr
    )

    def tick() -> None:
        bar.n = n_done()
        bar.refresh()

    results: list[tuple[str, Any]] = []
    if launcher != "local":
        if url.startswith("sqlite") and launcher == "slurm":
            print("warning: SQLite storage on SLURM needs a shared filesystem with working locks; "
                  "prefer --storage postgresql://...", file=sys.stderr)
        args = [(str(spec_path), str(grid_dir), preset, url, fn_ref, heartbeat_s, f"j{i} ", overrides)
                for i in range(workers)]
        results += run_jobs(_worker_main, args, launcher, grid_dir / "jobs", slurm, on_poll=tick)
    elif workers == 1:
        _set_threads(threads)
        fn = load_cell_fn(fn_ref)
        if mode == "grid":
            counts = work_grid(st, study, cells, grid_dir, fn, heartbeat_s, on_progress=tick)
        else:
            counts = work_search(
                st, spec, preset, grid_dir, fn, heartbeat_s, on_progress=tick, overrides=overrides
            )
        results.append(("ok", counts))
    else:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [
            ctx.Process(
                target=_worker_proc,
                args=(
                    (str(spec_path), str(grid_dir), preset, url, fn_ref, heartbeat_s, f"w{i} ", overrides,
                     threads),
                    q,
                ),
            )
            for i in range(workers)
        ]
        for p in procs:
            p.start()
        try:
            while any(p.is_alive() for p in procs):
                time.sleep(0.5)
                tick()
                while not q.empty():
                    results.append(q.get())
        finally:
            for p in procs:
                p.join()
        while not q.empty():
            results.append(q.get())
    tick()
    bar.close()
    for kind, msg in results:
        if kind == "error":
            print(f"a worker stopped: {msg}", file=sys.stderr)

    if mode == "grid":
        gs = grid_status(study, cells)
        names = [_cell_entry(c) for c in cells]
    else:
        best = search_best(studies, spec)
        atomic_write_json(grid_dir / "search_best.json", best)
        from optuna.trial import TrialState

        names = sorted(
            {
                t.user_attrs["cell_name"]
                for _, _, s in studies
                for t in s.get_trials(deepcopy=False)
                if "cell_name" in t.user_attrs and t.state == TrialState.COMPLETE
            }
        )
        gs = {"status": {n: "complete" for n in names}, "errors": {}}
        names = [{"name": n} for n in names]
        for g, b in best.items():
            print(
                f"best {g}: {spec.search.metric} = {b.get('value')} with {b.get('params', b.get('reason'))}"
            )
    failed = {n: gs["errors"].get(n, s) for n, s in gs["status"].items() if s != "complete"}
    manifest = json.loads((grid_dir / "grid.json").read_text())
    manifest.update(cells=names, failed=failed, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_json(grid_dir / "grid.json", manifest)
    write_results(grid_dir)
    if failed:
        print(f"{len(failed)} cell(s) not complete (rerun the same command to retry them):", file=sys.stderr)
        for n, err in failed.items():
            print(f"  {n}: {err}", file=sys.stderr)
    if report:
        print(f"report: {build_report(grid_dir)}")
    return grid_dir


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="ttm-bench grid", description="Run an ablation grid (or search) from a spec."
    )
    ap.add_argument("spec", help="grid spec YAML (see ablations/*.yaml)")
    ap.add_argument("--out", help="grid dir (default runs/grids/<name>[-<preset>])")
    ap.add_argument("--preset", help="a preset named in the spec (default: 'default' when the spec has one)")
    ap.add_argument(
        "--storage",
        help="Optuna RDB URL shared by all workers (default sqlite:///GRID_DIR/grid.db; "
        "postgresql://user:pass@host/db for many machines)",
    )
    ap.add_argument("--workers", type=int, default=None,
                    help="worker processes here, or jobs with --launcher slurm (default: one single-threaded "
                    "worker per core on a machine with <= 4 cores, else 1)")
    ap.add_argument("--launcher", choices=LAUNCHERS, default="local",
                    help="local processes, SLURM jobs, or submitit's local executor (default local)")
    ap.add_argument("--slurm-partition", help="SLURM partition of the worker jobs")
    ap.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per worker job (default 0)")
    ap.add_argument("--slurm-cpus", type=int, default=2, help="CPUs per worker job (default 2)")
    ap.add_argument("--slurm-mem-gb", type=float, default=16, help="memory per worker job (default 16)")
    ap.add_argument("--slurm-time", type=int, default=24 * 60, help="minutes per worker job (default 1440)")
    ap.add_argument("--slurm-account", help="SLURM account")
    ap.add_argument("--no-report", action="store_true", help="write results.csv/jsonl but no report")
    ap.add_argument(
        "--cell-fn", default=None, help=f"module:function run per cell (default {DEFAULT_CELL_FN})"
    )
    ap.add_argument(
        "--heartbeat",
        type=int,
        default=DEFAULT_HEARTBEAT_S,
        help="seconds between heartbeats; a cell silent for 2x this is retried",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key in every cell (value parsed as YAML); repeatable",
    )
    ap.add_argument("--reuse", action="append", default=[], metavar="GRID_DIR",
                    help="copy finished cells with the same config hash from another grid instead of "
                    "rerunning them; repeatable")
    ap.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    a = ap.parse_args(argv)
    overrides = parse_assignments(a.set)
    if a.dry_run:  # everything the real run checks, then the cells; nothing is written
        spec = load_spec(a.spec)
        check_grid(spec, Path(a.spec), a.preset, overrides, resolve_cell_fn(a.cell_fn))
        if spec.search is not None:
            for labels, ov in expand_groups(spec, a.preset, overrides):
                print(
                    f"group {labels or 'all'}: {spec.search.n_trials} trials over {list(spec.search.params)}"
                )
            return 0
        for c in expand(spec, a.preset, overrides):
            print(f"{c.index:4d} {c.name}  {json.dumps({**c.axes, 'seed': c.seed})}")
        return 0
    grid_dir = run_grid(
        a.spec,
        a.out,
        a.preset,
        a.storage,
        a.workers,
        a.cell_fn,
        report=not a.no_report,
        heartbeat_s=a.heartbeat,
        overrides=overrides,
        launcher=a.launcher,
        slurm=SlurmOptions(partition=a.slurm_partition, gpus=a.slurm_gpus, cpus=a.slurm_cpus,
                           mem_gb=a.slurm_mem_gb, time_min=a.slurm_time, account=a.slurm_account),
        reuse=a.reuse,
    )
    failed = json.loads((grid_dir / "grid.json").read_text()).get("failed") or {}
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
