"""Captions from clip attributes, with varied (MusicCaps-like) phrasing.

`make_caption(attributes, rng)` picks a sentence template, synonyms and optional clauses
with `rng` (a `random.Random`, so a caption is fixed by its seed). Every caption names
the instrument (its exact name), the texture, the tempo class, the key and mode
("F# minor") and the style, truthfully; the word lists below say which words stand
for which value, and no word of one value is used for another.
"""

from __future__ import annotations

import random
from collections import Counter

TEMPO_WORDS: dict[str, tuple[str, ...]] = {
    "slow": ("slow", "unhurried", "leisurely", "slow-paced", "adagio"),
    "moderate": ("moderate", "mid-tempo", "medium-tempo", "moderately paced", "andante"),
    "fast": ("fast", "quick", "brisk", "lively", "up-tempo", "allegro"),
}
# Style phrases (a noun phrase without article); the first entry of STYLE_WORDS appears in each.
STYLE_PHRASES: dict[str, tuple[str, ...]] = {
    "chorale": ("chorale", "Bach chorale", "hymn-like chorale", "Baroque chorale", "Lutheran chorale"),
    "folk": ("folk tune", "traditional folk tune", "folk melody", "folk dance tune", "fiddle tune"),
    "renaissance": ("Renaissance piece", "Renaissance composition", "piece of Renaissance music",
                    "Renaissance-era work", "piece in Renaissance style"),
    "quartet": ("Classical quartet movement", "quartet movement from the Classical era",
                "Classical-period string quartet excerpt", "movement from a Classical string quartet",
                "Classical quartet excerpt"),
}
STYLE_WORDS: dict[str, tuple[str, ...]] = {
    "chorale": ("chorale",),
    "folk": ("folk", "fiddle tune"),
    "renaissance": ("renaissance",),
    "quartet": ("quartet",),
}
TEXTURE_WORDS: dict[str, tuple[str, ...]] = {
    "solo": ("solo", "unaccompanied", "single melodic line", "lone", "single line"),
    "ensemble": ("ensemble", "voices", "parts", "-part", "polyphonic"),
}
MOODS: dict[str, tuple[str, ...]] = {
    "major": ("bright", "cheerful", "serene", "warm", "sunny"),
    "minor": ("melancholic", "somber", "wistful", "plaintive", "dark"),
}
FAMILY_WORDS: dict[str, str] = {
    "strings": "bowed strings",
    "keyboard": "keyboard instruments",
    "woodwind": "woodwinds",
    "brass": "brass instruments",
    "plucked": "plucked strings",
    "mallet": "mallet percussion",
}
COMMON_METERS = {"2/2", "2/4", "3/4", "4/4", "3/8", "6/8", "9/8", "12/8", "3/2", "4/2", "6/4"}
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
REQUIRED = ("instrument", "tempo", "key", "mode", "style", "texture")


def _a(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _plural(name: str) -> str:
    return name + "s"


def _list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _instrument_phrase(at: dict, rng: random.Random) -> str:
    """Noun phrase naming the instrument(s) and the texture: 'a solo violin', 'piano in four voices'."""
    inst = at["instrument"]
    if at["texture"] == "solo":
        return rng.choice(
            [f"a solo {inst}", f"an unaccompanied {inst}", f"a lone {inst}", f"{inst} solo",
             f"a solo {inst} line", f"an unaccompanied {inst} melody"]
        )
    n = int(at.get("n_parts") or 0)
    nword = NUMBERS.get(n)
    voices = at.get("part_instruments") or []
    counts = Counter(voices)
    if len(counts) > 1:  # a mixed section, e.g. "string ensemble"
        names = [(_plural(v) if counts[v] > 1 else v) for v in dict.fromkeys(voices)]
        opts = [f"a {inst} of {_list(names)}", f"a {inst}", f"a {inst} ({_list(names)})"]
        if nword:
            opts.append(f"a {nword}-part {inst}")
        return rng.choice(opts)
    opts = [f"{inst} in several voices", f"an ensemble of {_plural(inst)}", f"multi-part {inst}"]
    if nword:
        opts += [f"{inst} in {nword} voices", f"{inst} playing all {nword} parts", f"{nword}-part {inst}"]
    return rng.choice(opts)


def _check(at: dict) -> None:
    missing = [k for k in REQUIRED if k not in at]
    if missing:
        raise ValueError(f"attributes: missing {', '.join(missing)} (needed for a caption)")
    for k, allowed in (("tempo", TEMPO_WORDS), ("mode", MOODS), ("style", STYLE_PHRASES), ("texture", TEXTURE_WORDS)):
        if at[k] not in allowed:
            raise ValueError(f"attributes.{k}: expected one of {', '.join(allowed)}, got {at[k]!r}")


def make_caption(attributes: dict, rng: random.Random) -> str:
    """A one- to three-sentence caption that states the attributes truthfully."""
    at = attributes
    _check(at)
    tempo = rng.choice(TEMPO_WORDS[at["tempo"]])
    # next to "tempo"/"pace" only plain adjectives ("a slow tempo", not "a slow-paced pace")
    plain = [w for w in TEMPO_WORDS[at["tempo"]] if not w.endswith("paced") and "tempo" not in w]
    tempo_adj = tempo if tempo in plain else rng.choice(plain)
    style = rng.choice(STYLE_PHRASES[at["style"]])
    key = f"{at['key']} {at['mode']}"
    inst = _instrument_phrase(at, rng)
    played = rng.choice(["played by", "performed by", "rendered on", "arranged for", "played on"])
    playing = rng.choice(["playing", "performing", "rendering"])
    in_key = rng.choice([f"in {key}", f"in the key of {key}", f"set in {key}", f"in {key}"])
    pace = rng.choice(["tempo", "pace"])
    templates = [
        lambda: f"{_cap(_a(tempo))} {style} {played} {inst}, {in_key}.",
        lambda: f"{_cap(inst)} {playing} {_a(style)} {in_key} at {_a(tempo_adj)} {pace}.",
        lambda: f"This is {_a(style)} {in_key}, {played} {inst}. The {pace} is {tempo_adj}.",
        lambda: f"{key} {style}, {tempo}, {played} {inst}.",
        lambda: f"{_cap(_a(style))} {played} {inst}; {tempo_adj} {pace}, {key}.",
        lambda: f"{_cap(inst)} {playing} {_a(tempo)} {style} {in_key}.",
        lambda: f"A recording of {inst} {playing} {_a(style)}. It is {in_key} and moves at {_a(tempo_adj)} {pace}.",
        lambda: f"{_cap(_a(style))} {in_key}: {inst}, {tempo_adj} {pace}.",
        lambda: f"Instrumental {style} {in_key}, {played} {inst} at {_a(tempo_adj)} {pace}.",
        lambda: f"{_cap(inst)}, {in_key}, {playing} {_a(tempo)} {style}.",
        lambda: f"You can hear {inst} {playing} {_a(style)} {in_key}; the {pace} is {tempo_adj}.",
        lambda: f"{_cap(_a(tempo))} rendition of {_a(style)} for {inst}, {in_key}.",
        lambda: f"{_cap(tempo)} {style} {in_key}. Instrumentation: {inst}.",
        lambda: f"{_cap(key)}, {tempo_adj} {pace}: {_a(style)} {played} {inst}.",
    ]
    sentence = rng.choice(templates)()
    extras = []
    if at.get("tempo_bpm") is not None:
        bpm = round(float(at["tempo_bpm"]))
        extras.append(rng.choice([f"Around {bpm} BPM.", f"About {bpm} beats per minute.",
                                  f"Roughly {bpm} bpm."]))
    if at.get("meter") in COMMON_METERS:
        extras.append(rng.choice([f"It is in {at['meter']} time.", f"The meter is {at['meter']}.",
                                  f"Written in {at['meter']}."]))
    mood = rng.choice(MOODS[at["mode"]])
    extras.append(rng.choice([f"The mood is {mood}.", f"It sounds {mood}.", f"A {mood} feel throughout."]))
    if at.get("family") in FAMILY_WORDS:
        fam = FAMILY_WORDS[at["family"]]
        extras.append(rng.choice([f"The timbre is that of {fam}.", f"Sound: {fam}.", f"Scored for {fam}."]))
    rng.shuffle(extras)
    k = rng.choice([0, 0, 1, 1, 2])
    return " ".join([sentence] + extras[:k])
