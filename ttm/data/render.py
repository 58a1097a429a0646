"""Render note events to audio with TinySoundFont and pretty_midi's bundled GM soundfont.

`render_parts` plays each part on its own MIDI channel with its own General MIDI
program and returns mono float32 audio. The synthesizer is loaded once per process and
fully reset before each render, so a render does not depend on the ones before it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Instrument:
    name: str
    program: int  # General MIDI program, 0-based
    family: str
    low: int  # usable MIDI pitch range
    high: int


_INSTRUMENTS = [
    Instrument("violin", 40, "strings", 55, 100),
    Instrument("viola", 41, "strings", 48, 88),
    Instrument("cello", 42, "strings", 36, 76),
    Instrument("piano", 0, "keyboard", 28, 100),
    Instrument("electric piano", 4, "keyboard", 33, 96),
    Instrument("harpsichord", 6, "keyboard", 29, 89),
    Instrument("organ", 19, "keyboard", 36, 96),
    Instrument("flute", 73, "woodwind", 60, 96),
    Instrument("oboe", 68, "woodwind", 58, 91),
    Instrument("clarinet", 71, "woodwind", 50, 91),
    Instrument("bassoon", 70, "woodwind", 34, 75),
    Instrument("trumpet", 56, "brass", 55, 82),
    Instrument("french horn", 60, "brass", 41, 77),
    Instrument("trombone", 57, "brass", 40, 72),
    Instrument("tuba", 58, "brass", 28, 58),
    Instrument("acoustic guitar", 24, "plucked", 40, 84),
    Instrument("harp", 46, "plucked", 24, 100),
    Instrument("banjo", 105, "plucked", 48, 84),
    Instrument("marimba", 12, "mallet", 45, 96),
    Instrument("vibraphone", 11, "mallet", 53, 89),
    Instrument("xylophone", 13, "mallet", 65, 105),
]
INSTRUMENTS: dict[str, Instrument] = {i.name: i for i in _INSTRUMENTS}
FAMILIES: tuple[str, ...] = ("strings", "keyboard", "woodwind", "brass", "plucked", "mallet")

# Solo (one melodic line) instruments of each family.
SOLO: dict[str, tuple[str, ...]] = {
    f: tuple(i.name for i in _INSTRUMENTS if i.family == f and i.name not in ("tuba",)) for f in FAMILIES
}


@dataclass(frozen=True)
class Ensemble:
    name: str  # the `instrument` attribute of an ensemble clip, e.g. "string ensemble" or "piano"
    family: str
    voices: tuple[str, ...]  # instruments from the highest voice to the lowest


# Several parts: mixed sections where a family has one, otherwise one instrument for all parts.
ENSEMBLES: dict[str, tuple[Ensemble, ...]] = {
    "strings": (Ensemble("string ensemble", "strings", ("violin", "violin", "viola", "cello")),),
    "keyboard": tuple(Ensemble(n, "keyboard", (n,)) for n in ("piano", "harpsichord", "organ", "electric piano")),
    "woodwind": (Ensemble("woodwind ensemble", "woodwind", ("flute", "oboe", "clarinet", "bassoon")),),
    "brass": (Ensemble("brass ensemble", "brass", ("trumpet", "french horn", "trombone", "tuba")),),
    "plucked": tuple(Ensemble(n, "plucked", (n,)) for n in ("acoustic guitar", "harp")),
    "mallet": tuple(Ensemble(n, "mallet", (n,)) for n in ("marimba", "vibraphone")),
}


def voice_instruments(ens: Ensemble, n_parts: int) -> list[Instrument]:
    """Instrument of each of `n_parts` parts (highest first), spreading the ensemble's voices."""
    v = ens.voices
    if n_parts <= 1:
        return [INSTRUMENTS[v[0]]]
    return [INSTRUMENTS[v[round(i * (len(v) - 1) / (n_parts - 1))]] for i in range(n_parts)]


def fit_range(pitches: np.ndarray, inst: Instrument) -> np.ndarray:
    """Shift a part by whole octaves to sit in the instrument's range; fold any stragglers in."""
    best, best_key = 0, None
    for k in range(-4, 5):
        q = pitches + 12 * k
        inside = np.mean((q >= inst.low) & (q <= inst.high))
        key = (-inside, abs(k), k)
        if best_key is None or key < best_key:
            best, best_key = k, key
    q = pitches + 12 * best
    while np.any(q < inst.low):
        q = np.where(q < inst.low, q + 12, q)
    while np.any(q > inst.high):
        q = np.where(q > inst.high, q - 12, q)
    return q


def soundfont_path() -> str:
    import pretty_midi

    path = os.path.join(os.path.dirname(pretty_midi.__file__), "TimGM6mb.sf2")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: pretty_midi's bundled soundfont TimGM6mb.sf2 not found")
    return path


@lru_cache(maxsize=4)
def _synth(sample_rate: int, pid: int):
    """One synthesizer per process and rate (loading the soundfont takes tens of ms)."""
    import tinysoundfont

    synth = tinysoundfont.Synth(samplerate=int(sample_rate), gain=-6.0)
    sfid = synth.sfload(soundfont_path())
    return synth, sfid


@dataclass
class Part:
    program: int
    notes: np.ndarray  # [n, 3]: start (s), duration (s), MIDI pitch
    velocity: np.ndarray  # [n] MIDI velocity 1..127


def render_parts(parts: list[Part], duration: float, sample_rate: int = 16000) -> np.ndarray:
    """Mono float32 audio `[round(duration * sample_rate)]` of the parts; notes are cut at `duration`."""
    import tinysoundfont
    from tinysoundfont.midi import Event, NoteOff, NoteOn

    if len(parts) > 15:
        raise ValueError(f"parts: at most 15 (MIDI channels less the drum channel), got {len(parts)}")
    synth, sfid = _synth(int(sample_rate), os.getpid())
    # Reset all channels and end all voices (a quick release), then run the synth until they are
    # silent: no state is left from the previous render.
    synth.soundfonts[sfid].reset()
    synth.generate_simple(int(0.25 * sample_rate))
    seq = tinysoundfont.Sequencer(synth)
    timed: list[tuple[float, int, int, Event]] = []
    for i, part in enumerate(parts):
        chan = i if i < 9 else i + 1  # channel 9 is the drum channel
        synth.program_select(chan, sfid, 0, int(part.program))
        for (start, dur, pitch), vel in zip(part.notes.tolist(), part.velocity.tolist()):
            if start >= duration or dur <= 0:
                continue
            end = min(start + dur - min(0.03, 0.15 * dur), duration)  # a little articulation gap
            key = int(pitch)
            timed.append((start, 1, len(timed), Event(NoteOn(key, int(vel)), t=start, channel=chan, persistent=False)))
            timed.append((end, 0, len(timed), Event(NoteOff(key), t=end, channel=chan, persistent=False)))
    timed.sort(key=lambda x: x[:3])  # note-offs before note-ons at the same time
    seq.add([e for *_, e in timed])
    n = round(duration * sample_rate)
    buf = synth.generate(n)
    stereo = np.frombuffer(buf, dtype=np.float32).reshape(-1, 2)[:n]  # [N, 2]
    return stereo.mean(axis=1).astype(np.float32)


def silence_reason(wav: np.ndarray, sample_rate: int, floor_db: float = -60.0, max_quiet: float = 0.5) -> str | None:
    """Why a clip counts as silent (None if it does not): too quiet overall, or more than
    `max_quiet` of its 50 ms frames more than 40 dB below its loudest frame."""
    x = np.asarray(wav, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return "empty audio"
    rms = float(np.sqrt(np.mean(x**2)))
    if rms <= 10 ** (floor_db / 20):
        return f"silent (RMS {20 * np.log10(rms + 1e-12):.1f} dBFS <= {floor_db:.0f} dBFS)"
    hop = max(1, int(0.05 * sample_rate))
    frames = x[: (x.size // hop) * hop].reshape(-1, hop) if x.size >= hop else x[None]
    frms = np.sqrt(np.mean(frames**2, axis=1)) + 1e-12
    quiet = float(np.mean(20 * np.log10(frms / frms.max()) < -40))
    if quiet > max_quiet:
        return f"mostly silent ({quiet:.0%} of 50 ms frames 40 dB below the loudest)"
    return None


def normalize_loudness(wav: np.ndarray, target_dbfs: float = -20.0, peak: float = 0.95) -> np.ndarray:
    """Scale to `target_dbfs` RMS, then down if needed so that no sample exceeds `peak`."""
    x = np.asarray(wav, dtype=np.float32)
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    if rms <= 0:
        raise ValueError("cannot normalise silent audio")
    g = 10 ** (target_dbfs / 20) / rms
    m = float(np.abs(x).max()) * g
    if m > peak:
        g *= peak / m
    return (x * g).astype(np.float32)


def fade_out(wav: np.ndarray, sample_rate: int, seconds: float = 0.05) -> np.ndarray:
    """Linear fade over the last `seconds` so a cut note does not click."""
    x = np.array(wav, dtype=np.float32, copy=True)
    n = min(x.size, int(seconds * sample_rate))
    if n > 0:
        x[-n:] *= np.linspace(1.0, 0.0, n, dtype=np.float32)
    return x
