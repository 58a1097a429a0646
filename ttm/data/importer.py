"""Import user (audio, caption) pairs as a standard dataset.

The source is JSONL with at least `path` (relative to the source file's folder, or
absolute) and `caption`; optional `id`, `piece`, `split` and `attributes`. Each
usable file is decoded, mixed to mono, resampled to `sample_rate` and COPIED to
`DIR/audio/ID.wav`, so the dataset is self-contained and at one rate. Unreadable,
silent or too-short audio and malformed lines are skipped, and each is listed with
its reason in `DIR/import_report.json`, as are lines that are not valid UTF-8 and clips longer
than `max_seconds` (default 30 s, the study's clip length: token shards pad every clip to the
longest one, so one very long file would make every training batch that long). Missing splits are assigned by the hash of the
piece id (a file is its own piece unless `piece` says otherwise).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ttm.audio import load_audio, save_audio
from ttm.data.manifest import SPLITS, Entry, assign_split, write_manifest
from ttm.data.render import silence_reason
from ttm.util import atomic_write_text


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-.") or "clip"


def _item(obj, lineno: int, base: Path) -> tuple[dict, str | None]:
    """Checked fields of one source line, or the reason to skip it."""
    if not isinstance(obj, dict):
        return {}, f"line {lineno}: expected a JSON object"
    for k in ("path", "caption"):
        if not isinstance(obj.get(k), str) or not obj[k].strip():
            return {}, f"field '{k}': expected a non-empty string"
    for k in ("id", "piece"):
        if k in obj and (not isinstance(obj[k], str) or not obj[k].strip()):
            return {}, f"field '{k}': expected a non-empty string"
    if "split" in obj and obj["split"] not in SPLITS:
        return {}, f"field 'split': expected one of {', '.join(SPLITS)}, got {obj['split']!r}"
    if not isinstance(obj.get("attributes", {}), dict):
        return {}, "field 'attributes': expected an object"
    p = Path(obj["path"]).expanduser()
    return {**obj, "abs": p if p.is_absolute() else base / p}, None


def import_manifest(
    src: str | os.PathLike,
    out: str | os.PathLike,
    min_seconds: float = 1.0,
    sample_rate: int = 16000,
    progress: bool = False,
    max_seconds: float = 30.0,
) -> Path:
    """Import `src` into `out`; return the path of the written `manifest.jsonl`."""
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: source manifest not found")
    if min_seconds < 0:
        raise ValueError(f"min_seconds: expected >= 0, got {min_seconds}")
    if max_seconds <= min_seconds:
        raise ValueError(f"max_seconds: expected > min_seconds ({min_seconds}), got {max_seconds}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate: expected > 0, got {sample_rate}")
    from tqdm import tqdm

    lines = src.read_bytes().splitlines()
    entries: list[Entry] = []
    skipped: list[dict] = []
    ids: set[str] = set()
    report = {"source": str(src.resolve()), "min_seconds": min_seconds, "max_seconds": max_seconds,
              "sample_rate": sample_rate}
    complete = False
    try:
        for lineno, raw in enumerate(tqdm(lines, desc="import", unit="file", disable=not progress), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skipped.append({"line": lineno, "path": None,
                                "reason": f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"})
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.append({"line": lineno, "path": None, "reason": f"invalid JSON ({e.msg})"})
                continue
            item, why = _item(obj, lineno, src.parent)
            if why is None:
                why = _import_one(item, out, (min_seconds, max_seconds), sample_rate, ids, entries)
            if why is not None:
                path = obj.get("path") if isinstance(obj, dict) else None
                skipped.append({"line": lineno, "path": str(item.get("abs", path)) if path else None, "reason": why})
        complete = True
    finally:
        report.update(complete=complete, kept=len(entries), skipped=len(skipped), skipped_items=skipped)
        atomic_write_text(out / "import_report.json", json.dumps(report, indent=1) + "\n")
    if not entries:
        raise ValueError(f"{src}: no usable audio ({len(skipped)} skipped, reasons in {out / 'import_report.json'})")
    man = out / "manifest.jsonl"
    write_manifest(man, entries)
    return man


def _import_one(
    item: dict, out: Path, limits: tuple[float, float], sr: int, ids: set[str], entries: list[Entry]
) -> str | None:
    min_seconds, max_seconds = limits
    path: Path = item["abs"]
    if not path.is_file():
        return "file not found"
    try:
        wav = load_audio(path, sample_rate=sr, channels=1)  # [1, N]
    except Exception as e:  # noqa: BLE001 -- any decoder failure is a skip, never the end of the run
        return f"unreadable audio ({e})"
    dur = wav.shape[-1] / sr
    if dur < min_seconds:
        return f"too short ({dur:.2f} s < {min_seconds:.2f} s)"
    if dur > max_seconds:
        return f"too long ({dur:.1f} s > {max_seconds:.1f} s; cut it into clips, or raise max_seconds)"
    why = silence_reason(wav.numpy()[0], sr, max_quiet=1.0)
    if why is not None:
        return why
    if "id" in item:
        cid = _slug(item["id"])
    else:
        cid = f"{_slug(path.stem)}-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    if cid in ids:
        return f"duplicate id {cid!r}"
    piece = item.get("piece", cid)
    try:
        save_audio(out / "audio" / f"{cid}.wav", wav, sr)
    except OSError as e:
        return f"cannot write audio ({e})"
    ids.add(cid)
    entries.append(
        Entry(
            id=cid,
            path=f"audio/{cid}.wav",
            caption=item["caption"].strip(),
            split=item.get("split") or assign_split(piece),
            piece=piece,
            duration=round(dur, 6),
            sample_rate=sr,
            attributes=item.get("attributes", {}),
        )
    )
    return None
