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
`ttm.config` and calls `ttm.pipeline.run_cell`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing as mp
import os
import random
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ablations.launch import LAUNCHERS, SlurmOptions, run_jobs
from ablations.spec import (
    Cell,
    GridSpec,
    atomic_write_text,
    config_hash,
    expand,
    expand_groups,
    load_spec,
    make_cell,
    preset_parts,
    resolve_base,
    validate_run_configs,
)

CellFn = Callable[[dict, Path], Any]
DEFAULT_CELL_FN = "ablations.runner:pipeline_cell"
DEFAULT_HEARTBEAT_S = 30


# ----------------------------------------------------------------------------- cell functions


def pipeline_cell(config: dict, run_dir: Path) -> dict:
    """The default cell: validate the config as a RunConfig, then train + generate + evaluate."""
    from ttm.config import config_from_dict
    from ttm.pipeline import run_cell

    progress = os.environ.get("TTM_BENCH_PROGRESS", "1") != "0"  # set by run_grid(progress=False)
    return run_cell(config_from_dict(config, str(Path(run_dir) / "cell.yaml")), Path(run_dir), progress=progress)


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


def _load_fn(ref: CellFn | str) -> CellFn:
    if callable(ref):
        return ref
    mod, _, fn = ref.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cell function {ref!r} cannot be imported ({e})") from None


# ----------------------------------------------------------------------------- run dirs


def read_summary(run_dir: Path) -> dict | None:
    p = Path(run_dir) / "summary.json"
    if not p.is_file():
        return None
    try:
        s = json.loads(p.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    return s if isinstance(s, dict) else None


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


def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- storage


def _worker_identity() -> dict[str, Any]:
    """Which machine (host, boot, pid namespace) and process a claim belongs to."""
    boot = ""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        pass
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = ""
    return {
        "machine": f"{socket.gethostname()}:{boot}:{pidns}",
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped is a zombie: dead for our purpose
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _serialize_sqlite(engine) -> None:
    """Make every SQLite transaction BEGIN IMMEDIATE so read-then-write claims are atomic across
    processes (on one machine: SQLite over a network file system is not safe; use PostgreSQL)."""
    from sqlalchemy import event

    def on_connect(dbapi_conn, record):
        dbapi_conn.isolation_level = None  # pysqlite must not emit its own BEGIN
        # write-ahead log: readers do not block the writer, and a commit needs no fsync of the db file
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")

    def on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(engine, "connect", on_connect)
    event.listen(engine, "begin", on_begin)
    engine.dispose()  # connections opened before the listeners are dropped


def open_storage(url: str, heartbeat_s: int = DEFAULT_HEARTBEAT_S, grace_s: int | None = None):
    """Optuna RDBStorage with heartbeats; stale trials are re-enqueued by `_retry_trial`."""
    import optuna
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sqlite = url.startswith("sqlite")
    kwargs = {"connect_args": {"timeout": 300}} if sqlite else {"pool_pre_ping": True}
    last: Exception | None = None
    for attempt in range(8):  # several workers may create the tables at the same moment
        try:
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=int(heartbeat_s),
                grace_period=int(grace_s if grace_s is not None else max(2 * heartbeat_s, heartbeat_s + 2)),
                heartbeat_stale_trial_callback=_retry_trial,
            )
            break
        except (
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.IntegrityError,
            sqlalchemy.exc.ProgrammingError,
        ) as e:
            last = e
            time.sleep(0.2 + random.random() * (attempt + 1))
        except ImportError as e:
            raise ValueError(
                f"--storage {_redact(url)}: the database driver is missing ({e}); for "
                "PostgreSQL install psycopg2-binary"
            ) from None
    else:
        raise ValueError(f"--storage {_redact(url)}: cannot open the storage ({last})")
    if sqlite:
        _serialize_sqlite(storage.engine)
    return storage


def _redact(url: str) -> str:
    """Hide a password in a storage URL."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else url
    return url


def _retry_trial(study, trial) -> None:
    """Enqueue a WAITING copy of a failed trial (same params, same cell)."""
    params = trial.system_attrs.get("fixed_params") or trial.params
    attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("worker", "error", "recorded", "surplus")}
    attrs["attempt"] = int(trial.user_attrs.get("attempt", 1)) + 1
    attrs["retry_of"] = trial.number
    study.enqueue_trial(dict(params), user_attrs=attrs)


def _fail_trial(storage, trial_id: int) -> bool:
    """Move a RUNNING trial to FAIL; True for the one worker that made the move."""
    import optuna

    try:
        return bool(storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def reap(study, me: dict[str, Any], orphan_after_s: float) -> None:
    """Fail (and re-enqueue) RUNNING trials whose worker is gone: a stale heartbeat (any machine),
    a dead process on this machine, or a claim never marked with its worker."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)  # heartbeat older than the grace period
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get("worker") or {}
        gone = (
            w.get("machine") == me["machine"]
            and isinstance(w.get("pid"), int)
            and w["pid"] != me["pid"]
            and not _pid_alive(w["pid"])
        )
        # claimed but killed before it could record who it is (or its first heartbeat)
        orphan = (
            not w and t.datetime_start is not None and now - t.datetime_start.timestamp() > orphan_after_s
        )
        if (gone or orphan) and _fail_trial(study._storage, t._trial_id):
            _retry_trial(study, study._storage.get_trial(t._trial_id))


class _Heartbeat:
    """Records the trial's heartbeat every interval from a thread while a cell runs."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self):
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # a transient database error must not kill the cell
                print(f"warning: heartbeat of trial {self.trial_id} failed ({e})", file=sys.stderr)

    def __enter__(self):
        self.storage.record_heartbeat(self.trial_id)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


# ----------------------------------------------------------------------------- one cell


def _print(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


def run_one(cell: Cell, grid_dir: Path, fn: CellFn, tag: str = "") -> tuple[dict, bool]:
    """Run (or record) one cell in `grid_dir/cells/<name>`. Returns (summary, ran)."""
    run_dir = Path(grid_dir) / "cells" / cell.name
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_json(run_dir / "cell.json", cell.manifest())
    if summary_complete(run_dir):
        _print(f"{tag}{cell.name}: already complete, recorded")
        return read_summary(run_dir), False
    atomic_write_text(run_dir / "cell.yaml", yaml.safe_dump(cell.run_config(), sort_keys=False))
    _print(f"{tag}{cell.name}: started")
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
    _print(
        f"{tag}{cell.name}: done in {time.time() - t0:.1f}s"
        + (f", val_loss {vl:.4f}" if isinstance(vl, (int, float)) else "")
    )
    return summary, True


# ----------------------------------------------------------------------------- grid mode


def _study_name(spec: GridSpec, preset: str | None, cells: list[Cell], mode: str) -> str:
    digest = config_hash({"cells": [c.hash for c in cells]})
    return f"{spec.name}:{preset or '-'}:{mode}:{digest}"


def grid_study(storage, name: str, cells: list[Cell], wait_s: float = 300.0):
    """Create the study and enqueue every cell once (only the creator enqueues), or load it."""
    import optuna

    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="minimize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
        t0 = time.time()
        while not study.user_attrs.get("cells_enqueued"):
            if time.time() - t0 > wait_s:
                raise ValueError(
                    f"study {name!r} exists but its cells were never all enqueued (its creator "
                    "died?); delete it with `optuna delete-study` and rerun"
                ) from None
            time.sleep(0.5)
        return study
    for c in cells:
        study.enqueue_trial(
            {"cell": c.index},
            user_attrs={"cell": c.index, "cell_name": c.name, "cell_hash": c.hash, "attempt": 1},
        )
    study.set_user_attr("n_cells", len(cells))
    study.set_user_attr("cells_enqueued", True)
    return study


def _claim(study, storage, skip: set[int]):
    """Claim the first WAITING cell not in `skip`; None when nothing could be claimed."""
    import optuna
    from optuna.trial import TrialState

    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)), key=lambda t: t.number):
        if t.user_attrs.get("cell") in skip:
            continue
        storage.record_heartbeat(t._trial_id)  # before RUNNING, so a claim is never without a heartbeat
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                return t
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def _complete(storage, trial_id: int, summary: dict, value: float | None, recorded: bool) -> None:
    from optuna.trial import TrialState

    for k, v in headline(summary).items():
        storage.set_trial_user_attr(trial_id, k, v)
    storage.set_trial_user_attr(trial_id, "recorded", recorded)
    v = value if value is not None and not math.isnan(value) else math.inf
    storage.set_trial_state_values(trial_id, state=TrialState.COMPLETE, values=[v])


def _mark_claim(storage, trial_id: int, me: dict) -> None:
    storage.set_trial_user_attr(trial_id, "worker", me)  # {"machine", "host", "pid"}


def _fail_with(storage, study, trial_id: int, e: BaseException, retry: bool) -> None:
    storage.set_trial_user_attr(trial_id, "error", f"{type(e).__name__}: {e}"[-2000:])
    if _fail_trial(storage, trial_id) and retry:
        _retry_trial(study, storage.get_trial(trial_id))


def work_grid(
    storage,
    study,
    cells: list[Cell],
    grid_dir: Path,
    fn: CellFn,
    heartbeat_s: float,
    tag: str = "",
    on_progress: Callable[[], None] | None = None,
) -> dict[str, int]:
    """One worker: claim and run cells until none is waiting or running. Returns counts."""
    from optuna.distributions import IntDistribution
    from optuna.trial import TrialState

    me = _worker_identity()
    failed_here: set[int] = set()
    counts = {"ran": 0, "recorded": 0, "failed": 0}
    dist = IntDistribution(0, max(len(cells) - 1, 0))
    while True:
        reap(study, me, orphan_after_s=10 * heartbeat_s)
        t = _claim(study, storage, failed_here)
        if t is None:
            states = [(x.state, x.user_attrs.get("cell")) for x in study.get_trials(deepcopy=False)]
            running = any(s == TrialState.RUNNING for s, _ in states)
            waiting = any(s == TrialState.WAITING and c not in failed_here for s, c in states)
            if not running and not waiting:
                return counts
            time.sleep(
                0.5 if running and not waiting else 0.05
            )  # others' cells: wait for them or their heartbeat
            continue
        tid, idx = t._trial_id, int(t.user_attrs["cell"])
        cell = cells[idx]
        _mark_claim(storage, tid, me)
        storage.set_trial_param(tid, "cell", float(idx), dist)
        attempt = int(t.user_attrs.get("attempt", 1))
        try:
            with _Heartbeat(storage, tid, heartbeat_s):
                summary, ran = run_one(
                    cell,
                    grid_dir,
                    fn,
                    f"{tag}[{idx + 1}/{len(cells)}" + (f" attempt {attempt}" if attempt > 1 else "") + "] ",
                )
            _complete(storage, tid, summary, metric_of(summary, "val_loss"), recorded=not ran)
            counts["ran" if ran else "recorded"] += 1
        except Exception as e:
            _print(f"{tag}[{idx + 1}/{len(cells)}] {cell.name}: FAILED: {type(e).__name__}: {e}")
            _fail_with(storage, study, tid, e, retry=True)
            failed_here.add(idx)
            counts["failed"] += 1
        except BaseException as e:  # interrupted: leave the cell for the next run
            _fail_with(storage, study, tid, e, retry=True)
            raise
        if on_progress is not None:
            on_progress()


def grid_status(study, cells: list[Cell]) -> dict[str, Any]:
    """Per cell: complete / running / waiting / failed, and the last error."""
    from optuna.trial import TrialState

    status = {c.name: "waiting" for c in cells}
    errors: dict[str, str] = {}
    rank = {TrialState.COMPLETE: 4, TrialState.RUNNING: 3, TrialState.WAITING: 2, TrialState.FAIL: 1}
    best: dict[int, int] = {}
    for t in study.get_trials(deepcopy=False):
        i = t.user_attrs.get("cell")
        if i is None or not 0 <= i < len(cells):
            continue
        r = rank.get(t.state, 0)
        if r >= best.get(i, 0):
            best[i] = r
            status[cells[i].name] = t.state.name.lower().replace("fail", "failed")
        if t.state == TrialState.FAIL and "error" in t.user_attrs:
            errors[cells[i].name] = t.user_attrs["error"]
    return {"status": status, "errors": errors}


# ----------------------------------------------------------------------------- search mode


def _suggest(trial, spec: GridSpec) -> dict[str, Any]:
    out = {}
    for key, r in spec.search.params.items():
        if r.type == "categorical":
            out[key] = trial.suggest_categorical(key, r.choices)
        elif r.type == "int":
            out[key] = trial.suggest_int(key, int(r.low), int(r.high), step=int(r.step or 1), log=r.log)
        else:
            out[key] = trial.suggest_float(key, float(r.low), float(r.high), step=r.step, log=r.log)
    return out


def _countable(t) -> bool:
    """Trials that use up the search budget: all but those failed by a dead worker or cut as surplus."""
    from optuna.trial import TrialState

    if t.user_attrs.get("surplus"):
        return False
    return t.state != TrialState.FAIL or "error" in t.user_attrs


def search_studies(storage, spec: GridSpec, preset: str | None, overrides: dict | None = None):
    """[(group labels, group overrides, study)] — one TPE study per axis combination."""
    import optuna

    used, _, _, _ = preset_parts(spec, preset)
    out = []
    for labels, ov in expand_groups(spec, preset, overrides):
        gkey = "|".join(f"{a}={v}" for a, v in labels.items()) or "all"
        digest = config_hash({"base": resolve_base(spec), "ov": ov, "search": spec.search.model_dump()})
        name = f"{spec.name}:{used or '-'}:search:{gkey}:{digest}"
        sampler = optuna.samplers.TPESampler(seed=spec.search.sampler_seed)
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            load_if_exists=True,
            direction=spec.search.direction,
            sampler=sampler,
        )
        out.append((labels, ov, study))
    return out


def work_search(
    storage,
    spec: GridSpec,
    preset: str | None,
    grid_dir: Path,
    fn: CellFn,
    heartbeat_s: float,
    tag: str = "",
    on_progress: Callable[[], None] | None = None,
    overrides: dict | None = None,
) -> dict[str, int]:
    from optuna.trial import TrialState

    me = _worker_identity()
    base = resolve_base(spec)
    _, _, _, seeds = preset_parts(spec, preset)
    n = spec.search.n_trials
    counts = {"ran": 0, "recorded": 0, "failed": 0}
    studies = search_studies(storage, spec, preset, overrides)
    while True:
        busy = False
        for labels, ov, study in studies:
            reap(study, me, orphan_after_s=10 * heartbeat_s)
            trials = study.get_trials(deepcopy=False)
            if sum(_countable(t) for t in trials) >= n:
                busy |= any(t.state == TrialState.RUNNING for t in trials)
                continue
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Heartbeat of storage")  # we beat ourselves
                trial = study.ask()
            tid = trial._trial_id
            _mark_claim(storage, tid, me)
            storage.record_heartbeat(tid)
            ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and _countable(t)]
            if len(ahead) >= n:  # another worker took the last slot first
                storage.set_trial_user_attr(tid, "surplus", True)
                _fail_trial(storage, tid)
                busy = True
                break
            busy = True
            params = _suggest(trial, spec)
            cell = make_cell(trial.number, base, labels, ov, seeds[0], params)
            for k, v in {"cell_name": cell.name, "cell_hash": cell.hash, "group": cell.group}.items():
                storage.set_trial_user_attr(tid, k, v)
            try:
                with _Heartbeat(storage, tid, heartbeat_s):
                    summary, ran = run_one(
                        cell, grid_dir, fn, f"{tag}[{cell.group} trial {trial.number + 1}/{n}] "
                    )
                value = metric_of(summary, spec.search.metric)
                if value is None or not math.isfinite(value):
                    raise ValueError(
                        f"{cell.name}: search metric {spec.search.metric!r} is missing or not finite "
                        f"in summary.json ({value})"
                    )
                _complete(storage, tid, summary, value, recorded=not ran)
                counts["ran" if ran else "recorded"] += 1
            except Exception as e:
                _print(f"{tag}{cell.name}: FAILED: {type(e).__name__}: {e}")
                _fail_with(storage, study, tid, e, retry=False)
                counts["failed"] += 1
            except BaseException as e:
                _fail_with(storage, study, tid, e, retry=True)
                raise
            if on_progress is not None:
                on_progress()
            break
        if not busy:
            return counts
        if all(sum(_countable(t) for t in s.get_trials(deepcopy=False)) >= n for _, _, s in studies):
            time.sleep(0.5)  # only others' trials are left: wait for them (or their heartbeat)


def search_best(studies, spec: GridSpec) -> dict[str, Any]:
    from optuna.trial import TrialState

    out = {}
    for labels, _, study in studies:
        gkey = "|".join(f"{a}={v}" for a, v in labels.items()) or "all"
        done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        entry: dict[str, Any] = {
            "axes": labels,
            "metric": spec.search.metric,
            "direction": spec.search.direction,
            "n_complete": len(done),
        }
        if done:
            b = study.best_trial
            entry.update(value=b.value, params=b.params, cell=b.user_attrs.get("cell_name"), trial=b.number)
        else:
            entry.update(value=None, reason="no trial completed")
        out[gkey] = entry
    return out


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
) -> dict[str, int]:
    spec = load_spec(spec_path)
    storage = open_storage(storage_url, heartbeat_s)
    fn = _load_fn(fn_ref)
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


def default_grid_dir(spec: GridSpec, preset: str | None) -> Path:
    return Path("runs") / "grids" / (spec.name + (f"-{preset}" if preset not in (None, "default") else ""))


def run_grid(
    spec_path: str | Path,
    out_dir: str | Path | None = None,
    preset: str | None = None,
    storage: str | None = None,
    workers: int = 1,
    cell_fn: CellFn | str | None = None,
    report: bool = True,
    heartbeat_s: int = DEFAULT_HEARTBEAT_S,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    launcher: str = "local",
    slurm: SlurmOptions | None = None,
) -> Path:
    """Run every cell of a grid (or the search) once; write results.csv/jsonl and the report.

    `overrides`: dotted config keys applied to every cell (over preset and axes), e.g. data.root.
    `launcher`: "local" (this process, or `workers` processes here) or "slurm"/"submitit-local"
    (`workers` jobs through submitit, see ablations/launch.py).

    Returns the grid dir. Cells that failed are listed in `grid.json` (`failed`) and printed; a rerun
    retries them and skips finished cells.
    """
    from tqdm import tqdm

    if not progress:  # cells (in this process and in worker processes) stay quiet too
        os.environ["TTM_BENCH_PROGRESS"] = "0"
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    used_preset = preset_parts(spec, preset)[0]
    grid_dir = Path(out_dir) if out_dir is not None else default_grid_dir(spec, used_preset)
    url = storage or f"sqlite:///{(grid_dir / 'grid.db').resolve()}"
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher: expected one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    fn_ref = resolve_cell_fn(cell_fn)
    if (workers > 1 or launcher != "local") and callable(fn_ref):
        import pickle

        try:
            pickle.dumps(fn_ref)
        except Exception:
            raise ValueError(
                "--workers > 1 runs cells in new processes: pass the cell function as "
                "'module:function' (or a module-level function)"
            ) from None
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

    grid_dir.mkdir(parents=True, exist_ok=True)
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

    _atomic_json(
        grid_dir / "grid.json",
        {
            "spec": str(spec_path),
            "name": spec.name,
            "preset": used_preset,
            "mode": mode,
            "axes": list(preset_parts(spec, preset)[2]),
            "storage": _redact(url),
            "cells": [_cell_entry(c) for c in cells],
            "search": spec.search.model_dump() if spec.search else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    print(
        f"grid {spec.name} ({mode}{', preset ' + used_preset if used_preset else ''}): {total} "
        f"{'cells' if mode == 'grid' else 'trials'} in {grid_dir}, storage {_redact(url)}, "
        f"{workers} worker(s)"
    )

    bar = tqdm(
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
        fn = _load_fn(fn_ref)
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
                    (str(spec_path), str(grid_dir), preset, url, fn_ref, heartbeat_s, f"w{i} ", overrides),
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
        _atomic_json(grid_dir / "search_best.json", best)
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
    _atomic_json(grid_dir / "grid.json", manifest)
    from reports.build import build_report, write_results

    write_results(grid_dir)
    if failed:
        print(f"{len(failed)} cell(s) not complete (rerun the same command to retry them):", file=sys.stderr)
        for n, err in failed.items():
            print(f"  {n}: {err}", file=sys.stderr)
    if report:
        print(f"report: {build_report(grid_dir)}")
    return grid_dir


def parse_sets(items: list[str]) -> dict[str, Any]:
    """["train.steps=100", "model.backbone=mamba"] -> {"train.steps": 100, ...} (values parsed as YAML)."""
    out = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {it!r}")
        try:
            out[key.strip()] = yaml.safe_load(val)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {it!r}: the value is not valid YAML ({e})") from None
    return out


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
    ap.add_argument("--workers", type=int, default=1, help="worker processes here, or jobs with --launcher slurm")
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
    ap.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    a = ap.parse_args(argv)
    overrides = parse_sets(a.set)
    if a.dry_run:
        spec = load_spec(a.spec)
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
    )
    failed = json.loads((grid_dir / "grid.json").read_text()).get("failed") or {}
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
