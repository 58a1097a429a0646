"""Stage 2 of the two-stage model: diffusion over the codec's continuous latent.

    codes [B, K, T] --codec.latent--> target z0 [B, Dl, T]   (normalised per channel)
    x_t = alpha(t) z0 + sigma(t) eps                            cosine schedule, t in [0, 1]
    v   = alpha(t) eps - sigma(t) z0                            v-prediction target

    input frames = Linear(x_t) + sum_k Emb_k(stage-1 codes) + MLP(sinusoid(t)) [+ positions]
    denoiser     = Bidirectional(backbone) with cross-attention to the text memory
    v_hat        = Linear(denoiser output)                      [B, Dl, T]

Target: by default the RESIDUAL latent(all codebooks) - latent(first k codebooks). The
stage-1 tokens already fix latent(first k) exactly (it is a lookup), so modelling only
the residual (a) spends the denoiser on the detail the tokens do not carry, (b) keeps
every sample consistent with its stage-1 tokens whatever the denoiser does, and (c) a
residual has a smaller spread than the full latent. `target="full"` models the whole
latent instead (for codecs whose latent is not a sum over codebooks).

The text memory is built as in ttm/lm.py (Linear + LayerNorm, a learned null token first,
masked positions replaced by the null vector); whole captions are dropped with
probability `cond_dropout` in training, so classifier-free guidance can contrast the
caption with the null caption (one batched pass of 2B). The stage-1 tokens are never
dropped: they are the structure every sample must follow.

The codec is held by reference only (not a submodule): it is not in the state_dict, the
optimizer, `.to()` or EMA copies. Attach it with `attach_codec` after loading weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from backbones.base import count_params
from backbones.bidirectional import Bidirectional, size_bidirectional
from ttm.lm import text_memory
from ttm.patterns import Pattern
from ttm.positions import position_table, resolve_positions

SCHEDULE_S = 0.008  # cosine schedule offset (Nichol & Dhariwal 2021)
SAMPLERS = ("ddim", "ancestral")
TARGETS = ("residual", "full")


# ----------------------------------------------------------------------------- schedule


def alpha_sigma(t: Tensor, s: float = SCHEDULE_S) -> tuple[Tensor, Tensor]:
    """Cosine schedule: alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2); returns
    (alpha, sigma) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)), so alpha^2 + sigma^2 = 1."""
    ang = (t.double() + s) / (1 + s) * (math.pi / 2)
    return ang.cos().float(), ang.sin().float()


def timestep_embedding(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of continuous times `t [B]` -> `[B, dim]` (sin half, cos half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = (t.float() * scale)[:, None] * freqs[None]  # [B, half]
    emb = torch.cat([ang.sin(), ang.cos()], dim=-1)
    return nn.functional.pad(emb, (0, dim - 2 * half))


def _randn(shape, generator: torch.Generator | None, device) -> Tensor:
    gdev = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=gdev).to(device)


def _rand(shape, generator: torch.Generator | None, device) -> Tensor:
    gdev = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, device=gdev).to(device)


class _CodecRef:
    """Keeps the codec out of the module tree; deep copies (EMA) share it."""

    def __init__(self, codec):
        self.codec = codec

    def __deepcopy__(self, memo):
        return self


# ----------------------------------------------------------------------------- model


class DiffusionParts(nn.Module):
    """LatentDiffusion's modules outside the denoiser (it adopts them; diffusion_extra_params
    counts them on the meta device)."""

    def __init__(self, latent_dim: int, text_dim: int, d_model: int, first_k: int, cardinality: int):
        super().__init__()
        D = d_model
        self.in_proj = nn.Linear(latent_dim, D)
        self.emb = nn.ModuleList(nn.Embedding(cardinality, D) for _ in range(first_k))
        for e in self.emb:
            e.weight._no_weight_decay = True  # token tables are not decayed (ttm.train.param_groups)
        self.time_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.text_proj = nn.Sequential(nn.Linear(text_dim, D), nn.LayerNorm(D))
        self.null_text = nn.Parameter(torch.randn(D) * 0.02)
        self.heads = nn.ModuleList([nn.Linear(D, latent_dim)])  # one head: the v prediction
        nn.init.zeros_(self.heads[0].weight)  # start by predicting v = 0 (x0_hat = alpha * x_t)
        nn.init.zeros_(self.heads[0].bias)


class LatentDiffusion(nn.Module):
    def __init__(
        self,
        denoiser: Bidirectional,
        latent_dim: int,
        n_codebooks: int,
        cardinality: int,
        first_k: int,
        text_dim: int,
        target: str = "residual",
        cond_dropout: float = 0.1,
        positions: str = "auto",
        sampler: str = "ddim",
        sample_steps: int = 50,
        cfg_scale: float = 3.0,
    ):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"model.diffusion.target must be one of {TARGETS}, got {target!r}")
        if target == "residual" and first_k >= n_codebooks:
            raise ValueError(
                f"model.first_k={first_k} leaves no codebooks for stage 2 (the codec has {n_codebooks}): "
                "the residual target would be zero; lower first_k or use model.diffusion.target=full"
            )
        if sampler not in SAMPLERS:
            raise ValueError(f"model.diffusion.sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not denoiser.cross_attention:
            raise ValueError("the denoiser must be built with cross_attention=True (text conditioning)")
        self.backbone = denoiser
        self.conditioning = "cross"  # the text enters by cross-attention (read by ttm/flops.py)
        self.pattern = Pattern("first_k", n_codebooks, cardinality, k=first_k)  # the stage-1 codes it reads
        self.latent_dim, self.target, self.cond_dropout = latent_dim, target, cond_dropout
        self.sampler, self.sample_steps, self.cfg_scale = sampler, sample_steps, cfg_scale
        D = denoiser.d_model
        self.positions = resolve_positions(positions, denoiser.needs_positions)  # none / sinusoidal / study
        self.use_positions = self.positions != "none"
        p = DiffusionParts(latent_dim, text_dim, D, first_k, cardinality)
        self.in_proj, self.emb, self.time_mlp = p.in_proj, p.emb, p.time_mlp
        self.text_proj, self.null_text, self.heads = p.text_proj, p.null_text, p.heads
        # per-channel statistics of the target latent on the training split
        self.register_buffer("latent_mean", torch.zeros(latent_dim))
        self.register_buffer("latent_std", torch.ones(latent_dim))
        self._codec_ref = _CodecRef(None)

    # ------------------------------------------------------------------ codec and statistics

    @property
    def codec(self):
        if self._codec_ref.codec is None:
            raise ValueError("LatentDiffusion has no codec: call attach_codec(codec) first")
        return self._codec_ref.codec

    def attach_codec(self, codec) -> LatentDiffusion:
        check_latent_codec(codec)
        if int(codec.latent_dim) != self.latent_dim:
            raise ValueError(f"codec latent_dim {codec.latent_dim} != the model's latent_dim {self.latent_dim}")
        self._codec_ref = _CodecRef(codec)
        return self

    @property
    def first_k(self) -> int:
        return self.pattern.k

    def non_embedding_params(self) -> int:
        return count_params(self.backbone)

    def stage1_latent(self, stage1_codes: Tensor) -> Tensor:
        """`[B, k, T]` -> the latent the stage-1 codes stand for `[B, Dl, T]` (model device, float32)."""
        dev = self.latent_mean.device
        with torch.no_grad():
            return self.codec.latent(stage1_codes).to(dev, torch.float32)

    def target_latent(self, codes: Tensor) -> Tensor:
        """`codes [B, K, T]` -> un-normalised target `[B, Dl, T]` (residual or full latent)."""
        dev = self.latent_mean.device
        with torch.no_grad():
            z = self.codec.latent(codes).to(dev, torch.float32)
            if self.target == "residual":
                z = z - self.stage1_latent(codes[:, : self.first_k])
        return z

    def normalise(self, z: Tensor) -> Tensor:  # [B, Dl, T]
        return (z - self.latent_mean[:, None]) / self.latent_std[:, None]

    def denormalise(self, z: Tensor) -> Tensor:  # [B, Dl, T]
        return z * self.latent_std[:, None] + self.latent_mean[:, None]

    @torch.no_grad()
    def estimate_stats(self, codes: Tensor, lengths: Tensor, max_clips: int = 512, batch_size: int = 32) -> None:
        """Per-channel mean/std of the target latent over the valid frames of (up to `max_clips`
        of) these training clips; stored in the `latent_mean` / `latent_std` buffers."""
        n = min(len(codes), max_clips)
        if n == 0:
            raise ValueError("estimate_stats: no training clips")
        s1 = torch.zeros(self.latent_dim, dtype=torch.float64)
        s2 = torch.zeros(self.latent_dim, dtype=torch.float64)
        count = 0
        for i in range(0, n, batch_size):
            z = self.target_latent(codes[i : i + batch_size]).double().cpu()  # [b, Dl, T]
            valid = (torch.arange(z.shape[-1])[None] < lengths[i : i + batch_size, None].cpu())[:, None]  # [b,1,T]
            s1 += (z * valid).sum((0, 2))
            s2 += (z * z * valid).sum((0, 2))
            count += int(valid.sum())
        if count == 0:
            raise ValueError("estimate_stats: the training clips have no valid frames")
        mean = s1 / count
        std = (s2 / count - mean**2).clamp_min(0).sqrt()
        std = std.clamp_min(max(1e-5, 1e-3 * float(std.max())))  # a constant channel stays finite
        self.latent_mean.copy_(mean.float())
        self.latent_std.copy_(std.float())

    # ------------------------------------------------------------------ network

    def memory(self, text_emb: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        return text_memory(self.text_proj, self.null_text, text_emb, text_mask)

    def forward(self, x_t: Tensor, t: Tensor, stage1_codes: Tensor, text_emb: Tensor, text_mask: Tensor,
                lengths: Tensor | None = None) -> Tensor:
        """`x_t [B, Dl, T]` (normalised, noised), `t [B]`, `stage1_codes [B, k, T]` -> v_hat `[B, Dl, T]`."""
        mem, mem_mask = self.memory(text_emb, text_mask)
        x = self.in_proj(x_t.transpose(1, 2))  # [B, T, D]
        x = x + sum(e(stage1_codes[:, k]) for k, e in enumerate(self.emb))
        x = x + self.time_mlp(timestep_embedding(t, x.shape[-1]).to(x.dtype))[:, None]
        if self.use_positions:
            x = x + position_table(self.positions, x.shape[1], x.shape[-1], device=x.device).to(x.dtype)
        h = self.backbone(x, mem, mem_mask, lengths=lengths)  # [B, T, D]
        return self.heads[0](h).transpose(1, 2)  # [B, Dl, T]

    # ------------------------------------------------------------------ training

    def loss(self, codes: Tensor, lengths: Tensor, text_emb: Tensor, text_mask: Tensor, generator=None,
             forward=None) -> tuple[Tensor, Tensor]:
        """v-prediction MSE on valid frames. `codes [B, K, T]` -> (loss, parts [1]).

        In eval mode without a generator, times are stratified over the batch and the
        noise is drawn from a fixed seed, so the validation loss is a function of the
        weights alone. `forward`: the module to call (a DDP wrapper of this model).
        """
        B, _, T = codes.shape
        dev = self.latent_mean.device
        if not self.training and generator is None:
            generator = torch.Generator().manual_seed(0)
            t = (torch.arange(B, device=dev, dtype=torch.float32) + 0.5) / B
        else:
            t = _rand((B,), generator, dev)
        if self.training and self.cond_dropout > 0:
            drop = _rand((B,), generator, text_mask.device) < self.cond_dropout
            text_mask = text_mask & ~drop[:, None]
        z0 = self.normalise(self.target_latent(codes))  # [B, Dl, T]
        eps = _randn(z0.shape, generator, dev)
        a, s = alpha_sigma(t)
        a, s = a[:, None, None], s[:, None, None]
        x_t = a * z0 + s * eps
        v = a * eps - s * z0
        v_hat = (forward or self)(x_t, t, codes[:, : self.first_k], text_emb, text_mask, lengths)
        valid = (torch.arange(T, device=dev)[None] < lengths.to(dev)[:, None])[:, None]  # [B, 1, T]
        err = ((v_hat.float() - v) ** 2 * valid).sum() / (valid.sum().clamp_min(1) * self.latent_dim)
        return err, err.reshape(1)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self,
        stage1_codes: Tensor,
        text_emb: Tensor,
        text_mask: Tensor,
        steps: int | None = None,
        sampler: str | None = None,
        cfg_scale: float | None = None,
        generator: torch.Generator | None = None,
        lengths: Tensor | None = None,
    ) -> Tensor:
        """`stage1_codes [B, k, T]` + text -> latent `[B, Dl, T]` in codec units (for the residual
        target: latent(stage-1 codes) + the sampled residual), ready for `codec.decode_latent`.

        sampler "ddim": deterministic DDIM (eta = 0); "ancestral": DDPM posterior sampling.
        Classifier-free guidance (cfg_scale != 1) runs the caption and the null caption as
        one batch of 2B. Deterministic for a given `generator`.
        """
        steps = self.sample_steps if steps is None else int(steps)
        sampler = self.sampler if sampler is None else sampler
        cfg_scale = self.cfg_scale if cfg_scale is None else float(cfg_scale)
        if steps < 1:
            raise ValueError(f"diffusion sample steps must be >= 1, got {steps}")
        if sampler not in SAMPLERS:
            raise ValueError(f"diffusion sampler must be one of {SAMPLERS}, got {sampler!r}")
        if stage1_codes.dim() != 3 or stage1_codes.shape[1] != self.first_k:
            raise ValueError(f"stage1_codes: expected [B, {self.first_k}, T], got {tuple(stage1_codes.shape)}")
        dev = self.latent_mean.device
        stage1_codes = stage1_codes.to(dev)
        text_emb, text_mask = text_emb.to(dev), text_mask.to(dev)
        B, _, T = stage1_codes.shape
        use_cfg = cfg_scale != 1.0
        if use_cfg:
            c2 = torch.cat([stage1_codes, stage1_codes])
            e2 = torch.cat([text_emb, text_emb])
            m2 = torch.cat([text_mask, torch.zeros_like(text_mask)])
            l2 = None if lengths is None else torch.cat([lengths, lengths]).to(dev)
        else:
            c2, e2, m2, l2 = stage1_codes, text_emb, text_mask, None if lengths is None else lengths.to(dev)

        def v_of(x: Tensor, t: float) -> Tensor:  # guided v prediction [B, Dl, T]
            xx = torch.cat([x, x]) if use_cfg else x
            tt = torch.full((xx.shape[0],), t, device=dev)
            v = self(xx, tt, c2, e2, m2, l2).float()
            if not use_cfg:
                return v
            return v[B:] + cfg_scale * (v[:B] - v[B:])

        ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        x = _randn((B, self.latent_dim, T), generator, dev)  # x_1 ~ N(0, I)
        for i in range(steps):
            t, s = ts[i : i + 1], ts[i + 1 : i + 2]
            (a_t,), (s_t,) = alpha_sigma(t)
            (a_s,), (s_s,) = alpha_sigma(s)
            v = v_of(x, float(t))
            x0 = a_t * x - s_t * v
            if i == steps - 1:
                x = x0
                break
            if sampler == "ddim":
                eps = s_t * x + a_t * v
                x = a_s * x0 + s_s * eps
            else:  # ancestral: sample q(x_s | x_t, x0_hat)
                a_ts = a_t / a_s
                var_ts = s_t**2 - a_ts**2 * s_s**2
                mean = (a_ts * s_s**2 / s_t**2) * x + (a_s * var_ts / s_t**2) * x0
                std = (var_ts * s_s**2 / s_t**2).clamp_min(0).sqrt()
                x = mean + std * _randn(x.shape, generator, dev)
        z = self.denormalise(x)
        if self.target == "residual":
            z = z + self.stage1_latent(stage1_codes)
        return z

    @torch.no_grad()
    def render(self, stage1_codes: Tensor, text_emb: Tensor, text_mask: Tensor, **sample_kw: Any) -> Tensor:
        """Sample a latent and decode it with the codec: -> wav `[B, C, N]`."""
        z = self.sample(stage1_codes, text_emb, text_mask, **sample_kw)
        return self.codec.decode_latent(z)


# ----------------------------------------------------------------------------- building


def check_latent_codec(codec) -> None:
    missing = [a for a in ("latent", "decode_latent", "latent_dim") if not hasattr(codec, a)]
    if missing:
        raise ValueError(
            f"codec {type(codec).__name__} has no {', '.join(missing)}: a two-stage model needs a codec "
            "with continuous latents (latent(codes) -> [B, Dl, T], decode_latent, latent_dim)"
        )


def diffusion_extra_params(latent_dim: int, text_dim: int, d_model: int, first_k: int, cardinality: int) -> int:
    """Trainable LatentDiffusion parameters outside the denoiser, counted on the meta device."""
    with torch.device("meta"):
        return count_params(DiffusionParts(latent_dim, text_dim, d_model, first_k, cardinality))


def denoiser_kwargs(cfg, latent_dim: int, cardinality: int, text_dim: int) -> dict[str, Any]:
    """Kwargs of ONE direction of the denoiser; with `model.diffusion.target_params`, sized so
    the whole LatentDiffusion (both directions, merge, projections, embeddings) matches it."""
    d = cfg.model.diffusion
    kw = dict(d_model=d.d_model, n_layers=d.n_layers, n_heads=d.n_heads, cross_attention=True,
              dropout=cfg.model.dropout, **d.backbone_kwargs)
    if d.target_params:
        vary = cfg.model.size_by
        kw.pop(vary)
        kw = size_bidirectional(
            d.denoiser, d.target_params, merge=d.bidirectional, vary=vary,
            extra_params=lambda k: diffusion_extra_params(latent_dim, text_dim, k["d_model"], cfg.model.first_k,
                                                          cardinality),
            **kw,
        )
    return kw


def build_latent_diffusion(cfg, codec, text_dim: int, train_split=None) -> LatentDiffusion:
    """The stage-2 model of a run config, attached to `codec`. With `train_split` (a
    ttm.prepare.Split) the latent statistics are estimated on it; without, they stay at
    (0, 1) until a checkpoint is loaded."""
    check_latent_codec(codec)
    d = cfg.model.diffusion
    Dl, card = int(codec.latent_dim), int(codec.cardinality)
    kw = denoiser_kwargs(cfg, Dl, card, text_dim)
    model = LatentDiffusion(
        Bidirectional.build(d.denoiser, d.bidirectional, **kw),
        latent_dim=Dl,
        n_codebooks=int(codec.n_codebooks),
        cardinality=card,
        first_k=cfg.model.first_k,
        text_dim=text_dim,
        target=d.target,
        cond_dropout=d.cond_dropout,
        positions=cfg.model.positions,
        sampler=d.sampler,
        sample_steps=d.sample_steps,
        cfg_scale=d.cfg_scale,
    ).attach_codec(codec)
    if train_split is not None:
        model.estimate_stats(train_split.codes, train_split.lengths)
    return model

