"""Grid mode: one WAITING trial per cell; workers claim, run and complete cells exactly once."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ablations.cells import CellFn, headline, metric_of, run_one, say
from ablations.spec import Cell, GridSpec
from ablations.storage import Heartbeat, fail_trial, reap, retry_trial, worker_identity
from ttm.util import json_hash

# ----------------------------------------------------------------------------- grid mode


def _study_name(spec: GridSpec, preset: str | None, cells: list[Cell], mode: str) -> str:
    digest = json_hash({"cells": [c.hash for c in cells]}, compact=True)
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


def complete_trial(storage, trial_id: int, summary: dict, value: float | None, recorded: bool) -> None:
    from optuna.trial import TrialState

    for k, v in headline(summary).items():
        storage.set_trial_user_attr(trial_id, k, v)
    storage.set_trial_user_attr(trial_id, "recorded", recorded)
    v = value if value is not None and not math.isnan(value) else math.inf
    storage.set_trial_state_values(trial_id, state=TrialState.COMPLETE, values=[v])


def mark_claim(storage, trial_id: int, me: dict) -> None:
    storage.set_trial_user_attr(trial_id, "worker", me)  # {"machine", "host", "pid"}


def fail_with(storage, study, trial_id: int, e: BaseException, retry: bool) -> None:
    storage.set_trial_user_attr(trial_id, "error", f"{type(e).__name__}: {e}"[-2000:])
    if fail_trial(storage, trial_id) and retry:
        retry_trial(study, storage.get_trial(trial_id))


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

    me = worker_identity()
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
        mark_claim(storage, tid, me)
        storage.set_trial_param(tid, "cell", float(idx), dist)
        attempt = int(t.user_attrs.get("attempt", 1))
        try:
            with Heartbeat(storage, tid, heartbeat_s):
                summary, ran = run_one(
                    cell,
                    grid_dir,
                    fn,
                    f"{tag}[{idx + 1}/{len(cells)}" + (f" attempt {attempt}" if attempt > 1 else "") + "] ",
                )
            complete_trial(storage, tid, summary, metric_of(summary, "val_loss"), recorded=not ran)
            counts["ran" if ran else "recorded"] += 1
        except Exception as e:
            say(f"{tag}[{idx + 1}/{len(cells)}] {cell.name}: FAILED: {type(e).__name__}: {e}")
            fail_with(storage, study, tid, e, retry=True)
            failed_here.add(idx)
            counts["failed"] += 1
        except BaseException as e:  # interrupted: leave the cell for the next run
            fail_with(storage, study, tid, e, retry=True)
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
