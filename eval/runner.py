"""`ttm-bench eval`: score generated clips against a reference set.

    ttm-bench eval --generated runs/x/samples --reference data/tiny/manifest.jsonl \\
        --metrics fd_probe,adherence,kl_ast,clap,fad_clap,fad_encodec,fd_vggish --out runs/x/eval.json
    ttm-bench eval --list

Generated: a folder of audio files with `samples.jsonl` (`file`, `caption`, `seed`,
`attributes`, and `ref_id`: the manifest id of the reference clip it was generated for,
written by `ttm-bench generate` for split-driven prompts). Paired metrics (KL, per-clip
pair columns) pair 1:1 by that id, never by caption; a clip without `ref_id` (a free-text
prompt) is scored only by the unpaired metrics (FD, CLAP-style score, adherence), and
eval.json's "pairing" block says how many were paired. A sample without attributes takes
those of its reference clip, else of the reference clips with its caption when they agree. Reference: a dataset manifest (its `split`
clips, default test) or a plain folder of audio (FD metrics only, and the probe metrics
with --probe).

Every metric gets {value, ci_low, ci_high, n, settings, floors}: a percentile bootstrap
interval (clips resampled; both sets for FD), the embedder's settings with the sample
rate and the source rates that were resampled (scipy polyphase), and two floors:
  noise: the reference against itself, for FD: FD(reference half A, half B) over a
         seeded split into disjoint halves, reported next to FD(generated, half B) with
         the generated set cut to the size of half A, so the two numbers are comparable;
         for CLAP / adherence: the metric on the reference clips themselves; for KL:
         distinct reference clips sharing a caption (when there are any);
  codec: the metric on the reference resynthesised by a codec (encode -> decode) against
         the reference, when a codec is given.
Probe metrics also carry the probe's held-out accuracy and chance levels. Bad audio is
refused before any metric (`check_audio`): a generated or reference clip that is
unreadable, empty, non-finite, outside [-1, 1], silent after the down-mix to mono or
shorter than 0.5 s stops the evaluation with an error naming each file and its defect.
A per-clip CSV is written next to the JSON.
Embeddings are cached under $TTM_BENCH_CACHE/embeddings (default ~/.cache/ttm-bench),
keyed by file path, mtime and size and by the embedder's cache key.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from eval import metrics as M
from eval import stats as S
from eval.embedders import get_embedder
from eval.embedders.base import Embedder
from eval.probe import DEFAULT_FLOOR_FRAC, Probe, manifest_hash, train_probe
from ttm.audio import atomic_write_text, load_audio, save_audio

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
SILENT_PEAK = 1e-4  # -80 dBFS, after the down-mix to mono
MIN_SCORED_S = 0.5  # shorter clips are refused
MAX_PEAK = 1.0 + 1e-3  # float files beyond this are out of range

# metric -> (embedder, embedder settings, kind, description)
METRICS: dict[str, dict[str, Any]] = {
    "fd_probe": {"embedder": "probe", "kw": {}, "kind": "fd", "what": "Frechet distance on probe embeddings (one per clip)"},
    "adherence": {"embedder": "probe", "kw": {}, "kind": "adherence", "what": "probe-predicted attributes vs caption attributes (accuracy)"},
    "kl_ast": {
        "embedder": "ast", "kw": {"windowing": "audiocraft"}, "kind": "kl", "convention": "audiocraft",
        "what": "KL(reference || generated) of AST label distributions, audiocraft windowing (softmax per 10 s segment)",
    },
    "kl_ast_sam": {
        "embedder": "ast", "kw": {"windowing": "sam"}, "kind": "kl", "convention": "sam",
        "what": "KL(generated || reference) of AST label distributions, stable-audio-metrics windowing (logits averaged over 10 s / 5 s hop windows)",
    },
    "clap": {"embedder": "clap", "kw": {}, "kind": "clap", "what": "CLAP score: cosine of caption and audio embeddings"},
    "fad_clap": {"embedder": "clap", "kw": {}, "kind": "fd", "what": "Frechet distance on CLAP audio embeddings (per 10 s window)"},
    "fad_encodec": {"embedder": "encodec", "kw": {}, "kind": "fd", "what": "Frechet distance on EnCodec encoder frames (fadtk FAD-EnCodec)"},
    "fd_vggish": {"embedder": "vggish", "kw": {}, "kind": "fd", "what": "Frechet distance on VGGish frames (0.96 s)"},
}


# ----------------------------------------------------------------------------- inputs


@dataclass
class Clip:
    path: Path
    file: str  # as written in the CSV
    caption: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    seed: Any = None
    ref: str | None = None  # optional explicit reference id (samples.jsonl `ref_id`)


def cache_root(override: str | os.PathLike | None = None) -> Path:
    return Path(override or os.environ.get("TTM_BENCH_CACHE") or "~/.cache/ttm-bench").expanduser()


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
        for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("file"), str):
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
    from ttm.data.manifest import read_manifest, resolve_audio, split_entries

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
    except Exception as e:
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


# ----------------------------------------------------------------------------- features + cache


class FeatureStore:
    """Embedder features per file, cached on disk as .npz (atomic), keyed by path, mtime, size."""

    def __init__(self, root: Path, progress: bool = True):
        self.root = root
        self.progress = progress
        self.mem: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        self.hashes: dict[int, str] = {}

    def _file_key(self, path: Path) -> str:
        st = path.stat()
        return hashlib.sha256(f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}".encode()).hexdigest()[:24]

    def get(self, emb: Embedder, path: Path) -> dict[str, np.ndarray]:
        if id(emb) not in self.hashes:
            self.hashes[id(emb)] = emb.cache_hash()
        key = (self.hashes[id(emb)], self._file_key(path))
        if key in self.mem:
            return self.mem[key]
        d = self.root / key[0]
        f = d / f"{key[1]}.npz"
        if f.is_file():
            try:
                with np.load(f) as z:
                    out = {k: z[k] for k in z.files}
                self.mem[key] = out
                return out
            except (OSError, ValueError):
                pass  # a corrupt cache file is recomputed
        wav = load_audio(path, emb.sample_rate, channels=emb.channels)
        out = {k: np.asarray(v, dtype=np.float32) for k, v in emb.features(wav).items()}
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "key.json").is_file():
            atomic_write_text(d / "key.json", emb.cache_key() + "\n")
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz.tmp")
        os.close(fd)
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, **out)
            os.replace(tmp, f)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.mem[key] = out
        return out

    def many(self, emb: Embedder, clips: list[Clip], what: str) -> list[dict[str, np.ndarray]]:
        from tqdm.auto import tqdm

        return [self.get(emb, c.path) for c in tqdm(clips, desc=f"{emb.name}: {what}", disable=not self.progress, leave=False)]


def _rates(clips: list[Clip]) -> set[int]:
    return {int(sf.info(str(c.path)).samplerate) for c in clips}


# ----------------------------------------------------------------------------- codec floor


def resynthesize(codec: Any, clips: list[Clip], root: Path, progress: bool = True) -> list[Clip]:
    """Each reference clip encoded and decoded by `codec`, written as WAV (cached by codec identity)."""
    from tqdm.auto import tqdm

    ident = codec.identity() if hasattr(codec, "identity") else None
    if ident is not None:
        folder = root / "resynth" / hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    else:  # no identity: nothing to key a cache on, use a fresh folder
        folder = Path(tempfile.mkdtemp(prefix="ttm-bench-resynth-"))
    sr = int(codec.sample_rate)
    channels = int(getattr(codec, "channels", 1))
    out = []
    for c in tqdm(clips, desc="codec: resynthesising the reference", disable=not progress, leave=False):
        st = c.path.stat()
        name = hashlib.sha256(f"{c.path.resolve()}|{st.st_mtime_ns}|{st.st_size}".encode()).hexdigest()[:24]
        f = folder / f"{name}.wav"
        if not f.is_file():
            wav = load_audio(c.path, sr, channels=channels)  # [C, N]
            with torch.no_grad():
                y = codec.decode(codec.encode(wav[None]))[0].float().cpu()  # [C, N']
            n = wav.shape[-1]
            y = y[..., :n] if y.shape[-1] >= n else torch.nn.functional.pad(y, (0, n - y.shape[-1]))
            save_audio(f, y, sr)
        out.append(Clip(path=f, file=c.file, caption=c.caption, attributes=c.attributes, id=c.id))
    return out


# ----------------------------------------------------------------------------- metric kinds


def _ci(values: np.ndarray, n_boot: int, seed: int) -> tuple[float | None, float | None]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None, None
    return M.bootstrap_ci(v, n=n_boot, seed=seed)


def _fd_block(gen: list[np.ndarray], ref: list[np.ndarray]) -> float:
    a, b = np.concatenate(gen), np.concatenate(ref)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FD needs at least 2 embeddings per set, got {len(a)} and {len(b)}")
    return M.fd_fast(a, b)


def _fd_safe(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float | None, str]:
    try:
        return _fd_block(a, b), ""
    except ValueError as e:
        return None, str(e)


def _reduce_for_fd(gen, ref, codec, pca_source) -> tuple[list, list, list | None, dict[str, Any] | None]:
    """Apply the sample-size rule: an FD needs >= 2 D embeddings per set. Below that the embeddings
    are projected on the top k = n // 2 principal components of the reference's train split
    (`pca_source()` -> (Pca or None, why not)); without a train split the FD is refused."""
    dim = gen[0].shape[1]
    n_min = min(int(sum(len(g) for g in gen)), int(sum(len(r) for r in ref)))
    if n_min >= S.clips_needed(dim):
        return gen, ref, codec, None
    pca, why = pca_source() if pca_source is not None else (None, "no reference train split to fit a PCA on")
    if pca is None:
        try:
            S.require_samples(sum(len(g) for g in gen), sum(len(r) for r in ref), dim)
        except ValueError as e:
            raise ValueError(f"{e}; no dimension reduction: {why}") from None
    k = min(S.max_dim(n_min), pca.k_max)
    if k < 1:
        raise ValueError(f"fd: {n_min} embeddings per set are too few for any FD (needs at least 2)")
    proj = [[pca.project(x, k) for x in xs] for xs in (gen, ref)]
    pc = [pca.project(x, k) for x in codec] if codec is not None else None
    info = {**pca.identity(k), "reason": f"{n_min} embeddings per set < {S.MIN_SAMPLES_PER_DIM} * D = "
            f"{S.clips_needed(dim)}: projected on the top k = {k} principal components of the reference's train split"}
    return proj[0], proj[1], pc, info


def compute_fd(gen_f, ref_f, codec_f, n_boot: int, seed: int, pca_source=None) -> dict[str, Any]:
    gen = [f["emb"] for f in gen_f]
    ref = [f["emb"] for f in ref_f]
    codec = [f["emb"] for f in codec_f] if codec_f is not None else None
    gen, ref, codec, reduction = _reduce_for_fd(gen, ref, codec, pca_source)
    st = S.fd_statistics(gen, ref, n_boot=n_boot, seed=seed)
    at = st["fd_at_n"]
    res: dict[str, Any] = {
        "value": at["value"], "ci_low": at["ci_low"], "ci_high": at["ci_high"], "n": len(gen),
        "n_reference": len(ref), "n_frames": int(sum(len(g) for g in gen)),
        "n_frames_reference": int(sum(len(r) for r in ref)),
        "dim": int(gen[0].shape[1]),
        "dimension_reduction": reduction,
        "interval_meaning": "value / ci_low / ci_high are FD AT THIS n (see fd_at_n): comparable only between "
        "rows with the same n; fd_population estimates the n -> infinity FD with its own interval",
        "fd_at_n": at,
        "fd_population": st["fd_population"],
        "fd_method": "Gaussian fit to all frame embeddings of each set; Tr sqrtm(S1 S2) as the sum of "
        "square roots of the eigenvalues of F1^T S2 F1 (S1 = F1 F1^T), equal to the scipy sqrtm formula; "
        "intervals resample whole clips",
    }
    # FD-inf (fadtk) when there are enough generated frames
    allg = np.concatenate(gen)
    if len(allg) > 500:
        mu, sigma = M.embedding_stats(np.concatenate(ref))
        res["fd_inf"] = M.fd_inf(mu, sigma, allg, seed=seed)
    else:
        res["fd_inf"] = {"value": None, "reason": f"needs more than 500 generated frames, got {len(allg)}"}
    # noise floor: disjoint reference halves
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(ref))
    a_idx, b_idx = perm[: len(ref) // 2], perm[len(ref) // 2 :]
    half_a, half_b = [ref[i] for i in a_idx], [ref[i] for i in b_idx]
    g_idx = rng.permutation(len(gen))[: len(half_a)] if len(gen) > len(half_a) else np.arange(len(gen))
    floor, why = _fd_safe(half_a, half_b)
    gen_half, why_g = _fd_safe([gen[i] for i in g_idx], half_b)
    res["floors"] = {
        "noise": {
            "value": floor,
            "value_generated_vs_half": gen_half,
            "n_half_a": len(half_a), "n_half_b": len(half_b), "n_generated_used": len(g_idx),
            "description": "FD(reference half A, reference half B), seeded disjoint halves; "
            "value_generated_vs_half = FD(generated cut to |A| clips, half B), comparable with it",
            **({"reason": why or why_g} if floor is None or gen_half is None else {}),
        },
        "codec": None,
    }
    if codec is not None:
        res["floors"]["codec"] = {
            "value": _fd_block(codec, ref),
            "description": "FD(codec-resynthesised reference, reference)",
        }
    return res


def _probe_predictions(feats: list[dict[str, np.ndarray]], probe: Probe) -> dict[str, list[str]]:
    return {a: [probe.classes[a][int(f[f"logits_{a}"][0].argmax())] for f in feats] for a in probe.classes}


def _adherence_of(feats, clips: list[Clip], probe: Probe) -> dict[str, Any]:
    return M.text_adherence(_probe_predictions(feats, probe), [c.attributes for c in clips])


def compute_adherence(gen_f, gen, ref_f, ref, codec_f, probe: Probe, n_boot: int, seed: int) -> dict[str, Any]:
    if not any(c.attributes for c in gen):
        raise ValueError("adherence: no generated clip has caption attributes (samples.jsonl field 'attributes')")
    r = _adherence_of(gen_f, gen, probe)
    mat = np.stack(list(r["correct"].values()), axis=1)  # [N, A]

    def overall(m):
        return float(np.nansum(m) / max(np.isfinite(m).sum(), 1))

    lo, hi = M.bootstrap_ci((mat,), statistic=overall, n=n_boot, seed=seed)
    per_attr = {}
    for a, c in r["correct"].items():
        clo, chi = _ci(c, n_boot, seed)
        per_attr[a] = {"value": r["per_attribute"][a], "ci_low": clo, "ci_high": chi, "n": r["n_per_attribute"][a],
                       "probe_heldout_accuracy": probe.heldout_accuracy[a], "chance": probe.chance[a]}
    res: dict[str, Any] = {"value": r["overall"], "ci_low": lo, "ci_high": hi, "n": len(gen), "per_attribute": per_attr}
    floors: dict[str, Any] = {"noise": None, "codec": None}
    if any(c.attributes for c in ref):
        floors["noise"] = {"value": _adherence_of(ref_f, ref, probe)["overall"],
                           "description": "adherence of the reference clips to their own attributes (the probe's ceiling here)"}
        if codec_f is not None:
            floors["codec"] = {"value": _adherence_of(codec_f, ref, probe)["overall"],
                               "description": "adherence of the codec-resynthesised reference to its attributes"}
    res["floors"] = floors
    res["_per_clip"] = {"adherence": r["per_clip"], **{f"adherence_{a}": c for a, c in r["correct"].items()}}
    return res


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


def _kl_values(pairs: list[tuple[int, int]], a_f, b_f, convention: str) -> tuple[float, np.ndarray]:
    """KL over (reference i, compared j) pairs; a_f reference features, b_f compared features."""
    ra = [a_f[i]["logits"] for i, _ in pairs]
    gb = [b_f[j]["logits"] for _, j in pairs]
    return M.kl_audiocraft(ra, gb) if convention == "audiocraft" else M.kl_stable_audio(ra, gb)


def compute_kl(gen_f, gen, ref_f, ref, codec_f, convention: str, n_boot: int, seed: int,
               matches: list[int | None]) -> dict[str, Any]:
    pairs = [(r, g) for g, r in enumerate(matches) if r is not None]
    if not pairs:
        raise ValueError(
            "kl: no generated clip names its reference clip (samples.jsonl 'ref_id', written by `ttm-bench "
            "generate --split`); KL compares paired clips, so free-text prompts are scored only with unpaired metrics"
        )
    value, per_pair = _kl_values(pairs, ref_f, gen_f, convention)
    per_clip = np.full(len(gen), np.nan)
    for (_, g), v in zip(pairs, per_pair):
        per_clip[g] = float(v)
    lo, hi = _ci(per_clip, n_boot, seed)
    direction = "KL(reference || generated)" if convention == "audiocraft" else "KL(generated || reference)"
    res: dict[str, Any] = {
        "value": value, "ci_low": lo, "ci_high": hi, "n": int(np.isfinite(per_clip).sum()), "n_pairs": len(pairs),
        "n_unpaired": int((~np.isfinite(per_clip)).sum()), "direction": direction, "convention": convention,
        "pairing": "1:1 by reference clip id (samples.jsonl ref_id); clips without one are not scored",
        "ci_method": "percentile bootstrap over paired generated clips",
    }
    floors: dict[str, Any] = {"noise": None, "codec": None}
    same = [(i, j) for i in range(len(ref)) for j in range(len(ref))
            if i != j and ref[i].caption and _caption_key(ref[i].caption) == _caption_key(ref[j].caption)]
    if same:
        floors["noise"] = {"value": _kl_values(same, ref_f, ref_f, convention)[0], "n_pairs": len(same),
                           "description": "KL between distinct reference clips that share a caption"}
    else:
        floors["noise"] = {"value": None, "reason": "no two reference clips share a caption"}
    if codec_f is not None:
        floors["codec"] = {"value": _kl_values([(i, i) for i in range(len(ref))], ref_f, codec_f, convention)[0],
                           "description": "KL between each reference clip and its codec resynthesis"}
    res["floors"] = floors
    res["_per_clip"] = {METRIC_PER_CLIP_NAME[convention]: per_clip}
    return res


METRIC_PER_CLIP_NAME = {"audiocraft": "kl_ast", "sam": "kl_ast_sam"}


def _clap_scores(emb, feats, clips: list[Clip]) -> np.ndarray:
    text = emb.embed_text([c.caption for c in clips]).numpy()
    audio = np.stack([f["emb"].mean(0) for f in feats])
    return M.clap_score(text, audio)[1]


def compute_clap(emb, gen_f, gen, ref_f, ref, codec_f, n_boot: int, seed: int) -> dict[str, Any]:
    if not all(c.caption for c in gen):
        missing = next(c.file for c in gen if not c.caption)
        raise ValueError(f"clap: generated clip {missing!r} has no caption (samples.jsonl field 'caption')")
    per = _clap_scores(emb, gen_f, gen)
    lo, hi = _ci(per, n_boot, seed)
    res: dict[str, Any] = {"value": float(per.mean()), "ci_low": lo, "ci_high": hi, "n": len(gen),
                           "text_collapse_check": "passed (mean pairwise cosine of distinct captions <= 0.99)"}
    floors: dict[str, Any] = {"noise": None, "codec": None}
    if all(c.caption for c in ref):
        floors["noise"] = {"value": float(_clap_scores(emb, ref_f, ref).mean()),
                           "description": "CLAP score of the reference clips with their own captions"}
        if codec_f is not None:
            floors["codec"] = {"value": float(_clap_scores(emb, codec_f, ref).mean()),
                               "description": "CLAP score of the codec-resynthesised reference with its captions"}
    res["floors"] = floors
    res["_per_clip"] = {"clap": per}
    return res


# ----------------------------------------------------------------------------- evaluate


def _make_embedder(name: str, kw: dict[str, Any], ckpts: dict[str, str], device: str = "cpu") -> Embedder:
    args = dict(kw)
    if name in ckpts:
        args["ckpt"] = ckpts[name]
    if name in ("clap", "ast", "encodec"):
        args["device"] = device
    return get_embedder(name, **args)


def metric_table(ckpts: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every metric with its embedder, settings and whether its weights are available here."""
    ckpts = ckpts or {}
    rows = []
    for m, spec in METRICS.items():
        emb = _make_embedder(spec["embedder"], spec["kw"], ckpts)
        ok, why = emb.available()
        if spec["embedder"] == "probe" and not ok:
            ok, why = True, "trained at run time on the reference manifest's train split (or --probe PATH)"
        rows.append({"metric": m, "embedder": spec["embedder"], "what": spec["what"], "available": ok,
                     "reason": why, "settings": json.loads(emb.cache_key())})
    return rows


def _pca_source(emb: Embedder, store: FeatureStore, reference: Path, is_manifest: bool):
    """A thunk fitting the PCA for the sample-size rule on the embeddings of the reference
    manifest's train split (cached with the embeddings; identified by its hash in eval.json)."""

    def fit() -> tuple[S.Pca | None, str]:
        if not is_manifest:
            return None, "the reference is a folder of audio (no train split to fit a PCA on)"
        try:
            train, _ = read_reference(reference, "train")
        except ValueError as e:
            return None, str(e)
        x = np.concatenate([f["emb"] for f in store.many(emb, train, "train split for the PCA")])
        return S.Pca.fit(x, source=f"train split ({len(train)} clips) of {reference} [{manifest_hash(reference)}], "
                         f"embedder {emb.cache_hash()}"), ""

    return fit


def _get_probe(reference: Path, is_manifest: bool, probe_path: Path | None, seed: int, root: Path,
               progress: bool, floor_frac: float) -> Probe:
    if probe_path is not None:
        probe = Probe.load(Path(probe_path))
    elif is_manifest:
        out = root / "probes" / f"{manifest_hash(reference)}-seed{seed}.pt"
        probe = train_probe(reference, out, seed=seed, progress=progress)
    else:
        raise ValueError(
            f"--reference {reference} is a folder: the probe metrics need a manifest (to train the probe) or --probe PATH"
        )
    probe.check_quality(floor_frac)
    return probe


def evaluate(
    generated: Path,
    reference: Path,
    metrics: list[str] | None,
    out: Path | None,
    probe_path: Path | None = None,
    split: str = "test",
    codec: Any = None,
    seed: int = 0,
    progress: bool = True,
    ckpts: dict[str, str] | None = None,
    n_bootstrap: int = 1000,
    probe_floor: float = DEFAULT_FLOOR_FRAC,
    cache_dir: Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Score `generated` against `reference`; write `out` (JSON) and the per-clip CSV next to it.

    `metrics=None` runs every metric whose weights are available and lists the others
    under "skipped"; a metric named explicitly whose weights are missing is an error.
    `ckpts` maps an embedder name (clap, ast, encodec, vggish, probe) to a checkpoint.
    `device` runs the pretrained embedders (CLAP, AST, EnCodec) there; it is not part of the cache key.
    """
    ckpts = dict(ckpts or {})
    if probe_path is None and "probe" in ckpts:
        probe_path = Path(ckpts["probe"])
    root = cache_root(cache_dir)
    explicit = metrics is not None
    names = list(METRICS) if metrics is None else list(metrics)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"--metrics: unknown {', '.join(unknown)}; expected some of {', '.join(METRICS)}")
    if not names:
        raise ValueError("--metrics: no metric given")

    gen = read_generated(Path(generated))
    ref, is_manifest = read_reference(Path(reference), split)
    check_audio(gen, f"--generated {generated}")
    check_audio(ref, f"--reference {reference}")
    paired = pair_by_id(gen, ref, is_manifest)
    # a sample without attributes takes those of its reference clip (by id), else of the reference
    # clip(s) with its caption when they agree
    n_attr_from_ref = 0
    for g, r, rs in zip(gen, paired, attributes_by_caption(gen, ref)):
        if not g.attributes and r is not None and ref[r].attributes:
            g.attributes = dict(ref[r].attributes)
            n_attr_from_ref += 1
        elif not g.attributes and rs:
            cands = {json.dumps(ref[r].attributes, sort_keys=True) for r in rs}
            if len(cands) == 1 and ref[rs[0]].attributes:
                g.attributes = dict(ref[rs[0]].attributes)
                n_attr_from_ref += 1
    store = FeatureStore(root / "embeddings", progress)

    # embedders, shared between metrics with the same settings
    embedders: dict[str, Embedder] = {}
    skipped: dict[str, str] = {}
    probe: Probe | None = None
    for m in names:
        spec = METRICS[m]
        key = json.dumps([spec["embedder"], spec["kw"]], sort_keys=True)
        if spec["embedder"] == "probe":
            if probe is None:
                probe = _get_probe(Path(reference), is_manifest, probe_path, seed, root, progress, probe_floor)
            embedders[key] = get_embedder("probe", probe=probe)
            continue
        emb = embedders.get(key) or _make_embedder(spec["embedder"], spec["kw"], ckpts, device)
        ok, why = emb.available()
        if not ok:
            if explicit:
                raise FileNotFoundError(f"metric {m}: {why}")
            skipped[m] = why
            continue
        embedders[key] = emb
    names = [m for m in names if m not in skipped]

    codec_ref = resynthesize(codec, ref, root, progress) if codec is not None else None
    results: dict[str, Any] = {}
    per_clip: dict[str, np.ndarray] = {}
    gen_rates, ref_rates = _rates(gen), _rates(ref)
    for m in names:
        spec = METRICS[m]
        emb = embedders[json.dumps([spec["embedder"], spec["kw"]], sort_keys=True)]
        gen_f = store.many(emb, gen, f"{m} generated")
        ref_f = store.many(emb, ref, f"{m} reference")
        codec_f = store.many(emb, codec_ref, f"{m} codec") if codec_ref is not None else None
        kind = spec["kind"]
        if kind == "fd":
            res = compute_fd(gen_f, ref_f, codec_f, n_bootstrap, seed,
                             pca_source=_pca_source(emb, store, Path(reference), is_manifest))
        elif kind == "adherence":
            res = compute_adherence(gen_f, gen, ref_f, ref, codec_f, probe, n_bootstrap, seed)
        elif kind == "kl":
            res = compute_kl(gen_f, gen, ref_f, ref, codec_f, spec["convention"], n_bootstrap, seed, paired)
        else:
            res = compute_clap(emb, gen_f, gen, ref_f, ref, codec_f, n_bootstrap, seed)
        per_clip.update(res.pop("_per_clip", {}))
        settings = json.loads(emb.cache_key())
        res["settings"] = {
            "embedder": settings,
            "sr": emb.sample_rate,
            "resampled_from": {
                "generated": sorted(r for r in gen_rates if r != emb.sample_rate),
                "reference": sorted(r for r in ref_rates if r != emb.sample_rate),
            },
            "resampling": "scipy polyphase (ttm.audio.resample)",
        }
        res["what"] = spec["what"]
        if spec["embedder"] == "probe":
            res["probe"] = probe.summary()
            res["probe"]["floor_frac"] = probe_floor
        results[m] = res

    output: dict[str, Any] = {
        "generated": {
            "dir": str(Path(generated)), "n": len(gen),
            "n_attributes_from_reference": n_attr_from_ref,
        },
        "pairing": {
            "n_paired": sum(r is not None for r in paired), "n_unpaired": sum(r is None for r in paired),
            "rule": "paired metrics (KL) pair each generated clip 1:1 with the reference clip named by its ref_id; "
            "clips without ref_id (free-text prompts) are scored only with unpaired metrics (FD, CLAP-style, adherence)",
        },
        "audio_checks": f"passed for every generated and reference clip: readable, non-empty, finite, within "
        f"[-1, 1], mono peak >= {SILENT_PEAK:g}, at least {MIN_SCORED_S} s (rule: a clip failing any check "
        "stops the evaluation with an error naming it; nothing is scored, padded or dropped)",
        "reference": {"path": str(Path(reference)), "kind": "manifest" if is_manifest else "folder",
                      "split": split if is_manifest else None, "n": len(ref)},
        "seed": seed, "n_bootstrap": n_bootstrap, "alpha": 0.05,
        "codec": (codec.identity() if hasattr(codec, "identity") else repr(codec)) if codec is not None else None,
        "metrics": results,
        "skipped": skipped,
    }
    if out is not None:
        out = Path(out)
        atomic_write_text(out, json.dumps(output, indent=2, default=_json_default) + "\n")
        atomic_write_text(out.with_suffix(".csv"), per_clip_csv(gen, per_clip))
        output["csv"] = str(out.with_suffix(".csv"))
    return output


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def per_clip_csv(gen: list[Clip], per_clip: dict[str, np.ndarray]) -> str:
    cols = sorted(per_clip)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", "caption", "seed", *cols])
    for i, c in enumerate(gen):
        vals = []
        for k in cols:
            v = float(per_clip[k][i])
            vals.append("" if not np.isfinite(v) else f"{v:.6g}")
        w.writerow([c.file, c.caption, "" if c.seed is None else c.seed, *vals])
    return buf.getvalue()


# ----------------------------------------------------------------------------- CLI


def _parse_ckpts(items: list[str]) -> dict[str, str]:
    from eval.embedders import list_embedders

    out = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--ckpt {it!r}: expected NAME=PATH")
        if name not in list_embedders():
            raise ValueError(f"--ckpt {it!r}: unknown embedder {name!r}; expected one of {', '.join(list_embedders())}")
        out[name] = path
    return out


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ttm-bench eval", description="Evaluate generated audio against a reference set.")
    ap.add_argument("--generated", type=Path, help="folder of generated clips with samples.jsonl")
    ap.add_argument("--reference", type=Path, help="dataset manifest (.jsonl) or folder of audio")
    ap.add_argument("--metrics", default=None, help=f"comma-separated, from {','.join(METRICS)} (default: all available)")
    ap.add_argument("--out", type=Path, default=None, help="output JSON (the per-clip CSV goes next to it)")
    ap.add_argument("--probe", type=Path, default=None, help="a trained probe file (default: train one on the manifest)")
    ap.add_argument("--ckpt", action="append", default=[], metavar="NAME=PATH", help="checkpoint for an embedder")
    ap.add_argument("--split", default="test", help="reference manifest split (default test)")
    ap.add_argument("--codec", default=None, help="codec for the codec floor (NAME, NAME:PATH or a codec file/dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--probe-floor", type=float, default=DEFAULT_FLOOR_FRAC,
                    help="probe floor: mean held-out accuracy >= chance + FRAC * (1 - chance), averaged, "
                    f"and p < 0.05 against chance (default FRAC {DEFAULT_FLOOR_FRAC})")
    ap.add_argument("--cache", type=Path, default=None, help="cache root (default $TTM_BENCH_CACHE or ~/.cache/ttm-bench)")
    ap.add_argument("--device", default="cpu", help="device for the pretrained embedders (default cpu)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--list", action="store_true", help="list the metrics, their embedders and availability")
    a = ap.parse_args(argv)
    ckpts = _parse_ckpts(a.ckpt)
    if a.list:
        for r in metric_table(ckpts):
            state = "available" if r["available"] else "NOT available"
            print(f"{r['metric']:<12} embedder={r['embedder']:<8} {state}: {r['what']}")
            if r["reason"]:
                print(f"{'':<12} {r['reason']}")
            print(f"{'':<12} settings: {json.dumps(r['settings'], sort_keys=True)}")
        return 0
    if a.generated is None or a.reference is None:
        raise ValueError("--generated and --reference are required (or --list)")
    codec = None
    if a.codec:
        from ttm.codecs import load_codec

        codec = load_codec(a.codec)
    metrics = [m.strip() for m in a.metrics.split(",") if m.strip()] if a.metrics else None
    res = evaluate(a.generated, a.reference, metrics, a.out, probe_path=a.probe, split=a.split, codec=codec,
                   seed=a.seed, progress=not a.quiet, ckpts=ckpts, n_bootstrap=a.n_bootstrap,
                   probe_floor=a.probe_floor, cache_dir=a.cache, device=a.device)
    for m, r in res["metrics"].items():
        ci = "" if r.get("ci_low") is None else f"  [{r['ci_low']:.4g}, {r['ci_high']:.4g}]"
        print(f"{m:<12} {r['value']:.4g}{ci}  n={r['n']}")
    for m, why in res["skipped"].items():
        print(f"{m:<12} skipped: {why}")
    if a.out:
        print(f"wrote {a.out} and {res['csv']}")
    return 0
