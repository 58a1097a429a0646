"""Small helpers every floor uses: atomic writes, JSON hashing, dotted-key dicts.

Standard library only, so `reports/` and `ablations/` can use them without importing torch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- atomic writes


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Call `write(tmp_path)`, then rename onto `path`: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=suffix)
    os.close(fd)
    try:
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


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_keys(va, vb, key + ".")
        elif va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out
