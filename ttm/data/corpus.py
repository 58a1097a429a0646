"""Symbolic sources from the music21 corpus, parsed once and cached as note events.

A music21 parse is slow (an Essen opus file of 313 tunes takes ~25 s), so each corpus
file is parsed once into plain note events and cached as JSON under `cache_dir()`
(`$TTM_BENCH_CACHE`, default `~/.cache/ttm-bench/corpus`), keyed by the file's corpus path.

A piece is a list of parts (highest first); a part is an array `[n, 3]` of
(onset, duration, MIDI pitch), onsets and durations in quarter notes. Piece ids:
a one-score file is its corpus path without extension (`bach/bwv66.6`); a tune of a
multi-tune ABC file is `PATH#NUMBER` (`oneills1850/0001-0050#12`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ttm.data.manifest import assign_split, piece_unit
from ttm.util import atomic_write_text

CACHE_VERSION = 1
STYLES: tuple[str, ...] = ("chorale", "folk", "renaissance", "quartet")

# Spelling of the 12 tonics per mode (the usual key-signature spellings).
MAJOR_NAMES = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MINOR_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B")


def key_name(tonic_pc: int, mode: str) -> str:
    """`(6, "minor") -> "F#"`."""
    return (MAJOR_NAMES if mode == "major" else MINOR_NAMES)[tonic_pc % 12]


@dataclass
class Piece:
    piece: str  # piece id, e.g. "bach/bwv66.6"
    style: str
    source: str  # corpus path of the file, e.g. "bach/bwv66.6.mxl"
    title: str
    meter: str | None  # first time signature, e.g. "3/4"
    parts: list[np.ndarray]  # each [n, 3]: onset (quarters), duration (quarters), MIDI pitch; highest part first

    @property
    def length(self) -> float:
        """End of the last note, in quarter notes."""
        return max(float((p[:, 0] + p[:, 1]).max()) for p in self.parts)

    @property
    def split(self) -> str:
        return assign_split(self.piece)


# ----------------------------------------------------------------------------- key analysis


@lru_cache(maxsize=1)
def _key_profiles() -> np.ndarray:
    """music21's Aarden-Essen key profiles (its default for `analyze('key')`) rotated to all
    24 keys and standardised: `[24, 12]`, rows = major keys on C..B, then minor keys."""
    from music21.analysis.discrete import AardenEssen

    ae = AardenEssen()
    prof = [np.asarray(ae.getWeights(m), dtype=np.float64) for m in ("major", "minor")]
    rot = np.stack([np.roll(prof[m], t) for m in range(2) for t in range(12)])  # [24, 12]
    rot = rot - rot.mean(-1, keepdims=True)
    return rot / rot.std(-1, keepdims=True)


@dataclass(frozen=True)
class KeyEstimate:
    tonic: int  # pitch class 0..11
    mode: str  # "major" | "minor"
    r: float  # correlation of the best key
    margin: float  # best minus second-best correlation

    @property
    def name(self) -> str:
        return key_name(self.tonic, self.mode)


def estimate_key(parts: list[np.ndarray]) -> KeyEstimate | None:
    """Krumhansl-Schmuckler key finding (music21's method and profiles) on duration-weighted
    pitch classes of note events `[n, 3]`. None when there are fewer than 3 pitch classes."""
    hist = np.zeros(12)
    for p in parts:
        if len(p):
            np.add.at(hist, p[:, 2].astype(np.int64) % 12, p[:, 1])
    if np.count_nonzero(hist) < 3:
        return None
    h = (hist - hist.mean()) / hist.std()
    corr = _key_profiles() @ h / 12.0  # [24] Pearson correlations: major tonics 0..11, then minor
    order = np.argsort(-corr, kind="stable")
    best = int(order[0])
    return KeyEstimate(best % 12, "major" if best < 12 else "minor", float(corr[best]), float(corr[best] - corr[order[1]]))


# ----------------------------------------------------------------------------- the sources


def corpus_root() -> Path:
    import music21

    return Path(music21.__file__).parent / "corpus"


@lru_cache(maxsize=1)
def _core_paths() -> tuple[str, ...]:
    from music21 import corpus

    root = str(corpus_root()) + os.sep
    return tuple(sorted(str(p)[len(root):] for p in corpus.getCorePaths() if str(p).startswith(root)))


def _is_chorale(p: str) -> bool:
    m = re.fullmatch(r"bach/bwv(\d+)(\.\d+)?\.mxl", p)
    return bool(m) and m.group(1) != "846"  # bwv846 is a prelude and fugue


def _is_quartet(p: str) -> bool:
    # haydn, mozart and beethoven string quartets (k545 is a piano sonata; opus133 is a huge fugue)
    return p.endswith(".mxl") and p.split("/")[0] in ("haydn", "mozart", "beethoven") and not any(
        x in p for x in ("k545", "opus133")
    )


def _is_renaissance(p: str) -> bool:
    return (
        p.startswith("josquin/")
        or (p.startswith("palestrina/") and p.endswith(".krn"))
        or re.fullmatch(r"monteverdi/madrigal\.3\.\d+\.mxl", p) is not None
    )


# Multi-tune folk collections, cheapest (smallest) first within each group.
_FOLK_OPUS_DIRS = ("oneills1850", "essenFolksong", "miscFolk")


def is_opus_source(path: str) -> bool:
    """True for ABC files that hold many tunes (each tune is its own piece)."""
    return path.split("/")[0] in _FOLK_OPUS_DIRS + ("airdsAirs", "nottingham-dataset")


def single_piece_id(path: str) -> str:
    """Piece id of a one-piece file: its corpus path without extension."""
    return os.path.splitext(path)[0]


def candidates(style: str) -> list[str]:
    """Corpus files usable for a style, in a stable order (cheap files first where it matters)."""
    paths = _core_paths()
    root = corpus_root()
    if style == "chorale":
        out = [p for p in paths if _is_chorale(p)]
        return sorted(out, key=lambda p: piece_unit("order:" + p))  # spread over the catalogue
    if style == "folk":
        singles = sorted((p for p in paths if p.startswith("ryansMammoth/")), key=lambda p: piece_unit("order:" + p))
        opus = sorted(
            (p for p in paths if p.split("/")[0] in _FOLK_OPUS_DIRS and p.endswith(".abc")),
            key=lambda p: ((root / p).stat().st_size, p),
        )
        return singles + opus
    if style == "renaissance":
        out = [p for p in paths if _is_renaissance(p)]
        return sorted(out, key=lambda p: (not p.startswith("josquin/"), piece_unit("order:" + p)))
    if style == "quartet":
        return sorted((p for p in paths if _is_quartet(p)), key=lambda p: ((root / p).stat().st_size, p))
    raise ValueError(f"style: expected one of {', '.join(STYLES)}, got {style!r}")


def select_sources(style: str, n_single: int, n_opus: int = 0) -> list[str]:
    """Choose corpus files for a style without parsing anything.

    One-piece files are chosen so that every split gets pieces (splits are by the hash of
    the piece id): about 10% test, 10% valid, at least one each when `n_single >= 3`.
    `n_opus` multi-tune files (folk only) are added after them.
    """
    cand = candidates(style)
    singles = [p for p in cand if not is_opus_source(p)]
    opus = [p for p in cand if is_opus_source(p)]
    n_single = min(n_single, len(singles))
    q_eval = max(1, round(0.1 * n_single)) if n_single >= 3 else 0
    quota = {"test": q_eval, "valid": q_eval, "train": n_single - 2 * q_eval}
    chosen: list[str] = []
    for p in singles:
        s = assign_split(single_piece_id(p))
        if quota[s] > 0:
            quota[s] -= 1
            chosen.append(p)
    return chosen + opus[: max(0, n_opus)]


# ----------------------------------------------------------------------------- parsing and the cache


def cache_dir() -> Path:
    return Path(os.environ.get("TTM_BENCH_CACHE") or Path.home() / ".cache" / "ttm-bench" / "corpus")


def _cache_file(path: str, root: Path) -> Path:
    return root / (re.sub(r"[^A-Za-z0-9._-]+", "__", path) + ".json")


def _part_events(part) -> np.ndarray:
    """Note events `[n, 3]` of one music21 part (tied notes merged, chords split, grace notes dropped)."""
    rows: list[list[float]] = []
    open_ties: dict[int, int] = {}  # MIDI pitch -> row of the note its tie started
    for n in part.flatten().notes:
        dur = float(n.quarterLength)
        if dur <= 0:
            continue
        on = float(n.offset)
        members = n.notes if n.isChord else (n,)
        for m in members:
            if not hasattr(m, "pitch"):
                continue
            pitch = int(m.pitch.midi)
            tie = (m.tie or (n.tie if n.isChord else None))
            kind = tie.type if tie is not None else None
            if kind in ("continue", "stop") and pitch in open_ties:
                row = rows[open_ties[pitch]]
                row[1] = max(row[1], on + dur - row[0])
                if kind == "stop":
                    del open_ties[pitch]
                continue
            rows.append([on, dur, float(pitch)])
            if kind == "start":
                open_ties[pitch] = len(rows) - 1
            else:
                open_ties.pop(pitch, None)
    arr = np.round(np.array(sorted(rows), dtype=np.float64).reshape(-1, 3), 4)
    return arr


def _score_piece(score, piece_id: str, style: str, source: str, fallback_title: str, more_parts=()) -> dict | None:
    parts = []
    for part in list(score.parts) + list(more_parts):
        ev = _part_events(part)
        if len(ev) >= 2:
            parts.append(ev)
    if not parts:
        return None
    parts.sort(key=lambda p: -float(p[:, 2].mean()))  # highest part first
    ts = next(iter(score.parts[0].flatten().getElementsByClass("TimeSignature")), None) if score.parts else None
    md = score.metadata
    title = (md.title if md is not None and md.title else "") or fallback_title
    return {
        "piece": piece_id,
        "style": style,
        "source": source,
        "title": str(title),
        "meter": ts.ratioString if ts is not None else None,
        "parts": [p.tolist() for p in parts],
    }


def parse_source(path: str, style: str) -> list[dict]:
    """Parse one corpus file with music21 into JSON-able pieces."""
    from music21 import converter, stream

    obj = converter.parseFile(str(corpus_root() / path), forceSource=True, storePickle=False)
    base = single_piece_id(path)
    if isinstance(obj, stream.Opus):
        if path.startswith("josquin/"):  # the ABC file holds one voice per tune: one piece of all voices
            scores = list(obj.scores)
            others = [pt for sc in scores[1:] for pt in sc.parts]
            p = _score_piece(scores[0], base, style, path, base, more_parts=others)
            return [p] if p is not None else []
        else:
            pieces = []
            for i, sc in enumerate(obj.scores):
                num = sc.metadata.number if sc.metadata is not None and sc.metadata.number else i + 1
                p = _score_piece(sc, f"{base}#{num}", style, path, f"{base} #{num}")
                if p is not None and p["piece"] not in {q["piece"] for q in pieces}:
                    pieces.append(p)
            return pieces
    if isinstance(obj, stream.Part):
        s = stream.Score()
        s.insert(0, obj)
        obj = s
    p = _score_piece(obj, base, style, path, base)
    return [p] if p is not None else []


def _parse_to_cache(path: str, style: str, root: str) -> str:
    import music21

    try:
        pieces, error = parse_source(path, style), None
    except Exception as e:  # noqa: BLE001 -- a file this music21 cannot read is left out, and said so
        pieces, error = [], f"{type(e).__name__}: {e}"
    doc = {"version": CACHE_VERSION, "music21": music21.__version__, "source": path, "pieces": pieces, "error": error}
    f = _cache_file(path, Path(root))
    atomic_write_text(f, json.dumps(doc, separators=(",", ":")))
    return path


def _read_cache(path: str, root: Path) -> list[Piece] | None:
    import music21

    f = _cache_file(path, root)
    if not f.is_file():
        return None
    try:
        doc = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if doc.get("version") != CACHE_VERSION or doc.get("music21") != music21.__version__ or doc.get("source") != path:
        return None
    return [
        Piece(
            piece=d["piece"],
            style=d["style"],
            source=d["source"],
            title=d["title"],
            meter=d["meter"],
            parts=[np.asarray(p, dtype=np.float64).reshape(-1, 3) for p in d["parts"]],
        )
        for d in doc["pieces"]
    ]


def load_sources(
    sources: list[tuple[str, str]], cache: Path | None = None, workers: int = 2, progress: bool = False
) -> list[Piece]:
    """Pieces of `(corpus path, style)` files, parsing (in `workers` processes) only those not cached."""
    root = Path(cache) if cache is not None else cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    missing = [(p, s) for p, s in sources if _read_cache(p, root) is None]
    if missing:
        from tqdm import tqdm

        bar = tqdm(total=len(missing), desc="parse corpus", unit="file", disable=not progress)
        if workers > 1 and len(missing) >= 3:
            import multiprocessing as mp

            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
            # the largest files first, so the two workers finish together
            order = sorted(missing, key=lambda ps: -(corpus_root() / ps[0]).stat().st_size)
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
                for _ in ex.map(_parse_to_cache, *zip(*order), [str(root)] * len(order)):
                    bar.update(1)
        else:
            for p, s in missing:
                _parse_to_cache(p, s, str(root))
                bar.update(1)
        bar.close()
    pieces: list[Piece] = []
    for p, style in sources:
        got = _read_cache(p, root)
        if got is None:
            raise ValueError(f"{_cache_file(p, root)}: corpus cache entry for {p!r} missing after parsing")
        if not got:
            err = json.loads(_cache_file(p, root).read_text()).get("error")
            warnings.warn(f"corpus file {p!r} gives no piece ({err or 'no pitched part'}); left out", stacklevel=2)
        for piece in got:
            piece.style = style
        pieces.extend(got)
    return pieces
