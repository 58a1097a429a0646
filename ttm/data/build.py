"""Build a captioned music dataset from the music21 corpus, rendered with TinySoundFont.

Each clip is a short excerpt of a piece (chorale, folk tune, Renaissance polyphony,
Classical quartet), played at a chosen tempo with a chosen General MIDI instrument
(or a section of them), transposed, rendered to mono 16 kHz and loudness-normalised.
Its attributes (instrument, family, tempo, key, mode, style, texture) are balanced
within every split, and its caption states them. Splits are by piece.

Output under DIR: `audio/*.wav`, `card.json`, `card.md` and, written last,
`manifest.jsonl`. The same preset and seed give the same manifest bytes and audio.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ttm.audio import save_audio
from ttm.data import corpus as C
from ttm.data.captions import make_caption
from ttm.data.manifest import SPLITS, Entry, manifest_text, read_manifest
from ttm.data.render import (
    ENSEMBLES,
    FAMILIES,
    INSTRUMENTS,
    SOLO,
    Part,
    fade_out,
    fit_range,
    normalize_loudness,
    render_parts,
    silence_reason,
    soundfont_path,
    voice_instruments,
)
from ttm.util import atomic_write_text

BUILDER_VERSION = 1
SAMPLE_RATE = 16000
TEMPO_CLASSES: dict[str, tuple[int, int]] = {"slow": (56, 76), "moderate": (84, 116), "fast": (126, 160)}
MAX_PARTS = 6


def tempo_class(bpm: float) -> str:
    """slow < 80 <= moderate <= 120 < fast."""
    return "slow" if bpm < 80 else ("moderate" if bpm <= 120 else "fast")


@dataclass(frozen=True)
class Preset:
    name: str
    clips: int
    duration: float  # seconds per clip
    files: dict[str, tuple[int, int]] = field(default_factory=dict)  # style -> (one-piece files, multi-tune files)


PRESETS: dict[str, Preset] = {
    # "micro" is for tests: a few cheap files, a couple of seconds to build from a cold cache.
    "micro": Preset("micro", 16, 3.0, {"chorale": (3, 0), "folk": (4, 0), "renaissance": (3, 0), "quartet": (3, 0)}),
    "tiny": Preset("tiny", 48, 4.0, {"chorale": (6, 0), "folk": (8, 0), "renaissance": (5, 0), "quartet": (4, 0)}),
    "small": Preset("small", 300, 5.0, {"chorale": (40, 0), "folk": (40, 1), "renaissance": (16, 0), "quartet": (10, 0)}),
    "default": Preset(
        "default", 960, 6.0, {"chorale": (120, 0), "folk": (100, 2), "renaissance": (30, 0), "quartet": (20, 0)}
    ),
}
PUBLIC_PRESETS = ("tiny", "small", "default")


# ----------------------------------------------------------------------------- planning


@dataclass
class Clip:
    id: str
    split: str
    piece: C.Piece
    start: float  # excerpt start in quarter notes
    bpm: float
    transpose: int
    texture: str
    family: str
    instrument: str  # solo instrument or ensemble name
    voices: list[str]  # instrument of each rendered part, highest first
    parts: list[np.ndarray]  # the excerpt's notes per part, [n, 3] quarter notes from the excerpt start
    key: C.KeyEstimate  # of the excerpt before transposition


def _balanced(values: list, n: int, rng: np.random.Generator) -> list:
    """`n` values with counts as equal as possible, in random order."""
    # which values get the extra copies is random too
    order = list(rng.permutation(len(values)))
    reps = [values[order[i % len(values)]] for i in range(n)]
    return [reps[i] for i in rng.permutation(n)]


def _skyline(p: np.ndarray) -> np.ndarray:
    """The highest note at each onset: one melodic line from a part with chords."""
    if len(p) == 0:
        return p
    order = np.lexsort((-p[:, 2], p[:, 0]))
    q = p[order]
    keep = np.ones(len(q), bool)
    keep[1:] = q[1:, 0] != q[:-1, 0]
    return q[keep]


def _window(p: np.ndarray, start: float, length: float) -> np.ndarray:
    """Notes of `p` sounding in [start, start + length), re-timed from the window start `[n, 3]`."""
    end = start + length
    sel = (p[:, 0] < end) & (p[:, 0] + p[:, 1] > start)
    q = p[sel].copy()
    if len(q) == 0:
        return q
    on = np.maximum(q[:, 0], start)
    off = np.minimum(q[:, 0] + q[:, 1], end)
    q[:, 0] = on - start
    q[:, 1] = off - on
    return q[q[:, 1] > 1e-6]


def _coverage(parts: list[np.ndarray], length: float) -> float:
    """Fraction of the window in which at least one note sounds."""
    iv = sorted((float(a), float(a + d)) for p in parts for a, d, _ in p)
    covered, cur_a, cur_b = 0.0, None, None
    for a, b in iv:
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                covered += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        covered += cur_b - cur_a
    return covered / length


class _Planner:
    def __init__(self, pieces: list[C.Piece], preset: Preset, seed: int):
        self.preset, self.seed = preset, seed
        self.rng = np.random.default_rng([seed, BUILDER_VERSION])
        self.piece_key = {p.piece: C.estimate_key(p.parts) for p in pieces}
        self.pools: dict[tuple[str, str], list[C.Piece]] = defaultdict(list)
        for p in pieces:
            if self.piece_key[p.piece] is not None:  # a piece without a key estimate is not used
                self.pools[(p.split, p.style)].append(p)
        self.uses: Counter = Counter()
        self.inst_cycle: dict[tuple[str, str], list[str]] = {}

    def _instrument(self, family: str, texture: str) -> str:
        k = (family, texture)
        if not self.inst_cycle.get(k):
            names = list(SOLO[family]) if texture == "solo" else [e.name for e in ENSEMBLES[family]]
            self.inst_cycle[k] = [names[i] for i in self.rng.permutation(len(names))]
        return self.inst_cycle[k].pop()

    def _excerpt(self, piece: C.Piece, texture: str, length: float):
        """Random excerpt of a piece: (start, parts, key) or None when no window suits.

        Solo: one part (the highest first, then the others), reduced to a single line.
        Ensemble: all parts (at most MAX_PARTS) with notes in the window, at least two.
        """
        if texture == "solo":
            order = [0] + [int(i) + 1 for i in self.rng.permutation(len(piece.parts) - 1)]
            choices = [[_skyline(piece.parts[i])] for i in order]
        else:
            choices = [piece.parts[:MAX_PARTS]]
        pk = self.piece_key[piece.piece]
        for lines in choices:
            onsets = np.unique(lines[0][:, 0])
            onsets = onsets[onsets + length <= piece.length + 1e-6]
            for start in self.rng.choice(onsets, size=min(24, len(onsets)), replace=False):
                parts = [w for w in (_window(p, float(start), length) for p in lines) if len(w)]
                if texture == "ensemble" and len(parts) < 2:
                    continue
                if _coverage(parts, length) < 0.85 or sum(len(w) for w in parts) < 3:
                    continue
                est = C.estimate_key(parts)
                if est is None:
                    continue
                agrees = (est.tonic, est.mode) == (pk.tonic, pk.mode)
                if agrees or (est.r >= 0.75 and est.margin >= 0.1):
                    return float(start), parts, est
        return None

    def _pick(self, split: str, style: str, texture: str, mode: str, length: float):
        pool = self.pools[(split, style)]
        # least-used pieces first, pieces in the wanted mode before the others
        tie = self.rng.random(len(pool))
        order = sorted(
            range(len(pool)),
            key=lambda i: (self.uses[pool[i].piece], self.piece_key[pool[i].piece].mode != mode, tie[i]),
        )
        fallback = None
        for i in order[:10]:
            got = self._excerpt(pool[i], texture, length)
            if got is None:
                continue
            if got[2].mode == mode:
                return pool[i], got
            if fallback is None:
                fallback = (pool[i], got)
        return fallback

    def plan(self) -> list[Clip]:
        n = self.preset.clips
        n_eval = max(1, round(0.1 * n))
        sizes = {"train": n - 2 * n_eval, "valid": n_eval, "test": n_eval}
        clips: list[Clip] = []
        for split in SPLITS:
            styles = [s for s in C.STYLES if self.pools.get((split, s))]
            if not styles:
                raise ValueError(f"preset {self.preset.name!r}: no piece falls in split {split!r}")
            m = sizes[split]
            style_l = _balanced(styles, m, self.rng)
            family_l = _balanced(list(FAMILIES), m, self.rng)
            tempo_l = _balanced(list(TEMPO_CLASSES), m, self.rng)
            tonic_l = _balanced(list(range(12)), m, self.rng)  # keys after transposition
            nonfolk = [i for i, s in enumerate(style_l) if s != "folk"]
            n_ens = min(len(nonfolk), round(m / 2))
            ens = {int(nonfolk[i]) for i in self.rng.permutation(len(nonfolk))[:n_ens]}
            modes: Counter = Counter()
            for j in range(m):
                style, family, tclass = style_l[j], family_l[j], tempo_l[j]
                texture = "ensemble" if j in ens else "solo"
                lo, hi = TEMPO_CLASSES[tclass]
                bpm = float(self.rng.integers(lo, hi + 1))
                length = self.preset.duration * bpm / 60.0  # quarter notes
                want = "major" if modes["major"] < modes["minor"] else "minor"
                if modes["major"] == modes["minor"]:
                    want = ("major", "minor")[int(self.rng.integers(2))]
                # if no piece of this style in this split has a usable excerpt: solo, then another style
                tries = [(style, texture), (style, "solo")] + [(s, "solo") for s in styles if s != style]
                got = None
                for style, texture in tries:
                    if style == "folk":
                        texture = "solo"
                    got = self._pick(split, style, texture, want, length)
                    if got is not None:
                        break
                if got is None:
                    continue
                piece, (start, parts, key) = got
                self.uses[piece.piece] += 1
                modes[key.mode] += 1
                inst = self._instrument(family, texture)
                if texture == "solo":
                    voices = [inst]
                else:
                    ens_obj = next(e for e in ENSEMBLES[family] if e.name == inst)
                    voices = [v.name for v in voice_instruments(ens_obj, len(parts))]
                transpose = (tonic_l[j] - key.tonic) % 12
                transpose = transpose - 12 if transpose > 6 else transpose  # -5 .. 6 semitones
                slug = re.sub(r"[^A-Za-z0-9.]+", "-", piece.piece).strip("-")
                cid = f"{style}-{slug}-{len(clips):04d}-{inst.replace(' ', '-')}"
                clips.append(Clip(cid, split, piece, start, bpm, transpose, texture, family, inst, voices, parts, key))
        return clips


# ----------------------------------------------------------------------------- rendering


def _render(clip: Clip, duration: float, seed: int) -> tuple[np.ndarray | None, str | None, dict]:
    """Audio `[N]` (or None and why) and the attributes of a planned clip."""
    rng = np.random.default_rng([seed, BUILDER_VERSION, *clip.id.encode()])  # note velocities
    sec_per_q = 60.0 / clip.bpm
    parts = []
    for i, (notes, vname) in enumerate(zip(clip.parts, clip.voices)):
        inst = INSTRUMENTS[vname]
        pitch = fit_range(notes[:, 2] + clip.transpose, inst)
        sec = np.stack([notes[:, 0] * sec_per_q, notes[:, 1] * sec_per_q, pitch], axis=1)
        vel = rng.integers(76, 100, size=len(notes)) + (8 if i == 0 and len(clip.parts) > 1 else 0)
        parts.append(Part(inst.program, sec, np.clip(vel, 1, 127)))
    wav = render_parts(parts, duration, SAMPLE_RATE)
    tonic = (clip.key.tonic + clip.transpose) % 12
    attrs = {
        "instrument": clip.instrument,
        "program": INSTRUMENTS[clip.voices[0]].program,
        "family": clip.family,
        "tempo_bpm": clip.bpm,
        "tempo": tempo_class(clip.bpm),
        "key": C.key_name(tonic, clip.key.mode),
        "mode": clip.key.mode,
        "style": clip.piece.style,
        "texture": clip.texture,
        "n_parts": len(clip.parts),
        "part_instruments": list(clip.voices),
        "programs": [INSTRUMENTS[v].program for v in clip.voices],
        "meter": clip.piece.meter,
        "transpose": clip.transpose,
        "source": clip.piece.source,
        "excerpt_start": round(clip.start, 4),
    }
    why = silence_reason(wav, SAMPLE_RATE)
    if why is not None:
        return None, why, attrs
    return normalize_loudness(fade_out(wav, SAMPLE_RATE)), None, attrs


# ----------------------------------------------------------------------------- the card


CARD_KEYS = ("style", "family", "instrument", "texture", "tempo", "mode", "key")


def dataset_card(entries: list[Entry], extra: dict) -> dict:
    """Counts of each attribute value per split, pieces and hours per split."""
    per_split: dict[str, dict] = {}
    for split in SPLITS:
        es = [e for e in entries if e.split == split]
        per_split[split] = {
            "clips": len(es),
            "pieces": len({e.piece for e in es}),
            "hours": round(sum(e.duration for e in es) / 3600, 4),
            "counts": {
                k: dict(sorted(Counter(str(e.attributes.get(k)) for e in es if k in e.attributes).items()))
                for k in CARD_KEYS
            },
        }
    return {
        **extra,
        "clips": len(entries),
        "pieces": len({e.piece for e in entries}),
        "hours": round(sum(e.duration for e in entries) / 3600, 4),
        "splits": per_split,
    }


def card_markdown(card: dict) -> str:
    lines = [
        f"# Dataset card: preset `{card.get('preset')}`, seed {card.get('seed')}",
        "",
        (f"{card['clips']} clips from {card['pieces']} pieces, {card['hours']:.3f} hours, "
        f"{card.get('duration')} s each at {card.get('sample_rate')} Hz mono. "
        f"Built in {card.get('build_time_s')} s."),
        "",
        "| split | clips | pieces | hours |",
        "|---|---|---|---|",
    ]
    for s, d in card["splits"].items():
        lines.append(f"| {s} | {d['clips']} | {d['pieces']} | {d['hours']:.4f} |")
    for k in CARD_KEYS:
        values = sorted({v for d in card["splits"].values() for v in d["counts"].get(k, {})})
        lines += ["", f"## {k}", "", "| value | " + " | ".join(SPLITS) + " |", "|---|" + "---|" * len(SPLITS)]
        for v in values:
            lines.append(f"| {v} | " + " | ".join(str(card["splits"][s]["counts"][k].get(v, 0)) for s in SPLITS) + " |")
    if card.get("skipped"):
        lines += ["", "## Skipped renders", ""] + [f"- {s['id']}: {s['reason']}" for s in card["skipped"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- build


def _existing(out: Path, preset: str, seed: int) -> Path | None:
    """The manifest of a complete earlier build with the same recipe; raise if DIR holds another dataset."""
    man, card_f = out / "manifest.jsonl", out / "card.json"
    if not man.is_file():
        return None
    try:
        card = json.loads(card_f.read_text())
    except (OSError, json.JSONDecodeError):
        card = {}
    want = {"preset": preset, "seed": seed, "builder_version": BUILDER_VERSION}
    have = {k: card.get(k) for k in want}
    if have != want:
        raise ValueError(
            f"{man}: folder already holds a dataset ({have}); expected {want}. Use another --out or delete it"
        )
    return man


def build_dataset(
    preset: str, out: Path, seed: int = 0, progress: bool = True, workers: int = 2, cache: Path | None = None
) -> Path:
    """Build (or find already built) the dataset of a preset under `out`; return its manifest path."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(PUBLIC_PRESETS)}, got {preset!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    out = Path(out)
    done = _existing(out, preset, seed)
    if done is not None:
        return done
    t0 = time.time()
    p = PRESETS[preset]
    sources = [(f, style) for style in C.STYLES for f in C.select_sources(style, *p.files.get(style, (0, 0)))]
    pieces = C.load_sources(sources, cache=cache, workers=workers, progress=progress)
    clips = _Planner(pieces, p, seed).plan()

    from tqdm import tqdm

    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    entries: list[Entry] = []
    skipped: list[dict] = []
    for clip in tqdm(clips, desc=f"render {preset}", unit="clip", disable=not progress):
        wav, why, attrs = _render(clip, p.duration, seed)
        if wav is None:
            skipped.append({"id": clip.id, "reason": why})
            continue
        save_audio(audio_dir / f"{clip.id}.wav", wav[None], SAMPLE_RATE)
        caption = make_caption(attrs, random.Random(f"caption/{seed}/{clip.id}"))
        entries.append(
            Entry(
                id=clip.id,
                path=f"audio/{clip.id}.wav",
                caption=caption,
                split=clip.split,
                piece=clip.piece.piece,
                duration=p.duration,
                sample_rate=SAMPLE_RATE,
                attributes=attrs,
            )
        )
    keep = {f"{e.id}.wav" for e in entries}
    for f in audio_dir.glob("*.wav"):  # leftovers of an interrupted build with another recipe
        if f.name not in keep:
            f.unlink()
    import music21

    card = dataset_card(
        entries,
        {
            "preset": preset,
            "seed": seed,
            "builder_version": BUILDER_VERSION,
            "duration": p.duration,
            "sample_rate": SAMPLE_RATE,
            "planned": len(clips),
            "skipped": skipped,
            "sources": [s for s, _ in sources],
            "soundfont": Path(soundfont_path()).name,
            "music21": music21.__version__,
            "build_time_s": round(time.time() - t0, 2),
        },
    )
    atomic_write_text(out / "card.json", json.dumps(card, indent=1) + "\n")
    atomic_write_text(out / "card.md", card_markdown(card))
    man = out / "manifest.jsonl"
    atomic_write_text(man, manifest_text(entries))  # last: a manifest means a complete build
    read_manifest(man)  # validate what was written
    return man
