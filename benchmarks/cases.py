"""The benchmark cases of `ttm-bench bench`: each measures our code against a peer in the
same process and returns rows of raw figures plus their ratio against a target.

    python -m benchmarks.cases CASE [--quick] [--set KEY=VALUE ...] [--threads N]

runs one case and prints its result as one JSON line prefixed with `RESULT_MARK`, with
this process's peak resident memory (`resource.getrusage`), so that `benchmarks.run`
can give every case its own process and its own peak. Everything runs on the CPU.

A row is a dict:
    name, ours, peer, unit, ours_label, peer_label,
    ratio, ratio_kind ("speedup" | "overhead" | "fraction" | "x real time"),
    target, op (">=" | "<="), met (True | False | None when there is no target),
    status ("ok" | "not available"), note, details {...}
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULT_MARK = "BENCH_RESULT "

# ----------------------------------------------------------------------------- helpers


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def row(
    name: str,
    ours: float | None,
    peer: float | None,
    unit: str,
    ratio: float | None,
    ratio_kind: str,
    target: float | None,
    op: str = ">=",
    ours_label: str = "ours",
    peer_label: str = "peer",
    status: str = "ok",
    note: str = "",
    details: dict | None = None,
) -> dict[str, Any]:
    """One result row; `met` is derived from ratio, op and target (None when either is missing)."""
    if op not in (">=", "<="):
        raise ValueError(f"op must be '>=' or '<=', got {op!r}")
    met = None
    if target is not None and ratio is not None and math.isfinite(ratio):
        met = bool(ratio >= target) if op == ">=" else bool(ratio <= target)
    elif target is not None and status == "ok":
        met = False
    return {
        "name": name,
        "ours": ours,
        "peer": peer,
        "unit": unit,
        "ours_label": ours_label,
        "peer_label": peer_label,
        "ratio": ratio,
        "ratio_kind": ratio_kind,
        "target": target,
        "op": op,
        "met": met,
        "status": status,
        "note": note,
        "details": details or {},
    }


def _best(fn: Callable[[], Any], repeats: int) -> float:
    """Smallest wall time of `repeats` calls (the CPU may be shared: the minimum is the least noisy)."""
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _tiny_text(B: int, L: int, Dt: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, Dt, generator=g), torch.ones(B, L, dtype=torch.bool)


def _make_lm(
    backbone: str,
    d_model: int,
    n_layers: int,
    K: int,
    card: int,
    text_dim: int,
    conditioning: str = "prefix",
    n_heads: int = 4,
    seed: int = 0,
    **bb_kwargs,
):
    from backbones.base import build_backbone
    from ttm.lm import TTMLM
    from ttm.patterns import Pattern

    torch.manual_seed(seed)
    bb = build_backbone(
        backbone,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        cross_attention=conditioning == "cross",
        **bb_kwargs,
    )
    return TTMLM(bb, Pattern("delay", K, card), text_dim, conditioning=conditioning)


class _BenchCodec:
    """The codec attributes the training loop reads, for synthetic token data."""

    sample_rate, channels, frame_rate = 16000, 1, 50.0

    def __init__(self, n_codebooks: int, cardinality: int):
        self.n_codebooks, self.cardinality = n_codebooks, cardinality

    def identity(self) -> dict:
        return {"name": "bench-synthetic", "n_codebooks": self.n_codebooks, "cardinality": self.cardinality}


def synthetic_prepared(n: int, K: int, card: int, T: int, L: int, Dt: int, seed: int = 0):
    """Random token data products (train split only) for harness timing: no dataset, codec or text model."""
    from ttm.prepare import Prepared, Split

    g = torch.Generator().manual_seed(seed)
    split = Split(
        codes=torch.randint(0, card, (n, K, T), generator=g),  # [N, K, T]
        lengths=torch.full((n,), T),
        text_emb=torch.randn(n, L, Dt, generator=g),  # [N, L, Dt]
        text_mask=torch.ones(n, L, dtype=torch.bool),
        captions=[f"clip {i}" for i in range(n)],
        attributes=[{} for _ in range(n)],
        ids=[f"clip{i}" for i in range(n)],
    )
    return Prepared(Path("synthetic"), _BenchCodec(K, card), Dt, {"train": split}, Path("synthetic"))


# ----------------------------------------------------------------------------- cases


def mamba_vs_mambapy(quick: bool, repeats: int | None = None, seq_len: int | None = None) -> list[dict]:
    """Mamba1 training step (forward+backward), ours vs mambapy at matched size, via benchmarks.mamba_scan."""
    try:
        from benchmarks.mamba_scan import bench_mamba_vs_mambapy
    except ImportError as e:  # written by another module; reported, not fatal
        return [
            row(
                "mamba_vs_mambapy",
                None,
                None,
                "s/step",
                None,
                "speedup",
                4.0,
                status="not available",
                note=f"benchmarks.mamba_scan not importable ({e})",
            )
        ]
    kw: dict[str, Any] = {"repeats": repeats or (1 if quick else 5)}
    if seq_len:
        kw["seq_len"] = seq_len
    elif not quick:
        kw["seq_len"] = 512
    _log(f"mamba_vs_mambapy {kw}")
    r = bench_mamba_vs_mambapy(**kw)
    note = (
        f"d_model {r['d_model']}, {r['n_layers']} layers, batch {r['batch']}, seq {r['seq_len']}; "
        f"params ours {r['ours_params']:,} vs mambapy {r['mambapy_params']:,}"
    )
    return [
        row(
            "mamba_vs_mambapy",
            r["ours_s"],
            r["mambapy_s"],
            "s/step",
            r["ratio"],
            "speedup",
            4.0,
            ours_label="ours",
            peer_label="mambapy",
            note=note,
            details=r,
        )
    ]


def harness_overhead(
    quick: bool,
    d_model: int = 256,
    n_layers: int = 4,
    batch: int = 8,
    frames: int = 128,
    steps: int | None = None,
    warmup: int = 2,
    rounds: int | None = None,
) -> list[dict]:
    """A training step through `ttm.train.run` (batching, accounting, logging) vs the bare step
    (model.loss + backward + AdamW step in a plain loop) on a batch of the same shape."""
    from torch.utils.flop_counter import FlopCounterMode

    from ttm.config import load_config
    from ttm.factory import build_model
    from ttm.train import batch_of, param_groups, read_log, run

    steps = steps or (5 if quick else 12)
    rounds = rounds or (5 if quick else 7)
    if steps <= warmup:
        raise ValueError(f"harness_overhead: steps ({steps}) must exceed warmup ({warmup})")
    K, card, L, Dt = 4, 256, 8, 32
    data = synthetic_prepared(4 * batch, K, card, frames, L, Dt)
    cfg = load_config(
        None,
        {
            "model.backbone": "transformer",
            "model.d_model": d_model,
            "model.n_layers": n_layers,
            "model.n_heads": 4,
            "model.dropout": 0.0,
            "train.batch_size": batch,
            "train.steps": steps,
            "train.warmup": 2,
            "train.log_every": 1,
            "train.eval_every": 10**9,
            "train.ckpt_every": 10**9,
            "train.grad_clip": 0.0,
            "train.device": "cpu",
            "train.val_batches": 1,
        },
    )
    train = data.splits["train"]

    def harness() -> list[float]:
        with tempfile.TemporaryDirectory() as d:
            run(cfg, Path(d) / "run", data=data, progress=False)
            rows = read_log(Path(d) / "run" / "log.jsonl")
        wall = {r["step"]: r["wall_time"] for r in rows}
        return [wall[i] - wall[i - 1] for i in range(warmup + 1, steps + 1)]  # per-step seconds

    pos = L + 1 + (frames + K - 1)  # backbone positions: prefix [null + text ; audio], delay pattern
    bb_times: list[float] = []

    def bare() -> list[float]:
        """Bare steps; after each timed one, the backbone's own forward+backward on an input of the
        step's shape (adjacent in time, so the share is not skewed by a change in load)."""
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, K, card, Dt)
        opt = torch.optim.AdamW(
            param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, betas=tuple(cfg.train.betas)
        )
        model.train()
        b = batch_of(train, list(range(batch)), "cpu")
        x = torch.randn(batch, pos, d_model, requires_grad=True)  # [B, S, D]
        proj = torch.randn(batch, pos, d_model)
        out = []
        for i in range(steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss, _ = model.loss(*b)
            loss.backward()
            opt.step()
            if i >= warmup:
                out.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                (model.backbone(x) * proj).mean().backward()
                bb_times.append(time.perf_counter() - t0)
        return out

    h_all, b_all, ratios = [], [], []
    for r in range(rounds):  # short interleaved rounds: load from other processes hits both alike
        _log(f"harness_overhead round {r + 1}/{rounds}: harness")
        hs = harness()
        _log(f"harness_overhead round {r + 1}/{rounds}: bare")
        bs = bare()
        h_all.append(hs)
        b_all.append(bs)
        ratios.append(statistics.median(hs) / statistics.median(bs))
    # each round's ratio of median steps, then the median over rounds (robust to a noisy round)
    overhead = statistics.median(ratios) - 1
    h = statistics.median(x for hs in h_all for x in hs)
    b = statistics.median(x for bs in b_all for x in bs)

    # the backbone's share of the step: its forward+backward time, and its forward FLOPs
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, K, card, Dt).train()
    bb_s = statistics.median(bb_times)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.loss(*batch_of(train, list(range(batch)), "cpu"))
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    bb_flop_share = counts.get("TTMLM.backbone", 0) / max(1, counts.get("Global", 1))
    note = (
        f"transformer d_model {d_model}, {n_layers} layers, batch {batch}, {pos} positions; "
        f"backbone = {bb_s / b:.0%} of the bare step's time, {bb_flop_share:.0%} of its forward FLOPs"
    )
    return [
        row(
            "harness_overhead",
            h,
            b,
            "s/step",
            overhead,
            "overhead",
            0.10,
            op="<=",
            ours_label="harness",
            peer_label="bare loop",
            note=note,
            details={
                "harness_step_s": h_all,
                "bare_step_s": b_all,
                "round_ratios": ratios,
                "steps": steps,
                "warmup": warmup,
                "rounds": rounds,
                "backbone_s": bb_s,
                "backbone_time_share": bb_s / b,
                "backbone_forward_flop_share": bb_flop_share,
                "grad_clip": 0.0,
                "timing": "harness: per-step differences of log.jsonl wall_time (train_time) after "
                "warm-up; overhead = median over rounds of (median harness step / median bare step) - 1",
            },
        )
    ]


def decode_recurrent_vs_recompute(
    quick: bool,
    frames: int | None = None,
    d_model: int | None = None,
    n_layers: int = 2,
    backbones: list[str] | None = None,
    cfg_scale: float = 3.0,
) -> list[dict]:
    """Greedy generation, batch 1 with CFG: recurrent state (recurrent=True) vs recomputing the
    whole sequence per token (recurrent=False, the study's public sampler)."""
    from backbones.base import registered

    frames = frames or (200 if quick else 500)
    d_model = d_model or (64 if quick else 128)
    reg = registered()
    if backbones is None:  # every registered backbone, the study's first
        order = ("mamba", "mamba2", "s4d", "s5", "simba", "hybrid", "transformer")
        names = [n for n in order if n in reg] + [n for n in reg if n not in order]
    else:
        names = list(backbones)
    unknown = [n for n in names if n not in reg]
    if unknown:
        raise ValueError(f"backbones: unknown {unknown}; registered: {', '.join(reg)}")
    K, card, L, Dt = 4, 256, 8, 32
    te, tm = _tiny_text(1, L, Dt)
    rows = []
    for name in names:
        lm = _make_lm(name, d_model, n_layers, K, card, Dt).eval()

        def gen(rec, n=frames, lm=lm):
            return lm.generate(te, tm, n, cfg_scale=cfg_scale, greedy=True, recurrent=rec)

        gen(True, 4), gen(False, 4)  # warm-up
        _log(f"decode {name}: recurrent, {frames} frames")
        t0 = time.perf_counter()
        a = gen(True)
        rec_s = time.perf_counter() - t0
        _log(f"decode {name}: recompute, {frames} frames")
        t0 = time.perf_counter()
        b = gen(False)
        full_s = time.perf_counter() - t0
        constant = lm.backbone.constant_state
        rows.append(
            row(
                f"decode_recurrent_vs_recompute[{name}]",
                rec_s,
                full_s,
                "s",
                full_s / rec_s,
                "speedup",
                20.0 if constant else None,
                ours_label="recurrent",
                peer_label="recompute",
                note=(
                    f"{frames} frames ({lm.pattern.seq_len(frames)} steps), d_model {d_model}, "
                    f"{n_layers} layers, prefix, CFG {cfg_scale}; same tokens: {bool(torch.equal(a, b))}"
                    + ("" if constant else "; state grows with length: reported, no target")
                ),
                details={
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


def kv_cache_vs_musicgen(
    quick: bool,
    steps: int | None = None,
    d_model: int = 256,
    n_layers: int = 4,
    n_heads: int = 4,
    n_codebooks: int = 4,
    vocab: int = 1024,
    text_len: int = 8,
    repeats: int | None = None,
) -> list[dict]:
    """Our Cross Transformer LM with KV cache vs transformers' MusicgenForCausalLM.generate (random
    init, built locally) at the same d_model, layers, heads, FFN, codebooks and vocabulary:
    greedy, batch 1 with CFG 3, the same number of decoding steps."""
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    steps = steps or (200 if quick else 500)
    repeats = repeats or (1 if quick else 2)
    K, V, D = n_codebooks, vocab, d_model
    if steps < K:
        raise ValueError(f"kv_cache_vs_musicgen: steps ({steps}) must be >= n_codebooks ({K})")
    frames = steps - (K - 1)  # delay pattern: S = T + K - 1 decoding steps
    ours = _make_lm(
        "transformer", D, n_layers, K, V, D, conditioning="cross", n_heads=n_heads, mlp_ratio=4.0
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
    te, tm = _tiny_text(1, text_len, D)
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
    _log(f"kv_cache_vs_musicgen: ours, {steps} steps")
    ours_s = _best(lambda: out.__setitem__("ours", run_ours()), repeats)
    _log(f"kv_cache_vs_musicgen: musicgen, {steps} steps")
    mg_s = _best(lambda: out.__setitem__("mg", run_mg()), repeats)
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
            mg_s / ours_s,
            "speedup",
            1.5,
            ours_label="ours (KV cache)",
            peer_label="MusicgenForCausalLM",
            note=note,
            details={
                "steps": steps,
                "frames": frames,
                "params_ours": p_ours,
                "params_musicgen": p_mg,
                "ours_steps_per_s": steps / ours_s,
                "musicgen_steps_per_s": steps / mg_s,
            },
        )
    ]


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n @ n x n torch.mm."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    return 2 * n**3 / _best(lambda: torch.mm(a, b), repeats)


def cpu_mfu(
    quick: bool,
    d_model: int = 512,
    n_layers: int | None = None,
    batch: int | None = None,
    positions: int = 512,
    steps: int | None = None,
    mm_size: int | None = None,
) -> list[dict]:
    """Achieved FLOP/s of the transformer training step (FLOPs counted by ttm.flops / measured time)
    over the fp32 matmul peak measured in the same run."""
    from ttm.flops import count_train_step_flops
    from ttm.train import param_groups

    n_layers = n_layers or (2 if quick else 4)
    batch = batch or (2 if quick else 8)
    steps = steps or (2 if quick else 3)
    mm_size = mm_size or (2048 if quick else 3072)
    K, card, L, Dt = 4, 1024, 15, 64
    T = positions - (L + 1) - (K - 1)  # prefix [null + text ; audio], delay adds K-1 steps
    if T < 1:
        raise ValueError(
            f"cpu_mfu: positions ({positions}) too small for {L + 1} text and {K - 1} delay positions"
        )
    lm = _make_lm("transformer", d_model, n_layers, K, card, Dt, n_heads=8).train()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, card, (batch, K, T), generator=g)
    lengths = torch.full((batch,), T)
    te, tm = _tiny_text(batch, L, Dt)
    opt = torch.optim.AdamW(param_groups(lm, 0.02), lr=1e-4)
    flops = count_train_step_flops(lm, codes, lengths, te, tm)["total"]

    def step():
        opt.zero_grad(set_to_none=True)
        lm.loss(codes, lengths, te, tm)[0].backward()
        opt.step()

    _log(f"cpu_mfu: matmul peak ({mm_size}^2 fp32)")
    peak = matmul_peak(mm_size)
    step()  # warm-up
    _log(f"cpu_mfu: {steps} training steps, {flops / 1e9:.1f} GFLOP each")
    step_s = _best(step, steps)
    peak = max(peak, matmul_peak(mm_size))  # measured again: the best of both
    achieved = flops / step_s
    note = (
        f"transformer d_model {d_model}, {n_layers} layers, 8 heads, batch {batch}, {positions} positions, "
        f"{K} codebooks x {card}; {flops / 1e9:.1f} GFLOP/step in {step_s:.2f} s (fwd+bwd+AdamW); "
        f"threads {torch.get_num_threads()}"
    )
    return [
        row(
            "cpu_mfu",
            achieved / 1e9,
            peak / 1e9,
            "GFLOP/s",
            achieved / peak,
            "fraction",
            0.35,
            ours_label="training step",
            peer_label=f"torch.mm {mm_size}^2 fp32",
            note=note,
            details={
                "flops_per_step": flops,
                "step_s": step_s,
                "d_model": d_model,
                "n_layers": n_layers,
                "batch": batch,
                "positions": positions,
                "mm_size": mm_size,
                "params": sum(p.numel() for p in lm.parameters()),
            },
        )
    ]


def data_throughput(quick: bool, preset: str | None = None, kmeans_iters: int | None = None) -> list[dict]:
    """Seconds of audio rendered per second (dataset build into a temp dir, warm corpus cache) and
    tokenized per second (melrvq); the peer is real time."""
    from ttm.codecs.cli import fit_or_load_melrvq, tokenize_manifest
    from ttm.data import corpus as C
    from ttm.data.build import PRESETS, build_dataset
    from ttm.data.manifest import read_manifest

    preset = preset or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    kmeans_iters = kmeans_iters or (10 if quick else 100)
    p = PRESETS[preset]
    sources = [(f, style) for style in C.STYLES for f in C.select_sources(style, *p.files.get(style, (0, 0)))]
    t0 = time.perf_counter()
    C.load_sources(sources)  # warm the corpus cache (untimed)
    warm_s = time.perf_counter() - t0
    rows = []
    with tempfile.TemporaryDirectory() as d:
        _log(f"data_throughput: build {preset}")
        t0 = time.perf_counter()
        manifest = build_dataset(preset, Path(d) / "ds", seed=0, progress=False)
        build_s = time.perf_counter() - t0
        audio_s = sum(e.duration for e in read_manifest(manifest))
        rows.append(
            row(
                "data_throughput[build]",
                audio_s / build_s,
                1.0,
                "audio s/s",
                audio_s / build_s,
                "x real time",
                1.0,
                ours_label="render",
                peer_label="real time",
                note=f"preset {preset}: {audio_s:.0f} s of audio in {build_s:.1f} s "
                f"(corpus cache warm-up {warm_s:.1f} s, untimed)",
                details={"preset": preset, "audio_s": audio_s, "build_s": build_s, "cache_warmup_s": warm_s},
            )
        )
        # The codec fit is not what is measured; the fitted codec is kept next to the corpus cache
        # (the same preset and seed always give the same clips), so later runs skip it.
        codec_path = C.cache_dir().parent / "bench" / f"melrvq-{preset}-seed0-kmeans{kmeans_iters}.codec"
        codec_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            codec = fit_or_load_melrvq(manifest, codec_path, seed=0, kmeans_iters=kmeans_iters)
        except ValueError:  # fitted on other clips (e.g. a changed builder): refit
            codec_path.unlink()
            codec = fit_or_load_melrvq(manifest, codec_path, seed=0, kmeans_iters=kmeans_iters)
        fit_s = time.perf_counter() - t0
        _log(f"data_throughput: tokenize {preset}")
        t0 = time.perf_counter()
        tokenize_manifest(manifest, codec, Path(d) / "tokens", progress=False)
        tok_s = time.perf_counter() - t0
        rows.append(
            row(
                "data_throughput[tokenize]",
                audio_s / tok_s,
                1.0,
                "audio s/s",
                audio_s / tok_s,
                "x real time",
                1.0,
                ours_label="melrvq encode",
                peer_label="real time",
                note=f"{audio_s:.0f} s of audio in {tok_s:.2f} s ({codec.n_codebooks} x {codec.cardinality}; "
                f"codec fit/load {fit_s:.1f} s, untimed)",
                details={
                    "audio_s": audio_s,
                    "tokenize_s": tok_s,
                    "fit_or_load_s": fit_s,
                    "kmeans_iters": kmeans_iters,
                },
            )
        )
    return rows


CASES: dict[str, Callable[..., list[dict]]] = {
    "mamba_vs_mambapy": mamba_vs_mambapy,
    "harness_overhead": harness_overhead,
    "decode_recurrent_vs_recompute": decode_recurrent_vs_recompute,
    "kv_cache_vs_musicgen": kv_cache_vs_musicgen,
    "cpu_mfu": cpu_mfu,
    "data_throughput": data_throughput,
}


def run_case(name: str, quick: bool, overrides: dict[str, Any] | None = None) -> list[dict]:
    """Run one case in this process; unknown names or override keys raise ValueError."""
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; expected one of {', '.join(CASES)}")
    fn = CASES[name]
    overrides = dict(overrides or {})
    allowed = [p for p in inspect.signature(fn).parameters if p != "quick"]
    bad = sorted(set(overrides) - set(allowed))
    if bad:
        raise ValueError(
            f"{name}: unknown setting(s) {', '.join(bad)}; expected some of {', '.join(allowed)}"
        )
    return fn(quick, **overrides)


def peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished children, in MiB (Linux: kB units)."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) * scale


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs; a value is JSON when it parses as JSON, else a string."""
    out: dict[str, Any] = {}
    for it in items:
        key, eq, val = it.partition("=")
        if not eq or not key:
            raise ValueError(f"--set: expected KEY=VALUE, got {it!r}")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cases", description="run one benchmark case")
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a case setting")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    base_mb = peak_rss_mb()
    t0 = time.perf_counter()
    out: dict[str, Any] = {"case": a.case, "quick": a.quick, "threads": torch.get_num_threads()}
    rc = 0
    try:
        out["rows"] = run_case(a.case, a.quick, parse_sets(a.set))
    except Exception as e:  # noqa: BLE001 - reported as the case's error; the other cases still run
        out["rows"], out["error"] = [], f"{type(e).__name__}: {e}"
        rc = 1
    out["wall_s"] = time.perf_counter() - t0
    out["peak_mb"] = peak_rss_mb()
    out["base_mb"] = base_mb
    print(RESULT_MARK + json.dumps(out, default=str), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
