"""Speed of our pure-PyTorch Mamba (chunked selective scan) vs mambapy's parallel scan.

Both models are built at the same size (same d_model, n_layers, d_state, expand, so the
parameter counts match to within the final norm) and timed for one forward+backward
pass on the same input: one warm-up each, then `repeats` interleaved runs, medians.

    python -m benchmarks.mamba_scan
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from backbones.base import build_backbone, count_params


def _fwd_bwd_seconds(model: torch.nn.Module, x: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    model(x).square().mean().backward()
    return time.perf_counter() - t0


def bench_mamba_vs_mambapy(
    d_model: int = 128, n_layers: int = 4, batch: int = 8, seq_len: int = 256, repeats: int = 3, seed: int = 0
) -> dict:
    """Forward+backward seconds of ours vs mambapy at matched size (~0.47M params by default).

    Returns {"ours_s", "mambapy_s" (medians), "ratio" (median over pairs of mambapy / ours, > 1
    means ours is faster), "ratio_spread" ([min, max] over pairs),
    "ours_params", "mambapy_params", and the settings}."""
    from mambapy.mamba import Mamba as MambaPy
    from mambapy.mamba import MambaConfig

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    torch.manual_seed(seed)
    ours = build_backbone("mamba", d_model=d_model, n_layers=n_layers, d_state=16, d_conv=4, expand=2)
    theirs = MambaPy(MambaConfig(d_model=d_model, n_layers=n_layers, d_state=16, d_conv=4, expand_factor=2))
    x = torch.randn(batch, seq_len, d_model)
    _fwd_bwd_seconds(ours, x)  # warm-up (also compiles / loads the numba kernels)
    _fwd_bwd_seconds(theirs, x)
    ours_t, theirs_t = [], []
    for _ in range(repeats):  # interleaved, so that a change in machine load hits both
        ours_t.append(_fwd_bwd_seconds(ours, x))
        theirs_t.append(_fwd_bwd_seconds(theirs, x))
    ours_s, theirs_s = statistics.median(ours_t), statistics.median(theirs_t)
    ratios = [t / o for o, t in zip(ours_t, theirs_t, strict=True)]  # per interleaved pair
    return {
        "ours_s": ours_s,
        "mambapy_s": theirs_s,
        "ratio": statistics.median(ratios),
        "ratio_spread": [min(ratios), max(ratios)],
        "repeats": repeats,
        "ours_all_s": ours_t,
        "mambapy_all_s": theirs_t,
        "ours_params": count_params(ours),
        "mambapy_params": count_params(theirs),
        "d_model": d_model,
        "n_layers": n_layers,
        "batch": batch,
        "seq_len": seq_len,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    print(json.dumps(bench_mamba_vs_mambapy(), indent=2))
