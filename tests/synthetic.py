"""Synthetic data products for harness tests (no dataset build, codec fit or text model).

Codes follow a learnable rule (each clip repeats a caption-dependent motif), so training
loss really falls. `python tests/synthetic.py RUN_DIR STEPS [CKPT_EVERY]` trains on it (used by the
SIGKILL/resume and SIGTERM tests).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ttm.prepare import Prepared, Split


class SyntheticCodec:
    """Stands in for a fitted codec in harness tests: only the attributes training reads."""

    sample_rate, channels, frame_rate, n_codebooks, cardinality = 16000, 1, 25.0, 3, 16

    def identity(self) -> dict:
        return {"name": "synthetic", "K": 3, "card": 16}


def synthetic_split(n: int, seed: int, T: int = 24, L: int = 6, Dt: int = 8) -> Split:
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 4, (n,), generator=g)
    motif = torch.randint(0, 16, (4, 3, 4), generator=g)  # one motif per label
    codes = motif[label].repeat(1, 1, T // 4)  # [n, 3, T]
    text = torch.randn(4, L, Dt, generator=g)[label]
    mask = torch.ones(n, L, dtype=torch.bool)
    return Split(codes, torch.full((n,), T), text, mask, [f"label {int(x)}" for x in label],
                 [{"label": int(x)} for x in label], [f"clip{i}" for i in range(n)])


def synthetic_prepared(n_train: int = 64) -> Prepared:
    return Prepared(
        manifest=Path("synthetic"),
        codec=SyntheticCodec(),
        text_dim=8,
        splits={"train": synthetic_split(n_train, 0), "valid": synthetic_split(16, 1)},
        token_dir=Path("synthetic"),
    )


def tiny_config(**overrides):
    from ttm.config import load_config

    base = {
        "model.d_model": 32, "model.n_layers": 2, "train.batch_size": 8, "train.steps": 12,
        "train.warmup": 2, "train.log_every": 1, "train.eval_every": 4, "train.ckpt_every": 4,
        "train.val_batches": 1, "train.lr": 3e-3, "model.dropout": 0.1,
    }
    base.update(overrides)
    return load_config(None, base)


if __name__ == "__main__":
    import os
    import time

    from ttm.train import run

    torch.set_num_threads(1)
    delay = float(os.environ.get("TTM_TEST_STEP_DELAY", "0"))  # slows steps so a test can kill mid-run
    if delay:
        _step = torch.optim.AdamW.step

        def slow_step(self, *a, **k):
            time.sleep(delay)
            return _step(self, *a, **k)

        torch.optim.AdamW.step = slow_step
    ckpt_every = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    cfg = tiny_config(**{"train.steps": int(sys.argv[2]), "train.ckpt_every": ckpt_every})
    run(cfg, Path(sys.argv[1]), data=synthetic_prepared(), progress=False)
