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
