"""`ttm-bench eval`: score generated clips against a reference set.

    ttm-bench eval --generated runs/x/samples --reference data/tiny/manifest.jsonl --out runs/x/eval.json
    ttm-bench eval ... --metrics fd_probe,adherence,kl_probe,clap_probe,kl_ast,clap,fad_clap,fad_encodec
    ttm-bench eval --list

Metrics are objects in eval/scores/ (one family per file, `@register`): this module reads the
clips (eval/clips.py), refuses bad audio, computes and caches each embedder's features once,
and calls each metric's `compute` and `floors`. The offline default set comes from one embedded
evaluator (eval/probe.py): FD (fd_probe), KL of attribute posteriors (kl_probe), a CLAP-style
text-audio score (clap_probe) and adherence; metrics on pretrained weights (AST, CLAP, EnCodec,
VGGish) run when their weights are here and are listed under "skipped" otherwise.

Generated: a folder of audio files with `samples.jsonl` (`file`, `caption`, `seed`,
`attributes`, and `ref_id`: the manifest id of the reference clip it was generated for,
written by `ttm-bench generate` for split-driven prompts). Paired metrics (KL) pair 1:1 by
that id, never by caption; a clip without `ref_id` (a free-text prompt) is scored only by
the unpaired metrics (FD, CLAP-style score, adherence), and eval.json's "pairing" block
says how many were paired. Reference: a dataset manifest (its `split` clips, default test)
or a plain folder of audio (unpaired metrics; the probe metrics with --probe).

Every metric gets {value, ci_low, ci_high, n, resolvable_difference, settings, floors}. FD's
value and interval are FD AT THIS n (re-centred bootstrap over clips), next to the
population FD (jackknife) with its own interval; an FD with fewer than 2 D embeddings per
set is computed on the top n/2 principal components of the reference train split's
embeddings, or refused (eval/stats.py). Other intervals are percentile bootstraps over
clips. `resolvable_difference` is the smallest difference to another row at the same n
that the metric resolves. Floors:
  noise: the reference against itself, for FD: FD(reference half A, half B) over a
         seeded split into disjoint halves, reported next to FD(generated, half B) with
         the generated set cut to the size of half A, so the two numbers are comparable;
         for CLAP-style / adherence: the metric on the reference clips themselves; for KL:
         distinct reference clips sharing a caption (when there are any);
  codec: the metric on the reference resynthesised by a codec (encode -> decode) against
         the reference, when a codec is given.
Probe metrics also carry the probe's held-out quality and chance levels; a metric whose probe
head is below its floor is refused: reported with value null and the reason (an error when
every requested metric is refused). Bad audio is refused before any metric (eval/clips.py):
a generated or reference clip that is unreadable, empty, non-finite, outside [-1, 1], silent
after the down-mix to mono or shorter than 0.5 s stops the evaluation with an error naming
each file and its defect. A per-clip CSV is written next to the JSON.
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
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from eval import stats as S
from eval.clips import (
    MIN_SCORED_S,
    SILENT_PEAK,
    Clip,
    attributes_by_caption,
    audio_defect,
    check_audio,
    pair_by_id,
    read_generated,
    read_reference,
)
from eval.embedders import get_embedder
from eval.embedders.base import Embedder
from eval.probe import DEFAULT_FLOOR_FRAC, Probe, manifest_hash, train_probe
from eval.scores import Inputs, get_metric, list_metrics
from ttm.audio import atomic_write_text, load_audio, save_audio

__all__ = ["audio_defect", "cli", "evaluate", "metric_table"]

def cache_root(override: str | os.PathLike | None = None) -> Path:
    return Path(override or os.environ.get("TTM_BENCH_CACHE") or "~/.cache/ttm-bench").expanduser()


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
    for m in list_metrics():
        spec = get_metric(m)
        emb = _make_embedder(spec.embedder, spec.embedder_kw, ckpts)
        ok, why = emb.available()
        if spec.embedder == "probe" and not ok:
            ok, why = True, "trained at run time on the reference manifest's train split (or --probe PATH)"
        rows.append({"metric": m, "embedder": spec.embedder, "what": spec.what, "available": ok,
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
               progress: bool) -> Probe:
    if probe_path is not None:
        probe = Probe.load(Path(probe_path))
    elif is_manifest:
        out = root / "probes" / f"{manifest_hash(reference)}-seed{seed}.pt"
        probe = train_probe(reference, out, seed=seed, progress=progress)
    else:
        raise ValueError(
            f"--reference {reference} is a folder: the probe metrics need a manifest (to train the probe) or --probe PATH"
        )
    return probe


def _check_head(probe: Probe, head: str | None, frac: float) -> None:
    """The quality floor of the probe head a metric relies on (raises below it)."""
    if head == "attributes":
        probe.check_quality(frac)
    elif head == "contrastive":
        probe.check_contrastive_quality(frac)


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
    names = list_metrics() if metrics is None else list(metrics)
    unknown = [m for m in names if m not in list_metrics()]
    if unknown:
        raise ValueError(f"--metrics: unknown {', '.join(unknown)}; expected some of {', '.join(list_metrics())}")
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

    # embedders, shared between metrics with the same settings; the probe heads' floors
    embedders: dict[str, Embedder] = {}
    skipped: dict[str, str] = {}
    refused: dict[str, str] = {}
    probe: Probe | None = None
    specs = {m: get_metric(m) for m in names}
    for m, spec in specs.items():
        key = json.dumps([spec.embedder, spec.embedder_kw], sort_keys=True)
        if spec.embedder == "probe":
            if probe is None:
                probe = _get_probe(Path(reference), is_manifest, probe_path, seed, root, progress)
            try:
                _check_head(probe, spec.probe_head, probe_floor)
            except ValueError as e:  # below its quality floor: reported as refused, never scored
                refused[m] = f"refused: {e}"
                continue
            embedders[key] = embedders.get(key) or get_embedder("probe", probe=probe)
            continue
        emb = embedders.get(key) or _make_embedder(spec.embedder, spec.embedder_kw, ckpts, device)
        ok, why = emb.available()
        if not ok:
            if explicit:
                raise FileNotFoundError(f"metric {m}: {why}")
            skipped[m] = why
            continue
        embedders[key] = emb
    if refused and len(refused) == len(names):
        raise ValueError("; ".join(f"metric {m}: {why}" for m, why in refused.items()))
    names = [m for m in names if m not in skipped and m not in refused]

    codec_ref = resynthesize(codec, ref, root, progress) if codec is not None else None
    results: dict[str, Any] = {}
    per_clip: dict[str, np.ndarray] = {}
    gen_rates, ref_rates = _rates(gen), _rates(ref)
    inputs: dict[str, Inputs] = {}  # per embedder: features shared by its metrics
    for m in names:
        spec = specs[m]
        key = json.dumps([spec.embedder, spec.embedder_kw], sort_keys=True)
        emb = embedders[key]
        if key not in inputs:
            inputs[key] = Inputs(
                gen=gen, ref=ref, gen_f=store.many(emb, gen, f"{m} generated"), ref_f=store.many(emb, ref, f"{m} reference"),
                codec_f=store.many(emb, codec_ref, f"{m} codec") if codec_ref is not None else None,
                paired=paired, embedder=emb, n_boot=n_bootstrap, seed=seed, probe=probe,
                pca_source=_pca_source(emb, store, Path(reference), is_manifest),
            )
        x = inputs[key]
        res = spec.compute(x)
        res["floors"] = spec.floors(x)
        per_clip.update(res.pop("_per_clip", {}))
        res["resolvable_difference"] = S.resolvable_difference(res)
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
        res["what"] = spec.what
        res["paired"] = spec.paired
        if spec.embedder == "probe":
            res["probe"] = probe.summary()
            res["probe"]["floor_frac"] = probe_floor
        results[m] = res

    for m, why in refused.items():
        results[m] = {"value": None, "reason": why, "n": len(gen), "what": specs[m].what,
                      "probe": probe.summary() if probe is not None else None}
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
    ap.add_argument("--metrics", default=None, help=f"comma-separated, from {','.join(list_metrics())} (default: all available)")
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
        if r["value"] is None:
            print(f"{m:<12} {r['reason']}")
            continue
        ci = "" if r.get("ci_low") is None else f"  [{r['ci_low']:.4g}, {r['ci_high']:.4g}]"
        print(f"{m:<12} {r['value']:.4g}{ci}  n={r['n']}")
    for m, why in res["skipped"].items():
        print(f"{m:<12} skipped: {why}")
    if a.out:
        print(f"wrote {a.out} and {res['csv']}")
    return 0
