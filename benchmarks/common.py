"""What the benchmark cases share: the result row (with its spread over rounds), paired
interleaved timing, synthetic data, and models built through the training factory
(`ttm.factory.build_model`), so a case never restates how a model of a given size is made.

A row is a dict:
    name, ours, peer, unit, ours_label, peer_label,
    ratio, ratio_kind ("speedup" | "overhead" | "fraction" | "x real time" | "slowdown"),
    target, op (">=" | "<="), met (True | False | None when there is no target),
    spread ([min, max] of the ratio over rounds, or None), rounds (how many),
    within_spread (True when the target lies inside the spread: the verdict is not safe),
    status ("ok" | "not available"), note, details {...}
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def log(msg: str) -> None:
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
    spread: Sequence[float] | None = None,
    rounds: int | None = None,
) -> dict[str, Any]:
    """One result row; `met` is derived from ratio, op and target (None when either is missing);
    with a spread, `within_spread` says whether the target lies inside [min, max] of the rounds."""
    if op not in (">=", "<="):
        raise ValueError(f"op must be '>=' or '<=', got {op!r}")
    met = None
    if target is not None and ratio is not None and math.isfinite(ratio):
        met = bool(ratio >= target) if op == ">=" else bool(ratio <= target)
    elif target is not None and status == "ok":
        met = False
    within = None
    if spread is not None:
        spread = [float(spread[0]), float(spread[1])]
        if target is not None:
            within = bool(spread[0] <= target <= spread[1])
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
        "spread": spread,
        "rounds": rounds,
        "within_spread": within,
        "status": status,
        "note": note,
        "details": details or {},
    }


def best(fn: Callable[[], Any], repeats: int) -> float:
    """Smallest wall time of `repeats` calls (the CPU may be shared: the minimum is the least noisy)."""
    out = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def paired(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, best_of: int = 1
) -> dict[str, list[float]]:
    """Wall seconds of every function in every round, run in turn (A B C A B C ...): a change in
    machine load hits all of them alike, so per-round ratios stay meaningful on a shared CPU.
    `best_of` > 1: a function's time in a round is the fastest of that many consecutive calls
    (a call hit by a burst of other work does not count; timeit's rule)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, rounds)):
        for k, fn in fns.items():
            times[k].append(best(fn, best_of))
    return times


def ratio_stats(num: list[float], den: list[float]) -> tuple[float, list[float]]:
    """Median and [min, max] over rounds of num[i] / den[i]."""
    r = [a / b for a, b in zip(num, den, strict=True)]
    return statistics.median(r), [min(r), max(r)]


def tiny_text(B: int, L: int, Dt: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, Dt, generator=g), torch.ones(B, L, dtype=torch.bool)


def model_config(**model: Any):
    """A RunConfig whose `model.*` fields are `model` (e.g. backbone="s5", d_model=128,
    target_params=1_000_000); everything else is the default."""
    from ttm.config import load_config

    return load_config(None, {f"model.{k}": v for k, v in model.items()})


def build_lm(K: int, card: int, text_dim: int, seed: int = 0, **model: Any):
    """The LM the training loop would build for these `model.*` settings (ttm.factory.build_model)."""
    from ttm.factory import build_model

    torch.manual_seed(seed)
    return build_model(model_config(**model), K, card, text_dim)


# The embedded demo's shapes (ablations/demo.yaml, default preset): melrvq 4 x 256 codes at
# 50 frames/s, 3 s crops, MiniLM 384-d captions, prefix conditioning, 1.0M parameters.
DEMO = {
    "K": 4,
    "card": 256,
    "text_dim": 384,
    "text_len": 22,  # caption tokens (MiniLM, padded batch); the prefix adds the null token
    "frames": 150,
    "batch": 16,
    "model": {
        "d_model": 128,
        "n_heads": 4,
        "target_params": 1_000_000,
        "size_by": "n_layers",
        "conditioning": "prefix",
        "pattern": "delay",
    },
}


class BenchCodec:
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
    return Prepared(Path("synthetic"), BenchCodec(K, card), Dt, {"train": split}, Path("synthetic"))


def fake_batch(B: int, K: int, card: int, T: int, L: int, Dt: int, seed: int = 0):
    """(codes [B, K, T], lengths [B], text [B, L, Dt], mask [B, L]) as TTMLM.loss takes them."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, card, (B, K, T), generator=g),
        torch.full((B,), T),
        torch.randn(B, L, Dt, generator=g),
        torch.ones(B, L, dtype=torch.bool),
    )


def train_step_fn(lm, batch, lr: float = 1e-3) -> Callable[[], None]:
    """One training step (loss, backward, AdamW with the training loop's parameter groups)."""
    from ttm.train import adamw

    lm.train()
    opt = adamw(lm, 0.02, lr=lr)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        lm.loss(*batch)[0].backward()
        opt.step()

    return step


def machine_state(mm_size: int = 2048, copy_mb: int = 64, repeats: int = 5) -> dict[str, float]:
    """How fast this machine is right now: fp32 matmul GFLOP/s (`mm_size`^2 torch.mm) and memory copy
    bandwidth GB/s (read + write of a `copy_mb` MB buffer, larger than a CPU's last-level cache),
    each the best of `repeats`. On a shared or virtual machine both drift, not always together; the
    SSMs' steps are more memory-bound than the Transformer's, so their ratios move with the balance
    of the two. `bench` records this at the start and the end of every run."""
    src = torch.randn(copy_mb * 2**18)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_s = best(lambda: dst.copy_(src), repeats)
    copy_gbps = 2 * src.numel() * 4 / copy_s / 1e9  # read + write
    return {"matmul_gflops": matmul_peak(mm_size, repeats) / 1e9, "copy_gbps": copy_gbps}


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n @ n x n torch.mm."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    return 2 * n**3 / best(lambda: torch.mm(a, b), repeats)
