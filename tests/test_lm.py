import pytest
import torch

from backbones.base import build_backbone
from ttm.lm import TTMLM, lm_extra_params
from ttm.patterns import Pattern
from ttm.positions import position_table, resolve_positions, study_positions


def make_lm(cond="prefix", backbone="transformer", pattern="delay", K=3, card=16, Dt=12, positions="auto"):
    torch.manual_seed(0)
    bb = build_backbone(backbone, d_model=32, n_layers=2, cross_attention=cond == "cross")
    return TTMLM(bb, Pattern(pattern, K, card, k=1), text_dim=Dt, conditioning=cond, positions=positions)


def text(B=2, L=5, Dt=12):
    te = torch.randn(B, L, Dt)
    tm = torch.ones(B, L, dtype=torch.bool)
    tm[1, 3:] = False
    return te, tm


@pytest.mark.parametrize("cond", ["prefix", "cross"])
def test_causal_logits(cond):
    lm = make_lm(cond).eval()
    te, tm = text()
    seq = torch.randint(0, 17, (2, 3, 12))
    a = lm(seq, te, tm)
    seq2 = seq.clone()
    seq2[:, :, 7:] = torch.randint(0, 16, (2, 3, 5))
    b = lm(seq2, te, tm)
    assert torch.allclose(a[:, :, :7], b[:, :, :7], atol=1e-5)
    assert not torch.allclose(a[:, :, 7:], b[:, :, 7:])


@pytest.mark.parametrize("cond", ["prefix", "cross"])
def test_text_changes_logits_and_null_caption(cond):
    lm = make_lm(cond).eval()
    te, tm = text()
    seq = torch.randint(0, 16, (2, 3, 6))
    assert not torch.allclose(lm(seq, te, tm), lm(seq, te + 1, tm))
    null = torch.zeros_like(tm)  # null caption: text content must not matter
    assert torch.allclose(lm(seq, te, null), lm(seq, te * 5, null), atol=1e-6)


@pytest.mark.parametrize("cond", ["prefix", "cross"])
def test_recurrent_generation_equals_full_recompute(cond):
    lm = make_lm(cond).eval()
    te, tm = text()
    a = lm.generate(te, tm, 9, cfg_scale=2.5, greedy=True)
    b = lm.generate(te, tm, 9, cfg_scale=2.5, greedy=True, recurrent=False)
    assert a.shape == (2, 3, 9) and torch.equal(a, b)
    assert int(a.max()) < 16  # the special token is never emitted as a code


def test_study_positions_closed_form():
    d, p = 16, 7
    t = study_positions(p + 1, d)
    assert t.shape == (p + 1, d)
    assert torch.allclose(t[0], torch.cat([torch.ones(8), torch.zeros(8)]))  # position 0: cos 1, sin 0
    ang = p / 10000.0 ** (torch.arange(8) / 7)  # frequency i: 10000^(-i / (d/2 - 1))
    assert torch.allclose(t[p], torch.cat([ang.cos(), ang.sin()]), atol=1e-6)
    assert torch.allclose(position_table("study", 3, d, offset=p - 2), t[p - 2 :])  # rows by offset
    with pytest.raises(ValueError, match="model.positions"):
        resolve_positions("learned", True)


@pytest.mark.parametrize("kind", ["sinusoidal", "study"])
def test_position_rows_by_offset_equal_the_whole_table_bit_for_bit(kind):
    """Rows computed from an offset are the whole table's rows exactly: generation takes its rows
    from one table per call, and equals the sampled tokens of the row-by-row form it replaced."""
    full = position_table(kind, 3001, 64)
    for p in (0, 1, 37, 1499, 3000):
        assert torch.equal(position_table(kind, 1, 64, offset=p)[0], full[p])
    assert torch.equal(position_table(kind, 50, 64, offset=23), full[23:73])


@pytest.mark.parametrize(("positions", "want"), [("auto", "none"), ("none", "none"), ("sinusoidal", "sinusoidal"),
                                                 ("study", "study")])
def test_ssm_positions_are_a_knob(positions, want):
    """`auto` gives an SSM no positions; `study` adds the study's sinusoid over [text; audio], and
    changes the logits; recurrent decoding adds the same rows as the parallel pass."""
    lm = make_lm("prefix", backbone="mamba2", positions=positions).eval()
    assert lm.positions == want
    te, tm = text()
    seq = torch.randint(0, 16, (2, 3, 6))
    if want != "none":
        off = make_lm("prefix", backbone="mamba2", positions="none").eval()
        assert not torch.allclose(lm(seq, te, tm), off(seq, te, tm), atol=1e-3)
    a = lm.generate(te, tm, 7, cfg_scale=2.5, greedy=True)
    b = lm.generate(te, tm, 7, cfg_scale=2.5, greedy=True, recurrent=False)
    assert torch.equal(a, b)


def test_clip_nll_matches_the_loss_and_is_text_blind_when_the_text_cannot_matter():
    lm = make_lm("prefix").eval()
    te, tm = text()
    codes = torch.randint(0, 16, (2, 3, 10))
    lengths = torch.tensor([10, 10])
    nll = lm.clip_nll(codes, lengths, te, tm)  # [B, K']
    _, per_k = lm.loss(codes, lengths, te, tm)  # equal lengths: the token mean is the clip mean
    assert nll.shape == (2, 3) and torch.allclose(nll.mean(0), per_k, atol=1e-5)
    # a text projection that outputs the null vector whatever the text: no information gain at all
    with torch.no_grad():
        lm.text_proj[0].weight.zero_()
        lm.null_text.copy_(lm.text_proj[1].bias)
        lm.text_proj[1].weight.zero_()
    assert torch.allclose(lm.clip_nll(codes, lengths, te, torch.zeros_like(tm)), lm.clip_nll(codes, lengths, te, tm))


def test_generation_seeded_and_length():
    lm = make_lm().eval()
    te, tm = text()
    g = lambda s: lm.generate(te, tm, 7, top_k=5, temperature=1.0, generator=torch.Generator().manual_seed(s))
    assert torch.equal(g(1), g(1))
    assert g(1).shape[-1] == 7


def test_loss_decreases_and_ignores_padding():
    lm = make_lm()
    te, tm = text()
    codes = torch.randint(0, 16, (2, 3, 10))
    lengths = torch.tensor([10, 6])
    # positions past a clip's length do not affect the loss
    lm.eval()
    l1, _ = lm.loss(codes, lengths, te, tm)
    codes2 = codes.clone()
    codes2[1, :, 6:] = (codes2[1, :, 6:] + 3) % 16
    l2, _ = lm.loss(codes2, lengths, te, tm)
    assert torch.allclose(l1, l2)
    lm.train()
    opt = torch.optim.AdamW(lm.parameters(), 1e-2)
    first = None
    for _ in range(40):
        loss, per_k = lm.loss(codes, lengths, te, tm)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert per_k.shape == (3,)
    assert loss.item() < 0.3 * first


def test_first_k_models_only_k_codebooks():
    lm = make_lm(pattern="first_k")
    assert len(lm.heads) == 1
    te, tm = text()
    out = lm.eval().generate(te, tm, 5, greedy=True)
    assert out.shape == (2, 1, 5)


def test_extra_param_formula():
    lm = make_lm("cross")
    total = sum(p.numel() for p in lm.parameters())
    assert total == lm.backbone.num_params() + lm_extra_params(3, 16, 12, 32)


def test_validation_terms_equal_loss_and_clip_nll_from_one_pass():
    torch.manual_seed(0)
    lm = make_lm().eval()
    lm.label_smoothing = 0.1
    codes = torch.randint(0, 16, (2, 3, 9))
    lengths = torch.tensor([9, 6])
    emb, mask = text()
    per_k, nll = lm.validation_terms(codes, lengths, emb, mask)
    assert torch.allclose(per_k, lm.loss(codes, lengths, emb, mask)[1])
    assert torch.allclose(nll, lm.clip_nll(codes, lengths, emb, mask))


def test_compile_step_needs_recurrent_decoding():
    lm = make_lm().eval()
    te, tm = text()
    with pytest.raises(ValueError, match="compile_step applies to recurrent decoding"):
        lm.generate(te, tm, 4, recurrent=False, compile_step=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backbone", "cond"), [("mamba2", "prefix"), ("transformer", "cross"), ("s4d", "prefix"), ("s5", "prefix")]
)
def test_compiled_step_equals_eager_step(backbone, cond):
    """Backbone.compiled_step (torch.compile) against step, state for state over steps at growing
    positions (the Transformer's KV cache index changes every step; S4D's and S5's compiled steps run on
    real and imaginary parts instead of complex tensors), and greedy generation through it gives the
    eager tokens."""
    torch._dynamo.reset()
    lm = make_lm(cond, backbone=backbone).eval()
    bb = lm.backbone
    mem = (torch.randn(3, 5, 32), torch.ones(3, 5, dtype=torch.bool)) if cond == "cross" else ()
    with torch.no_grad():
        se, sc = bb.allocate_state(3, 16), bb.allocate_state(3, 16)
        for t in range(6):
            x = torch.randn(3, 32)
            ye, yc = bb.step(x, se, *mem), bb.compiled_step()(x, sc, *mem)
            torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5, msg=f"step {t}")
        for a, b in zip(se, sc):
            for k, v in a["mixer"].items():
                if torch.is_tensor(v):
                    torch.testing.assert_close(b["mixer"][k], v, atol=1e-5, rtol=1e-5)
                else:  # the KV cache's position
                    assert b["mixer"][k] == v
        te, tm = text()
        torch.manual_seed(1)
        a = lm.generate(te, tm, 8, greedy=True)
        b = lm.generate(te, tm, 8, greedy=True, compile_step=True)
    assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["s4d", "s5"])
def test_compiled_step_follows_changed_parameters_without_recompiling(backbone):
    """S4D's and S5's compiled steps read their discretisation from `prepare_compiled_step`, run by
    each `compiled_step()` call: after the parameters change (a training step), the next call's
    step equals the eager step with the new parameters, and nothing recompiles (the constants are
    written in place). Compiled without `compiled_step`, the step still equals the eager one."""
    torch._dynamo.reset()
    lm = make_lm("prefix", backbone=backbone)
    bb = lm.backbone
    x = torch.randn(3, 32)
    with torch.no_grad():
        s0 = bb.allocate_state(3, 16)
        bb.compiled_step()(x, s0)
    with torch.no_grad():
        for p in bb.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        se, sc = bb.allocate_state(3, 16), bb.allocate_state(3, 16)
        torch.testing.assert_close(bb.compiled_step()(x, sc), bb.step(x, se), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    fresh = make_lm("prefix", backbone=backbone).backbone
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fresh.step)(x, fresh.allocate_state(3, 16)),
                                   fresh.step(x, fresh.allocate_state(3, 16)), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_steps_of_two_models_do_not_share_a_frame():
    """Each backbone compiles its step as a frame of its own (`Backbone._own_step_frame`): a second
    model of another class and size compiles afresh instead of recompiling the first's frame (which
    gave it symbolic sizes and a slower graph), and each still equals its eager step."""
    torch._dynamo.reset()
    x = torch.randn(3, 32)
    with torch.no_grad():
        for backbone in ("mamba2", "s4d"):
            bb = make_lm("prefix", backbone=backbone).eval().backbone
            se, sc = bb.allocate_state(3, 16), bb.allocate_state(3, 16)
            with torch._dynamo.config.patch(error_on_recompile=True):  # its first compile is not a recompile
                yc = bb.compiled_step()(x, sc)
            torch.testing.assert_close(yc, bb.step(x, se), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(bb.compiled_step()(x, sc), bb.step(x, se), atol=1e-5, rtol=1e-5)


def test_own_step_frame_keeps_a_subclass_step_and_its_keyword_defaults():
    """The frame `compiled_step` compiles is the subclass's own `step` (zero-argument super() and
    keyword-only defaults included), under a name that carries its class and configuration."""
    base = type(make_lm().backbone)

    class Scaled(base):
        def step(self, x, state, memory=None, memory_mask=None, *, scale=2.0):
            return super().step(x, state, memory, memory_mask) * scale

    bb = Scaled(d_model=32, n_layers=1, n_heads=4).eval()
    frame = bb._own_step_frame()
    assert frame.__name__.startswith("Scaled.step(") and "d_model=32" in frame.__name__
    x = torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(frame(x, bb.allocate_state(2, 4)), bb.step(x, bb.allocate_state(2, 4)))


def test_per_codebook_loss_and_its_gradient_match_the_closed_form():
    """loss_k = mean over predicted positions of -log softmax(logits)[target]; its gradient wrt the
    logits is (softmax - onehot) / count_k at those positions and 0 where nothing is predicted."""
    lm = make_lm()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, 16, generator=gen, requires_grad=True)
    target = torch.randint(0, 16, (2, 3, 7), generator=gen)
    target[0, 1, 4:] = -100
    target[1, 2, :] = -100
    target[1, 2, 0] = 5
    per_k = lm._per_codebook_loss(logits, target)
    (grad,) = torch.autograd.grad(per_k.sum(), logits)
    keep = target != -100  # [B, K, S]
    count = keep.sum((0, 2))  # [K]
    logp = logits.detach().log_softmax(-1)
    nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * keep
    assert torch.allclose(per_k.detach(), nll.sum((0, 2)) / count, atol=1e-6)
    onehot = torch.nn.functional.one_hot(target.clamp(min=0), 16) * keep[..., None]
    want = (logp.exp() * keep[..., None] - onehot) / count[None, :, None, None]
    assert torch.allclose(grad, want, atol=1e-7)
