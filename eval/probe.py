"""The offline probe evaluator: a small audio classifier trained on the reference's train split.

A log-mel front end (torch.stft + transformers' mel_filter_bank), three 1-D conv blocks,
mean/max pooling over time -> an embedding `[D]` (D = 96 by default), and one linear
head per categorical attribute (family, instrument, tempo, mode, style, texture; only
those with >= 2 classes among the train clips). It is trained ONLY on the manifest's
train split (random crops) and its accuracy is measured on the held-out valid + test
clips (whole clips), next to the chance level (always predicting the most frequent
training class, scored on the same held-out clips).

Level robustness: every clip is scaled to a fixed RMS (`target_rms_db`, -20 dBFS) before the
log-mel, in training and at inference, and training crops get a random gain of -30 to +12 dB
relative to full scale (peak 1), clipped to [-1, 1], before that normalisation (so about a quarter
of the training crops are clipped, as loud generated audio is).
Measured on the synthetic test set: at -20 dB no prediction flips and FD to the original set is
~0; at +6 dB clipped 4% of predictions flip (clipped sines turn square-ish) and the FD moves by
~6% of its noise floor (tests/test_eval_embedders.py::test_probe_is_level_invariant).

Contrastive text-audio head: a linear projection of the embedding into the caption space of the
frozen text encoder (`text_encoder`, MiniLM by default; sentence embedding = masked mean of its
token states), trained jointly with the attribute heads by a symmetric InfoNCE loss (clips sharing
a caption are all positives). Its floor: held-out text-to-audio recall@k (k = 5, at most a tenth
of the held-out clips: `recall_cutoff`) against the chance of a random ranking (1 - C(N - m, k) /
C(N, k) per query, one query per distinct caption, m clips with that caption), by the same margin
and significance rule as the attribute heads (`check_contrastive_quality`; the p value is the
exact Poisson-binomial tail).

One evaluator, three metric families: its embeddings give FD (fd_probe), its attribute heads give
adherence and the KL of attribute posteriors between paired clips (kl_probe), its contrastive head
gives the CLAP-style score (clap_probe). It is versioned by the manifest's hash, its settings and
the text encoder's identity (a probe file with other values is retrained, not reused).
Quality floor: a probe is refused unless it beats chance on the held-out clips both
by a margin (mean accuracy >= mean over attributes of chance + frac * (1 - chance),
frac = 0.1 by default) and significantly (pooled one-sided binomial test, p < 0.05).
(A stricter margin such as frac = 0.5 is out of reach with the tiny dataset's 10
held-out clips and 38 training clips: its probes reach about 0.5 mean accuracy
against 0.32 chance, p < 0.005.)

    probe = train_probe(Path("data/tiny/manifest.jsonl"), Path("runs/probe.pt"))
    probe.heldout_accuracy   # {"family": 0.93, ..., "mean": 0.81}
    probe.predict([wav])     # {"family": ["strings"], ...}
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttm.audio import atomic_torch_save, load_audio
from ttm.progress import bar as progress_bar

ATTRIBUTES = ("family", "instrument", "tempo", "mode", "style", "texture")
FORMAT = "ttm-bench-probe/2"  # /2: loudness normalisation + wide gain augmentation
DEFAULT_FLOOR_FRAC = 0.1
SIGNIFICANCE = 0.05


@dataclass
class ProbeSettings:
    sample_rate: int = 16000
    n_fft: int = 512
    hop_length: int = 320
    n_mels: int = 48
    f_min: float = 30.0
    f_max: float = 8000.0
    channels: tuple[int, ...] = (64, 96, 128)
    emb_dim: int = 96
    dropout: float = 0.3
    crop_s: float = 1.5
    target_rms_db: float = -20.0  # every clip is scaled to this RMS (dBFS) before the log-mel
    gain_db: tuple[float, float] = (-30.0, 12.0)  # training: random gain re full scale, clipped to [-1, 1], normalised
    epochs: int | None = None  # None: enough epochs to see ~3000 crops, clamped to [10, 60]
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-2
    seed: int = 0
    attributes: tuple[str, ...] = ATTRIBUTES
    text_encoder: str = "minilm"  # frozen caption encoder of the contrastive head (ttm.text)
    contrastive_weight: float = 1.0
    temperature: float = 0.1
    recall_k: int = 5  # the contrastive head's floor: text-to-audio recall@k on held-out clips

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["attributes"] = list(self.attributes)
        d["gain_db"] = list(self.gain_db)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeSettings:
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        d["attributes"] = tuple(d["attributes"])
        d["gain_db"] = tuple(d["gain_db"])
        return cls(**d)


# ----------------------------------------------------------------------------- network


def normalize_loudness(wav: Tensor, target_rms_db: float) -> Tensor:
    """Scale each row of `wav [B, N]` to RMS `target_rms_db` dBFS (all-zero rows stay zero), so the
    probe's outputs do not depend on playback level."""
    rms = wav.pow(2).mean(-1, keepdim=True).sqrt()  # [B, 1]
    return wav * (10 ** (target_rms_db / 20) / rms.clamp(min=1e-8))


class LogMel(nn.Module):
    """`wav [B, N]` -> log-mel `[B, n_mels, T]` (power spectrogram, Slaney mel, log10)."""

    def __init__(self, s: ProbeSettings):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        self.n_fft, self.hop = s.n_fft, s.hop_length
        fb = mel_filter_bank(
            num_frequency_bins=s.n_fft // 2 + 1,
            num_mel_filters=s.n_mels,
            min_frequency=s.f_min,
            max_frequency=min(s.f_max, s.sample_rate / 2),
            sampling_rate=s.sample_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        self.register_buffer("fb", torch.tensor(fb, dtype=torch.float32).T.contiguous(), persistent=False)  # [M, F]
        self.register_buffer("window", torch.hann_window(s.n_fft), persistent=False)

    def forward(self, wav: Tensor) -> Tensor:
        spec = torch.stft(wav, self.n_fft, self.hop, window=self.window, center=True, return_complex=True)
        power = spec.real**2 + spec.imag**2  # [B, F, T]
        return torch.log10(torch.clamp(self.fb @ power, min=1e-10))  # [B, M, T]


class ProbeNet(nn.Module):
    """Log-mel -> three 1-D conv blocks over time (mel bins as channels) -> mean and max over
    time -> Linear -> embedding `[B, D]`; one linear head per attribute on the embedding.
    1-D convolutions keep training at a few seconds to a minute on one CPU core."""

    def __init__(self, s: ProbeSettings, n_classes: dict[str, int], text_dim: int):
        super().__init__()
        self.logmel = LogMel(s)
        self.bn0 = nn.BatchNorm1d(s.n_mels)
        layers: list[nn.Module] = []
        c_in = s.n_mels
        for i, c in enumerate(s.channels):
            k = 5 if i == 0 else 3
            layers += [nn.Conv1d(c_in, c, k, padding=k // 2, bias=False), nn.BatchNorm1d(c), nn.ReLU()]
            if i < len(s.channels) - 1:
                layers.append(nn.MaxPool1d(2, ceil_mode=True))
            c_in = c
        self.conv = nn.Sequential(*layers)
        self.proj = nn.Linear(2 * c_in, s.emb_dim)
        self.drop = nn.Dropout(s.dropout)
        self.heads = nn.ModuleDict({a: nn.Linear(s.emb_dim, k) for a, k in n_classes.items()})
        self.text_proj = nn.Linear(s.emb_dim, text_dim)  # contrastive head: audio -> caption space

    def embed_mel(self, mel: Tensor) -> Tensor:  # [B, M, T] -> [B, D]
        x = self.conv(self.bn0(mel))  # [B, C, T']
        return self.proj(torch.cat([x.mean(-1), x.amax(-1)], dim=1))

    def heads_out(self, emb: Tensor) -> dict[str, Tensor]:
        emb = self.drop(emb)
        return {a: h(emb) for a, h in self.heads.items()}

    def audio_text(self, emb: Tensor) -> Tensor:  # [B, D] -> [B, text_dim], unit norm
        return F.normalize(self.text_proj(emb), dim=-1)


def caption_embeddings(encoder, captions: list[str]) -> Tensor:
    """Sentence embeddings `[B, text_dim]` of the frozen text encoder: masked mean of its token
    states, unit norm (as sentence-transformers pools all-MiniLM-L6-v2)."""
    with torch.no_grad():
        h, m = encoder.encode(list(captions))  # [B, L, E], [B, L]
        mf = m.float()[..., None]
        return F.normalize((h.float() * mf).sum(1) / mf.sum(1).clamp(min=1.0), dim=-1).cpu()


def retrieval_recall(audio: Tensor, text: Tensor, captions: list[str], k: int) -> dict[str, float]:
    """Text-to-audio recall@k over held-out clips: each distinct caption queries all N clips, a hit
    when one of the k most similar clips has that caption (captions can repeat, so a match is any
    clip with the same caption). Clips sharing a caption give one query, not several: their caption
    embeddings, rankings and hits are identical, so counting each would multiply one outcome.

    Under chance (a random ranking) a query whose caption m clips share hits with probability
    1 - C(N - m, k) / C(N, k), independently across queries; `p` is the exact one-sided tail
    P(hits >= observed) of that Poisson-binomial count (scipy.stats.poisson_binom). Returns recall,
    chance (mean hit probability), p, k (`recall_cutoff`), the number of queries and of clips."""
    n = len(captions)
    k = recall_cutoff(k, n)
    first: dict[str, int] = {}
    for i, c in enumerate(captions):
        first.setdefault(c, i)
    q = list(first.values())  # one query per distinct caption
    top = (text[q] @ audio.T).topk(k, dim=1).indices  # [Q, k]
    hits, ps = [], []
    for row, i in enumerate(q):
        same = {j for j in range(n) if captions[j] == captions[i]}
        hits.append(any(int(j) in same for j in top[row]))
        m = len(same)
        ps.append(1.0 - (math.comb(n - m, k) / math.comb(n, k) if n - m >= k else 0.0))
    from scipy.stats import poisson_binom

    return {"recall": float(np.mean(hits)), "chance": float(np.mean(ps)), "k": k,
            "p": float(poisson_binom.sf(int(sum(hits)) - 1, ps)), "queries": len(q), "clips": n}


def recall_cutoff(k: int, n_clips: int) -> int:
    """The k of recall@k on `n_clips` held-out clips: at most `k`, and at most a tenth of the clips
    (at least 1), so that a small held-out set keeps the power to show a head beats chance (12
    clips over 6 captions at k = 5: chance 0.68 per caption, and 6 hits of 6 have p = 0.10)."""
    return max(1, min(k, n_clips // 10, n_clips - 1))


# ----------------------------------------------------------------------------- manifest helpers


def _read_entries(manifest: Path) -> list[dict[str, Any]]:
    """Manifest entries as dicts with an absolute `audio` path (ttm.data.manifest does the validation)."""
    from ttm.data.manifest import read_manifest, resolve_audio

    return [
        {"id": e.id, "audio": resolve_audio(manifest, e), "caption": e.caption, "split": e.split, "attributes": e.attributes}
        for e in read_manifest(manifest)
    ]


def manifest_hash(manifest: Path) -> str:
    """sha256 of the manifest file's bytes (the audio is assumed fixed by its manifest)."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: manifest not found")
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]


def _labels(entries: list[dict[str, Any]], attr: str) -> list[str | None]:
    out = []
    for e in entries:
        v = e["attributes"].get(attr)
        out.append(None if v is None else str(v))
    return out


# ----------------------------------------------------------------------------- the probe


class Probe:
    """A trained probe: `embed`, `predict`, `heldout_accuracy`, `chance`, `check_quality`."""

    def __init__(self, net: ProbeNet, settings: ProbeSettings, classes: dict[str, list[str]], info: dict[str, Any]):
        self.net = net.eval()
        self.settings = settings
        self.classes = classes
        self.info = info
        self.path: Path | None = None

    # -- reported numbers
    @property
    def heldout_accuracy(self) -> dict[str, float]:
        return dict(self.info["heldout_accuracy"])

    @property
    def chance(self) -> dict[str, float]:
        return dict(self.info["chance"])

    @property
    def sample_rate(self) -> int:
        return self.settings.sample_rate

    @property
    def dim(self) -> int:
        return self.settings.emb_dim

    @property
    def attributes(self) -> list[str]:
        return list(self.classes)

    def identity(self) -> dict[str, Any]:
        """Everything that fixes the probe's outputs: settings, classes, weights hash."""
        h = hashlib.sha256()
        for k, v in sorted(self.net.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return {
            "settings": self.settings.to_dict(),
            "classes": self.classes,
            "manifest_hash": self.info.get("manifest_hash"),
            "text_encoder_hash": self.info.get("text_encoder_hash"),
            "weights": h.hexdigest()[:16],
        }

    def required_accuracy(self, frac: float = DEFAULT_FLOOR_FRAC) -> float:
        """Mean over attributes of chance + frac * (1 - chance)."""
        if not 0 <= frac <= 1:
            raise ValueError(f"probe floor: frac must lie in [0, 1], got {frac}")
        ch = [self.info["chance"][a] for a in self.classes]
        return float(np.mean([c + frac * (1 - c) for c in ch]))

    def significance(self) -> tuple[float, float]:
        """(z, p) of a one-sided test that the held-out predictions beat chance: correct answers
        pooled over attributes against their expectation under chance (binomial, normal
        approximation; the attributes of a clip are treated as independent)."""
        n = self.info["n_heldout_per_attribute"]
        acc, ch = self.info["heldout_accuracy"], self.info["chance"]
        correct = sum(acc[a] * n[a] for a in self.classes)
        expected = sum(ch[a] * n[a] for a in self.classes)
        var = sum(n[a] * ch[a] * (1 - ch[a]) for a in self.classes)
        if var <= 0:
            return 0.0, 1.0
        from scipy.stats import norm

        z = (correct - expected) / math.sqrt(var)
        return float(z), float(norm.sf(z))

    def check_quality(self, frac: float = DEFAULT_FLOOR_FRAC) -> None:
        """The quality floor. Raise ValueError unless the probe beats chance on the held-out clips
        both by a margin (mean accuracy >= `required_accuracy(frac)`) and significantly
        (`significance()` p < 0.05)."""
        got, need = self.info["heldout_accuracy"]["mean"], self.required_accuracy(frac)
        _, p = self.significance()
        if got < need or p >= SIGNIFICANCE:
            per = ", ".join(
                f"{a} {self.info['heldout_accuracy'][a]:.3f} (chance {self.info['chance'][a]:.3f})" for a in self.classes
            )
            where = f" ({self.path})" if self.path else ""
            raise ValueError(
                f"probe{where}: mean held-out accuracy {got:.3f} (required {need:.3f} = chance + {frac:g} * "
                f"(1 - chance), averaged over attributes), one-sided p = {p:.3g} against chance (required < "
                f"{SIGNIFICANCE:g}) on {self.info['n_heldout']} held-out clips: {per}; "
                "the probe is too weak to score with"
            )

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else None,
            "heldout_accuracy": self.heldout_accuracy,
            "chance": self.chance,
            "required_accuracy": self.required_accuracy(),
            "significance": dict(zip(("z", "p"), self.significance())),
            "floor_rule": f"mean held-out accuracy >= mean(chance + frac * (1 - chance)) and one-sided "
            f"p < {SIGNIFICANCE:g} against chance (pooled binomial z-test)",
            "classes": self.classes,
            "n_train": self.info.get("n_train"),
            "n_heldout": self.info.get("n_heldout"),
            "manifest": self.info.get("manifest"),
            "manifest_hash": self.info.get("manifest_hash"),
            "contrastive": self.info.get("contrastive"),
            "text_encoder": self.settings.text_encoder,
        }

    # -- inference
    def _prepare(self, wav: Tensor | np.ndarray) -> Tensor:
        x = torch.as_tensor(wav, dtype=torch.float32)
        if x.dim() == 2:
            x = x.mean(0)  # [C, N] -> [N]
        if x.dim() != 1:
            raise ValueError(f"probe: expected audio [N] or [C, N], got shape {tuple(x.shape)}")
        if x.numel() < self.settings.n_fft:
            x = F.pad(x, (0, self.settings.n_fft - x.numel()))
        return x

    @torch.no_grad()
    def _embed_one(self, wav: Tensor) -> Tensor:
        x = normalize_loudness(self._prepare(wav)[None], self.settings.target_rms_db)
        return self.net.embed_mel(self.net.logmel(x))[0]

    @torch.no_grad()
    def embed(self, wavs: list[Tensor] | Tensor) -> Tensor:
        """Audio at `sample_rate` (a list of `[N]` / `[C, N]`, or a batch `[B, N]`) -> `[B, D]`."""
        self.net.eval()
        return torch.stack([self._embed_one(w) for w in wavs])

    @torch.no_grad()
    def audio_text(self, wavs: list[Tensor] | Tensor) -> Tensor:
        """Contrastive-head audio embeddings `[B, text_dim]` (unit norm), comparable by cosine with
        `caption_embeddings` of the probe's text encoder."""
        return self.net.audio_text(self.embed(wavs))

    def text_encoder(self):
        """The frozen text encoder the contrastive head was trained against (checked by identity)."""
        from ttm.text import build_text_encoder

        enc = build_text_encoder(self.settings.text_encoder)
        want = self.info.get("text_encoder_hash")
        if want is not None and _ident_hash(enc.identity()) != want:
            raise ValueError(f"probe{f' ({self.path})' if self.path else ''}: the {self.settings.text_encoder} "
                             "text encoder here differs from the one its contrastive head was trained against")
        return enc

    def check_contrastive_quality(self, frac: float = DEFAULT_FLOOR_FRAC) -> None:
        """The contrastive head's floor: held-out text-to-audio recall@k >= chance + frac * (1 - chance)
        and one-sided p < 0.05 against chance (exact test over the distinct held-out captions,
        `retrieval_recall`); raises otherwise."""
        c = self.info["contrastive"]
        need = c["chance"] + frac * (1 - c["chance"])
        if c["recall"] < need or c["p"] >= SIGNIFICANCE:
            where = f" ({self.path})" if self.path else ""
            raise ValueError(
                f"probe{where}: contrastive head held-out text-to-audio recall@{c['k']} {c['recall']:.3f} (required "
                f"{need:.3f} = chance {c['chance']:.3f} + {frac:g} * (1 - chance)), one-sided p = {c['p']:.3g} "
                f"(required < {SIGNIFICANCE:g}) on {c['n']} held-out clips; the text-audio head is too weak to score with"
            )

    @torch.no_grad()
    def predict_logits(self, wavs: list[Tensor] | Tensor) -> dict[str, Tensor]:
        emb = self.embed(wavs)
        return {a: v for a, v in self.net.heads_out(emb).items()}

    def predict(self, wavs: list[Tensor] | Tensor) -> dict[str, list[str]]:
        """{attr: [B] predicted class labels}."""
        return {a: [self.classes[a][i] for i in lg.argmax(-1).tolist()] for a, lg in self.predict_logits(wavs).items()}

    # -- files
    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        obj = {
            "format": FORMAT,
            "settings": self.settings.to_dict(),
            "classes": self.classes,
            "state_dict": self.net.state_dict(),
            "info": self.info,
        }
        atomic_torch_save(obj, path)
        self.path = path

    @classmethod
    def load(cls, path: Path) -> Probe:
        path = Path(path)
        if path.is_dir():
            path = path / "probe.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: probe file not found")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a probe file ({e})") from e
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"{path}: not a probe file (expected format {FORMAT!r})")
        settings = ProbeSettings.from_dict(obj["settings"])
        classes = {a: list(c) for a, c in obj["classes"].items()}
        net = ProbeNet(settings, {a: len(c) for a, c in classes.items()}, int(obj["state_dict"]["text_proj.weight"].shape[0]))
        net.load_state_dict(obj["state_dict"])
        probe = cls(net, settings, classes, obj["info"])
        probe.path = path
        return probe


# ----------------------------------------------------------------------------- training


def _accuracy(pred: list[int], target: list[int]) -> float:
    return float(np.mean([p == t for p, t in zip(pred, target)])) if target else float("nan")


def _targets(es: list[dict[str, Any]], classes: dict[str, list[str]]) -> dict[str, list[int]]:
    """Class indices per attribute: -100 for a missing attribute (ignored by the loss), -1 for a
    class never seen in training (always counted wrong)."""
    out: dict[str, list[int]] = {}
    for a, cl in classes.items():
        idx = {c: i for i, c in enumerate(cl)}
        out[a] = [(-100 if v is None else idx.get(v, -1)) for v in _labels(es, a)]
    return out


def train_probe(
    manifest: Path,
    out: Path,
    seed: int = 0,
    epochs: int | None = None,
    progress: bool = True,
    settings: ProbeSettings | None = None,
) -> Probe:
    """Train a probe on the manifest's train split, measure it on valid + test, save it to `out`.

    If `out` already holds a probe trained on the same manifest bytes with the same settings,
    it is loaded instead of retrained. `out` is a file path (a directory means DIR/probe.pt).
    """
    manifest = Path(manifest)
    out = Path(out)
    if out.is_dir():
        out = out / "probe.pt"
    s = settings or ProbeSettings()
    s = ProbeSettings.from_dict({**s.to_dict(), "seed": seed, "epochs": epochs if epochs is not None else s.epochs})
    mhash = manifest_hash(manifest)
    from ttm.text import build_text_encoder

    encoder = build_text_encoder(s.text_encoder)
    thash = _ident_hash(encoder.identity())
    if out.is_file():
        try:
            old = Probe.load(out)
        except (ValueError, KeyError):
            old = None
        if (old is not None and old.info.get("manifest_hash") == mhash and old.settings == s
                and old.info.get("text_encoder_hash") == thash):
            return old

    entries = _read_entries(manifest)
    train = [e for e in entries if e["split"] == "train"]
    held = [e for e in entries if e["split"] in ("valid", "test")]
    if not train:
        raise ValueError(f"{manifest}: the probe needs train-split clips, found none")
    if not held:
        raise ValueError(f"{manifest}: the probe needs valid/test clips to measure its accuracy, found none")

    classes: dict[str, list[str]] = {}
    for a in s.attributes:
        vals = sorted({v for v in _labels(train, a) if v is not None})
        if len(vals) >= 2:
            classes[a] = vals
    if not classes:
        raise ValueError(
            f"{manifest}: no attribute among {', '.join(s.attributes)} has >= 2 classes in the train split "
            "(field 'attributes'); the probe has nothing to learn"
        )

    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG state
        torch.manual_seed(s.seed)
        return _train(manifest, out, s, classes, train, held, mhash, progress, encoder, thash)


def _ident_hash(ident: Any) -> str:
    import json

    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _train(manifest, out, s: ProbeSettings, classes, train, held, mhash: str, progress: bool, encoder, thash: str) -> Probe:
    rng = np.random.default_rng(s.seed)
    net = ProbeNet(s, {a: len(c) for a, c in classes.items()}, encoder.dim)
    text_train = caption_embeddings(encoder, [e["caption"] for e in train])  # [N, E], frozen
    t0 = time.time()

    def load_all(es: list[dict[str, Any]], what: str) -> list[Tensor]:
        wavs = []
        for e in es:
            if not Path(e["audio"]).is_file():
                raise FileNotFoundError(f"{manifest}: {what} clip {e['id']!r}: audio file {e['audio']} not found")
            wavs.append(load_audio(e["audio"], s.sample_rate, channels=1)[0])
        return wavs

    train_wavs = load_all(train, "train")  # [N_i] each
    y_train = _targets(train, classes)
    frames = [w.numel() // s.hop_length + 1 for w in train_wavs]
    crop = max(8, min(int(s.crop_s * s.sample_rate / s.hop_length), int(np.median(frames))))
    crop_n = (crop - 1) * s.hop_length  # samples giving `crop` STFT frames
    n_epochs = s.epochs if s.epochs is not None else int(np.clip(math.ceil(3000 / len(train)), 10, 60))
    steps_per_epoch = max(1, math.ceil(len(train) / s.batch_size))
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=n_epochs * steps_per_epoch, pct_start=0.2)

    def crop_wav(w: Tensor) -> Tensor:
        n = w.numel()
        if n <= crop_n:  # pad short clips with silence
            return F.pad(w, (0, crop_n - n))
        st = int(rng.integers(0, n - crop_n + 1))
        return w[st : st + crop_n]

    bar = progress_bar(range(n_epochs), desc="probe: training", disable=not progress, leave=False)
    net.train()
    lo_db, hi_db = s.gain_db
    for _ in bar:
        order = rng.permutation(len(train))
        total = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * s.batch_size : (b + 1) * s.batch_size]
            if len(idx) < 2:  # BatchNorm needs two examples
                continue
            wav = torch.stack([crop_wav(train_wavs[i]) for i in idx])  # [B, crop_n]
            gain = 10 ** (torch.as_tensor(rng.uniform(lo_db, hi_db, size=(len(idx), 1)), dtype=torch.float32) / 20)
            peak = wav.abs().amax(-1, keepdim=True).clamp(min=1e-8)
            wav = normalize_loudness((wav / peak * gain).clamp(-1, 1), s.target_rms_db)  # gain re full scale, clip, normalise
            with torch.no_grad():
                mel = net.logmel(wav)  # [B, M, crop]
            emb = net.embed_mel(mel)
            logits = net.heads_out(emb)
            losses = [
                F.cross_entropy(logits[a], torch.tensor([y_train[a][i] for i in idx]), ignore_index=-100)
                for a in classes
                if any(y_train[a][i] >= 0 for i in idx)
            ]
            # contrastive head: symmetric InfoNCE against the frozen caption embeddings; clips that
            # share a caption are all positives (soft targets)
            caps = [train[i]["caption"] for i in idx]
            same = torch.tensor([[float(a == b) for b in caps] for a in caps])  # [B, B]
            sim = net.audio_text(emb) @ text_train[idx].T / s.temperature  # [B audio, B text]
            target = same / same.sum(1, keepdim=True)
            nce = 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target))
            losses.append(s.contrastive_weight * nce)
            if not losses:
                continue
            loss = torch.stack(losses).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        bar.set_postfix(loss=f"{total / steps_per_epoch:.3f}")
    net.eval()

    probe = Probe(net, s, classes, {})
    held_wavs = load_all(held, "held-out")
    pred = {a: lg.argmax(-1).tolist() for a, lg in probe.predict_logits(held_wavs).items()}
    y_held = _targets(held, classes)
    acc, chance, n_per = {}, {}, {}
    for a in classes:
        keep = [i for i, t in enumerate(y_held[a]) if t != -100]
        if not keep:
            raise ValueError(f"{manifest}: no valid/test clip has attribute {a!r}; its accuracy cannot be measured")
        majority = int(np.bincount([t for t in y_train[a] if t >= 0], minlength=len(classes[a])).argmax())
        acc[a] = _accuracy([pred[a][i] for i in keep], [y_held[a][i] for i in keep])
        chance[a] = _accuracy([majority] * len(keep), [y_held[a][i] for i in keep])
        n_per[a] = len(keep)
    acc["mean"] = float(np.mean([acc[a] for a in classes]))
    held_caps = [e["caption"] for e in held]
    r = retrieval_recall(probe.audio_text(held_wavs), caption_embeddings(encoder, held_caps), held_caps,
                         s.recall_k)
    contrastive = {"k": r["k"], "recall": r["recall"], "chance": r["chance"],
                   "n": r["queries"], "n_clips": r["clips"], "p": r["p"],
                   "test": "exact Poisson-binomial tail over distinct held-out captions"}
    chance["mean"] = float(np.mean([chance[a] for a in classes]))
    probe.info = {
        "heldout_accuracy": acc,
        "chance": chance,
        "n_train": len(train),
        "n_heldout": len(held),
        "n_heldout_per_attribute": n_per,
        "epochs": n_epochs,
        "crop_frames": crop,
        "train_time_s": round(time.time() - t0, 2),
        "manifest": str(manifest.resolve()),
        "manifest_hash": mhash,
        "text_encoder_hash": thash,
        "contrastive": contrastive,
    }
    probe.save(out)
    return probe


__all__ = ["ATTRIBUTES", "Probe", "ProbeNet", "ProbeSettings", "manifest_hash", "train_probe"]
