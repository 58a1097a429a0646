"""VGGish (Hershey et al. 2017), the FAD embedding of MusicGen's papers, in torch.

Only with a local weights file: the `weights=` argument or the TTM_BENCH_VGGISH
environment variable, a torch state dict in the layout of harritaylor/torchvggish
(`features.{0,3,6,8,11,13}.*`, `embeddings.{0,2,4}.*`, e.g. vggish-10086976.pth).
Without it `available()` is False and says so; nothing is downloaded.

Front end as VGGish's mel_features / vggish_input: 16 kHz mono, 25 ms periodic-Hann
frames every 10 ms, |rfft| with 512 points, 64 HTK mel bands from 125 to 7500 Hz
(transformers' mel_filter_bank with triangles in mel space is the same matrix),
log(mel + 0.01), examples of 96 frames every 96 frames (0.96 s). Clips shorter than
0.96 s are zero-padded to it. Embeddings are the 128-d output of the last linear layer
without the final ReLU and without the PCA post-processing (as fadtk's default).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eval.embedders.base import Embedder, register

ENV_VAR = "TTM_BENCH_VGGISH"
SR = 16000
WIN, HOP, N_FFT = 400, 160, 512
N_MELS, F_MIN, F_MAX, LOG_OFFSET = 64, 125.0, 7500.0, 0.01
EXAMPLE = 96  # frames per example (0.96 s) and hop between examples


def vggish_mel_matrix() -> np.ndarray:
    """`[N_FFT // 2 + 1, N_MELS]` mel weights, as VGGish's spectrogram_to_mel_matrix."""
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=N_MELS,
        min_frequency=F_MIN,
        max_frequency=F_MAX,
        sampling_rate=SR,
        norm=None,
        mel_scale="htk",
        triangularize_in_mel_space=True,
    )


def log_mel_examples(wav: torch.Tensor) -> torch.Tensor:
    """`wav [N]` at 16 kHz -> examples `[E, 1, 96, 64]` of log-mel frames."""
    x = wav.float()
    if x.numel() < WIN + HOP * (EXAMPLE - 1):
        x = F.pad(x, (0, WIN + HOP * (EXAMPLE - 1) - x.numel()))
    frames = x.unfold(0, WIN, HOP) * torch.hann_window(WIN, periodic=True)  # [T, 400]
    mag = torch.fft.rfft(frames, n=N_FFT).abs()  # [T, 257]
    mel = torch.log(mag @ torch.from_numpy(vggish_mel_matrix()).float() + LOG_OFFSET)  # [T, 64]
    return mel.unfold(0, EXAMPLE, EXAMPLE).transpose(1, 2)[:, None]  # [E, 1, 96, 64]


class VGGishNet(nn.Module):
    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c_in = int(v)
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 4 * 6, 4096), nn.ReLU(True), nn.Linear(4096, 4096), nn.ReLU(True), nn.Linear(4096, 128), nn.ReLU(True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [E, 1, 96, 64] -> [E, 128]
        x = self.features(x)  # [E, 512, 6, 4]
        x = x.transpose(1, 3).transpose(1, 2).contiguous().flatten(1)  # TF's channel-last order
        return self.embeddings[:-1](x)  # no final ReLU


@register("vggish")
class VGGishEmbedder(Embedder):
    sample_rate = SR
    channels = 1
    window_s = EXAMPLE * HOP / SR
    hop_s = EXAMPLE * HOP / SR

    def __init__(self, weights: str | os.PathLike | None = None, ckpt: str | os.PathLike | None = None, batch_size: int = 32):
        w = weights or ckpt or os.environ.get(ENV_VAR)
        self.weights = Path(w).expanduser() if w else None
        self.batch_size = int(batch_size)
        self._model: VGGishNet | None = None
        self._sha: str | None = None

    @property
    def dim(self) -> int:
        return 128

    def available(self) -> tuple[bool, str]:
        if self.weights is None:
            return False, (
                f"vggish: no weights given; pass --ckpt vggish=FILE or set {ENV_VAR} to a local torchvggish "
                "state dict (e.g. vggish-10086976.pth); nothing is downloaded"
            )
        if not self.weights.is_file():
            return False, f"vggish: weights file {self.weights} not found"
        return True, ""

    def _weights_sha(self) -> str | None:
        if self._sha is None and self.weights is not None and self.weights.is_file():
            self._sha = hashlib.sha256(self.weights.read_bytes()).hexdigest()[:16]
        return self._sha

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "weights": str(self.weights) if self.weights else None,
            "weights_sha256": self._weights_sha(),
            "postprocess": "none (no PCA, no final ReLU)",
        }

    def load(self) -> None:
        if self._model is not None:
            return
        ok, why = self.available()
        if not ok:
            raise FileNotFoundError(why)
        try:
            sd = torch.load(self.weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"vggish: {self.weights}: not a torch state dict ({e})") from e
        sd = {k: v for k, v in sd.items() if k.startswith(("features.", "embeddings."))}
        with torch.device("meta"):  # no random init of 72M parameters that are overwritten anyway
            net = VGGishNet()
        try:
            net.load_state_dict(sd, assign=True)
        except RuntimeError as e:
            raise ValueError(f"vggish: {self.weights}: not in the torchvggish layout ({e})") from e
        self._model = net.eval()

    @torch.no_grad()
    def features(self, wav: torch.Tensor) -> dict[str, np.ndarray]:
        self.load()
        ex = log_mel_examples(self._check(wav)[0])
        out = [self._model(ex[i : i + self.batch_size]) for i in range(0, len(ex), self.batch_size)]
        return {"emb": torch.cat(out).numpy().astype(np.float32)}
