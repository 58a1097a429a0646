"""Data preparation for a run: dataset -> codec -> token shards -> text embeddings.

Every product is cached on disk next to the dataset and keyed by the settings that
change it, so a grid of runs over one dataset builds, fits and tokenizes once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ttm.audio import atomic_torch_save
from ttm.codecs import build_codec
from ttm.codecs.cli import fit_or_load_melrvq, tokenize_manifest
from ttm.config import RunConfig
from ttm.data.build import build_dataset
from ttm.text import build_text_encoder, encode_captions
from ttm.util import file_lock, json_hash


@dataclass
class Split:
    codes: Tensor  # [N, K, T] int64
    lengths: Tensor  # [N] valid frames
    text_emb: Tensor  # [N, L, Dt]
    text_mask: Tensor  # [N, L] bool
    captions: list[str]
    attributes: list[dict]
    ids: list[str]

    def __len__(self) -> int:
        return self.codes.shape[0]


@dataclass
class Prepared:
    manifest: Path
    codec: object  # ttm.codecs.base.Codec
    text_dim: int
    splits: dict[str, Split]
    token_dir: Path


def resolve_manifest(cfg: RunConfig, progress: bool = True) -> Path:
    if cfg.data.manifest:
        m = Path(cfg.data.manifest)
        if not m.exists():
            raise FileNotFoundError(f"data.manifest: {m} does not exist")
        return m
    out = Path(cfg.data.root) / f"{cfg.data.preset}-seed{cfg.data.seed}"
    return build_dataset(cfg.data.preset, out, seed=cfg.data.seed, progress=progress)


def load_codec_for(cfg: RunConfig, manifest: Path):
    if cfg.codec.name == "melrvq":
        path = Path(cfg.codec.path) if cfg.codec.path else (
            manifest.parent / f"melrvq-{json_hash(cfg.codec.settings)}.codec"
        )
        return fit_or_load_melrvq(manifest, path, seed=cfg.data.seed, **cfg.codec.settings)
    kw = dict(cfg.codec.settings)
    if cfg.codec.path:
        kw["path"] = cfg.codec.path
    return build_codec(cfg.codec.name, **kw)


def _text_cache(token_dir: Path, split: str, captions: list[str], encoder, max_len: int) -> tuple[Tensor, Tensor]:
    key = json_hash({"enc": encoder.identity(), "L": max_len, "captions": captions})
    f = token_dir / f"text-{split}-{key}.pt"
    if f.exists():
        d = torch.load(f, weights_only=True)
        return d["emb"], d["mask"]
    embs, masks = [], []
    for i in range(0, len(captions), 64):
        e, m = encode_captions(encoder, captions[i : i + 64], max_len)
        embs.append(e)
        masks.append(m)
    emb = torch.cat(embs) if embs else torch.zeros(0, max_len, encoder.dim)
    mask = torch.cat(masks) if masks else torch.zeros(0, max_len, dtype=torch.bool)
    atomic_torch_save({"emb": emb, "mask": mask}, f)
    return emb, mask


def build_text_encoder_for(cfg: RunConfig):
    return build_text_encoder(cfg.text.name, path=cfg.text.path, max_length=cfg.text.max_length)


def prepare(cfg: RunConfig, progress: bool = True, splits=("train", "valid", "test")) -> Prepared:
    # one builder at a time per data root: parallel grid workers wait for the first one's products
    where = Path(cfg.data.manifest).parent if cfg.data.manifest else Path(cfg.data.root)
    with file_lock(where / ".prepare.lock"):
        manifest = resolve_manifest(cfg, progress)
        codec = load_codec_for(cfg, manifest)
        token_dir = Path(tokenize_manifest(manifest, codec, manifest.parent / "tokens", progress=progress))
        encoder = build_text_encoder_for(cfg)
        out = {}
        for split in splits:
            f = token_dir / f"tokens_{split}.pt"
            if not f.exists():
                continue
            d = torch.load(f, weights_only=True)
            emb, mask = _text_cache(token_dir, split, list(d["captions"]), encoder, cfg.text.max_length)
            out[split] = Split(
                codes=d["codes"].long(),
                lengths=d["lengths"].long(),
                text_emb=emb,
                text_mask=mask,
                captions=list(d["captions"]),
                attributes=list(d.get("attributes", [{}] * len(d["captions"]))),
                ids=list(d.get("ids", [])),
            )
    if "train" not in out or len(out["train"]) == 0:
        raise ValueError(f"{manifest}: no training clips after tokenization (is there a 'train' split?)")
    return Prepared(manifest, codec, encoder.dim, out, token_dir)
