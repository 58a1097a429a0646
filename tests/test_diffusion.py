import copy
from pathlib import Path

import pytest
import torch

from backbones.base import build_backbone, count_params
from backbones.bidirectional import Bidirectional, merge_params, reverse_padded
from ttm.diffusion import (
    alpha_sigma,
    build_latent_diffusion,
    denoiser_kwargs,
    diffusion_extra_params,
)
from ttm.prepare import Prepared, Split

# ----------------------------------------------------------------------------- synthetic data with latents


class LatentCodec:
    """A random residual VQ with fixed codebook vectors: latent = sum of the codebook vectors,
    decode_latent = a fixed linear synthesis per frame (tanh)."""

    sample_rate, channels, frame_rate, n_codebooks, cardinality, latent_dim = 8000, 1, 25.0, 3, 16, 8
    hop = 320
    device = torch.device("cpu")

    def __init__(self):
        g = torch.Generator().manual_seed(1234)
        scale = torch.tensor([1.0, 0.6, 0.4])[:, None, None]
        self.books = torch.randn(3, 16, 8, generator=g) * scale  # [K, card, Dl]
        self.synth = torch.randn(8, self.hop, generator=g) / 8**0.5  # [Dl, hop]

    def identity(self) -> dict:
        return {"name": "latent-synthetic", "K": 3, "card": 16, "Dl": 8}

    def latent(self, codes):  # [B, k, T] -> [B, Dl, T]
        z = sum(self.books[k][codes[:, k].cpu()] for k in range(codes.shape[1]))  # [B, T, Dl]
        return z.transpose(1, 2).contiguous()

    def decode_latent(self, z):  # [B, Dl, T] -> [B, 1, T * hop]
        if z.dim() != 3 or z.shape[1] != self.latent_dim:
            raise ValueError(f"latent: expected [B, {self.latent_dim}, T], got {tuple(z.shape)}")
        wav = torch.tanh(z.float().cpu().transpose(1, 2) @ self.synth)  # [B, T, hop]
        return wav.reshape(z.shape[0], 1, -1)

    def decode(self, codes):
        return self.decode_latent(self.latent(codes))


def latent_split(n: int, seed: int, T: int = 16, L: int = 4, Dt: int = 8) -> Split:
    """Codebook 0 repeats a caption-dependent motif; codebooks 1 and 2 are fixed functions of
    codebook 0 at the same frame, so the residual is predictable from the stage-1 tokens."""
    tables = torch.Generator().manual_seed(99)
    motif = torch.randint(0, 16, (4, 4), generator=tables)  # [label, 4]
    f1 = torch.randint(0, 16, (16,), generator=tables)
    f2 = torch.randint(0, 16, (16,), generator=tables)
    text = torch.randn(4, L, Dt, generator=tables)
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 4, (n,), generator=g)
    c0 = motif[label].repeat(1, T // 4)  # [n, T]
    codes = torch.stack([c0, f1[c0], f2[c0]], 1)  # [n, 3, T]
    return Split(codes, torch.full((n,), T), text[label], torch.ones(n, L, dtype=torch.bool),
                 [f"label {int(x)}" for x in label], [{"label": int(x)} for x in label],
                 [f"clip{i}" for i in range(n)])


def latent_prepared(n_train: int = 64) -> Prepared:
    return Prepared(Path("synthetic"), LatentCodec(), 8,
                    {"train": latent_split(n_train, 0), "valid": latent_split(16, 1), "test": latent_split(8, 2)},
                    Path("synthetic"))


def tiny_two_stage_config(**overrides):
    from ttm.config import load_config

    base = {
        "model.kind": "two_stage", "model.pattern": "first_k", "model.first_k": 1, "model.d_model": 32,
        "model.n_layers": 2, "model.diffusion.d_model": 32, "model.diffusion.n_layers": 2,
        "model.diffusion.sample_steps": 4, "train.batch_size": 8, "train.steps": 8, "train.warmup": 2,
        "train.log_every": 1, "train.eval_every": 2, "train.ckpt_every": 2, "train.val_batches": 1,
        "train.lr": 3e-3, "text.max_length": 4, "generate.n_clips": 2, "eval.metrics": [],
    }
    base.update(overrides)
    return load_config(None, base)


def make_model(data=None, merge="sum", denoiser="transformer", target="residual", **over):
    torch.manual_seed(0)
    data = data or latent_prepared()
    cfg = tiny_two_stage_config(**{"model.kind": "diffusion", "model.diffusion.bidirectional": merge,
                                   "model.diffusion.denoiser": denoiser, "model.diffusion.target": target, **over})
    return build_latent_diffusion(cfg, data.codec, data.text_dim, data.splits["train"]), data


def batch(split: Split, n: int = 8):
    idx = list(range(n))
    return split.codes[idx], split.lengths[idx], split.text_emb[idx], split.text_mask[idx]


# ----------------------------------------------------------------------------- bidirectional


@pytest.mark.parametrize("merge", ["sum", "concat"])
@pytest.mark.parametrize("name", ["transformer", "mamba"])
def test_bidirectional_uses_future_context(merge, name):
    torch.manual_seed(0)
    kw = dict(d_model=16, n_layers=1, n_heads=2)
    if name == "mamba":
        pytest.importorskip("backbones.mamba")
    bi = Bidirectional.build(name, merge, **kw).eval()
    x = torch.randn(2, 10, 16)
    x2 = x.clone()
    x2[:, 8] += 1.0  # perturb a late frame
    y, y2 = bi(x), bi(x2)
    assert y.shape == x.shape
    assert not torch.allclose(y[:, :3], y2[:, :3], atol=1e-6)  # early outputs see the future
    causal = build_backbone(name, **kw).eval()  # the control: the plain backbone does not
    assert torch.allclose(causal(x)[:, :8], causal(x2)[:, :8], atol=1e-6)


def test_bidirectional_ignores_padding_with_lengths_and_passes_memory():
    torch.manual_seed(0)
    bi = Bidirectional.build("transformer", "sum", d_model=16, n_layers=2, n_heads=2, cross_attention=True).eval()
    x, mem = torch.randn(2, 9, 16), torch.randn(2, 3, 16)
    lengths = torch.tensor([9, 5])
    x2 = x.clone()
    x2[1, 5:] = torch.randn(4, 16) * 10  # change only the padding of clip 1
    y, y2 = bi(x, mem, None, lengths=lengths), bi(x2, mem, None, lengths=lengths)
    assert torch.allclose(y[1, :5], y2[1, :5], atol=1e-5) and torch.allclose(y[0], y2[0], atol=1e-5)
    assert not torch.allclose(bi(x, mem + 1, None, lengths=lengths), y)  # the memory is used
    with pytest.raises(ValueError, match="cross_attention=True"):
        bi(x)


def test_reverse_padded_is_an_involution():
    x = torch.arange(12.0).view(2, 6, 1)
    lengths = torch.tensor([6, 4])
    r = reverse_padded(x, lengths)
    assert r[0, :, 0].tolist() == [5, 4, 3, 2, 1, 0]
    assert r[1, :, 0].tolist() == [9, 8, 7, 6, 10, 11]
    assert torch.equal(reverse_padded(r, lengths), x)
    with pytest.raises(ValueError, match="merge"):
        Bidirectional.build("transformer", "max", d_model=16, n_layers=1)


# ----------------------------------------------------------------------------- model pieces


def test_cosine_schedule_closed_form():
    t = torch.tensor([0.0, 0.5, 1.0])
    a, s = alpha_sigma(t)
    ab = torch.cos((t + 0.008) / 1.008 * torch.pi / 2) ** 2
    assert torch.allclose(a**2, ab, atol=1e-6) and torch.allclose(a**2 + s**2, torch.ones(3), atol=1e-6)
    assert a[2] < 1e-6 and a[0] > 0.9998


@pytest.mark.parametrize("merge", ["sum", "concat"])
def test_param_count_and_codec_kept_out_of_the_module(merge):
    model, data = make_model(merge=merge)
    bb = model.backbone
    expected = 2 * count_params(bb.fwd) + merge_params(32, merge) + diffusion_extra_params(8, 8, 32, 1, 16)
    assert count_params(model) == expected
    assert not any("codec" in k or "books" in k for k in model.state_dict())
    assert "latent_mean" in model.state_dict() and "latent_std" in model.state_dict()
    assert copy.deepcopy(model).codec is data.codec  # EMA copies share the codec, do not copy it


def test_latent_statistics_normalise_the_residual():
    model, data = make_model()
    tr = data.splits["train"]
    z = model.normalise(model.target_latent(tr.codes))  # [N, Dl, T]
    assert torch.allclose(z.mean((0, 2)), torch.zeros(8), atol=1e-4)
    assert torch.allclose(z.std((0, 2), unbiased=False), torch.ones(8), atol=1e-3)
    full = data.codec.latent(tr.codes[:4])
    assert torch.allclose(model.target_latent(tr.codes[:4]), full - data.codec.latent(tr.codes[:4, :1]), atol=1e-6)


def test_sizing_matches_target_params():
    data = latent_prepared()
    cfg = tiny_two_stage_config(**{"model.kind": "diffusion", "model.diffusion.target_params": 120_000})
    kw = denoiser_kwargs(cfg, 8, 16, 8)
    model = build_latent_diffusion(cfg, data.codec, 8)
    assert model.backbone.fwd.n_layers == kw["n_layers"] > 2
    assert abs(count_params(model) - 120_000) / 120_000 < 0.05


def test_errors_name_the_problem():
    from tests.synthetic import synthetic_prepared

    data = synthetic_prepared()
    cfg = tiny_two_stage_config(**{"model.kind": "diffusion"})
    with pytest.raises(ValueError, match="continuous latents"):
        build_latent_diffusion(cfg, data.codec, 8)
    with pytest.raises(ValueError, match="first_k=3 leaves no codebooks"):
        make_model(**{"model.first_k": 3})
    model, _ = make_model()
    codes = latent_prepared().splits["test"].codes
    with pytest.raises(ValueError, match=r"stage1_codes: expected \[B, 1, T\]"):
        model.sample(codes, torch.zeros(8, 4, 8), torch.ones(8, 4, dtype=torch.bool), steps=2)
    with pytest.raises(ValueError, match="sampler"):
        model.sample(codes[:, :1], torch.zeros(8, 4, 8), torch.ones(8, 4, dtype=torch.bool), sampler="euler")


# ----------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_samplers_shapes_and_determinism(sampler):
    model, data = make_model()
    model.eval()
    codes, _, te, tm = batch(data.splits["test"], 3)
    kw = dict(steps=3, sampler=sampler, cfg_scale=2.0)
    a = model.sample(codes[:, :1], te, tm, generator=torch.Generator().manual_seed(5), **kw)
    b = model.sample(codes[:, :1], te, tm, generator=torch.Generator().manual_seed(5), **kw)
    c = model.sample(codes[:, :1], te, tm, generator=torch.Generator().manual_seed(6), **kw)
    assert a.shape == (3, 8, 16) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    wav = model.render(codes[:, :1], te, tm, steps=2, generator=torch.Generator().manual_seed(0))
    assert wav.shape == (3, 1, 16 * LatentCodec.hop)


def test_one_step_sample_is_the_guided_x0_prediction():
    """steps=1 returns x0_hat = alpha(1) x_1 - sigma(1) v_guided, with v_guided = v_u + w (v_c - v_u)
    from one batched pass of the caption and the null caption."""
    model, data = make_model()
    torch.nn.init.normal_(model.heads[0].weight, std=0.1)  # a non-zero head so v depends on the inputs
    model.eval()
    codes, _, te, tm = batch(data.splits["test"], 2)
    s1 = codes[:, :1]
    w = 3.0
    z = model.sample(s1, te, tm, steps=1, cfg_scale=w, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    t = torch.ones(2)
    vc = model(x, t, s1, te, tm)
    vu = model(x, t, s1, te, torch.zeros_like(tm))
    a, s = alpha_sigma(t[:1])
    expect = model.denormalise(a * x - s * (vu + w * (vc - vu))) + data.codec.latent(s1)
    assert torch.allclose(z, expect, atol=1e-5)
    assert not torch.allclose(vc, vu)  # the caption matters, so the guidance test is not vacuous


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_samplers_recover_a_gaussian_with_the_exact_denoiser(sampler):
    """For data z0 ~ N(0, c^2) the exact v-prediction is linear in x_t; both samplers must then
    produce samples with standard deviation c (tests the DDIM and DDPM-posterior updates)."""
    model, _ = make_model(target="full")
    model.latent_mean.zero_()  # sample in the normalised space itself
    model.latent_std.fill_(1.0)
    c = 0.5

    def exact_v(x_t, t, *args):
        a, s = alpha_sigma(t)
        a, s = a[:, None, None], s[:, None, None]
        x0 = a * c**2 * x_t / (a**2 * c**2 + s**2)  # E[z0 | x_t]
        return (a * x_t - x0) / s

    model.forward = exact_v
    codes = torch.zeros(1, 1, 2000, dtype=torch.long)
    z = model.sample(codes, torch.zeros(1, 2, 8), torch.ones(1, 2, dtype=torch.bool), steps=250, sampler=sampler,
                     cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert abs(float(z.std()) - c) < 0.02 * c  # with few steps both fall short (the last x0_hat is a mean)
    assert abs(float(z.mean())) < 0.02


# ----------------------------------------------------------------------------- training


def _train(model, split, steps, lr=3e-3, seed=0):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for i in range(steps):
        idx = torch.randint(0, len(split), (16,), generator=g).tolist()
        loss, _ = model.loss(split.codes[idx], split.lengths[idx], split.text_emb[idx], split.text_mask[idx],
                             generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def trained():
    """One brief training shared by the training tests: (model, data, val batch, val loss before)."""
    model, data = make_model(**{"model.diffusion.n_layers": 1})
    val = batch(data.splits["valid"], 16)
    model.eval()
    with torch.no_grad():
        before, parts = model.loss(*val)
        assert parts.shape == (1,) and torch.equal(model.loss(*val)[0], before)  # same weights, same val loss
    _train(model, data.splits["train"], 60)
    return model, data, val, before.item()


def test_loss_decreases(trained):
    model, _, val, before = trained
    with torch.no_grad():
        after, _ = model.loss(*val)
    assert after.item() < 0.5 * before


def test_stage2_beats_the_codebook1_decode_with_ground_truth_tokens(trained):
    model, data, (codes, _, te, tm), _ = trained
    true = data.codec.latent(codes)  # all codebooks
    base = data.codec.latent(codes[:, :1])  # what the codebook-1-only decode renders
    for sampler in ("ddim", "ancestral"):
        z = model.sample(codes[:, :1], te, tm, steps=10, sampler=sampler, cfg_scale=1.0,
                         generator=torch.Generator().manual_seed(0))
        err, err_base = float(((z - true) ** 2).mean()), float(((base - true) ** 2).mean())
        assert err < 0.2 * err_base, (sampler, err, err_base)  # measured: about 0.04


def test_with_a_fitted_melrvq_codec():
    """The real offline codec: residual target, sampling and rendering through decode_latent."""
    from ttm.codecs.melrvq import MelRVQCodec

    sr = 16000
    tt = torch.arange(sr // 2) / sr
    wavs = [torch.sin(2 * torch.pi * f * tt)[None] * 0.3 for f in (220.0, 330.0, 440.0, 550.0, 660.0, 880.0)]
    codec = MelRVQCodec(sample_rate=sr, n_fft=256, hop_length=128, n_mels=16, n_codebooks=3, cardinality=8,
                        kmeans_iters=10, griffin_lim_iters=2).fit(wavs)
    codes = codec.encode(torch.stack(wavs))  # [6, 3, T]
    T = codes.shape[-1]
    split = Split(codes, torch.full((6,), T), torch.randn(6, 4, 8), torch.ones(6, 4, dtype=torch.bool),
                  ["tone"] * 6, [{}] * 6, [f"c{i}" for i in range(6)])
    data = Prepared(Path("melrvq"), codec, 8, {"train": split}, Path("melrvq"))
    model, _ = make_model(data)
    assert model.latent_dim == 16
    assert torch.allclose(model.target_latent(codes), codec.latent(codes) - codec.latent(codes[:, :1]), atol=1e-5)
    model.eval()
    z = model.sample(codes[:2, :1], split.text_emb[:2], split.text_mask[:2], steps=2,
                     generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 16, T)
    wav = model.render(codes[:2, :1], split.text_emb[:2], split.text_mask[:2], steps=2,
                       generator=torch.Generator().manual_seed(0))
    assert wav.shape[:2] == (2, 1) and torch.isfinite(wav).all()
