"""Optuna RDB storage for grids: opening it (SQLite / PostgreSQL), worker identity, heartbeats,
and reaping trials whose worker is gone."""

from __future__ import annotations

import os
import random
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

DEFAULT_HEARTBEAT_S = 30


# ----------------------------------------------------------------------------- storage


def worker_identity() -> dict[str, Any]:
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
    """Optuna RDBStorage with heartbeats; stale trials are re-enqueued by `retry_trial`."""
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
                heartbeat_stale_trial_callback=retry_trial,
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
                f"--storage {redact(url)}: the database driver is missing ({e}); for "
                "PostgreSQL install psycopg2-binary"
            ) from None
    else:
        raise ValueError(f"--storage {redact(url)}: cannot open the storage ({last})")
    if sqlite:
        _serialize_sqlite(storage.engine)
    return storage


def redact(url: str) -> str:
    """Hide a password in a storage URL."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else url
    return url


def retry_trial(study, trial) -> None:
    """Enqueue a WAITING copy of a failed trial (same params, same cell)."""
    params = trial.system_attrs.get("fixed_params") or trial.params
    attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("worker", "error", "recorded", "surplus")}
    attrs["attempt"] = int(trial.user_attrs.get("attempt", 1)) + 1
    attrs["retry_of"] = trial.number
    study.enqueue_trial(dict(params), user_attrs=attrs)


def fail_trial(storage, trial_id: int) -> bool:
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
        if (gone or orphan) and fail_trial(study._storage, t._trial_id):
            retry_trial(study, study._storage.get_trial(t._trial_id))


class Heartbeat:
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
