"""Where grid workers run: processes on this machine, or jobs submitted through `submitit`.

Every worker opens the grid's Optuna storage and claims cells from it until none is left, so a
launcher only starts workers and waits for them; a cell is never run twice, whichever machine
its worker is on. On SLURM the storage must be reachable from every node: PostgreSQL
(`--storage postgresql://...`) is the safe choice; SQLite works only on a shared filesystem that
supports its locks.

    ttm-bench grid SPEC --launcher slurm --workers 8 --slurm-partition gpu --slurm-gpus 1 \
        --storage postgresql://user@host/grids
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

LAUNCHERS = ("local", "slurm", "submitit-local")  # submitit-local: submitit's local executor (tests, laptops)


class SlurmOptions(BaseModel):
    """Per-job resources for `--launcher slurm` (ignored by the local executors)."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = None
    gpus: int = Field(0, ge=0)  # GPUs per worker job
    cpus: int = Field(2, ge=1)  # CPUs per worker job
    mem_gb: float = Field(16, gt=0)
    time_min: int = Field(24 * 60, ge=1)  # wall-clock limit per worker job
    account: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)  # any other submitit `slurm_*` parameter


def executor(launcher: str, folder: Path, opts: SlurmOptions | None = None, name: str = "ttm-grid"):
    """A submitit executor writing its job logs under `folder`."""
    if launcher not in ("slurm", "submitit-local"):
        raise ValueError(f"--launcher: expected one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    try:
        import submitit
    except ImportError:
        raise ImportError("--launcher slurm needs the 'submitit' package (pip install submitit)") from None
    opts = opts or SlurmOptions()
    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm" if launcher == "slurm" else "local")
    params: dict[str, Any] = dict(
        name=name, timeout_min=opts.time_min, cpus_per_task=opts.cpus, mem_gb=opts.mem_gb,
        gpus_per_node=opts.gpus, tasks_per_node=1, nodes=1,
    )
    if launcher == "slurm":
        if opts.partition:
            params["slurm_partition"] = opts.partition
        if opts.account:
            params["slurm_account"] = opts.account
        params.update({k if k.startswith("slurm_") else f"slurm_{k}": v for k, v in opts.extra.items()})
    else:  # the local executor knows only the generic parameters it can honour
        params = {k: params[k] for k in ("name", "timeout_min", "gpus_per_node", "tasks_per_node", "nodes")}
    ex.update_parameters(**params)
    return ex


def run_jobs(
    fn: Callable[..., Any],
    args_list: Sequence[tuple],
    launcher: str,
    folder: Path,
    opts: SlurmOptions | None = None,
    on_poll: Callable[[], None] | None = None,
    poll_s: float = 2.0,
) -> list[tuple[str, Any]]:
    """Submit `fn(*args)` once per entry, wait for all, return ("ok", result) or ("error", message)."""
    folder.mkdir(parents=True, exist_ok=True)
    ex = executor(launcher, folder, opts)
    jobs = [ex.submit(fn, *args) for args in args_list]
    print(f"submitted {len(jobs)} worker job(s) via {launcher}: {', '.join(str(j.job_id) for j in jobs)} "
          f"(logs in {folder})", file=sys.stderr)
    try:
        while not all(j.done() for j in jobs):
            time.sleep(poll_s)
            if on_poll is not None:
                on_poll()
    except KeyboardInterrupt:
        for j in jobs:
            j.cancel(check=False)
        raise
    out: list[tuple[str, Any]] = []
    for j in jobs:
        try:
            out.append(("ok", j.result()))
        except Exception as e:  # noqa: BLE001 -- a failed job is reported, the others still count
            out.append(("error", f"job {j.job_id}: {' '.join(str(e).split())[-500:]}"))
    return out
