"""The dataset manifest: one JSON object per line (see ARCHITECTURE.md).

    {"id", "path" (relative to the manifest's folder, or absolute), "caption",
     "split": "train" | "valid" | "test", "piece", "duration", "sample_rate", "attributes"}

Splits are by piece: `assign_split(piece)` hashes the piece id, so a piece lands in the
same split in every build and every preset.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ttm.util import atomic_write_text, read_jsonl_objects

SPLITS: tuple[str, ...] = ("train", "valid", "test")
Split = Literal["train", "valid", "test"]


class Entry(BaseModel):
    """One clip of a dataset."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    path: str = Field(min_length=1)
    caption: str
    split: Split
    piece: str = Field(min_length=1)
    duration: float = Field(gt=0)
    sample_rate: int = Field(gt=0)
    attributes: dict[str, Any] = Field(default_factory=dict)


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"]) or "(line)"
        parts.append(f"field '{field}': {e['msg']}")
    return "; ".join(parts)


def read_manifest(path: str | os.PathLike) -> list[Entry]:
    """Read and validate a manifest. Errors name the file, the line number and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    for lineno, obj in read_jsonl_objects(path):
        try:
            entry = Entry.model_validate(obj)
        except ValidationError as e:
            raise ValueError(f"{path}:{lineno}: {_describe(e)}") from None
        if entry.id in seen:
            raise ValueError(f"{path}:{lineno}: field 'id': duplicate id {entry.id!r} (first on line {seen[entry.id]})")
        seen[entry.id] = lineno
        entries.append(entry)
    return entries


def manifest_text(entries: list[Entry]) -> str:
    """The manifest's exact bytes (as text): one compact JSON object per line."""
    return "".join(json.dumps(e.model_dump(mode="json"), ensure_ascii=False) + "\n" for e in entries)


def write_manifest(path: str | os.PathLike, entries: list[Entry]) -> None:
    """Write a manifest atomically. Ids must be unique."""
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{path}: duplicate entry id {dup!r}")
    atomic_write_text(path, manifest_text(entries))


def resolve_audio(manifest_path: str | os.PathLike, entry: Entry) -> Path:
    """The audio file of an entry: its `path` taken relative to the manifest's folder."""
    p = Path(entry.path)
    return p if p.is_absolute() else Path(manifest_path).parent / p


def split_entries(entries: list[Entry], split: str) -> list[Entry]:
    """The entries of one split, in manifest order."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    return [e for e in entries if e.split == split]


def piece_unit(piece: str) -> float:
    """A number in [0, 1) fixed by the piece id (SHA-1), the same on every machine."""
    h = hashlib.sha1(piece.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def assign_split(piece: str, valid: float = 0.1, test: float = 0.1) -> str:
    """Split of a piece by the hash of its id: `test` of pieces go to test, `valid` to valid."""
    if not (0 <= valid and 0 <= test and valid + test < 1):
        raise ValueError(f"split fractions: expected valid, test >= 0 with sum < 1, got {valid}, {test}")
    u = piece_unit(piece)
    if u < test:
        return "test"
    if u < test + valid:
        return "valid"
    return "train"
