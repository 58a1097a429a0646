"""Small helpers every floor uses: atomic writes, JSON hashing, dotted-key dicts, the code version.

Standard library only, so `reports/` and `ablations/` can use them without importing torch.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import fcntl
import functools
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- atomic writes and locks


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once: os.umask can only be read by setting it


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Call `write(tmp_path)`, then rename onto `path`: a crash never leaves half a file.
    The file gets the permissions an ordinary `open()` would give (0666 less the umask), not
    mkstemp's private 0600, so results are shareable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temp file + rename)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


# ----------------------------------------------------------------------------- hashing


@contextmanager
def file_lock(path: str | os.PathLike):
    """Hold an exclusive lock on `path` (created if missing) for the block, waiting for it if another
    process holds it. The OS drops it when its holder dies. Used where parallel grid workers would
    otherwise build the same shared product (a dataset, a codec, a probe) twice at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # closing the file releases the lock
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def json_hash(obj: Any, n: int = 10, algo: str = "sha1", compact: bool = False) -> str:
    """Stable short hex digest of a JSON-serialisable object (key order does not matter)."""
    seps = (",", ":") if compact else None
    blob = json.dumps(obj, sort_keys=True, separators=seps, default=str)
    return hashlib.new(algo, blob.encode()).hexdigest()[:n]


# ----------------------------------------------------------------------------- dotted-key dicts


def set_dotted(d: dict, key: str, value: Any) -> None:
    """d["a"]["b"] = value for key "a.b"; a mapping merges into an existing section."""
    *head, last = key.split(".")
    for h in head:
        nxt = d.setdefault(h, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"key {key!r}: {h!r} holds a value, not a section")
        d = nxt
    if isinstance(value, dict) and isinstance(d.get(last), dict):
        deep_merge(d[last], value)
    else:
        d[last] = copy.deepcopy(value)


def deep_merge(dst: dict, src: dict) -> dict:
    """Merge `src` (dotted or nested keys) into `dst` in place; mappings merge, other values replace."""
    for k, v in src.items():
        set_dotted(dst, str(k), normalize(v) if isinstance(v, dict) else v)
    return dst


def normalize(d: dict) -> dict:
    """Turn dotted keys into nested dicts: {"a.b": 1} -> {"a": {"b": 1}}."""
    return deep_merge({}, d) if d else {}


def get_dotted(d: dict, key: str, default: Any = None) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def pop_dotted(d: dict, key: str) -> None:
    """Remove "a.b" from d if present."""
    *head, last = key.split(".")
    for h in head:
        d = d.get(h, {})
    d.pop(last, None)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def diff_items(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for each leaf whose values differ between two nested dicts
    (a key missing on one side has the value None there)."""
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_items(va, vb, key + ".")
        elif va != vb:
            out.append((key, va, vb))
    return out


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, as "key: a -> b"."""
    return [f"{key}: {va!r} -> {vb!r}" for key, va, vb in diff_items(a, b, prefix)]


# ----------------------------------------------------------------------------- stopping on signals


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every verb stops the same way (exit code 143)."""


class StopRequest:
    """Set by SIGINT/SIGTERM inside `stop_on_signals()`; a loop checks it at a clean point."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def raise_(self) -> None:
        """Raise the interrupt the signal stands for (call after saving state)."""
        import signal

        raise Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def stop_on_signals():
    """Within the block, SIGINT and SIGTERM only set the yielded flag, so a training loop can finish
    its step and save a checkpoint before stopping; a second signal raises at once. Outside the
    main thread (where handlers cannot be set) the flag is never set."""
    import signal
    import threading

    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):  # noqa: ARG001
        if stop:
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        stop.signum = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- JSON lines


def read_jsonl_objects(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a line that is not a JSON
    object is a ValueError naming the file and the line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004
            out.append((lineno, obj))
    return out


# ----------------------------------------------------------------------------- code version


_PROJECT = Path(__file__).resolve().parents[1]


def code_version(repo: str | os.PathLike | None = None) -> str | None:
    """The git commit checked out in `repo` (default: this project's checkout), with "+dirty" when
    tracked files differ from it; None outside git. What shipped results and bench runs record as
    the code that produced them."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo or _PROJECT), *args], capture_output=True, text=True,
                              check=True, timeout=20).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    return (head + ("+dirty" if dirty else "")) or None


# ----------------------------------------------------------------------------- the process's allocator


#: glibc's malloc while training: blocks up to 32 MiB (glibc's largest mmap threshold) come from the
#: heap, and up to 1 GiB of freed heap is kept for the next step instead of handed back to the kernel
MALLOC_SETTINGS = {"mmap_threshold": 32 << 20, "trim_threshold": 1 << 30}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> str:
    """Make glibc's malloc keep the memory a training step frees for the next step; returns what
    this process's allocator does, as a run records it. Once per process; `TTM_MALLOC=default`
    leaves glibc's defaults.

    A step frees and reallocates the same multi-MB activations every time. By default glibc serves
    blocks above its mmap threshold (128 KiB, raised as large blocks are freed) with fresh mappings
    and trims freed memory at the top of the heap, so each step faults fresh zeroed pages in again
    (in most processes: whether the defaults keep a freed heap top varied from process to process).
    At the demo's shapes (2-core AMD EPYC, 2 threads) a Mamba2 step took 5,600-24,500 minor faults
    and, paired in one process, 14-15% longer than with these settings (0-280 faults); SiMBA 19%,
    S4D 6%, Mamba1 and S5 3%, the Transformer 0-7% (benchmarks' ssm_train_step and grid cells run
    with it too). The arithmetic is untouched: the same bits either way."""
    if os.environ.get("TTM_MALLOC", "") == "default":
        return "default (TTM_MALLOC=default)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"default (not glibc: {platform.system()} {platform.libc_ver()[0] or 'unknown libc'})"
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_SETTINGS["mmap_threshold"]) and libc.mallopt(
        _M_TRIM_THRESHOLD, MALLOC_SETTINGS["trim_threshold"])
    if not ok:
        raise OSError(f"glibc mallopt refused {MALLOC_SETTINGS} (set TTM_MALLOC=default to leave the defaults)")
    return "glibc mallopt: mmap threshold {} MiB, trim threshold {} MiB".format(
        MALLOC_SETTINGS["mmap_threshold"] >> 20, MALLOC_SETTINGS["trim_threshold"] >> 20)
