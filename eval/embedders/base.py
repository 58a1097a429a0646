"""The embedder contract, the registry decorator and pretrained-weight resolution.

An embedder turns one clip `wav [C, N]` at its own `sample_rate` into frame embeddings
`[frames, D]` (`embed`) or one clip embedding `[D]` (`embed_clip`, the mean over frames).
`features(wav)` returns every array the embedder computes in one pass (always "emb",
plus e.g. "logits" for a tagger); the runner caches that dict on disk under
`cache_key()`, which lists every setting that changes the output.

To add an embedder, write one file in eval/embedders/ with a subclass decorated with
`@register("name")`; the registry imports every module of the package.

Pretrained weights come only from a local directory or the local Hugging Face cache
(`local_files_only=True`, so nothing is ever downloaded, whatever HF_HUB_OFFLINE says).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REGISTRY: dict[str, type[Embedder]] = {}


def register(name: str) -> Callable[[type[Embedder]], type[Embedder]]:
    def deco(cls: type[Embedder]) -> type[Embedder]:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


class Embedder:
    """Base class. Subclasses set the attributes below and implement `features` and `settings`."""

    name: str = "?"
    sample_rate: int = 16000
    channels: int = 1
    window_s: float | None = None
    hop_s: float | None = None

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Every setting that changes the output (checkpoint id/path, revision, rates, windows...)."""
        return {"sample_rate": self.sample_rate, "channels": self.channels, "window_s": self.window_s, "hop_s": self.hop_s}

    def cache_key(self) -> str:
        """A JSON string of the embedder's name and all its settings (sorted keys)."""
        return json.dumps({"embedder": self.name, **self.settings()}, sort_keys=True, default=str)

    def cache_hash(self) -> str:
        return hashlib.sha256(self.cache_key().encode()).hexdigest()[:16]

    def available(self) -> tuple[bool, str]:
        """(True, "") when the weights are here; otherwise (False, why not)."""
        return True, ""

    def features(self, wav: torch.Tensor) -> dict[str, np.ndarray]:
        """`wav [C, N]` at `sample_rate` -> {"emb": [frames, D], ...} float32 arrays."""
        raise NotImplementedError

    def embed(self, wav: torch.Tensor) -> torch.Tensor:
        """`wav [C, N]` at `sample_rate` -> `[frames, D]`."""
        return torch.from_numpy(self.features(self._check(wav))["emb"])

    def embed_clip(self, wav: torch.Tensor) -> torch.Tensor:
        """`wav [C, N]` -> `[D]`, the mean over frames."""
        e = self.embed(wav)
        if e.shape[0] == 0:
            raise ValueError(f"{self.name}: the clip ({wav.shape[-1]} samples) yields no frames")
        return e.mean(0)

    def _check(self, wav: torch.Tensor) -> torch.Tensor:
        wav = torch.as_tensor(wav, dtype=torch.float32)
        if wav.dim() == 1:
            wav = wav[None]
        if wav.dim() != 2:
            raise ValueError(f"{self.name}: expected audio [C, N], got shape {tuple(wav.shape)}")
        if wav.shape[0] != self.channels:
            wav = wav.mean(0, keepdim=True).expand(self.channels, -1)
        return wav

    def windows(self, n_samples: int) -> list[tuple[int, int]]:
        """Windows covering the clip: full `window_s` windows every `hop_s`, and one more aligned
        to the clip's end when they do not reach it. A clip shorter than a window is one window."""
        if self.window_s is None:
            return [(0, n_samples)]
        return cover_windows(n_samples, round(self.window_s * self.sample_rate), round(self.hop_s * self.sample_rate))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cache_key()})"


def cover_windows(n: int, win: int, hop: int) -> list[tuple[int, int]]:
    if hop <= 0 or win <= 0:
        raise ValueError(f"windows: window and hop must be > 0 samples, got {win}, {hop}")
    if n <= win:
        return [(0, n)]
    out = [(s, s + win) for s in range(0, n - win + 1, hop)]
    if out[-1][1] < n:
        out.append((n - win, n))
    return out


# ----------------------------------------------------------------------------- pretrained weights


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _dir_fingerprint(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(d)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def resolve_checkpoint(ckpt: str | os.PathLike, metric: str, revision: str | None = None) -> tuple[Path, dict[str, Any]]:
    """A local model directory for `ckpt` (a directory, or a hub id found in the local HF cache).

    Returns (directory, identity) where identity names the source: {"ckpt", "revision",
    "commit"} for the cache, {"ckpt", "fingerprint"} (file names, sizes, mtimes) for a directory.
    Raises FileNotFoundError naming the metric and every place looked in.
    """
    s = str(ckpt)
    p = Path(s).expanduser()
    if p.is_dir():
        return p.resolve(), {"ckpt": str(p.resolve()), "fingerprint": _dir_fingerprint(p)}
    looks_like_path = p.is_absolute() or s.startswith((".", "~")) or s.count("/") != 1 or p.exists()
    if looks_like_path:
        raise FileNotFoundError(f"{metric}: checkpoint directory {p} not found (pass an existing model directory)")
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(s, "config.json", revision=revision)
    if not isinstance(found, str):
        raise FileNotFoundError(
            f"{metric}: weights {s!r}{f' (revision {revision})' if revision else ''} are not a local directory and "
            f"not in the Hugging Face cache {hf_cache_dir()} (nothing is downloaded at run time); fetch them once "
            f"with `huggingface-cli download {s}` where there is network access, or pass --ckpt NAME=DIR"
        )
    snap = Path(found).parent
    return snap, {"ckpt": s, "revision": revision or "main", "commit": snap.name}


def from_pretrained(cls: Any, directory: Path, metric: str, **kw: Any) -> Any:
    """`cls.from_pretrained(directory, local_files_only=True)` with an error naming the metric."""
    try:
        return cls.from_pretrained(str(directory), local_files_only=True, **kw)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{metric}: cannot load {cls.__name__} from {directory}: {e}") from e


class PretrainedEmbedder(Embedder):
    """Shared logic of the transformers-based embedders: lazy loading from a resolved directory."""

    default_ckpt: str = ""

    def __init__(self, ckpt: str | os.PathLike | None = None, revision: str | None = None, device: str = "cpu"):
        self.ckpt = str(ckpt) if ckpt else self.default_ckpt
        self.revision = revision
        self.device = device
        self._dir: Path | None = None
        self._ident: dict[str, Any] | None = None
        self._model: Any = None

    def _resolve(self) -> tuple[Path, dict[str, Any]]:
        if self._dir is None:
            self._dir, self._ident = resolve_checkpoint(self.ckpt, self.name, self.revision)
        return self._dir, self._ident  # type: ignore[return-value]

    def available(self) -> tuple[bool, str]:
        try:
            self._resolve()
        except FileNotFoundError as e:
            return False, str(e)
        return True, ""

    def settings(self) -> dict[str, Any]:
        try:
            ident = self._resolve()[1]
        except FileNotFoundError:
            ident = {"ckpt": self.ckpt, "revision": self.revision or "main", "commit": None}
        return {**super().settings(), **ident}

    def _config(self) -> dict[str, Any]:
        d = self._resolve()[0]
        try:
            return json.loads((d / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FileNotFoundError(f"{self.name}: cannot read {d / 'config.json'}: {e}") from e
