"""Optional curve loggers: what is written reads back as the same numbers."""

from __future__ import annotations

import pytest

from ttm.loggers import open_loggers, scalars


def test_scalars_flatten_rows_and_drop_non_finite():
    row = {"step": 5, "loss": 2.5, "loss_per_codebook": [2.0, 3.0], "lr": 1e-3, "nan": float("nan"), "s": "x"}
    assert scalars(row) == {"loss": 2.5, "loss_per_codebook/0": 2.0, "loss_per_codebook/1": 3.0, "lr": 1e-3}


def test_tensorboard_curves_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (lg,) = open_loggers(["tensorboard"], tmp_path, {})
    for step, loss in ((10, 3.0), (20, 2.5)):
        lg.log(step, {"step": step, "loss": loss, "loss_per_codebook": [loss, loss + 1]})
    lg.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(10, 3.0), (20, 2.5)]
    assert [e.value for e in acc.Scalars("loss_per_codebook/1")] == [4.0, 3.5]


def test_unknown_logger_is_named(tmp_path):
    with pytest.raises(ValueError, match="train.loggers: unknown logger 'mlflow'"):
        open_loggers(["mlflow"], tmp_path, {})


def test_wandb_logger_runs_offline_and_logs_scalars(tmp_path, monkeypatch):
    """With a stand-in `wandb` module (the package is optional): offline by default, flattened
    finite scalars at the step, finish on close."""
    import sys
    import types

    calls = []
    run = types.SimpleNamespace(log=lambda d, step: calls.append(("log", step, d)),
                                finish=lambda: calls.append(("finish",)))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    (lg,) = open_loggers(["wandb"], tmp_path / "run", {"seed": 0})
    lg.log(10, {"step": 10, "loss": 2.0, "val_loss_per_codebook": [1.0, float("inf")]})
    lg.close()
    import os

    assert os.environ.pop("WANDB_MODE") == "offline"  # (set by the logger: not left for other tests)
    assert calls[0][0] == "init" and calls[0][1]["config"] == {"seed": 0}
    assert calls[1] == ("log", 10, {"loss": 2.0, "val_loss_per_codebook/0": 1.0})
    assert calls[2] == ("finish",)
