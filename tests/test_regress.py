"""Regression checks against a baseline written from a (FAKE) grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_grid import fake_cell

from ablations import runner
from reports.regress import cli, compare, load_baseline, tolerance


def _grid(tmp: Path, name: str, degrade: float = 0.0) -> Path:
    spec = tmp / "s.yaml"
    if not spec.exists():
        spec.write_text(
            yaml.safe_dump(
                {
                    "name": "reg",
                    "base": {"train.steps": 40, "model.d_model": 32},
                    "axes": {"model.backbone": ["transformer", "simba"]},
                    "seeds": [0, 1],
                }
            )
        )
    return runner.run_grid(
        spec,
        tmp / name,
        cell_fn=fake_cell,
        report=False,
        progress=False,
        overrides={"fake.degrade": degrade} if degrade else None,
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("regress")
    grid = _grid(tmp, "base")
    path = tmp / "baseline.json"
    assert cli(["--write-baseline", "--baseline", str(path), "--candidate", str(grid)]) == 0
    return tmp, path


def test_tolerance_rule():
    m = {"mean": 10.0, "std": 1.0, "floor": 4.5, "direction": "lower"}
    assert tolerance(m, 3.0, 0.02) == 4.5  # the noise floor dominates
    assert tolerance({**m, "direction": "higher"}, 3.0, 0.02) == 3.0  # a score's floor is not a noise scale
    assert tolerance({**m, "std": 0.0, "floor": None}, 3.0, 0.02) == pytest.approx(0.2)


def test_baseline_contents(base):
    _, path = base
    b = load_baseline(path)
    assert set(b["groups"]) == {"model.backbone=transformer", "model.backbone=simba"}
    m = b["groups"]["model.backbone=transformer"]["metrics"]
    assert set(m) == {"val_loss", "fd_probe", "adherence"}  # clap has no value in any run
    assert m["fd_probe"]["n"] == 2 and m["fd_probe"]["floor"] == 4.5 and m["fd_probe"]["direction"] == "lower"
    assert m["adherence"]["direction"] == "higher"
    # FAKE val_loss differs by 0.01 between seeds 0 and 1
    assert m["val_loss"]["std"] == pytest.approx(0.01 / 2**0.5)


def test_equal_candidate_passes(base, capsys):
    tmp, path = base
    assert cli(["--baseline", str(path), "--candidate", str(tmp / "base")]) == 0
    out = capsys.readouterr().out
    assert "REGRESSION" not in out and "6 ok, 0 regressed" in out
    small = _grid(tmp, "small", degrade=0.005)  # within tolerance
    assert cli(["--baseline", str(path), "--candidate", str(small)]) == 0


def test_degraded_candidate_fails(base, capsys):
    tmp, path = base
    bad = _grid(tmp, "bad", degrade=0.5)
    assert cli(["--baseline", str(path), "--candidate", str(bad)]) == 1
    rows = compare(load_baseline(path), bad)
    verdicts = {(r["group"].split("=")[1], r["metric"]): r["verdict"] for r in rows}
    # loss +0.5 and adherence -0.05 regress; FD +5 exceeds its 4.5 noise floor
    assert set(verdicts.values()) == {"REGRESSION"}
    assert "REGRESSION" in capsys.readouterr().out
    assert cli(["--baseline", str(path), "--candidate", str(bad), "--metrics", "adherence"]) == 1
    better = _grid(tmp, "better", degrade=-0.5)
    assert {r["verdict"] for r in compare(load_baseline(path), better)} == {"improved"}


def test_single_run_candidate_and_missing_group(base, capsys):
    tmp, path = base
    run = next((tmp / "base" / "cells").glob("simba-s0-*"))
    assert cli(["--baseline", str(path), "--candidate", str(run), "--group", "model.backbone=simba"]) == 0
    assert (
        cli(["--baseline", str(path), "--candidate", str(run), "--group", "model.backbone=transformer"]) == 1
    )
    with pytest.raises(ValueError, match="not in the baseline"):
        cli(["--baseline", str(path), "--candidate", str(run), "--group", "nope"])
    # a whole-grid candidate lacking a group fails with MISSING GROUP
    b = json.loads(path.read_text())
    b["groups"]["model.backbone=mamba"] = b["groups"]["model.backbone=simba"]
    p2 = tmp / "b2.json"
    p2.write_text(json.dumps(b))
    assert cli(["--baseline", str(p2), "--candidate", str(tmp / "base")]) == 1
    assert "MISSING GROUP" in capsys.readouterr().out


def test_bad_inputs(tmp_path, base):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli(["--baseline", str(tmp_path / "none.json"), "--candidate", str(tmp_path)])
    p = tmp_path / "x.json"
    p.write_text("{}")
    with pytest.raises(ValueError, match="not a baseline"):
        cli(["--baseline", str(p), "--candidate", str(tmp_path)])
    with pytest.raises(ValueError, match="--metrics: nope"):
        cli(["--baseline", str(base[1]), "--candidate", str(base[0] / "base"), "--metrics", "nope"])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b.update(groups={}), "no groups"),
        (lambda b: next(iter(b["groups"].values())).update(metrics={}), "has no metrics"),
        (lambda b: next(iter(next(iter(b["groups"].values()))["metrics"].values())).update(mean=float("nan")),
         r"\.mean: expected a finite number"),
        (lambda b: next(iter(next(iter(b["groups"].values()))["metrics"].values())).update(std=None),
         r"\.std: expected a finite number"),
        (lambda b: next(iter(b["groups"].values()))["metrics"].pop("val_loss"), "lacks metric"),
    ],
    ids=["empty", "no-metrics", "nan-mean", "null-std", "group-missing-metric"],
)
def test_malformed_baseline_fails_naming_the_defect(base, tmp_path, mutate, match):
    tmp, path = base
    b = json.loads(path.read_text())
    mutate(b)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(b, allow_nan=True))
    with pytest.raises(ValueError, match=match):
        cli(["--baseline", str(bad), "--candidate", str(tmp / "base")])


def test_shipped_baselines_are_valid():
    from reports.regress import validate_baseline

    for p in (Path(__file__).resolve().parents[1] / "reports" / "baselines").glob("*.json"):
        validate_baseline(json.loads(p.read_text()), str(p))
