"""`melrvq`: the offline default codec. Log-mel frames quantised by residual k-means.

encode: wav -> |STFT| -> mel filterbank -> log -> per-bin normalisation (train mean/std)
        -> K residual k-means stages (each fitted on the residual of the previous one).
decode: codebook sum -> de-normalise -> exp -> linear magnitude (pseudo-inverse of the
        filterbank, clamped at 0) -> Griffin-Lim (fixed-seed phase init).

No pretrained weights are needed: `fit` learns everything from train-split audio in
seconds. The latent is the reconstructed normalised log-mel frame `[B, n_mels, T]`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ttm.codecs.base import Codec, hash_tensors
from ttm.util import atomic_write

FORMAT = "ttm-melrvq-1"


def _bottom_k(keys: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The `k` rows with the smallest keys, in key order (a uniform sample without replacement)."""
    if keys.shape[0] <= k:
        order = keys.argsort()
    else:
        order = keys.topk(k, largest=False, sorted=True).indices
    return keys[order], rows[order]


def nearest(x: Tensor, centers: Tensor) -> Tensor:
    """Index of the nearest center (squared L2) for each row. `[M, D], [C, D] -> [M]`."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ centers.T + (centers * centers).sum(1)[None]
    return d.argmin(1)


class MelRVQCodec(Codec):
    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 1024,
        hop_length: int = 320,
        n_mels: int = 64,
        f_min: float = 0.0,
        f_max: float | None = None,
        n_codebooks: int = 4,
        cardinality: int = 256,
        griffin_lim_iters: int = 32,
        griffin_lim_momentum: float = 0.99,
        griffin_lim_seed: int = 0,
        max_fit_frames: int = 50_000,
        kmeans_iters: int = 100,
        log_floor: float = 1e-5,
    ):
        super().__init__()
        f_max = float(sample_rate) / 2 if f_max is None else float(f_max)
        sizes = {"n_fft": n_fft, "hop_length": hop_length, "n_mels": n_mels, "n_codebooks": n_codebooks}
        for name, v in sizes.items():
            if int(v) < 1:
                raise ValueError(f"melrvq: {name} must be >= 1, got {v}")
        if cardinality < 2:
            raise ValueError(f"melrvq: cardinality must be >= 2, got {cardinality}")
        if hop_length > n_fft:
            raise ValueError(f"melrvq: hop_length {hop_length} must not exceed n_fft {n_fft}")
        if not 0 <= f_min < f_max <= sample_rate / 2:
            raise ValueError(f"melrvq: need 0 <= f_min < f_max <= sample_rate/2, got {f_min}, {f_max}")
        self.settings: dict[str, Any] = {
            "sample_rate": int(sample_rate),
            "n_fft": int(n_fft),
            "hop_length": int(hop_length),
            "n_mels": int(n_mels),
            "f_min": float(f_min),
            "f_max": f_max,
            "n_codebooks": int(n_codebooks),
            "cardinality": int(cardinality),
            "griffin_lim_iters": int(griffin_lim_iters),
            "griffin_lim_momentum": float(griffin_lim_momentum),
            "griffin_lim_seed": int(griffin_lim_seed),
            "max_fit_frames": int(max_fit_frames),
            "kmeans_iters": int(kmeans_iters),
            "log_floor": float(log_floor),
        }
        from transformers.audio_utils import mel_filter_bank

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an empty mel filter is a setting error, not a warning
            try:
                fb = mel_filter_bank(
                    num_frequency_bins=n_fft // 2 + 1,
                    num_mel_filters=n_mels,
                    min_frequency=f_min,
                    max_frequency=f_max,
                    sampling_rate=sample_rate,
                    norm="slaney",
                    mel_scale="slaney",
                )
            except UserWarning as e:
                raise ValueError(f"melrvq: n_mels={n_mels} too many for n_fft={n_fft} ({e})") from e
        fb_t = torch.from_numpy(fb.astype(np.float32))  # [F, M]
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("mel_fb", fb_t.T.contiguous(), persistent=False)  # [M, F]
        self.register_buffer(
            "mel_pinv", torch.linalg.pinv(fb_t.T.double()).float(), persistent=False
        )  # [F, M]
        # fitted state (None until fit/load)
        self.register_buffer("mean", None)  # [M]
        self.register_buffer("std", None)  # [M]
        self.register_buffer("codebooks", None)  # [K, card, M]
        self.fit_info: dict[str, Any] = {}  # how it was fitted (seed, clip count, data hash)

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """Raise ValueError for keys that are not constructor settings."""
        import inspect

        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        bad = sorted(set(settings) - known)
        if bad:
            raise ValueError(f"melrvq: unknown settings {bad}; expected some of {sorted(known)}")
        return settings

    # ----------------------------------------------------------------- properties
    @property
    def sample_rate(self) -> int:
        return self.settings["sample_rate"]

    @property
    def channels(self) -> int:
        return 1

    @property
    def frame_rate(self) -> float:
        return self.settings["sample_rate"] / self.settings["hop_length"]

    @property
    def n_codebooks(self) -> int:
        return self.settings["n_codebooks"]

    @property
    def cardinality(self) -> int:
        return self.settings["cardinality"]

    @property
    def latent_dim(self) -> int:
        return self.settings["n_mels"]

    @property
    def fitted(self) -> bool:
        return self.codebooks is not None

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise ValueError("melrvq: codec is not fitted; call fit(wavs) or MelRVQCodec.load(path)")

    def n_frames(self, n_samples: int) -> int:
        return int(n_samples) // self.settings["hop_length"] + 1

    def identity(self) -> dict[str, Any]:
        self._require_fitted()
        s = self.settings
        keys = [
            "sample_rate",
            "n_fft",
            "hop_length",
            "n_mels",
            "f_min",
            "f_max",
            "n_codebooks",
            "cardinality",
        ]
        return {
            "codec": "melrvq",
            **{k: s[k] for k in keys},
            "log_floor": s["log_floor"],
            "state": hash_tensors(self.mean, self.std, self.codebooks),
        }

    # ----------------------------------------------------------------- features
    def _stft(self, wav: Tensor) -> Tensor:  # [B, N] -> complex [B, F, T]
        s = self.settings
        return torch.stft(
            wav,
            s["n_fft"],
            s["hop_length"],
            window=self.window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )

    def _istft(self, spec: Tensor, length: int) -> Tensor:  # complex [B, F, T] -> [B, N]
        s = self.settings
        return torch.istft(spec, s["n_fft"], s["hop_length"], window=self.window, center=True, length=length)

    def log_mel(self, wav: Tensor) -> Tensor:
        """`[B, 1, N]` at the codec rate -> log-mel `[B, n_mels, T]` (not normalised)."""
        mag = self._stft(wav[:, 0]).abs()  # [B, F, T]
        mel = self.mel_fb @ mag  # [B, M, T]
        return mel.clamp_min(self.settings["log_floor"]).log()

    # ----------------------------------------------------------------- fitting
    def fit(self, wavs: Iterable[Tensor], seed: int = 0, sample_rate: int | None = None) -> MelRVQCodec:
        """Fit normalisation and the K codebooks on `wavs` (each `[C, N]`; any iterable, read once).

        Mean/std use every frame; k-means uses a uniform sample of at most `max_fit_frames`
        frames (bottom-k of seeded random keys, so memory stays bounded). Deterministic in
        (data, order, seed) on a given library stack, whatever the thread count.
        """
        s = self.settings
        cap = s["max_fit_frames"]
        g = torch.Generator().manual_seed(seed)
        total = torch.zeros(s["n_mels"], dtype=torch.float64)
        total_sq = torch.zeros(s["n_mels"], dtype=torch.float64)
        n_frames = n_clips = 0
        keys, kept = torch.zeros(0, dtype=torch.float64), torch.zeros(0, s["n_mels"])
        with torch.no_grad():
            for i, w in enumerate(wavs):
                w = torch.as_tensor(w)
                if w.dim() != 2:
                    raise ValueError(f"melrvq fit: clip {i}: expected [C, N], got shape {tuple(w.shape)}")
                x = self.log_mel(self.prepare(w[None], sample_rate))[0].T.cpu()  # [T, M]
                total += x.double().sum(0)
                total_sq += x.double().square().sum(0)
                n_frames, n_clips = n_frames + x.shape[0], n_clips + 1
                keys = torch.cat([keys, torch.rand(x.shape[0], generator=g, dtype=torch.float64)])
                kept = torch.cat([kept, x])
                if keys.shape[0] >= 2 * cap:
                    keys, kept = _bottom_k(keys, kept, cap)
        if n_clips == 0:
            raise ValueError("melrvq fit: no training audio")
        if n_frames < s["cardinality"]:
            raise ValueError(
                f"melrvq fit: {n_frames} frames of training audio, fewer than cardinality "
                f"{s['cardinality']}; give more audio or lower the cardinality"
            )
        keys, kept = _bottom_k(keys, kept, cap)
        mean = total / n_frames
        std = (total_sq / n_frames - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
        z = ((kept.double() - mean) / std).float()  # [min(n_frames, cap), M]
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        residual = z.clone()
        books = []
        torch_threads = torch.get_num_threads()  # threadpool_limits resets OpenMP, torch's pool included
        for k in range(s["n_codebooks"]):
            # one thread: sklearn's parallel centre updates sum in a thread-count-dependent order
            with warnings.catch_warnings(), threadpool_limits(limits=1):
                # duplicate frames (silence) can leave fewer distinct points than clusters
                warnings.filterwarnings("ignore", message="Number of distinct clusters")
                km = KMeans(
                    n_clusters=s["cardinality"],
                    n_init=1,
                    max_iter=s["kmeans_iters"],
                    random_state=seed * 1000 + k,
                    algorithm="lloyd",
                ).fit(residual.numpy())
            torch.set_num_threads(torch_threads)
            centers = torch.from_numpy(km.cluster_centers_.astype(np.float32))  # [card, M]
            books.append(centers)
            residual = residual - centers[nearest(residual, centers)]
        dev = self.mel_fb.device
        self.mean = mean.float().to(dev)
        self.std = std.float().to(dev)
        self.codebooks = torch.stack(books).to(dev)
        self.fit_info = {"seed": int(seed), "n_clips": n_clips, "n_frames": n_frames}
        return self

    # ----------------------------------------------------------------- codes
    def normalise(self, log_mel: Tensor) -> Tensor:  # [B, M, T]
        return (log_mel - self.mean[:, None]) / self.std[:, None]

    def _encode(self, wav: Tensor) -> Tensor:
        self._require_fitted()
        z = self.normalise(self.log_mel(wav))  # [B, M, T]
        B, M, T = z.shape
        r = z.transpose(1, 2).reshape(B * T, M)
        codes = []
        for book in self.codebooks:  # [card, M]
            idx = nearest(r, book)  # [B*T]
            r = r - book[idx]
            codes.append(idx.view(B, T))
        return torch.stack(codes, 1)  # [B, K, T]

    def latent(self, codes: Tensor) -> Tensor:
        self._require_fitted()
        codes = self.check_codes(codes)
        z = sum(self.codebooks[k][codes[:, k]] for k in range(codes.shape[1]))  # [B, T, M]
        return z.transpose(1, 2).contiguous()  # [B, M, T]

    def decode(self, codes: Tensor) -> Tensor:
        return self.decode_latent(self.latent(codes))

    def decode_latent(self, latent: Tensor) -> Tensor:
        self._require_fitted()
        latent = torch.as_tensor(latent, dtype=torch.float32).to(self.device)
        if latent.dim() != 3 or latent.shape[1] != self.latent_dim:
            raise ValueError(f"melrvq latent: expected [B, {self.latent_dim}, T], got {tuple(latent.shape)}")
        with torch.no_grad():
            mel = (latent * self.std[:, None] + self.mean[:, None]).exp()  # [B, M, T]
            mag = (self.mel_pinv @ mel).clamp_min(0.0)  # [B, F, T]
            wav = self.griffin_lim(mag)  # [B, N]
        return wav[:, None]  # [B, 1, N]

    def griffin_lim(self, mag: Tensor) -> Tensor:
        """Fast Griffin-Lim (momentum, as in Perraudin et al. 2013). `[B, F, T] -> [B, (T-1)*hop]`."""
        s = self.settings
        length = (mag.shape[-1] - 1) * s["hop_length"]
        g = torch.Generator().manual_seed(s["griffin_lim_seed"])
        phase = torch.rand(mag.shape, generator=g).to(mag.device) * (2 * math.pi)
        angles = torch.polar(torch.ones_like(mag), phase)
        alpha = s["griffin_lim_momentum"] / (1 + s["griffin_lim_momentum"])
        prev = torch.zeros_like(angles)
        for _ in range(s["griffin_lim_iters"]):
            rebuilt = self._stft(self._istft(mag * angles, length))
            angles = rebuilt - alpha * prev
            angles = angles / (angles.abs() + 1e-16)
            prev = rebuilt
        return self._istft(mag * angles, length)

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write settings + fitted tensors to one safetensors file, atomically."""
        from safetensors.torch import save_file

        self._require_fitted()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: getattr(self, k).detach().cpu().contiguous() for k in ("mean", "std", "codebooks")}
        meta = {"format": FORMAT, "settings": json.dumps(self.settings), "fit_info": json.dumps(self.fit_info)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), ".safetensors.tmp")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides: Any) -> MelRVQCodec:
        """Load a codec written by `save`. `overrides` may change decode-only settings (Griffin-Lim)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"melrvq codec file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a melrvq codec file ({e})") from e
        if meta.get("format") != FORMAT or set(tensors) != {"mean", "std", "codebooks"}:
            raise ValueError(
                f"{path}: not a melrvq codec file (format {meta.get('format')!r}, expected {FORMAT!r})"
            )
        settings = json.loads(meta["settings"])
        decode_only = {"griffin_lim_iters", "griffin_lim_momentum", "griffin_lim_seed"}
        bad = set(overrides) - decode_only
        if bad:
            raise ValueError(
                f"melrvq load: cannot override {sorted(bad)} of a fitted codec (only {sorted(decode_only)})"
            )
        codec = cls(**{**settings, **overrides})
        K, card, M = tensors["codebooks"].shape
        if (K, card, M) != (codec.n_codebooks, codec.cardinality, codec.latent_dim):
            raise ValueError(f"{path}: codebooks shape {(K, card, M)} does not match its settings")
        codec.mean, codec.std, codec.codebooks = tensors["mean"], tensors["std"], tensors["codebooks"]
        codec.fit_info = json.loads(meta.get("fit_info", "{}"))
        return codec
