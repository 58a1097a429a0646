"""Grid worker layout: on a small machine, is a grid of cells faster as one worker with all the
threads or as one worker per core? Each cell is a separate process that builds a demo-sized
model (ttm.factory.build_model with the demo's model.* settings) and runs training steps on
synthetic batches of the demo's shape, as a grid worker would.

    python -m benchmarks.cases_grid BACKBONE STEPS THREADS     (one cell; used by the case)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import DEMO, build_lm, fake_batch, log, row, train_step_fn

REPO = Path(__file__).resolve().parents[1]


def _cell_cmd(backbone: str, steps: int, threads: int) -> list[str]:
    return [sys.executable, "-m", "benchmarks.cases_grid", backbone, str(steps), str(threads)]


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _layout(cells: list[str], steps: int, workers: int, threads: int) -> float:
    """Wall seconds to run every cell, `workers` processes at a time with `threads` threads each."""
    t0 = time.perf_counter()
    pending = list(cells)
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < workers:
            running.append(
                subprocess.Popen(
                    _cell_cmd(pending.pop(0), steps, threads),
                    cwd=REPO,
                    env=_env(threads),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        p = running.pop(0)
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(
                f"grid cell failed (exit {p.returncode}): {(err or '').strip().splitlines()[-1:]}"
            )
    return time.perf_counter() - t0


def grid_layout(
    quick: bool,
    cells: list[str] | None = None,
    steps: int | None = None,
    rounds: int | None = None,
    cores: int = 2,
) -> list[dict]:
    """1 worker x `cores` threads vs `cores` workers x 1 thread over the demo's cells (transformer
    and simba), interleaved rounds. The ratio is the speed-up of one worker per core; no target:
    it decides the default layout, and needs a quiet machine to mean anything."""
    cells = list(cells or ["transformer", "simba"])
    steps = steps or (10 if quick else 40)
    rounds = rounds or (2 if quick else 3)
    a, b = [], []
    for r in range(rounds):
        log(f"grid_layout round {r + 1}/{rounds}: 1 worker x {cores} threads")
        a.append(_layout(cells, steps, 1, cores))
        log(f"grid_layout round {r + 1}/{rounds}: {cores} workers x 1 thread")
        b.append(_layout(cells, steps, cores, 1))
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    med = statistics.median(ratios)
    spread = [min(ratios), max(ratios)]
    verdict = (
        "inside the spread: no difference measured"
        if spread[0] <= 1.0 <= spread[1]
        else (f"{cores} workers x 1 thread faster" if med > 1 else f"1 worker x {cores} threads faster")
    )
    return [
        row(
            "grid_layout",
            statistics.median(b),
            statistics.median(a),
            "s/grid",
            med,
            "speedup",
            None,
            ours_label=f"{cores} workers x 1 thread",
            peer_label=f"1 worker x {cores} threads",
            note=f"cells {', '.join(cells)}, {steps} demo-shaped training steps each (process start and model "
            f"build included); {verdict}",
            spread=spread,
            rounds=rounds,
            details={"one_worker_s": a, "per_core_s": b, "cells": cells, "steps": steps, "cores": cores},
        )
    ]


def _run_cell(backbone: str, steps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    K, card, Dt = DEMO["K"], DEMO["card"], DEMO["text_dim"]
    lm = build_lm(K, card, Dt, **{**DEMO["model"], "backbone": backbone})
    step = train_step_fn(lm, fake_batch(DEMO["batch"], K, card, DEMO["frames"], DEMO["text_len"], Dt))
    for _ in range(steps):
        step()


if __name__ == "__main__":
    _run_cell(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
