"""Search mode: Optuna TPE per group over the spec's declared ranges; the best config per group."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ablations.cells import CellFn, metric_of, run_one, say
from ablations.claims import complete_trial, fail_with, mark_claim
from ablations.spec import (
    GridSpec,
    expand_groups,
    make_cell,
    preset_parts,
    resolve_base,
)
from ablations.storage import Heartbeat, fail_trial, reap, worker_identity
from ttm.util import json_hash

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
        digest = json_hash({"base": resolve_base(spec), "ov": ov, "search": spec.search.model_dump()}, compact=True)
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

    me = worker_identity()
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
            mark_claim(storage, tid, me)
            storage.record_heartbeat(tid)
            ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and _countable(t)]
            if len(ahead) >= n:  # another worker took the last slot first
                storage.set_trial_user_attr(tid, "surplus", True)
                fail_trial(storage, tid)
                busy = True
                break
            busy = True
            params = _suggest(trial, spec)
            cell = make_cell(trial.number, base, labels, ov, seeds[0], params)
            for k, v in {"cell_name": cell.name, "cell_hash": cell.hash, "group": cell.group}.items():
                storage.set_trial_user_attr(tid, k, v)
            try:
                with Heartbeat(storage, tid, heartbeat_s):
                    summary, ran = run_one(
                        cell, grid_dir, fn, f"{tag}[{cell.group} trial {trial.number + 1}/{n}] "
                    )
                value = metric_of(summary, spec.search.metric)
                if value is None or not math.isfinite(value):
                    raise ValueError(
                        f"{cell.name}: search metric {spec.search.metric!r} is missing or not finite "
                        f"in summary.json ({value})"
                    )
                complete_trial(storage, tid, summary, value, recorded=not ran)
                counts["ran" if ran else "recorded"] += 1
            except Exception as e:
                say(f"{tag}{cell.name}: FAILED: {type(e).__name__}: {e}")
                fail_with(storage, study, tid, e, retry=False)
                counts["failed"] += 1
            except BaseException as e:
                fail_with(storage, study, tid, e, retry=True)
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
