"""Decoding cases: recurrent state vs re-computation, per-token decode time at length (every
backbone, and SSMs vs the KV-cache Transformer), and our KV cache vs MusicgenForCausalLM."""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import DEMO, build_lm, log, paired, ratio_stats, row, tiny_text

ORDER = ("mamba", "mamba2", "s4d", "s5", "simba", "hybrid", "transformer")


def _names(backbones: list[str] | None) -> list[str]:
    from backbones.base import registered

    reg = registered()
    names = (
        [n for n in ORDER if n in reg] + [n for n in reg if n not in ORDER]
        if backbones is None
        else list(backbones)
    )
    unknown = [n for n in names if n not in reg]
    if unknown:
        raise ValueError(f"backbones: unknown {unknown}; registered: {', '.join(reg)}")
    return names


def decode_recurrent_vs_recompute(
    quick: bool,
    frames: int | None = None,
    d_model: int | None = None,
    n_layers: int = 2,
    backbones: list[str] | None = None,
    cfg_scale: float = 3.0,
    rounds: int | None = None,
) -> list[dict]:
    """Greedy generation, batch 1 with CFG: recurrent state (recurrent=True) vs recomputing the
    whole sequence per token (recurrent=False, the study's public sampler), interleaved rounds."""
    frames = frames or (200 if quick else 500)
    rounds = rounds or (2 if quick else 3)
    d_model = d_model or (64 if quick else 128)
    names = _names(backbones)
    K, card, L, Dt = 4, 256, 8, 32
    te, tm = tiny_text(1, L, Dt)
    rows = []
    for name in names:
        lm = build_lm(K, card, Dt, backbone=name, d_model=d_model, n_layers=n_layers, n_heads=4).eval()

        def gen(rec, n=frames, lm=lm):
            return lm.generate(te, tm, n, cfg_scale=cfg_scale, greedy=True, recurrent=rec)

        gen(True, 4), gen(False, 4)  # warm-up
        out = {}
        log(f"decode {name}: {rounds} rounds of recurrent and recompute, {frames} frames")
        t = paired(
            {
                "rec": lambda out=out, gen=gen: out.__setitem__("a", gen(True)),
                "full": lambda out=out, gen=gen: out.__setitem__("b", gen(False)),
            },
            rounds,
            warmup=0,
        )
        a, b = out["a"], out["b"]
        ratio, spread = ratio_stats(t["full"], t["rec"])
        rec_s, full_s = statistics.median(t["rec"]), statistics.median(t["full"])
        constant = lm.backbone.constant_state
        rows.append(
            row(
                f"decode_recurrent_vs_recompute[{name}]",
                rec_s,
                full_s,
                "s",
                ratio,
                "speedup",
                20.0 if constant else None,
                ours_label="recurrent",
                peer_label="recompute",
                note=(
                    f"{frames} frames ({lm.pattern.seq_len(frames)} steps), d_model {d_model}, "
                    f"{n_layers} layers, prefix, CFG {cfg_scale}; same tokens: {bool(torch.equal(a, b))}"
                    + ("" if constant else "; state grows with length: reported, no target")
                ),
                spread=spread,
                rounds=rounds,
                details={
                    "recurrent_s": t["rec"],
                    "recompute_s": t["full"],
                    "frames": frames,
                    "steps": lm.pattern.seq_len(frames),
                    "d_model": d_model,
                    "n_layers": n_layers,
                    "params": sum(p.numel() for p in lm.parameters()),
                    "same_tokens": bool(torch.equal(a, b)),
                    "constant_state": constant,
                },
            )
        )
    return rows


class _Decoder:
    """The per-token work of `TTMLM.generate(recurrent=True)` with CFG (heads, guidance, greedy
    pick, embedding, one backbone step), on a state prefilled to a given length; `compiled`: the
    step through `Backbone.compiled_step` (generate(compile_step=True))."""

    def __init__(self, lm, batch: int, length: int, extra: int, text_len: int, text_dim: int,
                 compiled: bool = False):
        self.lm, self.B = lm, batch
        self.step = lm.backbone.compiled_step() if compiled else lm.backbone.step
        te, tm = tiny_text(batch, text_len, text_dim)
        te, tm = torch.cat([te, te]), torch.cat([tm, torch.zeros_like(tm)])  # CFG: conditional + null
        with torch.inference_mode():  # as generate
            mem, _ = lm.memory(te, tm)  # [2B, M, D]
            self.M = mem.shape[1]
            self.state = lm.backbone.allocate_state(2 * batch, self.M + length + extra)
            x = torch.cat(
                [mem, torch.randn(2 * batch, length, mem.shape[-1]) * 0.5], 1
            )  # a prefix of `length` frames
            if lm.use_positions:  # one table of every position's row, as generate
                self.table = lm._pos(self.M + length + extra, 0, x)
                x = x + self.table[: x.shape[1]]
            self.h = lm.backbone(x, state=self.state)[:, -1]  # [2B, D]
        self.pos = x.shape[1]

    @torch.inference_mode()
    def steps(self, n: int) -> None:
        lm, B = self.lm, self.B
        for _ in range(n):
            logits = torch.stack([head(self.h) for head in lm.heads], dim=1)  # [2B, K', card]
            g = logits[B:] + 3.0 * (logits[:B] - logits[B:])
            tok = g.argmax(-1).repeat(2, 1)  # [2B, K']
            x = lm.embed_tokens(tok[:, :, None])[:, 0]  # [2B, D]
            if lm.use_positions:
                x = x + self.table[self.pos]
            self.h = self.step(x, self.state)
            self.pos += 1


def _decoders(
    names: list[str], lengths: list[int], batch: int, tokens: int, rounds: int, modes: tuple[str, ...],
    case: str,
) -> tuple[dict, dict]:
    """A `_Decoder` per (backbone at the demo's matched size, prefix length, mode: "eager" or
    "compiled"), each run 3 steps (a compiled step compiles then, untimed; its seconds are kept),
    and per backbone {params, constant, compile_s}."""
    K, card, Dt, L = DEMO["K"], DEMO["card"], DEMO["text_dim"], DEMO["text_len"]
    dec, info = {}, {}
    for name in names:
        lm = build_lm(K, card, Dt, **{**DEMO["model"], "backbone": name}).eval()
        info[name] = {"params": sum(p.numel() for p in lm.parameters()),
                      "constant": lm.backbone.constant_state, "compile_s": 0.0}
        for n in lengths:
            log(f"{case}: {name} prefill {n}")
            for mode in modes:
                d = _Decoder(lm, batch, n, (rounds + 1) * tokens + 8, L, Dt, compiled=mode == "compiled")
                t0 = time.perf_counter()
                d.steps(3)  # compiles on the first call (recompiles for a new cache length)
                if mode == "compiled":
                    info[name]["compile_s"] += time.perf_counter() - t0
                dec[name, n, mode] = d
    return dec, info


def _per_token(dec: dict, tokens: int, rounds: int) -> dict:
    """Seconds per token of every decoder in every round (interleaved rounds of `tokens` steps)."""
    fns = {key: (lambda d=d: d.steps(tokens)) for key, d in dec.items()}
    t = paired(fns, rounds)
    return {k: [s / tokens for s in v] for k, v in t.items()}


def _vs_kv_cache(per_tok: dict, info: dict, names: list[str], lengths: list[int], kv_from: int, batch: int,
                 rounds: int, mode: str, case: str) -> list[dict]:
    """Each constant-state backbone vs the KV-cache Transformer per token at >= `kv_from` frames,
    both decoding in `mode` (target >= 1.5x)."""
    if "transformer" not in names:
        return []
    both = " compiled" if mode == "compiled" else ""
    rows = []
    for name in [x for x in names if x != "transformer" and info[x]["constant"]]:
        for n in [x for x in lengths if x >= kv_from]:
            ours, peer = per_tok[name, n, mode], per_tok["transformer", n, mode]
            med, spread = ratio_stats(peer, ours)
            rows.append(row(
                f"{case}[{name}@{n}]", statistics.median(ours), statistics.median(peer), "s/token", med,
                "speedup", 1.5, ours_label=f"{name}{both}", peer_label=f"transformer (KV cache){both}",
                note=f"per token after {n} frames, batch {batch} with CFG, matched params"
                + (", both compiled" if both else ""),
                spread=spread, rounds=rounds,
            ))
    return rows


def decode_at_length(
    quick: bool,
    lengths: list[int] | None = None,
    backbones: list[str] | None = None,
    batch: int = 4,
    tokens: int | None = None,
    rounds: int | None = None,
    kv_from: int = 1500,
) -> list[dict]:
    """Per-token decoding time (batch 4 with CFG, i.e. 8 rows) after a prefix of 300, 1500 and 3000
    frames, every backbone at the demo's matched size: flatness (time at the longest / at the
    shortest length, target <= 1.2 for constant-state backbones) and each SSM vs the KV-cache
    Transformer at >= `kv_from` frames (target >= 1.5x). Rounds interleave backbones and lengths."""
    lengths = sorted(lengths or [300, 1500, 3000])
    names = _names(backbones)
    tokens = tokens or (8 if quick else 24)
    rounds = rounds or (5 if quick else 9)
    with torch.no_grad():
        dec, info = _decoders(names, lengths, batch, tokens, rounds, ("eager",), "decode_at_length")
        log(f"decode_at_length: {rounds} rounds x {len(dec)} (backbone, length) x {tokens} tokens")
        per_tok = _per_token(dec, tokens, rounds)
    lo, hi = lengths[0], lengths[-1]
    rows = []
    for name in names:
        at = {n: per_tok[name, n, "eager"] for n in lengths}
        med, spread = ratio_stats(at[hi], at[lo])
        rows.append(
            row(
                f"decode_flatness[{name}]",
                statistics.median(at[hi]),
                statistics.median(at[lo]),
                "s/token",
                med,
                "slowdown",
                1.2 if info[name]["constant"] else None,
                op="<=",
                ours_label=f"at {hi}",
                peer_label=f"at {lo}",
                note=f"batch {batch} with CFG, {info[name]['params']:,} params"
                + ("" if info[name]["constant"] else "; state grows with length: reported, no target"),
                spread=spread,
                rounds=rounds,
                details={f"per_token_s@{n}": at[n] for n in lengths},
            )
        )
    return rows + _vs_kv_cache(per_tok, info, names, lengths, kv_from, batch, rounds, "eager",
                               "decode_vs_kv_cache")


COMPILED = ("mamba", "mamba2", "s4d", "s5", "simba", "transformer")


def decode_compiled(
    quick: bool,
    lengths: list[int] | None = None,
    backbones: list[str] | None = None,
    batch: int = 4,
    tokens: int | None = None,
    rounds: int | None = None,
    kv_from: int = 1500,
) -> list[dict]:
    """Per-token decoding time with the step compiled (`Backbone.compiled_step`, torch.compile) vs
    eager, every backbone at the demo's matched size, batch 4 with CFG, after a prefix of 300, 1500
    and 3000 frames; and each compiled constant-state backbone vs the compiled KV-cache Transformer
    at >= `kv_from` frames (target >= 1.5x, as decode_vs_kv_cache's). Compilation (first steps) is
    untimed and reported; rounds interleave eager and compiled."""
    lengths = sorted(lengths or [300, 1500, 3000])
    names = _names(list(backbones or COMPILED))
    tokens = tokens or (8 if quick else 24)
    rounds = rounds or (5 if quick else 9)
    with torch.no_grad():
        dec, info = _decoders(names, lengths, batch, tokens, rounds, ("eager", "compiled"), "decode_compiled")
        per_tok = _per_token(dec, tokens, rounds)
    rows = []
    for name in names:
        for n in lengths:
            med, spread = ratio_stats(per_tok[name, n, "eager"], per_tok[name, n, "compiled"])
            rows.append(row(
                f"decode_compiled[{name}@{n}]",
                statistics.median(per_tok[name, n, "compiled"]),
                statistics.median(per_tok[name, n, "eager"]),
                "s/token", med, "speedup", None, ours_label="compiled", peer_label="eager",
                note=f"per token after {n} frames, batch {batch} with CFG; "
                f"compile {info[name]['compile_s']:.0f} s",
                spread=spread, rounds=rounds, details={"compile_s": info[name]["compile_s"]},
            ))
    return rows + _vs_kv_cache(per_tok, info, names, lengths, kv_from, batch, rounds, "compiled",
                               "decode_compiled_vs_kv_cache")


def kv_cache_vs_musicgen(
    quick: bool,
    steps: int | None = None,
    d_model: int = 256,
    n_layers: int = 4,
    n_heads: int = 4,
    n_codebooks: int = 4,
    vocab: int = 1024,
    text_len: int = 8,
    rounds: int | None = None,
) -> list[dict]:
    """Our Cross Transformer LM with KV cache vs transformers' MusicgenForCausalLM.generate (random
    init, built locally) at the same d_model, layers, heads, FFN, codebooks and vocabulary:
    greedy, batch 1 with CFG 3, the same number of decoding steps."""
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    steps = steps or (200 if quick else 500)
    rounds = rounds or (3 if quick else 5)
    K, V, D = n_codebooks, vocab, d_model
    if steps < K:
        raise ValueError(f"kv_cache_vs_musicgen: steps ({steps}) must be >= n_codebooks ({K})")
    frames = steps - (K - 1)  # delay pattern: S = T + K - 1 decoding steps
    ours = build_lm(
        K,
        V,
        D,
        backbone="transformer",
        d_model=D,
        n_layers=n_layers,
        n_heads=n_heads,
        conditioning="cross",
        backbone_kwargs={"mlp_ratio": 4.0},
    ).eval()
    torch.manual_seed(0)
    mg_cfg = MusicgenDecoderConfig(
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        ffn_dim=4 * D,
        num_codebooks=K,
        pad_token_id=V,
        bos_token_id=V,
        decoder_start_token_id=V,
        max_position_embeddings=max(2048, steps + 8),
        dropout=0.0,
    )
    mg = MusicgenForCausalLM(mg_cfg).eval()
    te, tm = tiny_text(1, text_len, D)
    enc = torch.randn(2, text_len + 1, D)  # conditional + null memory (CFG doubles the batch)
    start = torch.full((K, 1), V, dtype=torch.long)  # [B*K, 1] BOS

    def run_ours(n=frames):
        return ours.generate(te, tm, n, cfg_scale=3.0, greedy=True, recurrent=True)

    def run_mg(n=steps):
        return mg.generate(
            start,
            encoder_hidden_states=enc,
            guidance_scale=3.0,
            do_sample=False,
            max_new_tokens=n,
            num_return_sequences=1,
        )

    run_ours(8), run_mg(8 + K - 1)  # warm-up
    out = {}
    log(f"kv_cache_vs_musicgen: {rounds} rounds of ours and musicgen, {steps} steps")
    t = paired(
        {"ours": lambda: out.__setitem__("ours", run_ours()), "mg": lambda: out.__setitem__("mg", run_mg())},
        rounds,
        warmup=0,
    )
    ratio, spread = ratio_stats(t["mg"], t["ours"])
    ours_s, mg_s = statistics.median(t["ours"]), statistics.median(t["mg"])
    if out["ours"].shape[-1] != out["mg"].shape[-1]:
        raise RuntimeError(
            f"frame counts differ: ours {tuple(out['ours'].shape)} vs musicgen {tuple(out['mg'].shape)}"
        )
    p_ours = sum(p.numel() for p in ours.parameters())
    p_mg = sum(p.numel() for p in mg.parameters())
    note = (
        f"{steps} steps / {frames} frames, d_model {D}, {n_layers} layers, {n_heads} heads, ffn {4 * D}, "
        f"{K} codebooks x {V}; params ours {p_ours:,} vs MusicGen {p_mg:,}"
    )
    return [
        row(
            "kv_cache_vs_musicgen",
            ours_s,
            mg_s,
            "s",
            ratio,
            "speedup",
            3.0,
            ours_label="ours (KV cache)",
            peer_label="MusicgenForCausalLM",
            note=note,
            spread=spread,
            rounds=rounds,
            details={
                "ours_s": t["ours"],
                "musicgen_s": t["mg"],
                "steps": steps,
                "frames": frames,
                "params_ours": p_ours,
                "params_musicgen": p_mg,
                "ours_steps_per_s": steps / ours_s,
                "musicgen_steps_per_s": steps / mg_s,
            },
        )
    ]
