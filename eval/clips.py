"""The clips an evaluation reads: generated (a folder with samples.jsonl) and reference (a manifest
split or a folder), the bad-audio rule, and pairing by reference id.

Bad audio is refused: every clip is checked before any metric (`check_audio`); a clip that is
unreadable, empty, non-finite, outside [-1, 1], silent after the down-mix to mono or shorter
than `MIN_SCORED_S` stops the evaluation with an error naming each file and its defect. Bad
clips are never scored, padded or silently dropped (dropping would flatter a model).

Pairing: a generated clip names the reference clip it was generated for by its samples.jsonl
`ref_id` (written by `ttm-bench generate` for split-driven prompts); paired metrics pair 1:1 by
it, never by caption text (captions repeat).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from ttm.data.manifest import read_manifest, resolve_audio, split_entries
from ttm.util import read_jsonl_objects

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
SILENT_PEAK = 1e-4  # -80 dBFS, after the down-mix to mono
MIN_SCORED_S = 0.5  # shorter clips are refused
MAX_PEAK = 1.0 + 1e-3  # float files beyond this are out of range


@dataclass
class Clip:
    path: Path
    file: str  # as written in the CSV
    caption: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    seed: Any = None
    ref: str | None = None  # optional explicit reference id (samples.jsonl `ref_id`)


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTS and p.is_file())


def read_generated(folder: Path) -> list[Clip]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--generated {folder}: folder not found")
    meta = folder / "samples.jsonl"
    clips: list[Clip] = []
    if not meta.is_file():
        for p in _audio_files(folder):
            clips.append(Clip(path=p, file=str(p.relative_to(folder)), id=str(p.relative_to(folder))))
    else:
        for lineno, obj in read_jsonl_objects(meta):
            if not isinstance(obj.get("file"), str):
                raise ValueError(f"{meta}:{lineno}: field 'file': expected the audio file name relative to {folder}")
            p = folder / obj["file"]
            if not p.is_file():
                raise FileNotFoundError(f"{meta}:{lineno}: audio file {p} not found")
            attrs = obj.get("attributes") or {}
            if not isinstance(attrs, dict):
                raise ValueError(f"{meta}:{lineno}: field 'attributes': expected an object, got {type(attrs).__name__}")
            clips.append(
                Clip(path=p, file=obj["file"], caption=str(obj.get("caption") or ""), attributes=attrs,
                     id=obj["file"], seed=obj.get("seed"), ref=obj.get("ref_id"))
            )
    if not clips:
        raise ValueError(f"--generated {folder}: no audio clips found")
    return clips


def read_reference(ref: Path, split: str) -> tuple[list[Clip], bool]:
    """Reference clips and whether they come from a manifest (with captions and attributes)."""
    ref = Path(ref)
    if ref.is_dir():
        files = _audio_files(ref)
        if not files:
            raise ValueError(f"--reference {ref}: no audio files in the folder")
        return [Clip(path=p, file=str(p.relative_to(ref)), id=str(p.relative_to(ref))) for p in files], False
    if not ref.is_file():
        raise FileNotFoundError(f"--reference {ref}: not a manifest file or a folder of audio")
    entries = split_entries(read_manifest(ref), split)
    if not entries:
        raise ValueError(f"--reference {ref}: no clips in split {split!r}")
    clips = []
    for e in entries:
        p = resolve_audio(ref, e)
        if not p.is_file():
            raise FileNotFoundError(f"{ref}: entry {e.id!r}: audio file {p} not found")
        clips.append(Clip(path=p, file=e.path, caption=e.caption, attributes=dict(e.attributes), id=e.id))
    return clips, True


def audio_defect(path: Path) -> str:
    """What is wrong with one audio file for scoring, or "" when nothing is: unreadable, empty,
    non-finite samples, samples outside [-1, 1], silent after the down-mix to mono, shorter than
    `MIN_SCORED_S`. Checked on the file's own samples, before any resampling or embedding."""
    try:
        x, sr = sf.read(str(path), dtype="float64", always_2d=True)  # [N, C]
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        return f"unreadable audio ({e})"
    if x.shape[0] == 0:
        return "empty (0 samples)"
    bad = ~np.isfinite(x)
    if bad.any():
        return f"non-finite samples ({int(np.isnan(x).sum())} NaN, {int(np.isinf(x).sum())} Inf)"
    peak = float(np.abs(x).max())
    if peak > MAX_PEAK:
        return f"samples out of range: peak {peak:.4g} (expected within [-1, 1])"
    mono_peak = float(np.abs(x.mean(1)).max())
    if mono_peak < SILENT_PEAK:
        what = "silent" if peak < SILENT_PEAK else f"silent after the down-mix to mono (channel peak {peak:.3g})"
        return f"{what}: mono peak {mono_peak:.3g} < {SILENT_PEAK:g}"
    if x.shape[0] < MIN_SCORED_S * sr:
        return f"too short: {x.shape[0] / sr:.3f} s (at least {MIN_SCORED_S} s)"
    return ""


def check_audio(clips: list[Clip], what: str) -> None:
    """The bad-audio rule: refuse. Every clip is checked before any metric; when any has a defect
    (see `audio_defect`), evaluation stops with an error naming each file and its defect. Bad
    clips are never scored, padded or silently dropped (dropping would flatter a model)."""
    bad = [(c.path, d) for c in clips if (d := audio_defect(c.path))]
    if bad:
        lines = "\n".join(f"  {p}: {d}" for p, d in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise ValueError(f"{what}: {len(bad)} of {len(clips)} clips cannot be scored:\n{lines}{more}")


def _caption_key(c: str) -> str:
    return " ".join(c.split()).lower()


def pair_by_id(gen: list[Clip], ref: list[Clip], has_ids: bool = True) -> list[int | None]:
    """For each generated clip, the index of the reference clip it was generated for (its
    samples.jsonl `ref_id`, written by `ttm-bench generate` for split-driven prompts), or None for
    a free-text prompt. Pairing is 1:1 by id, never by caption text (captions repeat). A `ref_id`
    that is not in the reference is an error; a reference folder (`has_ids` False) has no ids, so
    nothing pairs."""
    if not has_ids:
        return [None] * len(gen)
    by_id = {c.id: i for i, c in enumerate(ref)}
    out: list[int | None] = []
    for g in gen:
        if g.ref is None:
            out.append(None)
        elif g.ref in by_id:
            out.append(by_id[g.ref])
        else:
            raise ValueError(f"generated clip {g.file!r}: ref_id {g.ref!r} is not a clip of the reference set")
    return out


def attributes_by_caption(gen: list[Clip], ref: list[Clip]) -> list[list[int]]:
    """For each generated clip, the reference clips with its caption (whitespace and case ignored):
    only used to look up caption attributes for a sample that has none, never to pair clips."""
    by_cap: dict[str, list[int]] = {}
    for i, c in enumerate(ref):
        if c.caption:
            by_cap.setdefault(_caption_key(c.caption), []).append(i)
    return [by_cap.get(_caption_key(g.caption), []) if g.caption else [] for g in gen]
