"""Training-side cases: the harness's overhead, the Transformer's CPU MFU, every SSM's training
step against the Transformer's at the demo's shapes (with each one's MFU), and Mamba1 vs mambapy."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    DEMO,
    build_lm,
    fake_batch,
    log,
    paired,
    ratio_stats,
    row,
    synthetic_prepared,
    train_step_fn,
)

SSMS = ("mamba2", "simba", "s4d", "s5", "mamba")


def mamba_vs_mambapy(quick: bool, repeats: int | None = None, seq_len: int | None = None) -> list[dict]:
    """Mamba1 training step (forward+backward), ours vs mambapy at matched size, via benchmarks.mamba_scan;
    interleaved rounds, the ratio's median and spread over them."""
    from benchmarks.mamba_scan import bench_mamba_vs_mambapy

    kw: dict[str, Any] = {"repeats": repeats or (5 if quick else 9)}
    if seq_len:
        kw["seq_len"] = seq_len
    elif not quick:
        kw["seq_len"] = 512
    log(f"mamba_vs_mambapy {kw}")
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
            spread=r["ratio_spread"],
            rounds=r["repeats"],
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
    from ttm.rundir import read_log
    from ttm.train import adamw, batch_of, run

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
        opt = adamw(model, cfg.train.weight_decay, lr=cfg.train.lr, betas=tuple(cfg.train.betas))
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
        log(f"harness_overhead round {r + 1}/{rounds}: harness")
        hs = harness()
        log(f"harness_overhead round {r + 1}/{rounds}: bare")
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
            spread=[min(ratios) - 1, max(ratios) - 1],
            rounds=rounds,
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


def cpu_mfu(
    quick: bool,
    d_model: int = 512,
    n_layers: int | None = None,
    batch: int | None = None,
    positions: int = 512,
    rounds: int | None = None,
    mm_size: int | None = None,
) -> list[dict]:
    """Achieved FLOP/s of the transformer training step (FLOPs counted by ttm.flops / measured time)
    over the fp32 matmul peak, both measured in every round (interleaved)."""
    from ttm.flops import count_train_step_flops

    n_layers = n_layers or (2 if quick else 4)
    batch = batch or (2 if quick else 8)
    rounds = rounds or (3 if quick else 5)
    mm_size = mm_size or (2048 if quick else 3072)
    K, card, L, Dt = 4, 1024, 15, 64
    T = positions - (L + 1) - (K - 1)  # prefix [null + text ; audio], delay adds K-1 steps
    if T < 1:
        raise ValueError(
            f"cpu_mfu: positions ({positions}) too small for {L + 1} text and {K - 1} delay positions"
        )
    lm = build_lm(K, card, Dt, backbone="transformer", d_model=d_model, n_layers=n_layers, n_heads=8)
    b = fake_batch(batch, K, card, T, L, Dt)
    flops = count_train_step_flops(lm, *b)["total"]
    step = train_step_fn(lm, b, lr=1e-4)
    a, m = torch.randn(mm_size, mm_size), torch.randn(mm_size, mm_size)
    log(f"cpu_mfu: {rounds} rounds of (training step, {mm_size}^2 matmul), {flops / 1e9:.1f} GFLOP/step")
    t = paired({"step": step, "mm": lambda: torch.mm(a, m)}, rounds)
    fracs = [(flops / s) / (2 * mm_size**3 / p) for s, p in zip(t["step"], t["mm"], strict=True)]
    step_s, peak = min(t["step"]), 2 * mm_size**3 / min(t["mm"])
    note = (
        f"transformer d_model {d_model}, {n_layers} layers, 8 heads, batch {batch}, {positions} positions, "
        f"{K} codebooks x {card}; {flops / 1e9:.1f} GFLOP/step, best {step_s:.2f} s (fwd+bwd+AdamW); "
        f"threads {torch.get_num_threads()}"
    )
    return [
        row(
            "cpu_mfu",
            flops / step_s / 1e9,
            peak / 1e9,
            "GFLOP/s",
            statistics.median(fracs),
            "fraction",
            0.50,
            ours_label="training step",
            peer_label=f"torch.mm {mm_size}^2 fp32",
            note=note,
            spread=[min(fracs), max(fracs)],
            rounds=rounds,
            details={
                "flops_per_step": flops,
                "step_s": t["step"],
                "mm_s": t["mm"],
                "d_model": d_model,
                "n_layers": n_layers,
                "batch": batch,
                "positions": positions,
                "mm_size": mm_size,
                "params": sum(p.numel() for p in lm.parameters()),
            },
        )
    ]


def ssm_train_step(
    quick: bool,
    backbones: list[str] | None = None,
    rounds: int | None = None,
    batch: int | None = None,
    frames: int | None = None,
    mm_size: int = 2048,
    best_of: int | None = None,
) -> list[dict]:
    """Training step (loss + backward + AdamW) of every SSM vs the Transformer at the demo's shapes
    and matched parameters (ttm.factory.build_model with the demo's model.* settings), interleaved
    in rounds; plus each backbone's MFU (analytic FLOPs / step time / fp32 matmul peak).

    In each round every SSM's step is timed right after a Transformer step (its own peer, so a
    change in load between the two is seconds, not the whole round, apart), each the fastest of
    `best_of` consecutive steps; the ratio's median and [min, max] are over rounds."""
    from ttm.flops import analytic_flops_per_token, backbone_positions, count_train_step_flops

    names = list(backbones or SSMS)
    rounds = rounds or (5 if quick else 9)
    best_of = best_of or 3
    batch = batch or DEMO["batch"]
    frames = frames or DEMO["frames"]
    K, card, Dt, L = DEMO["K"], DEMO["card"], DEMO["text_dim"], DEMO["text_len"]
    b = fake_batch(batch, K, card, frames, L, Dt)
    steps, info = {}, {}
    for name in ["transformer"] + names:
        lm = build_lm(K, card, Dt, **{**DEMO["model"], "backbone": name})
        info[name] = {
            "params": sum(p.numel() for p in lm.parameters() if p.requires_grad),
            "backbone": lm.backbone.config(),
            # analytic (ttm.flops): the same definition on every device; the counted total
            # (ttm.flops.count_train_step_flops, each scan once) is kept beside it
            "flops": batch
            * backbone_positions(lm, frames, L)
            * analytic_flops_per_token(lm, frames, L, "train"),
            "counted_flops": count_train_step_flops(lm, *b)["total"],
        }
        steps[name] = train_step_fn(lm, b)
    a, m = torch.randn(mm_size, mm_size), torch.randn(mm_size, mm_size)
    order: dict = {}
    for name in names:  # each SSM right after its own Transformer step
        order[("transformer", name)] = steps["transformer"]
        order[name] = steps[name]
    order["mm"] = lambda: torch.mm(a, m)
    log(f"ssm_train_step: {rounds} rounds of (transformer, SSM) for {', '.join(names)}, best of {best_of}")
    t = paired(order, rounds, warmup=2, best_of=best_of)
    t["transformer"] = [min(t["transformer", n][i] for n in names) for i in range(rounds)]
    rows = []
    for name in names:
        tf = t["transformer", name]
        med, spread = ratio_stats(t[name], tf)
        rows.append(
            row(
                f"ssm_train_step[{name}]",
                statistics.median(t[name]),
                statistics.median(tf),
                "s/step",
                med,
                "slowdown",
                1.5,
                op="<=",
                ours_label=name,
                peer_label="transformer",
                note=(
                    f"demo shapes: batch {batch}, {frames} frames + {L + 1} prefix, {K}x{card} codes; "
                    f"params {info[name]['params']:,} vs {info['transformer']['params']:,}"
                ),
                spread=spread,
                rounds=rounds,
                details={"ours_s": t[name], "peer_s": tf, "best_of": best_of, **info[name]},
            )
        )
    peak_flops = [2 * mm_size**3 / s for s in t["mm"]]
    for name in ["transformer"] + names:
        fr = [info[name]["flops"] / s / p for s, p in zip(t[name], peak_flops, strict=True)]
        rows.append(
            row(
                f"train_mfu[{name}]",
                info[name]["flops"] / statistics.median(t[name]) / 1e9,
                statistics.median(peak_flops) / 1e9,
                "GFLOP/s",
                statistics.median(fr),
                "fraction",
                0.30 if name != "transformer" else None,
                ours_label=f"{name} step",
                peer_label=f"torch.mm {mm_size}^2 fp32",
                note=f"{info[name]['flops'] / 1e9:.2f} GFLOP/step (analytic) at the demo's shapes"
                + ("; the Transformer's bar is cpu_mfu's (d_model 512)" if name == "transformer" else ""),
                spread=[min(fr), max(fr)],
                rounds=rounds,
            )
        )
    return rows
