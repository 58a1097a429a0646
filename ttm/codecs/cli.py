"""Token caching: a manifest's audio -> codec codes, one shard per split.

    out_root/<codec identity hash>/tokens_{split}.pt   {"ids", "codes" [N, K, T], "lengths" [N],
                                                         "captions", "attributes"}
    out_root/<codec identity hash>/identity.json        codec identity + manifest hash (written last)

`ttm-bench data tokenize MANIFEST --codec melrvq [--codec-path P] [--out DIR]`
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ttm.audio import atomic_torch_save, load_audio
from ttm.codecs import CODECS, build_codec
from ttm.codecs.base import Codec, hash_json
from ttm.codecs.melrvq import MelRVQCodec
from ttm.config import parse_assignments
from ttm.data.manifest import SPLITS, Entry, read_manifest, resolve_audio
from ttm.util import atomic_write_text

SHARD_FORMAT = "ttm-tokens-1"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_clip(manifest: Path, e: Entry, sample_rate: int, channels: int) -> Tensor:
    path = resolve_audio(manifest, e)
    if not path.is_file():
        raise FileNotFoundError(f"{manifest}: entry {e.id!r}: audio file not found: {path}")
    return load_audio(path, sample_rate=sample_rate, channels=channels)  # [C, N]


def _encode_entries(manifest: Path, entries: list[Entry], codec: Codec, batch_size: int, bar) -> list[Tensor]:
    """Codes `[K, T_i]` per entry; consecutive clips of equal length are encoded as one batch."""
    out: list[Tensor] = []
    batch: list[Tensor] = []

    def flush() -> None:
        if batch:
            codes = codec.encode(torch.stack(batch)).cpu()  # [b, K, T]
            out.extend(codes.unbind(0))
            bar.update(len(batch))
            batch.clear()

    for e in entries:
        wav = _read_clip(manifest, e, codec.sample_rate, codec.channels)
        if batch and (wav.shape != batch[0].shape or len(batch) >= batch_size):
            flush()
        batch.append(wav)
    flush()
    return out


def tokenize_manifest(
    manifest: str | os.PathLike,
    codec: Codec,
    out_root: str | os.PathLike,
    progress: bool = True,
    batch_size: int = 16,
    max_frames: int | None = None,
) -> Path:
    """Encode every clip of `manifest` with `codec` into `out_root/<identity hash>/` and return that folder.

    Per split, clips are padded (with code 0) or cropped (to `max_frames`) to a common T;
    `lengths` holds each clip's valid frames. A second call with the same codec identity,
    manifest bytes and `max_frames` returns at once.
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: manifest not found")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames: expected >= 1 or None, got {max_frames}")
    ident = codec.identity()
    out = Path(out_root) / hash_json(ident)
    id_file = out / "identity.json"
    m_hash = _sha256(manifest)
    if id_file.is_file():
        try:
            done = json.loads(id_file.read_text())
        except json.JSONDecodeError:
            done = {}
        if (
            done.get("manifest_sha256") == m_hash
            and done.get("max_frames") == max_frames
            and done.get("codec") == ident
            and all((out / f"tokens_{s}.pt").is_file() for s in done.get("splits", {}))
        ):
            return out
    entries = read_manifest(manifest)
    if not entries:
        raise ValueError(f"{manifest}: no entries")
    out.mkdir(parents=True, exist_ok=True)
    if id_file.exists():
        id_file.unlink()  # the old shards are about to be replaced
    from tqdm import tqdm

    splits: dict[str, dict[str, int]] = {}
    with tqdm(total=len(entries), desc="tokenize", leave=False, file=sys.stderr, disable=not progress) as bar:
        for split in SPLITS:
            shard = out / f"tokens_{split}.pt"
            part = [e for e in entries if e.split == split]
            if not part:
                if shard.exists():
                    shard.unlink()
                continue
            codes = _encode_entries(manifest, part, codec, batch_size, bar)
            T = max(c.shape[-1] for c in codes)
            if max_frames is not None:
                T = min(T, max_frames)
            stacked = torch.zeros(len(codes), codec.n_codebooks, T, dtype=torch.long)  # [N, K, T]
            lengths = torch.zeros(len(codes), dtype=torch.long)  # [N]
            for i, c in enumerate(codes):
                n = min(c.shape[-1], T)
                stacked[i, :, :n] = c[:, :n]
                lengths[i] = n
            atomic_torch_save(
                {
                    "format": SHARD_FORMAT,
                    "ids": [e.id for e in part],
                    "codes": stacked,
                    "lengths": lengths,
                    "captions": [e.caption for e in part],
                    "attributes": [e.attributes for e in part],
                },
                shard,
            )
            splits[split] = {"n": len(part), "frames": T}
    record = {
        "codec": ident,
        "codec_hash": out.name,
        "sample_rate": codec.sample_rate,
        "frame_rate": codec.frame_rate,
        "n_codebooks": codec.n_codebooks,
        "cardinality": codec.cardinality,
        "manifest": str(manifest.resolve()),
        "manifest_sha256": m_hash,
        "max_frames": max_frames,
        "splits": splits,
    }
    atomic_write_text(id_file, json.dumps(record, indent=2) + "\n")
    return out


def _train_audio(manifest: Path, entries: list[Entry], sample_rate: int) -> Iterator[Tensor]:
    for e in entries:
        yield _read_clip(manifest, e, sample_rate, 1)


def fit_or_load_melrvq(
    manifest: str | os.PathLike, out: str | os.PathLike, seed: int = 0, **settings: Any
) -> MelRVQCodec:
    """The melrvq codec fitted on the train split of `manifest`, saved at `out`.

    An existing file at `out` is reused when it was fitted with the same settings, seed and
    train clips; a file fitted otherwise raises ValueError (delete it or choose another path).
    Griffin-Lim settings only affect decoding and may differ.
    """
    manifest, out = Path(manifest), Path(out)
    entries = [e for e in read_manifest(manifest) if e.split == "train"]
    if not entries:
        raise ValueError(f"{manifest}: no 'train' entries to fit the melrvq codec on")
    train_hash = hash_json([[e.id, e.path] for e in entries])
    want = MelRVQCodec(**MelRVQCodec.check_settings(settings))
    decode_only = {k: v for k, v in want.settings.items() if k.startswith("griffin_lim_")}
    if out.exists():
        codec = MelRVQCodec.load(out, **decode_only)
        fitted = {k: v for k, v in codec.settings.items() if k not in decode_only}
        wanted = {k: v for k, v in want.settings.items() if k not in decode_only}
        diff = sorted(k for k in wanted if fitted.get(k) != wanted[k])
        info = codec.fit_info
        if info.get("seed") != seed:
            diff.append(f"seed ({info.get('seed')} != {seed})")
        if info.get("train_hash") != train_hash:
            diff.append("train clips")
        if diff:
            raise ValueError(
                f"{out}: melrvq codec was fitted with different {', '.join(diff)}; delete it or choose another path"
            )
        return codec
    want.fit(_train_audio(manifest, entries, want.sample_rate), seed=seed)
    want.fit_info["train_hash"] = train_hash
    want.fit_info["manifest"] = str(manifest.resolve())
    want.save(out)
    return want


def tokenize_main(argv: list[str]) -> int:
    """`ttm-bench data tokenize MANIFEST --codec NAME [--codec-path P] [--out DIR] ...`"""
    ap = argparse.ArgumentParser(prog="ttm-bench data tokenize", description=tokenize_manifest.__doc__)
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--codec", choices=CODECS, default="melrvq")
    ap.add_argument(
        "--codec-path",
        help="melrvq: fitted codec file (fitted on the train split when missing); encodec/dac: hub id or local dir",
    )
    ap.add_argument("--out", type=Path, help="token root (default: MANIFEST's folder/tokens)")
    ap.add_argument("--n-codebooks", type=int)
    ap.add_argument("--seed", type=int, default=0, help="melrvq fitting seed")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="melrvq setting (e.g. cardinality=256, hop_length=320); repeatable",
    )
    ap.add_argument("--max-frames", type=int, help="crop clips to this many frames")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    out_root = a.out or a.manifest.parent / "tokens"
    settings = parse_assignments(a.set)
    if a.n_codebooks is not None:
        settings["n_codebooks"] = a.n_codebooks
    if a.codec == "melrvq":
        path = (
            Path(a.codec_path)
            if a.codec_path
            else out_root / f"melrvq-seed{a.seed}-{hash_json(settings)}.codec"
        )
        codec: Codec = fit_or_load_melrvq(a.manifest, path, seed=a.seed, **settings)
        if a.device:
            codec.to(a.device)
    else:
        if a.set:
            raise ValueError(f"--set applies to melrvq only, not {a.codec}")
        codec = build_codec(a.codec, path=a.codec_path, device=a.device, **settings)
    d = tokenize_manifest(
        a.manifest, codec, out_root, progress=not a.quiet, batch_size=a.batch_size, max_frames=a.max_frames
    )
    print(d)
    return 0
