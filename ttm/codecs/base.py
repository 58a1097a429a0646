"""The codec interface: audio `[B, C, N]` <-> discrete codes `[B, K, T]` (+ continuous latents).

A codec turns a waveform into K parallel streams of tokens (residual codebooks) at
`frame_rate` frames per second, and back. `identity()` lists every setting that
changes the codes (with a hash of any fitted state); token caches are keyed by
`identity_hash()`.

Continuous latents (for the two-stage model): `latent(codes) -> [B, Dl, T]` is the
continuous vector the codes stand for (the sum of the quantised codebook vectors) and
`decode_latent(latent) -> wav` renders any such latent, quantised or not.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn

from ttm.audio import resample
from ttm.util import json_hash


def hash_tensors(*tensors: Tensor) -> str:
    """sha256 (hex, 16 chars) of the tensors' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """Hashes of a transformers model's config (minus bookkeeping fields) and of its weights."""
    sd = model.state_dict()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
        cfg.pop(k, None)
    return {"config": hash_json(cfg), "state": hash_tensors(*(sd[k] for k in sorted(sd)))}


def hash_json(obj: Any) -> str:
    """sha256 (hex, 16 chars) of a JSON-serialisable object with sorted keys."""
    return json_hash(obj, n=16, algo="sha256")


class Codec(nn.Module):
    """Abstract codec. Subclasses implement `_encode`, `decode`, `latent`, `decode_latent`,
    `identity`, `n_frames` and the properties below."""

    # -- properties every codec defines
    @property
    def sample_rate(self) -> int:
        raise NotImplementedError

    @property
    def channels(self) -> int:
        raise NotImplementedError

    @property
    def frame_rate(self) -> float:
        raise NotImplementedError

    @property
    def n_codebooks(self) -> int:
        raise NotImplementedError

    @property
    def cardinality(self) -> int:
        raise NotImplementedError

    @property
    def latent_dim(self) -> int:
        raise NotImplementedError

    # -- interface
    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def identity_hash(self) -> str:
        return hash_json(self.identity())

    def n_frames(self, n_samples: int) -> int:
        """Number of code frames `encode` returns for `n_samples` samples at `sample_rate`."""
        raise NotImplementedError

    def encode(self, wav: Tensor, sample_rate: int | None = None) -> Tensor:
        """`wav [B, C, N]` (at `sample_rate`, default the codec's) -> codes `[B, K, T]` int64."""
        x = self.prepare(wav, sample_rate)
        with torch.no_grad():
            codes = self._encode(x)
        return codes.long()

    def _encode(self, wav: Tensor) -> Tensor:  # [B, channels, N] at sample_rate -> [B, K, T]
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:
        """codes `[B, K, T]` -> wav `[B, channels, N]` at `sample_rate`."""
        raise NotImplementedError

    def decode_first_k(self, codes: Tensor) -> Tensor:
        """Decode codes of the first k < n_codebooks codebooks `[B, k, T]` (residual VQ: the
        coarse reconstruction; the missing codebooks count as zero vectors)."""
        return self.decode(codes)

    def latent(self, codes: Tensor) -> Tensor:
        """codes `[B, K, T]` (K may be fewer than n_codebooks: a prefix) -> latent `[B, latent_dim, T]`."""
        raise NotImplementedError

    def decode_latent(self, latent: Tensor) -> Tensor:
        """latent `[B, latent_dim, T]` -> wav `[B, channels, N]`."""
        raise NotImplementedError

    # -- helpers shared by the codecs
    @property
    def device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    def prepare(self, wav: Tensor, sample_rate: int | None = None) -> Tensor:
        """Check `[B, C, N]`, resample to the codec's rate, mix/duplicate to its channel count."""
        wav = torch.as_tensor(wav)
        if wav.dim() != 3:
            raise ValueError(f"codec input: expected audio [B, C, N], got shape {tuple(wav.shape)}")
        if wav.shape[-1] == 0:
            raise ValueError("codec input: audio has no samples")
        wav = wav.detach().float()
        if sample_rate is not None and int(sample_rate) != self.sample_rate:
            wav = resample(wav.cpu(), int(sample_rate), self.sample_rate)
        c = wav.shape[1]
        if c != self.channels:
            if self.channels == 1:
                wav = wav.mean(1, keepdim=True)
            elif c == 1:
                wav = wav.expand(-1, self.channels, -1)
            else:
                raise ValueError(f"codec input: cannot map {c} channels to {self.channels}")
        return wav.contiguous().to(self.device)

    def check_codes(self, codes: Tensor) -> Tensor:
        codes = torch.as_tensor(codes)
        if codes.dim() != 3 or codes.shape[1] > self.n_codebooks or codes.shape[1] < 1:
            raise ValueError(
                f"codes: expected [B, K, T] with 1 <= K <= {self.n_codebooks}, got shape {tuple(codes.shape)}"
            )
        if codes.dtype.is_floating_point:
            raise ValueError(f"codes: expected an integer tensor, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cardinality):
            raise ValueError(
                f"codes: values must lie in [0, {self.cardinality}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        return codes.long().to(self.device)

    def extra_repr(self) -> str:
        return (
            f"sample_rate={self.sample_rate}, channels={self.channels}, frame_rate={self.frame_rate:g}, "
            f"n_codebooks={self.n_codebooks}, cardinality={self.cardinality}"
        )
