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


def synthetic_split(n: int, seed: int, T: int = 24, L: int = 6, Dt: int = 8, task_seed: int | None = None) -> Split:
    """`n` clips; with `task_seed`, the motifs and caption embeddings per label are those of that seed
    (so splits drawn with different `seed` and one `task_seed` are clips of ONE task)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 4, (n,), generator=g)
    if task_seed is not None:
        g = torch.Generator().manual_seed(task_seed)
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


def noisy(split: Split, p: float, seed: int) -> Split:
    """Each code replaced by a uniform random one with probability `p`: every clip differs."""
    g = torch.Generator().manual_seed(seed)
    swap = torch.rand(split.codes.shape, generator=g) < p
    codes = torch.where(swap, torch.randint(0, 16, split.codes.shape, generator=g), split.codes)
    return Split(codes, split.lengths, split.text_emb, split.text_mask, split.captions, split.attributes, split.ids)


def text_task_prepared(n_train: int = 128, n_valid: int = 32, shuffle_train_text: bool = False,
                       noise: float = 0.25) -> Prepared:
    """A task where the caption determines the codes: train and valid clips share the motif and caption
    of each label (a fraction `noise` of codes random, so that no two clips are alike).
    `shuffle_train_text`: each training clip gets the caption of another label, in a balanced design
    (the j-th clip of label l gets label (l + j) mod 4's caption), so that in the training set the
    caption carries no information on the codes at all (a control model that cannot use the text)."""
    train = noisy(synthetic_split(n_train, 0, task_seed=100), noise, 10)
    if shuffle_train_text:
        labels = [a["label"] for a in train.attributes]
        table = {lab: train.text_emb[labels.index(lab)] for lab in set(labels)}  # label -> caption [L, Dt]
        seen: dict[int, int] = {}
        text = []
        for lab in labels:
            j = seen[lab] = seen.get(lab, -1) + 1
            text.append(table[(lab + j) % 4])
        train = Split(train.codes, train.lengths, torch.stack(text), train.text_mask, train.captions,
                      train.attributes, train.ids)
    return Prepared(manifest=Path("synthetic"), codec=SyntheticCodec(), text_dim=8,
                    splits={"train": train, "valid": noisy(synthetic_split(n_valid, 1, task_seed=100), noise, 11)},
                    token_dir=Path("synthetic"))


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
