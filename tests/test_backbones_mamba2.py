"""Mamba2 (chunked SSD vs the recurrence), SiMBA's EinFFT, the hybrid's layer layout and the
study's full-scale parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backbones.base import MLP, build_backbone, count_params
from backbones.hybrid import attention_indices
from backbones.mamba2 import GatedRMSNorm, Mamba2Mixer, ssd_chunked, ssd_flops_per_token
from backbones.simba import EinFFT
from backbones.transformer import SelfAttention


def naive_ssd(x, dt, A, B, C, D, h0):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t + D x_t, one step at a time."""
    _b, l, h, _p = x.shape
    hg = h // B.shape[2]
    state, ys = h0.clone(), []
    for t in range(l):
        Bh, Ch = B[:, t].repeat_interleave(hg, 1), C[:, t].repeat_interleave(hg, 1)  # [b, h, n]
        state = state * torch.exp(dt[:, t] * A)[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, :, None]
        ys.append((state * Ch[:, :, None]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 8, 16, 37, 64])
def test_chunked_ssd_equals_recurrence(chunk, fused):
    g = torch.Generator().manual_seed(0)
    b, l, h, p, ng, n = 2, 37, 4, 3, 2, 5  # 37 is not a multiple of 3, 8 or 16
    f64 = {"dtype": torch.float64, "generator": g}
    x, dt = torch.randn(b, l, h, p, **f64), torch.rand(b, l, h, **f64)
    A, D = -3 * torch.rand(h, **f64), torch.randn(h, **f64)
    B, C = torch.randn(b, l, ng, n, **f64), torch.randn(b, l, ng, n, **f64)
    h0 = torch.randn(b, h, p, n, **f64)
    y_ref, s_ref = naive_ssd(x, dt, A, B, C, D, h0)
    y, s = ssd_chunked(x, dt, A, B, C, chunk, D, h0, fused=fused)
    assert (y - y_ref).abs().max() < 1e-10
    assert (s - s_ref).abs().max() < 1e-10
    y0, _ = ssd_chunked(x, dt, A, B, C, chunk, D, None, fused=fused)  # no initial state = zeros
    assert (y0 - naive_ssd(x, dt, A, B, C, D, torch.zeros_like(h0))[0]).abs().max() < 1e-10


@pytest.mark.parametrize("chunk", [4, 5])
def test_prefill_then_step_equals_forward_float64(chunk):
    torch.manual_seed(0)
    m = Mamba2Mixer(16, d_state=6, headdim=4, ngroups=2, chunk_size=chunk).double()
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    y = m(x)
    st = m.allocate_state(2, 13, dtype=torch.float64)
    parts = [m(x[:, :6], st), m(x[:, 6:9], st)] + [m.step(x[:, t], st)[:, None] for t in range(9, 13)]
    assert (torch.cat(parts, 1) - y).abs().max() < 1e-10
    m64 = Mamba2Mixer(16, d_state=6, headdim=4, ngroups=2, chunk_size=64).double()
    m64.load_state_dict(m.state_dict())
    assert (m64(x) - y).abs().max() < 1e-10  # the chunk size changes the schedule, not the result


def test_mamba2_layout_matches_mamba_ssm():
    m = Mamba2Mixer(32, d_state=8, d_conv=4, expand=2, headdim=16, ngroups=1)
    d_inner, nheads = 64, 4
    assert m.in_proj.weight.shape == (2 * d_inner + 2 * 8 + nheads, 32)  # [z, x, B, C, dt]
    assert m.conv1d.weight.shape == (d_inner + 2 * 8, 1, 4)
    assert m.A_log.shape == m.dt_bias.shape == m.D.shape == (nheads,)
    A = torch.exp(m.A_log)
    assert (A >= 1).all() and (A <= 16).all()
    dt = F.softplus(m.dt_bias)
    assert (dt >= 1e-3 - 1e-7).all() and (dt <= 0.1 + 1e-7).all()
    st = m.allocate_state(3, 100)
    assert st["conv"].shape == (3, d_inner + 16, 3) and st["ssm"].shape == (3, nheads, 16, 8)


def test_gated_rmsnorm_normalises_each_group_after_the_gate():
    norm = GatedRMSNorm(8, group_size=4)
    y, z = torch.randn(2, 8), torch.randn(2, 8)
    g = (y * F.silu(z)).view(2, 2, 4)
    expected = (g / g.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).view(2, 8)
    assert torch.allclose(norm(y, z), expected, atol=1e-6)


def test_bad_knobs_raise():
    with pytest.raises(ValueError, match="not divisible by headdim"):
        build_backbone("mamba2", d_model=30, headdim=16)
    with pytest.raises(ValueError, match="unknown knob.*d_sate"):
        build_backbone("mamba2", d_model=32, d_sate=8)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        build_backbone("mamba2", d_model=32, chunk_size=0)
    with pytest.raises(ValueError, match="channel_mixer must be one of mlp, einfft"):
        build_backbone("simba", d_model=32, channel_mixer="fft")
    with pytest.raises(ValueError, match="einfft_blocks"):
        build_backbone("simba", d_model=32, channel_mixer="einfft", einfft_blocks=5)


def test_scan_flops_count():
    m = Mamba2Mixer(1024, d_state=512, expand=2, headdim=64, chunk_size=64)
    H, P, N, Q = 32, 64, 512, 64
    assert m.scan_flops_per_token(4096) == int(2 * Q * N + Q * H + 2 * Q * H * P + 4 * H * P * N
                                               + 2 * H * P * N / Q + 3 * H * P)
    # a sequence shorter than the chunk is one chunk of its own length
    assert m.scan_flops_per_token(16) == ssd_flops_per_token(16, 16, H, P, N, 1)
    bb = build_backbone("mamba2", d_model=32, n_layers=3)
    assert bb.scan_flops_per_token(100) == 3 * bb.blocks[0].mixer.scan_flops_per_token(100) > 0


# ----------------------------------------------------------------------------- SiMBA / EinFFT


def test_simba_default_block_is_mamba2_plus_mlp_ratio_2():
    bb = build_backbone("simba", d_model=32, n_layers=2)
    blk = bb.blocks[0]
    assert isinstance(blk.mixer, Mamba2Mixer) and isinstance(blk.channel, MLP)
    assert blk.channel.fc1.out_features == 64


def test_einfft_matches_complex_formula_and_is_per_token():
    torch.manual_seed(0)
    f = EinFFT(16, num_blocks=4, sparsity_threshold=0.01, scale=0.3)
    x = torch.randn(2, 5, 16)
    # the same mixer written with complex tensors
    W1, W2 = torch.complex(f.w1[0], f.w1[1]), torch.complex(f.w2[0], f.w2[1])  # [nb, bs, bs]
    b1, b2 = torch.complex(f.b1[0], f.b1[1]), torch.complex(f.b2[0], f.b2[1])  # [nb, bs]
    u = torch.fft.fft2(x.view(2, 5, 4, 4), norm="ortho")
    v = torch.einsum("...ni,nio->...no", u, W1) + b1
    v = torch.complex(F.relu(v.real), F.relu(v.imag))
    v = torch.einsum("...ni,nio->...no", v, W2) + b2
    v = torch.complex(F.softshrink(v.real, 0.01), F.softshrink(v.imag, 0.01))
    expected = torch.fft.ifft2(v, norm="ortho").real.reshape(2, 5, 16)
    y = f(x)
    assert torch.allclose(y, expected, atol=1e-5)
    x2 = x.clone()
    x2[:, 3] += 1.0
    changed = (f(x2) - y).abs().amax(dim=(0, 2))
    assert changed[3] > 0 and changed[[0, 1, 2, 4]].max() == 0  # each token is mixed on its own


def test_simba_einfft_trains_and_decodes():
    torch.manual_seed(0)
    bb = build_backbone("simba", d_model=32, n_layers=2, channel_mixer="einfft", d_state=8).eval()
    assert isinstance(bb.blocks[0].channel, EinFFT)
    # two complex block-diagonal layers per block: 2 x (2 nb bs^2 + 2 nb bs) with nb 4, bs 8
    assert count_params(bb.blocks[0].channel) == 2 * (2 * 4 * 8 * 8 + 2 * 4 * 8)
    x = torch.randn(2, 9, 32)
    y = bb(x)
    st = bb.allocate_state(2, 9)
    dec = torch.cat([bb(x[:, :5], state=st)] + [bb.step(x[:, t], st)[:, None] for t in range(5, 9)], 1)
    assert (dec - y).abs().max() < 1e-4
    (y * torch.randn_like(y)).sum().backward()
    for p in bb.blocks[0].channel.parameters():
        assert p.grad is not None and p.grad.abs().max() > 0


# ----------------------------------------------------------------------------- hybrid


def test_hybrid_places_attention_at_requested_layers():
    bb = build_backbone("hybrid", d_model=32, n_layers=4, attn_layers=[0, 2], d_state=8)
    kinds = [type(b.mixer) for b in bb.blocks]
    assert kinds == [SelfAttention, Mamba2Mixer, SelfAttention, Mamba2Mixer]
    assert not bb.constant_state and bb.blocks[0].channel is None
    bb = build_backbone("hybrid", d_model=32, n_layers=4, attn_layers="3", mlp_ratio=2.0)
    assert [isinstance(b.mixer, SelfAttention) for b in bb.blocks] == [False, False, False, True]
    assert isinstance(bb.blocks[0].channel, MLP)
    assert build_backbone("hybrid", d_model=32, n_layers=3, attn_layers="none").constant_state
    assert attention_indices("auto", 10) == [1, 5, 9]
    assert attention_indices("auto", 1) == []
    with pytest.raises(ValueError, match=r"out of range for n_layers=4"):
        build_backbone("hybrid", d_model=32, n_layers=4, attn_layers=[4])
    with pytest.raises(ValueError, match="attn_layers must be"):
        build_backbone("hybrid", d_model=32, n_layers=4, attn_layers="every")


# ----------------------------------------------------------------------------- the study's sizes

D_MODEL, LAYERS = 1024, 24


def lm_extras(n_codebooks: int, card: int = 1024, text_dim: int = 768) -> int:
    """The LM's parameters around the backbone: text Linear + LayerNorm, codebook embeddings
    (card + 1 entries: the special token), linear heads without bias."""
    d = D_MODEL
    return text_dim * d + d + 2 * d + n_codebooks * (card + 1) * d + n_codebooks * d * card


def mamba2_layer(d=D_MODEL, d_state=512, expand=2, headdim=64, d_conv=4) -> int:
    di, h = expand * d, expand * d // headdim
    return d * (2 * di + 2 * d_state + h) + (di + 2 * d_state) * (d_conv + 1) + 3 * h + di + di * d


def test_study_prefix_simba_size():
    with torch.device("meta"):
        bb = build_backbone("simba", d_model=D_MODEL, n_layers=LAYERS, d_state=512, expand=2, headdim=64)
    mlp = D_MODEL * 2 * D_MODEL + 2 * D_MODEL + 2 * D_MODEL * D_MODEL + D_MODEL
    assert count_params(bb) == LAYERS * (mamba2_layer() + mlp + 2 * D_MODEL) + D_MODEL == 278_154_496
    # with the 9-codebook LM around it: 297.8M, 6% over the study's ~281M ...
    assert count_params(bb) + lm_extras(9) == 297_827_584
    # ... which matches a stage-1 LM over the first codebook only (one embedding, one head)
    assert abs(count_params(bb) + lm_extras(1) - 281e6) / 281e6 < 0.001


def test_study_cross_transformer_size():
    with torch.device("meta"):
        bb = build_backbone("transformer", d_model=D_MODEL, n_layers=LAYERS, n_heads=16, cross_attention=True,
                            mlp_ratio=4.0)
        bb2 = build_backbone("transformer", d_model=D_MODEL, n_layers=LAYERS, n_heads=16, cross_attention=True,
                             mlp_ratio=2.0)
    d = D_MODEL
    attn = 4 * d * d  # q, k, v, out (no biases), for self- and cross-attention alike

    def mlp(r):
        return 2 * r * d * d + r * d + d

    assert count_params(bb) == LAYERS * (2 * attn + mlp(4) + 3 * d) + d == 402_850_816
    assert count_params(bb) + lm_extras(9) == 422_523_904  # 38% over the study's ~305M
    # the study's ~305M is a d -> 2d -> d feed-forward (as in its SiMBA) with a one-codebook LM
    assert count_params(bb2) == LAYERS * (2 * attn + mlp(2) + 3 * d) + d
    assert abs(count_params(bb2) + lm_extras(1) - 305e6) / 305e6 < 0.001


# ----------------------------------------------------------------------------- GPU kernel


def _kernel_available() -> bool:
    from backbones.mamba2 import _chunk_scan_kernel

    return torch.cuda.is_available() and _chunk_scan_kernel() is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _kernel_available(), reason="needs CUDA and mamba_ssm")
def test_kernel_path_equals_reference_path():
    torch.manual_seed(0)
    m = Mamba2Mixer(64, d_state=16, headdim=16, chunk_size=8).cuda()
    x = torch.randn(2, 29, 64, device="cuda")
    outs = {}
    for use in (True, False):
        m.use_kernel = use
        st = m.allocate_state(2, 29)
        outs[use] = (m(x), m(x[:, :13], st), m(x[:, 13:], st), st["ssm"].clone())
    for a, b in zip(outs[True], outs[False]):
        assert (a - b).abs().max() < 5e-3


@pytest.mark.slow
def test_mixer_compiles_without_graph_breaks():
    torch.manual_seed(0)
    m = Mamba2Mixer(16, d_state=4, headdim=8, chunk_size=4)
    x = torch.randn(1, 10, 16)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break raises
    assert torch.allclose(compiled(x), m(x), atol=1e-6)
