"""The offline data plane: manifest I/O, corpus build (micro preset), captions, import, CLI."""

from __future__ import annotations

import json
import random
import re
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ttm.data import corpus as C
from ttm.data.build import CARD_KEYS, build_dataset, tempo_class
from ttm.data.captions import STYLE_WORDS, TEMPO_WORDS, TEXTURE_WORDS, make_caption
from ttm.data.importer import import_manifest
from ttm.data.manifest import (
    SPLITS,
    Entry,
    assign_split,
    read_manifest,
    resolve_audio,
    split_entries,
    write_manifest,
)
from ttm.data.render import ENSEMBLES, INSTRUMENTS, Part, render_parts

SR = 16000


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="module")
def micro(tmp_path_factory, cache) -> Path:
    """The micro dataset, built once per module from a cold corpus cache."""
    return build_dataset("micro", tmp_path_factory.mktemp("ds") / "a", seed=0, progress=False, cache=cache)


def _has(caption: str, word: str) -> bool:
    """`word` in the caption as a whole word (a suffix such as "-part" may follow a word)."""
    left = r"(?<![a-z])" if word[:1].isalpha() else ""
    return re.search(left + re.escape(word.lower()) + r"(?![a-z])", caption.lower()) is not None


def _check_caption(caption: str, at: dict) -> None:
    """The caption names the instrument, key and mode, tempo class, style and texture, and no other class."""
    assert at["instrument"] in caption.lower(), (caption, at)
    assert f"{at['key']} {at['mode']}" in caption, (caption, at)
    for attr, words in (("tempo", TEMPO_WORDS), ("style", STYLE_WORDS), ("texture", TEXTURE_WORDS)):
        assert any(_has(caption, w) for w in words[at[attr]]), (attr, caption)
        for other, ws in words.items():
            if other != at[attr]:
                assert not any(_has(caption, w) for w in ws), (attr, other, caption)


# ----------------------------------------------------------------------------- build


def test_build_deterministic_and_seed_dependent(micro, cache, tmp_path):
    again = build_dataset("micro", tmp_path / "b", seed=0, progress=False, cache=cache)
    assert again.read_bytes() == micro.read_bytes()
    for e in read_manifest(micro):
        assert resolve_audio(again, e).read_bytes() == resolve_audio(micro, e).read_bytes(), e.id
    other = build_dataset("micro", tmp_path / "c", seed=1, progress=False, cache=cache)
    assert other.read_bytes() != micro.read_bytes()


def test_build_returns_existing_and_refuses_other_recipe(micro, cache):
    mtime = micro.stat().st_mtime_ns
    assert build_dataset("micro", micro.parent, seed=0, progress=False, cache=cache) == micro
    assert micro.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="already holds a dataset"):
        build_dataset("micro", micro.parent, seed=5, progress=False, cache=cache)
    with pytest.raises(ValueError, match="preset"):
        build_dataset("huge", micro.parent / "x", progress=False, cache=cache)


def test_corpus_cache_written(micro, cache):
    files = list(cache.glob("*.json"))
    assert files
    doc = json.loads(files[0].read_text())
    assert doc["pieces"] and all(len(p["parts"]) >= 1 for p in doc["pieces"])


def test_splits_are_disjoint_by_piece(micro):
    entries = read_manifest(micro)
    pieces = {s: {e.piece for e in split_entries(entries, s)} for s in SPLITS}
    assert all(pieces[s] for s in SPLITS), "every split has clips"
    assert not (pieces["train"] & pieces["valid"] or pieces["train"] & pieces["test"] or pieces["valid"] & pieces["test"])
    assert all(e.split == assign_split(e.piece) for e in entries)


def test_attributes_consistent_and_captions_truthful(micro):
    entries = read_manifest(micro)
    assert len(entries) >= 14
    for e in entries:
        at = e.attributes
        assert at["tempo"] == tempo_class(at["tempo_bpm"])
        fam = {i.family for i in INSTRUMENTS.values() if i.name == at["instrument"]} | {
            x.family for xs in ENSEMBLES.values() for x in xs if x.name == at["instrument"]
        }
        assert at["family"] in fam
        assert at["n_parts"] == len(at["part_instruments"]) == len(at["programs"])
        assert (at["texture"] == "solo") == (at["n_parts"] == 1)
        assert at["program"] == at["programs"][0] == INSTRUMENTS[at["part_instruments"][0]].program
        if at["style"] == "folk":
            assert at["texture"] == "solo"
        _check_caption(e.caption, at)
    assert len({e.caption for e in entries}) == len(entries)


def test_audio_format_and_loudness(micro):
    for e in read_manifest(micro):
        info = sf.info(str(resolve_audio(micro, e)))
        assert (info.samplerate, info.channels) == (SR, 1) == (e.sample_rate, 1)
        assert info.frames == round(e.duration * SR) == 3 * SR
        x, _ = sf.read(str(resolve_audio(micro, e)), dtype="float32")
        rms_db = 20 * np.log10(np.sqrt(np.mean(x**2)))
        assert np.abs(x).max() <= 0.951
        assert -30 < rms_db <= -19.5, (e.id, rms_db)


def test_card_counts_match_manifest(micro):
    entries = read_manifest(micro)
    card = json.loads((micro.parent / "card.json").read_text())
    assert (card["preset"], card["seed"], card["clips"]) == ("micro", 0, len(entries))
    assert card["hours"] == pytest.approx(sum(e.duration for e in entries) / 3600, abs=1e-4)
    for s in SPLITS:
        es = split_entries(entries, s)
        assert card["splits"][s]["clips"] == len(es)
        assert card["splits"][s]["pieces"] == len({e.piece for e in es})
        for k in CARD_KEYS:
            assert card["splits"][s]["counts"][k] == dict(Counter(str(e.attributes[k]) for e in es))
    md = (micro.parent / "card.md").read_text()
    assert "micro" in md and "## mode" in md


def test_balanced_attributes_in_train(micro):
    train = split_entries(read_manifest(micro), "train")
    for k in ("style", "tempo", "texture"):
        c = Counter(e.attributes[k] for e in train)
        assert max(c.values()) - min(c.values()) <= 1, (k, c)


# ----------------------------------------------------------------------------- parts


def test_key_estimate_closed_cases():
    def line(pcs):  # one quarter note per pitch, tonic doubled in length
        rows = [[i, 2.0 if i == 0 else 1.0, 60 + p] for i, p in enumerate(pcs)]
        return [np.array(rows, dtype=float)]

    c_major = C.estimate_key(line([0, 2, 4, 5, 7, 9, 11, 0, 4, 7]))
    assert (c_major.tonic, c_major.mode, c_major.name) == (0, "major", "C")
    a_minor = C.estimate_key(line([9, 11, 0, 2, 4, 5, 8, 9, 0, 4, 9]))
    assert (a_minor.tonic, a_minor.mode) == (9, "minor")
    eb_minor = C.estimate_key([p + np.array([0, 0, 6]) for p in line([9, 11, 0, 2, 4, 5, 8, 9, 0, 4, 9])])
    assert (eb_minor.tonic, eb_minor.mode, eb_minor.name) == (3, "minor", "Eb")  # A minor up a tritone
    assert C.estimate_key([np.array([[0, 1, 60], [1, 1, 67]], dtype=float)]) is None


def test_tempo_class_boundaries():
    assert [tempo_class(b) for b in (79.9, 80, 120, 120.1)] == ["slow", "moderate", "moderate", "fast"]


def test_render_is_independent_of_previous_renders():
    def part(p0, prog):
        notes = np.array([[i * 0.25, 0.5, p0 + i % 5] for i in range(12)], dtype=float)
        return Part(prog, notes, np.full(12, 90))

    a = render_parts([part(60, 40), part(48, 42)], 1.0)
    render_parts([part(70, 19), part(40, 0)], 1.0)  # held organ notes in between
    b = render_parts([part(60, 40), part(48, 42)], 1.0)
    assert a.shape == (SR,) and a.dtype == np.float32 and np.abs(a).max() > 0.01
    assert np.array_equal(a, b)
    # a note that starts after the end is not heard; one that starts before it is
    assert np.abs(render_parts([Part(0, np.array([[1.5, 0.5, 60.0]]), np.array([90]))], 1.0)).max() == 0


def test_captions_vary_deterministically_and_stay_truthful():
    rng = random.Random(0)
    for _ in range(300):
        ens = rng.random() < 0.5
        fam = rng.choice(list(ENSEMBLES))
        inst = rng.choice(ENSEMBLES[fam]).name if ens else rng.choice([i.name for i in INSTRUMENTS.values() if i.family == fam])
        n = rng.choice([2, 3, 4, 6]) if ens else 1
        voices = [inst] * n if inst in INSTRUMENTS else [v for v in ENSEMBLES[fam][0].voices][:n]
        at = {"instrument": inst, "family": fam, "tempo_bpm": 100.0, "tempo": rng.choice(list(TEMPO_WORDS)),
              "key": rng.choice(C.MINOR_NAMES), "mode": rng.choice(["major", "minor"]),
              "style": rng.choice(list(STYLE_WORDS)), "texture": "ensemble" if ens else "solo",
              "n_parts": n, "part_instruments": voices, "meter": rng.choice(["3/4", None, "1/16"])}
        _check_caption(make_caption(at, random.Random(rng.random())), at)
    at = {"instrument": "violin", "tempo": "slow", "tempo_bpm": 66, "key": "F#", "mode": "minor",
          "style": "chorale", "texture": "solo", "family": "strings"}
    caps = [make_caption(at, random.Random(s)) for s in range(40)]
    assert len(set(caps)) >= 30
    assert caps == [make_caption(at, random.Random(s)) for s in range(40)]
    with pytest.raises(ValueError, match="tempo"):
        make_caption({**at, "tempo": "brisk"}, random.Random(0))
    with pytest.raises(ValueError, match="missing"):
        make_caption({"instrument": "violin"}, random.Random(0))


# ----------------------------------------------------------------------------- manifest


def _entry(i: int, **kw) -> Entry:
    d = {"id": f"c{i}", "path": f"audio/c{i}.wav", "caption": "a tune", "split": "train", "piece": f"p{i}",
             "duration": 2.0, "sample_rate": SR, "attributes": {"mode": "major"}}
    return Entry(**{**d, **kw})


def test_manifest_round_trip_and_helpers(tmp_path):
    entries = [_entry(0), _entry(1, split="test", path=str(tmp_path / "abs.wav"))]
    m = tmp_path / "m" / "manifest.jsonl"
    write_manifest(m, entries)
    assert read_manifest(m) == entries
    assert resolve_audio(m, entries[0]) == m.parent / "audio" / "c0.wav"
    assert resolve_audio(m, entries[1]) == tmp_path / "abs.wav"
    assert split_entries(entries, "test") == [entries[1]]
    with pytest.raises(ValueError, match="split"):
        split_entries(entries, "dev")
    with pytest.raises(ValueError, match="duplicate"):
        write_manifest(m, [_entry(0), _entry(0)])
    assert {assign_split(f"piece{i}") for i in range(200)} == set(SPLITS)
    share = Counter(assign_split(f"piece{i}") for i in range(2000))
    assert 0.75 < share["train"] / 2000 < 0.85


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"id": "x"', r":2: invalid JSON"),
        ("[1, 2]", r":2: expected a JSON object"),
        ('{"id": "b", "path": "a.wav", "caption": "c", "split": "dev", "piece": "p", "duration": 1, "sample_rate": 16000}',
         r":2: field 'split'"),
        ('{"id": "b", "path": "a.wav", "split": "train", "piece": "p", "duration": 1, "sample_rate": 16000}',
         r":2: field 'caption'"),
        ('{"id": "b", "path": "a.wav", "caption": "c", "split": "train", "piece": "p", "duration": -1, "sample_rate": 16000}',
         r":2: field 'duration'"),
        ('{"id": "c0", "path": "a.wav", "caption": "c", "split": "train", "piece": "p", "duration": 1, "sample_rate": 16000}',
         r":2: field 'id': duplicate"),
    ],
)
def test_manifest_errors_name_line_and_field(tmp_path, line, match):
    m = tmp_path / "manifest.jsonl"
    m.write_text(json.dumps(_entry(0).model_dump()) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=re.escape(str(m)) + match):
        read_manifest(m)


def test_manifest_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_manifest(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- import


def _tone(path: Path, seconds: float, sr: int = 44100, amp: float = 0.3, channels: int = 2) -> None:
    t = np.arange(int(seconds * sr)) / sr
    x = amp * np.sin(2 * np.pi * 440 * t)
    sf.write(str(path), np.stack([x] * channels, 1), sr)


def _import_source(tmp_path: Path) -> Path:
    d = tmp_path / "user"
    d.mkdir()
    _tone(d / "good.wav", 2.0)
    _tone(d / "good2.flac", 1.5, sr=22050, channels=1)
    _tone(d / "short.wav", 0.5)
    _tone(d / "silent.wav", 2.0, amp=0.0)
    (d / "broken.wav").write_text("not audio")
    lines = [
        {"path": "good.wav", "caption": "a sine", "attributes": {"mood": "calm"}},
        {"path": str(d / "good2.flac"), "caption": "another sine", "split": "test", "id": "g2", "piece": "song"},
        {"path": "short.wav", "caption": "too short"},
        {"path": "silent.wav", "caption": "nothing"},
        {"path": "broken.wav", "caption": "broken"},
        {"path": "missing.wav", "caption": "gone"},
        {"path": "good.wav"},
        {"path": "good.wav", "caption": "bad split", "split": "dev"},
    ]
    src = d / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    return src


def test_import_keeps_good_files_and_reports_bad_ones(tmp_path):
    src = _import_source(tmp_path)
    out = tmp_path / "imported"
    man = import_manifest(src, out, min_seconds=1.0, sample_rate=SR)
    entries = read_manifest(man)
    assert [e.caption for e in entries] == ["a sine", "another sine"]
    good, g2 = entries
    assert good.split == assign_split(good.piece) and good.attributes == {"mood": "calm"}
    assert (g2.id, g2.split, g2.piece) == ("g2", "test", "song")
    for e, secs in ((good, 2.0), (g2, 1.5)):
        info = sf.info(str(resolve_audio(man, e)))
        assert (info.samplerate, info.channels) == (SR, 1)
        assert e.duration == pytest.approx(secs, abs=1e-3) == pytest.approx(info.frames / SR, abs=1e-3)
    rep = json.loads((out / "import_report.json").read_text())
    assert (rep["kept"], rep["skipped"], rep["complete"]) == (2, 7, True)
    reasons = {(Path(i["path"]).name if i["path"] else None): i["reason"] for i in rep["skipped_items"]}
    assert "too short" in reasons["short.wav"]
    assert "silent" in reasons["silent.wav"]
    assert "unreadable" in reasons["broken.wav"]
    assert "not found" in reasons["missing.wav"]
    by_line = {i["line"]: i["reason"] for i in rep["skipped_items"]}
    assert "'caption'" in by_line[7] and "'split'" in by_line[8] and "invalid JSON" in by_line[9]


def test_import_with_nothing_usable_writes_report_then_raises(tmp_path):
    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps({"path": "missing.wav", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="no usable audio"):
        import_manifest(src, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "import_report.json").read_text())["skipped"] == 1
    assert not (tmp_path / "out" / "manifest.jsonl").exists()
    with pytest.raises(FileNotFoundError):
        import_manifest(tmp_path / "none.jsonl", tmp_path / "out")


# ----------------------------------------------------------------------------- CLI


def test_cli_import_and_errors(tmp_path, capsys):
    from ttm.cli import main as top
    from ttm.data_cli import main

    src = _import_source(tmp_path)
    assert main(["import", str(src), "--out", str(tmp_path / "o"), "--min-seconds", "1.8", "--quiet"]) == 0
    assert [e.caption for e in read_manifest(tmp_path / "o" / "manifest.jsonl")] == ["a sine"]
    assert "1 imported, 8 skipped" in capsys.readouterr().out
    assert top(["data", "import", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o2")]) == 2
    assert "ttm-bench data: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build", "--preset", "huge", "--out", str(tmp_path / "x")])


def test_cli_tokenize_delegates(monkeypatch):
    from ttm.data_cli import main

    seen = []
    fake = types.ModuleType("ttm.codecs.cli")
    fake.tokenize_main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "ttm.codecs.cli", fake)
    assert main(["tokenize", "m.jsonl", "--codec", "melrvq"]) == 3
    assert seen == [["m.jsonl", "--codec", "melrvq"]]


def test_import_reports_overlong_and_non_utf8_entries(tmp_path):
    d = tmp_path / "user"
    d.mkdir()
    _tone(d / "ok.wav", 2.0)
    _tone(d / "long.wav", 12.0)
    src = d / "pairs.jsonl"
    src.write_bytes(
        json.dumps({"path": "ok.wav", "caption": "fine"}).encode() + b"\n"
        + json.dumps({"path": "long.wav", "caption": "an hour of it"}).encode() + b"\n"
        + b'{"path": "ok.wav", "caption": "caf\xe9 latin-1"}\n'
    )
    man = import_manifest(src, tmp_path / "out", max_seconds=10.0)
    assert [e.caption for e in read_manifest(man)] == ["fine"]
    rep = json.loads((tmp_path / "out" / "import_report.json").read_text())
    by_line = {i["line"]: i["reason"] for i in rep["skipped_items"]}
    assert "too long (12.0 s > 10.0 s" in by_line[2]
    assert "not valid UTF-8 (byte 0xe9" in by_line[3]
    assert rep["max_seconds"] == 10.0
    with pytest.raises(ValueError, match="max_seconds: expected > min_seconds"):
        import_manifest(src, tmp_path / "out2", min_seconds=2.0, max_seconds=1.0)
