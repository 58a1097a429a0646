"""Audio I/O (soundfile) and resampling (scipy polyphase). Audio tensors are `[C, N]` float32."""

from __future__ import annotations

import os
from math import gcd

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

from ttm.util import atomic_write, atomic_write_text

# atomic_write_text is ttm.util's, named here too for eval/runner.py
__all__ = ["atomic_torch_save", "atomic_write_text", "load_audio", "resample", "save_audio"]


def resample(wav: torch.Tensor | np.ndarray, sr_in: int, sr_out: int) -> torch.Tensor:
    """Resample along the last axis with a polyphase filter. `[..., N] -> [..., N']`."""
    x = torch.as_tensor(wav, dtype=torch.float32)
    if sr_in == sr_out:
        return x
    g = gcd(int(sr_in), int(sr_out))
    y = resample_poly(x.numpy(), int(sr_out) // g, int(sr_in) // g, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))


def load_audio(path: str | os.PathLike, sample_rate: int | None = None, channels: int | None = 1) -> torch.Tensor:
    """Read a file as `[C, N]` float32, optionally resampled and mixed/duplicated to `channels`."""
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [N, C]
    except Exception as e:
        raise ValueError(f"{path}: unreadable audio ({e})") from e
    wav = torch.from_numpy(data.T.copy())
    if channels is not None and wav.shape[0] != channels:
        wav = wav.mean(0, keepdim=True).expand(channels, -1).clone() if channels >= 1 else wav
    if sample_rate is not None and sr != sample_rate:
        wav = resample(wav, sr, sample_rate)
    return wav


def save_audio(path: str | os.PathLike, wav: torch.Tensor | np.ndarray, sample_rate: int) -> None:
    """Write `[C, N]` (or `[N]`) audio as 16-bit WAV, atomically (temp file + rename)."""
    x = torch.as_tensor(wav, dtype=torch.float32).detach().cpu()
    if x.dim() == 1:
        x = x[None]
    x = x.clamp(-1, 1).numpy().T
    atomic_write(path, lambda tmp: sf.write(tmp, x, int(sample_rate), subtype="PCM_16", format="WAV"), ".wav.tmp")


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """`torch.save` through a temp file + rename: a crash never leaves a truncated file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), ".pt.tmp")
