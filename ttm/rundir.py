"""A run directory: the one module that knows a run's files.

    RUN/config.yaml      the validated run config
    RUN/checkpoint.pt    model, optimizer, scheduler, EMA, RNG, data position, counters
    RUN/log.jsonl        one row per logged step
    RUN/summary.json     written when training ends (status ok / diverged)
    RUN/samples/         generated WAVs + samples.jsonl
    RUN/eval.json        evaluation of the samples
    RUN/stage1, stage2/  the two runs of a two-stage model, each a run directory

State: new -> trained -> generated -> evaluated; failed when the summary says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml
from torch import nn

from ttm.audio import atomic_torch_save
from ttm.config import RunConfig, load_config
from ttm.util import atomic_write_text

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
SUMMARY = "summary.json"
SAMPLES = "samples"
SAMPLES_INDEX = "samples.jsonl"
EVAL = "eval.json"

State = Literal["new", "trained", "generated", "evaluated", "failed"]


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def ema_state_dict(ck: dict) -> dict | None:
    """The EMA weights of a checkpoint as a plain state dict (None when the run kept none)."""
    if not ck.get("ema"):
        return None
    return {k[len("module."):]: v for k, v in ck["ema"].items() if k.startswith("module.")}


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    # ------------------------------------------------------------------ files
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoint_file(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def log_file(self) -> Path:
        return self.path / LOG

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY

    @property
    def samples_dir(self) -> Path:
        return self.path / SAMPLES

    @property
    def eval_file(self) -> Path:
        return self.path / EVAL

    def stage(self, name: str) -> RunDir:
        return RunDir(self.path / name)

    # ------------------------------------------------------------------ config and summary
    def write_config(self, cfg: RunConfig) -> None:
        atomic_write_text(self.config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def read_config(self) -> RunConfig:
        return load_config(self.config_file)

    def read_summary(self) -> dict | None:
        """The summary, or None when there is none yet (or a crash left it unreadable)."""
        try:
            s = json.loads(self.summary_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            return None
        return s if isinstance(s, dict) else None

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary_file, json.dumps(summary, indent=2))

    def has_samples(self) -> bool:
        return (self.samples_dir / SAMPLES_INDEX).exists()

    @property
    def state(self) -> State:
        s = self.read_summary()
        if s is None:
            return "new"
        if s.get("status") != "ok":
            return "failed"
        if self.eval_file.exists():
            return "evaluated"
        if self.has_samples():
            return "generated"
        return "trained"

    # ------------------------------------------------------------------ checkpoints and weights
    def has_checkpoint(self) -> bool:
        return self.checkpoint_file.exists()

    def load_checkpoint(self) -> dict:
        return load_checkpoint(self.checkpoint_file)

    def save_checkpoint(self, obj: dict) -> None:
        atomic_torch_save(obj, self.checkpoint_file)

    def checkpoint_step(self) -> int:
        return int(self.load_checkpoint()["counters"]["step"]) if self.has_checkpoint() else 0

    def load_weights(self, model: nn.Module) -> nn.Module:
        """Load the trained weights into `model`: the EMA weights when the run kept them."""
        if not self.has_checkpoint():
            raise FileNotFoundError(f"{self.path}: no {CHECKPOINT} (was this run trained?)")
        ck = self.load_checkpoint()
        ema = ema_state_dict(ck)
        model.load_state_dict(ema if ema is not None else ck["model"])
        return model


def load_weights(model: nn.Module, run_dir: str | Path) -> nn.Module:
    """Load a run's trained weights into `model` (the EMA weights when the run kept them)."""
    return RunDir(run_dir).load_weights(model)
