"""Pretrained neural codecs through transformers: EnCodec (`EncodecModel`) and DAC (`DacModel`).

Weights come from a local directory (written by `save_pretrained`, or a downloaded
snapshot) or a hub id resolved in the local HF cache; nothing is downloaded when
HF_HUB_OFFLINE=1. The input is padded to a multiple of the hop length (what the
models' feature extractors do), so `T = ceil(N / hop)`.

Latents: EnCodec's is the sum of the quantised codebook vectors (`[B, codebook_dim, T]`,
the decoder input); DAC's is the sum of the codebooks' out-projections
(`[B, hidden_size, T]`, its decoder input).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ttm.codecs.base import Codec, model_fingerprint
from ttm.progress import is_tty


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_pretrained(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """`(what to pass to from_pretrained, local_files_only)`. A directory is local; a string that
    looks like a path (absolute, ./, ../, ~, or more than one '/') must exist."""
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.is_dir():
        return str(p.resolve()), True
    looks_like_path = (
        p.is_absolute() or s.startswith((".", "~")) or s.count("/") > 1 or os.sep != "/" and os.sep in s
    )
    if p.exists():
        raise FileNotFoundError(f"{p}: expected a pretrained model directory, found a file")
    if looks_like_path:
        raise FileNotFoundError(f"pretrained model directory not found: {p}")
    return s, hub_offline()


def load_pretrained(cls: Any, name_or_path: str | os.PathLike, what: str) -> Any:
    """`cls.from_pretrained` from a local directory, or a hub id from the local HF cache first (the
    hub is asked only when that fails and HF_HUB_OFFLINE is not set). Missing weights raise
    FileNotFoundError naming the id/path and HF_HUB_OFFLINE."""
    if not is_tty(sys.stderr):  # transformers' weight-loading bar would flood a log file
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    src, local_only = resolve_pretrained(name_or_path)
    if Path(src).is_dir():
        try:
            return cls.from_pretrained(src, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{what}: {src}: cannot load a {cls.__name__} from this directory ({e})") from e
    try:
        return cls.from_pretrained(src, local_files_only=True)
    except OSError as e:
        if local_only:
            raise FileNotFoundError(
                f"{what}: {src!r} is not in the local HF cache and HF_HUB_OFFLINE=1 forbids downloading; "
                f"download it once with network access or pass a local directory"
            ) from e
    try:
        return cls.from_pretrained(src)
    except OSError as e:
        raise FileNotFoundError(
            f"{what}: cannot load {src!r} from the hub or the local HF cache (HF_HUB_OFFLINE unset): {e}; "
            f"pass a local directory"
        ) from e


class HFCodec(Codec):
    """Shared parts of the transformers-backed codecs."""

    kind = "?"

    def __init__(self, model: Any, source: str):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.source = source
        self._state_hash: dict[str, str] | None = None

    def train(self, mode: bool = True) -> HFCodec:  # always eval: quantizer dropout must stay off
        return super().train(False)

    @property
    def hop_length(self) -> int:
        return int(self.model.config.hop_length)

    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def n_codebooks(self) -> int:
        return self._k

    @property
    def cardinality(self) -> int:
        return int(self.model.config.codebook_size)

    def n_frames(self, n_samples: int) -> int:
        return math.ceil(int(n_samples) / self.hop_length)

    def _pad(self, wav: Tensor) -> Tensor:  # [B, C, N] -> [B, C, T*hop]
        extra = -wav.shape[-1] % self.hop_length
        return F.pad(wav, (0, extra)) if extra else wav

    def identity(self) -> dict[str, Any]:
        if self._state_hash is None:  # computed once: the model is frozen
            self._state_hash = model_fingerprint(self.model)
        return {
            "codec": self.kind,
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "n_codebooks": self.n_codebooks,
            "cardinality": self.cardinality,
            **self._state_hash,
        }

    def decode(self, codes: Tensor) -> Tensor:
        return self.decode_latent(self.latent(codes))


class EncodecCodec(HFCodec):
    """EnCodec (`facebook/encodec_24khz`, `facebook/encodec_32khz`, ...). `n_codebooks` picks the
    smallest target bandwidth with at least that many quantizers (RVQ codes are prefixes of each
    other, so the first `n_codebooks` rows are kept). Default: the model's smallest bandwidth."""

    kind = "encodec"

    def __init__(
        self,
        name_or_path: str | os.PathLike = "facebook/encodec_24khz",
        n_codebooks: int | None = None,
        device: str | torch.device | None = None,
    ):
        from transformers import EncodecModel

        model = load_pretrained(EncodecModel, name_or_path, "encodec")
        cfg = model.config
        if cfg.chunk_length_s is not None or cfg.normalize:
            raise ValueError(
                f"encodec: {name_or_path}: chunked / normalised models (chunk_length_s={cfg.chunk_length_s}, "
                f"normalize={cfg.normalize}) are not supported: their codes need per-chunk scales"
            )
        super().__init__(model, str(name_or_path))
        q = model.quantizer
        self._bandwidths = sorted(float(b) for b in cfg.target_bandwidths)
        self._per_bw = {b: q.get_num_quantizers_for_bandwidth(b) for b in self._bandwidths}
        max_k = max(self._per_bw.values())
        k = self._per_bw[self._bandwidths[0]] if n_codebooks is None else int(n_codebooks)
        if not 1 <= k <= max_k:
            raise ValueError(
                f"encodec: n_codebooks must be in [1, {max_k}] for {name_or_path}, got {n_codebooks}"
            )
        self._k = k
        self._bandwidth = next(b for b in self._bandwidths if self._per_bw[b] >= k)
        if device is not None:
            self.to(device)

    @property
    def channels(self) -> int:
        return int(self.model.config.audio_channels)

    @property
    def latent_dim(self) -> int:
        return int(self.model.config.codebook_dim)

    def _encode(self, wav: Tensor) -> Tensor:
        out = self.model.encode(self._pad(wav), bandwidth=self._bandwidth, return_dict=True)
        return out.audio_codes[0, :, : self._k]  # [1, B, Kq, T] -> [B, K, T]

    def latent(self, codes: Tensor) -> Tensor:
        codes = self.check_codes(codes)
        with torch.no_grad():
            return self.model.quantizer.decode(codes.transpose(0, 1))  # [B, D, T]

    def decode_latent(self, latent: Tensor) -> Tensor:
        latent = torch.as_tensor(latent, dtype=torch.float32).to(self.device)
        if latent.dim() != 3 or latent.shape[1] != self.latent_dim:
            raise ValueError(f"encodec latent: expected [B, {self.latent_dim}, T], got {tuple(latent.shape)}")
        with torch.no_grad():
            return self.model.decoder(latent)  # [B, C, T*hop]


class DacCodec(HFCodec):
    """DAC (`descript/dac_16khz`, `descript/dac_24khz`, `descript/dac_44khz`); mono.
    `n_codebooks` = DAC's n_quantizers (default: all)."""

    kind = "dac"

    def __init__(
        self,
        name_or_path: str | os.PathLike = "descript/dac_44khz",
        n_codebooks: int | None = None,
        device: str | torch.device | None = None,
    ):
        from transformers import DacModel

        model = load_pretrained(DacModel, name_or_path, "dac")
        super().__init__(model, str(name_or_path))
        max_k = int(model.config.n_codebooks)
        k = max_k if n_codebooks is None else int(n_codebooks)
        if not 1 <= k <= max_k:
            raise ValueError(
                f"dac: n_codebooks must be in [1, {max_k}] for {name_or_path}, got {n_codebooks}"
            )
        self._k = k
        if device is not None:
            self.to(device)

    @property
    def channels(self) -> int:
        return 1

    @property
    def latent_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def _encode(self, wav: Tensor) -> Tensor:
        out = self.model.encode(self._pad(wav), n_quantizers=self._k, return_dict=True)
        return out.audio_codes[:, : self._k]  # [B, K, T]

    def latent(self, codes: Tensor) -> Tensor:
        codes = self.check_codes(codes)
        with torch.no_grad():
            return self.model.quantizer.from_codes(codes)[0]  # [B, hidden, T]

    def decode_latent(self, latent: Tensor) -> Tensor:
        latent = torch.as_tensor(latent, dtype=torch.float32).to(self.device)
        if latent.dim() != 3 or latent.shape[1] != self.latent_dim:
            raise ValueError(f"dac latent: expected [B, {self.latent_dim}, T], got {tuple(latent.shape)}")
        with torch.no_grad():
            return self.model.decoder(latent)  # [B, 1, T*hop]
