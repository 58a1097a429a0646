"""Optional training-curve loggers beside `log.jsonl`: TensorBoard and Weights & Biases.

Off by default (`train.loggers: []`). `log.jsonl` stays the record the suite reads; these only
mirror its numeric fields for people who read curves in TensorBoard or W&B. W&B runs offline
unless WANDB_MODE says otherwise (`wandb sync RUN/wandb` uploads later).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Protocol

LOGGERS = ("tensorboard", "wandb")


class CurveLogger(Protocol):
    def log(self, step: int, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten a log row to finite scalars: {"loss": .., "loss_per_codebook/0": .., ...}."""
    out: dict[str, float] = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool) or k == "step":
            continue
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[key] = float(v)
        elif isinstance(v, (list, tuple)):
            out.update(scalars({str(i): x for i, x in enumerate(v)}, key + "/"))
        elif isinstance(v, dict):
            out.update(scalars(v, key + "/"))
    return out


class TensorBoardLogger:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("train.loggers: 'tensorboard' needs the tensorboard package (pip install tensorboard)") from None
        self.w = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, row: dict[str, Any]) -> None:
        for k, v in scalars(row).items():
            self.w.add_scalar(k, v, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class WandbLogger:
    def __init__(self, run_dir: Path, config: dict[str, Any], name: str):
        try:
            import wandb
        except ImportError:
            raise ImportError("train.loggers: 'wandb' needs the wandb package (pip install wandb)") from None
        os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(dir=str(run_dir), config=config, name=name, project="ssm-ttm-bench",
                              resume="allow", id=f"ttm-{Path(run_dir).resolve().name}")

    def log(self, step: int, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=step)

    def close(self) -> None:
        self.run.finish()


def open_loggers(names: list[str], run_dir: Path, config: dict[str, Any]) -> list[CurveLogger]:
    out: list[CurveLogger] = []
    for n in names:
        if n == "tensorboard":
            out.append(TensorBoardLogger(run_dir))
        elif n == "wandb":
            out.append(WandbLogger(run_dir, config, Path(run_dir).name))
        else:
            raise ValueError(f"train.loggers: unknown logger {n!r} (expected one of {', '.join(LOGGERS)})")
    return out
