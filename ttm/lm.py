"""The text-to-music LM around any backbone (MusicGen-style).

    codes [B, K, T] --pattern--> seq [B, K', S] --embed (sum over codebooks)--> [B, S, D]
    text  [B, L, Dt] --Linear + LayerNorm--> memory [B, 1 + L, D]   (a learned null token first)

    prefix:  backbone([memory ; start ; audio[:-1]])  -> logits read from the start position on
    cross:   backbone([start ; audio[:-1]], memory)   -> cross-attention to the memory

One linear head per modelled codebook; loss = cross-entropy per codebook on valid
positions (the pattern's special token is never a target), averaged over codebooks.
Masked text positions (padding, and every position of the null caption used for
classifier-free guidance) are replaced by a learned null vector, so the memory
length is fixed and the null caption is well defined.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.base import Backbone, count_params, step_linear
from ttm.patterns import Pattern
from ttm.positions import position_table, resolve_positions


def text_memory(proj: nn.Module, null: Tensor, text_emb: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
    """`[B, L, Dt], [B, L] -> memory [B, 1+L, D], mask [B, 1+L]`: projected text, masked positions
    replaced by the learned null vector, and the null token first (always visible)."""
    m = proj(text_emb)
    m = torch.where(text_mask[..., None], m, null.to(m.dtype))
    B = m.shape[0]
    m = torch.cat([null.to(m.dtype).expand(B, 1, -1), m], dim=1)
    mask = torch.cat([text_mask.new_ones(B, 1), text_mask], dim=1)
    return m, mask


def uses_cfg(cfg_scale: float) -> bool:
    """Whether generation runs classifier-free guidance (`TTMLM.generate`): the conditional and the null
    caption as one batch, twice the prompts' rows."""
    return cfg_scale != 1.0


class LMParts(nn.Module):
    """The LM's modules outside the backbone: text projection, null token, per-codebook
    embeddings and heads (TTMLM adopts them; lm_extra_params counts them on the meta device)."""

    def __init__(self, n_out: int, cardinality: int, text_dim: int, d_model: int):
        super().__init__()
        D = d_model
        self.text_proj = nn.Sequential(nn.Linear(text_dim, D), nn.LayerNorm(D))
        self.null_text = nn.Parameter(torch.randn(D) * 0.02)
        self.emb = nn.ModuleList(nn.Embedding(cardinality + 1, D) for _ in range(n_out))  # +1: special token
        for e in self.emb:
            e.weight._no_weight_decay = True  # token tables are not decayed (ttm.train.param_groups)
        self.heads = nn.ModuleList(nn.Linear(D, cardinality, bias=False) for _ in range(n_out))


class TTMLM(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        pattern: Pattern,
        text_dim: int,
        conditioning: str = "prefix",
        positions: str = "auto",
        caption_dropout: float = 0.1,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        if conditioning not in ("prefix", "cross"):
            raise ValueError(f"model.conditioning must be prefix or cross, got {conditioning!r}")
        if conditioning == "cross" and not backbone.cross_attention:
            raise ValueError("cross conditioning needs a backbone built with cross_attention=True")
        self.backbone, self.pattern, self.conditioning = backbone, pattern, conditioning
        self.caption_dropout, self.label_smoothing = caption_dropout, label_smoothing
        D, card, Ko = backbone.d_model, pattern.cardinality, pattern.n_out
        self.positions = resolve_positions(positions, backbone.needs_positions)  # none / sinusoidal / study
        self.use_positions = self.positions != "none"
        parts = LMParts(Ko, card, text_dim, D)
        self.text_proj, self.null_text, self.emb, self.heads = parts.text_proj, parts.null_text, parts.emb, parts.heads

    # ------------------------------------------------------------------ pieces

    def non_embedding_params(self) -> int:
        return count_params(self.backbone)

    def memory(self, text_emb: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        return text_memory(self.text_proj, self.null_text, text_emb, text_mask)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """`[B, K', S] -> [B, S, D]` (sum of per-codebook embeddings)."""
        return sum(e(tokens[:, k]) for k, e in enumerate(self.emb))

    def _pos(self, n: int, offset: int, ref: Tensor) -> Tensor:
        return position_table(self.positions, n, ref.shape[-1], offset, device=ref.device).to(ref.dtype)

    def logits(self, h: Tensor) -> Tensor:
        """`[B, S, D] -> [B, K', S, card]`."""
        return torch.stack([head(h) for head in self.heads], dim=1)

    def start_tokens(self, B: int, device) -> Tensor:
        return torch.full((B, self.pattern.n_out, 1), self.pattern.special, dtype=torch.long, device=device)

    # ------------------------------------------------------------------ training

    def forward(self, seq_in: Tensor, text_emb: Tensor, text_mask: Tensor) -> Tensor:
        """Teacher-forced logits. `seq_in [B, K', S]` starts with the start token -> `[B, K', S, card]`."""
        mem, mem_mask = self.memory(text_emb, text_mask)
        x = self.embed_tokens(seq_in)  # [B, S, D]
        S, M = x.shape[1], mem.shape[1]
        if self.conditioning == "prefix":
            x = torch.cat([mem, x], dim=1)  # [B, M + S, D]
            if self.use_positions:
                x = x + self._pos(M + S, 0, x)
            h = self.backbone(x)[:, M:]
        else:
            if self.use_positions:
                x = x + self._pos(S, 0, x)
            h = self.backbone(x, mem, mem_mask)
        return self.logits(h)

    def loss(
        self, codes: Tensor, lengths: Tensor, text_emb: Tensor, text_mask: Tensor, generator=None, forward=None
    ) -> tuple[Tensor, Tensor]:
        """`codes [B, K, T]`, `lengths [B]` -> (mean loss, loss per codebook [K']).

        `forward`: the module to call for logits (a DDP wrapper of this model); default self.
        """
        B = codes.shape[0]
        if self.training and self.caption_dropout > 0:
            drop = torch.rand(B, generator=generator, device="cpu").to(codes.device) < self.caption_dropout
            text_mask = text_mask & ~drop[:, None]
        logits, target = self._teacher_forced(codes, lengths, text_emb, text_mask, forward)
        per_k = self._per_codebook_loss(logits, target)
        return per_k.mean(), per_k

    def _per_codebook_loss(self, logits: Tensor, target: Tensor) -> Tensor:  # -> [K']
        # unbind, not logits[:, k]: the backward stacks the K' gradients once instead of zero-filling
        # a full [B, K', S, card] tensor per codebook (the same values)
        return torch.stack([
            F.cross_entropy(lk.reshape(-1, logits.shape[-1]).float(), tk.reshape(-1),
                            ignore_index=-100, label_smoothing=self.label_smoothing)
            for lk, tk in zip(logits.unbind(1), target.unbind(1), strict=True)
        ])

    def _teacher_forced(self, codes: Tensor, lengths: Tensor, text_emb: Tensor, text_mask: Tensor,
                        forward=None) -> tuple[Tensor, Tensor]:
        """(logits [B, K', S, card], targets [B, K', S] with -100 where nothing is predicted)."""
        B = codes.shape[0]
        seq = self.pattern.build(codes)  # [B, K', S]
        valid = self.pattern.valid_mask(lengths, seq.shape[-1])  # [B, K', S]
        seq = seq.masked_fill(~valid, self.pattern.special)  # padding past a clip's end is never input
        seq_in = torch.cat([self.start_tokens(B, codes.device), seq[..., :-1]], dim=-1)
        logits = (forward or self)(seq_in, text_emb, text_mask)  # [B, K', S, card]
        return logits, seq.masked_fill(~valid, -100)

    def clip_nll(self, codes: Tensor, lengths: Tensor, text_emb: Tensor, text_mask: Tensor) -> Tensor:
        """Per clip and codebook, the mean negative log-likelihood per predicted token (nats, no
        label smoothing, no caption dropout) -> `[B, K']`. With an all-False `text_mask` it is the
        loss under the null caption (the text information gain compares the two)."""
        return _clip_nll(*self._teacher_forced(codes, lengths, text_emb, text_mask))

    def validation_terms(self, codes: Tensor, lengths: Tensor, text_emb: Tensor,
                         text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """One teacher-forced pass with the true caption: (`loss`'s per-codebook values `[K']`,
        `clip_nll` `[B, K']`), for validation without running the model twice."""
        logits, target = self._teacher_forced(codes, lengths, text_emb, text_mask)
        return self._per_codebook_loss(logits, target), _clip_nll(logits, target)

    # ------------------------------------------------------------------ sampling

    @torch.inference_mode()  # no autograd bookkeeping at all (~6% per decoding step against no_grad)
    def generate(
        self,
        text_emb: Tensor,
        text_mask: Tensor,
        n_frames: int,
        cfg_scale: float = 3.0,
        top_k: int = 0,
        top_p: float = 0.0,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        recurrent: bool = True,
        greedy: bool = False,
        on_step: Callable[[int], None] | None = None,
        compile_step: bool = False,
    ) -> Tensor:
        """Sample codes `[B, K', n_frames]` (`on_step(s)` after each of the pattern's steps).

        Classifier-free guidance runs the conditional and the null caption as one batch
        of 2B. `recurrent=True` advances the backbone state one step per token;
        `recurrent=False` re-runs the whole sequence per token (the study's public
        sampler; kept for benchmarks and equivalence tests). `compile_step=True` runs the
        recurrent step through `Backbone.compiled_step` (torch.compile; equal to float
        tolerance, so sampled tokens can differ where two logits nearly tie).
        """
        if compile_step and not recurrent:
            raise ValueError("generate: compile_step applies to recurrent decoding (recurrent=True)")
        step = self.backbone.compiled_step() if compile_step else self.backbone.step
        B, dev = text_emb.shape[0], text_emb.device
        use_cfg = uses_cfg(cfg_scale)
        if use_cfg:
            text_emb = torch.cat([text_emb, text_emb])
            text_mask = torch.cat([text_mask, torch.zeros_like(text_mask)])
        mem, mem_mask = self.memory(text_emb, text_mask)
        B2, M = mem.shape[0], mem.shape[1]
        S = self.pattern.seq_len(n_frames)
        valid = self.pattern.valid_mask(torch.full((1,), n_frames, device=dev), S)[0]  # [K', S]
        seq = torch.full((B2, self.pattern.n_out, S), self.pattern.special, dtype=torch.long, device=dev)
        pick = _sampler(top_k, top_p, temperature, generator, greedy)

        def guided(logits: Tensor) -> Tensor:  # [B2, K', card] -> [B, K', card]
            if not use_cfg:
                return logits
            cond, uncond = logits[:B].float(), logits[B:].float()
            return uncond + cfg_scale * (cond - uncond)

        prefix = self.conditioning == "prefix"
        if recurrent:
            state = self.backbone.allocate_state(B2, (M if prefix else 0) + S)
            x = self.embed_tokens(self.start_tokens(B2, dev))  # [B2, 1, D]
            if prefix:
                x = torch.cat([mem, x], dim=1)
            if self.use_positions:  # every position's row once (the same values as row by row)
                table = self._pos((M if prefix else 0) + S, 0, x)  # [positions, D]
                x = x + table[: x.shape[1]]
            h = self.backbone(x, *(() if prefix else (mem, mem_mask)), state=state)[:, -1]  # [B2, D]
        for s in range(S):
            if not recurrent:
                seq_in = torch.cat([self.start_tokens(B2, dev), seq[..., :s]], dim=-1)
                h = self._full(seq_in, mem, mem_mask)[:, -1]
            logits = guided(torch.stack([step_linear(head, h) for head in self.heads], dim=1))  # [B, K', card]
            tok = pick(logits)  # [B, K']
            tok = torch.where(valid[:, s][None], tok, self.pattern.special)
            seq[:, :, s] = tok.repeat(2, 1) if use_cfg else tok
            if recurrent and s < S - 1:
                x = self.embed_tokens(seq[:, :, s : s + 1])[:, 0]  # [B2, D]
                if self.use_positions:
                    x = x + table[(M if prefix else 0) + s + 1]
                h = step(x, state, *(() if prefix else (mem, mem_mask)))
            if on_step is not None:
                on_step(s)
        return self.pattern.revert(seq[:B])

    def _full(self, seq_in: Tensor, mem: Tensor, mem_mask: Tensor) -> Tensor:
        x = self.embed_tokens(seq_in)
        if self.conditioning == "prefix":
            M = mem.shape[1]
            x = torch.cat([mem, x], dim=1)
            if self.use_positions:
                x = x + self._pos(x.shape[1], 0, x)
            return self.backbone(x)[:, M:]
        if self.use_positions:
            x = x + self._pos(x.shape[1], 0, x)
        return self.backbone(x, mem, mem_mask)


def _clip_nll(logits: Tensor, target: Tensor) -> Tensor:
    """Mean NLL per predicted token, per clip and codebook: `[B, K', S, V], [B, K', S]` -> `[B, K']`."""
    nll = F.cross_entropy(logits.float().flatten(0, 2), target.flatten(), ignore_index=-100,
                          reduction="none").view(target.shape)  # [B, K', S]
    n = (target != -100).sum(-1)  # [B, K']
    return nll.sum(-1) / n.clamp(min=1)


def _sampler(top_k: int, top_p: float, temperature: float, generator, greedy: bool) -> Callable[[Tensor], Tensor]:
    def pick(logits: Tensor) -> Tensor:  # [B, K, V] -> [B, K]
        if greedy or temperature <= 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if top_p and 0 < top_p < 1:
            srt, idx = logits.sort(dim=-1, descending=True)
            cum = srt.softmax(-1).cumsum(-1)
            drop = cum - srt.softmax(-1) > top_p  # keep the smallest prefix with mass >= top_p
            srt = srt.masked_fill(drop, -math.inf)
            logits = torch.full_like(logits, -math.inf).scatter(-1, idx, srt)
        probs = logits.softmax(-1)
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat.cpu(), 1, generator=generator).to(probs.device).view(probs.shape[:-1])

    return pick


def lm_extra_params(n_out: int, cardinality: int, text_dim: int, d_model: int) -> int:
    """Trainable LM parameters outside the backbone, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return count_params(LMParts(n_out, cardinality, text_dim, d_model))
