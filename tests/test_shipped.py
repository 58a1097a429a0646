"""Shipped results (reports/shipped.py), the settings hash: ship a FAKE grid, compare new grids beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_grid import fake_cell

from ablations import runner
from ablations.spec import expand, load_spec, parse_spec
from reports.regress import cli as regress_cli
from reports.regress import load_baseline
from reports.shipped import beside, check_settings, load_settings, ship
from ttm import cli
from ttm.config import config_hash, settings_hash

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model.d_model": 32, "train.steps": 40, "train.lr": 0.002}
SHIPPED_AXES = {"model.backbone": ["transformer", "simba"], "model.conditioning": ["prefix", "cross"]}


def _grid(tmp: Path, name: str, axes: dict, cell_fn=fake_cell, seeds=(0, 1), **base) -> Path:
    spec = tmp / f"{name}.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"name": name, "base": {**BASE, **base}, "axes": axes, "seeds": list(seeds)}, sort_keys=False
        )
    )
    return runner.run_grid(
        spec,
        tmp / name,
        cell_fn=cell_fn,
        report=False,
        progress=False,
        overrides={"data.root": str(tmp / "data")},
    )


def _lr_grid(tmp: Path) -> Path:
    """A one-backbone grid at the shipped settings but for train.lr (made once per module)."""
    return (
        tmp / "lr"
        if (tmp / "lr" / "results.csv").is_file()
        else _grid(tmp, "lr", {"model.backbone": ["myssm"]}, **{"train.lr": 0.001})
    )


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(tmp dir, the FAKE grid, its shipped folder): backbone x conditioning, 2 seeds."""
    tmp = tmp_path_factory.mktemp("shipped")
    grid = _grid(tmp, "zoo", SHIPPED_AXES)
    return tmp, grid, ship(grid, tmp / "results" / "zoo")


# ----------------------------------------------------------------------------- the settings hash


def test_settings_hash_leaves_out_backbone_and_seed_only():
    spec = parse_spec({"name": "s", "base": BASE, "axes": SHIPPED_AXES, "seeds": [0, 1]})
    cells = expand(spec)
    by_cond: dict[str, set[str]] = {}
    for c in cells:
        by_cond.setdefault(c.axes["model.conditioning"], set()).add(settings_hash(c.config))
    # cells differing only in backbone and seed share it; conditioning is a setting
    assert all(len(h) == 1 for h in by_cond.values()) and len(set.union(*by_cond.values())) == 2
    assert len({c.hash for c in cells}) == len(cells)  # while every config hash differs
    c = cells[0].config
    assert settings_hash({**c, "model": {**c["model"], "backbone_kwargs": {"d_state": 8}}}) == settings_hash(
        c
    )
    assert settings_hash({**c, "data": {"root": "/elsewhere"}, "name": "x"}) == settings_hash(c)
    assert settings_hash({**c, "train": {**c["train"], "lr": 0.001}}) != settings_hash(c)
    assert settings_hash({**c, "train": {**c["train"], "steps": 41}}) != settings_hash(c)


# ----------------------------------------------------------------------------- shipping


def test_ship_writes_only_small_files_and_the_spec_hashes(shipped):
    tmp, _, out = shipped
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"results.csv", "results.jsonl", "curves.csv", "settings.json", "baseline.json", "report.md"} <= files
    assert all(
        f.startswith("report_files/") and f.endswith(".png")
        for f in files - {"results.csv", "results.jsonl", "curves.csv", "settings.json", "baseline.json", "report.md"}
    )
    assert not any(f.endswith((".wav", ".pt", ".html", ".db")) for f in files)
    assert all((out / f).stat().st_size < 200_000 for f in files)
    for f in files - {f for f in files if f.endswith(".png")}:  # the spec (outside the repository here) aside
        text = (out / f).read_text().replace(str(tmp / "zoo.yaml"), "SPEC")
        assert str(tmp) not in text, f"{f} holds a path of this machine"
    md = (out / "report.md").read_text()
    assert "Listening" not in md and "[wav]" not in md and "## Comparison" in md
    assert "val_loss_vs_step.png" in md and (out / "report_files" / "val_loss_vs_step.png").is_file()

    # settings.json: the hashes of the cells the spec expands to
    s = load_settings(out)
    assert s["preset"] is None and s["name"] == "zoo"
    cells = {c.name: c for c in expand(load_spec(s["spec"]), s["preset"], {"data.root": "anywhere"})}
    assert {c["name"] for c in s["cells"]} == set(cells)
    for c in s["cells"]:
        assert c["config_hash"] == cells[c["name"]].hash == config_hash(c["config"])
        assert c["settings_hash"] == settings_hash(cells[c["name"]].config)
        assert "root" not in c["config"]["data"] and "name" not in c["config"]
    assert {c["settings_hash"] for c in s["cells"]} == {
        settings_hash(c.config) for c in cells.values()
    } and len({c["settings_hash"] for c in s["cells"]}) == 2  # prefix and cross
    rows = pd.read_csv(out / "results.csv")
    assert len(rows) == 8 and set(rows["status"]) == {"complete"}
    b = load_baseline(out / "baseline.json")
    assert set(b["settings"]["groups"]) == set(b["groups"]) and b["source"].startswith("grid zoo")


def _crash_half_simba(config: dict, run_dir: Path) -> dict:
    """FAKE cell: simba's seed-1 cells fail with an error naming a path of this machine."""
    if config["model"]["backbone"] == "simba" and config["seed"] == 1:
        raise RuntimeError(f"cannot read {Path(run_dir).resolve() / 'missing.bin'}")
    return fake_cell(config, run_dir)


def test_ship_refuses_an_incomplete_grid_unless_told(tmp_path, capsys):
    grid = _grid(tmp_path, "partial", {"model.backbone": ["transformer", "simba"]}, cell_fn=_crash_half_simba)
    with pytest.raises(ValueError, match=r"1 of 4 cell\(s\) did not complete \(simba-s1-\w+: failed") as e:
        ship(grid, tmp_path / "out")
    assert "--allow-incomplete" in str(e.value) and not (tmp_path / "out").exists()
    assert cli.main(["ship", str(grid), "--out", str(tmp_path / "out")]) == 2
    assert "ttm-bench ship: error:" in capsys.readouterr().err
    assert cli.main(["ship", str(grid), "--out", str(tmp_path / "out"), "--allow-incomplete"]) == 0
    out = tmp_path / "out"
    rows = pd.read_json(out / "results.jsonl", lines=True)
    failed = rows[rows["status"] == "failed"]
    assert len(failed) == 1 and "cannot read <grid>/cells/simba-s1-" in failed["error"].iloc[0]
    for f in ("results.csv", "results.jsonl", "report.md", "settings.json", "baseline.json"):
        assert str(tmp_path) not in (out / f).read_text().replace(str(tmp_path / "partial.yaml"), "SPEC")
    # the baseline holds the complete cells only
    b = load_baseline(out / "baseline.json")
    assert all(m["n"] == 1 for m in b["groups"]["model.backbone=simba"]["metrics"].values())
    # a folder holding other things is not overwritten
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds 'notes.txt'"):
        ship(grid, tmp_path / "other", True)
    with pytest.raises(ValueError, match="is the grid itself"):
        ship(grid, grid, True)


# ----------------------------------------------------------------------------- beside shipped results


def test_one_backbone_grid_lands_beside_the_shipped_rows(shipped, capsys):
    tmp, _, out = shipped
    mine = _grid(tmp, "mine", {"model.backbone": ["myssm"], "model.conditioning": ["prefix", "cross"]})
    assert set(check_settings(mine, out).values()) == {
        c["settings_hash"] for c in load_settings(out)["cells"]
    }
    md = beside(mine, out)
    assert md == mine / "beside-zoo" / "report.md"
    rows = pd.read_json(md.parent / "results.jsonl", lines=True)
    assert rows["source"].value_counts().to_dict() == {"shipped": 8, "mine": 4}
    assert set(rows[rows["source"] == "mine"]["axis.model.backbone"]) == {"myssm"}
    text = md.read_text()
    table = [ln for ln in text.split("## Comparison", 1)[1].splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| source | model.backbone | model.conditioning |")
    assert any(ln.startswith("| shipped | simba | cross |") for ln in table)
    assert any(ln.startswith("| mine | myssm | prefix | 2/2 |") for ln in table)
    assert "[" in table[-1]  # means with a 95% interval over the two seeds
    assert "Settings checked" in text and "report_files/metric_fd_probe.png" in text
    assert (md.parent / "report_files" / "val_loss_vs_step.png").is_file()  # the new grid's curves
    # the CLI, into another folder
    assert cli.main(["report", str(mine), "--beside", str(out), "--out", str(tmp / "cmp")]) == 0
    assert (tmp / "cmp" / "report.md").is_file() and (tmp / "cmp" / "results.csv").is_file()
    assert not (tmp / "cmp" / "report.html").exists()


def test_a_grid_at_other_settings_is_refused_naming_the_keys(shipped, capsys):
    tmp, _, out = shipped
    other = _lr_grid(tmp)
    with pytest.raises(ValueError, match=r"train\.lr: yours 0\.001, shipped 0\.002") as e:
        check_settings(other, out)
    assert "'myssm-s0-" in str(e.value) and "vs nearest shipped cell" in str(e.value)
    assert "model.backbone:" not in str(e.value) and "seed:" not in str(e.value)  # identity keys: not listed
    assert cli.main(["report", str(other), "--beside", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ttm-bench report: error:" in err and "train.lr: yours 0.001, shipped 0.002" in err
    assert not (other / "beside-zoo").exists()
    # cells given directly (as the grid expands them)
    cells = expand(load_spec(tmp / "lr.yaml"))
    with pytest.raises(ValueError, match=r"train\.lr"):
        check_settings(cells, out)
    check_settings(expand(load_spec(tmp / "zoo.yaml")), out)


# ----------------------------------------------------------------------------- regress vs shipped results


def test_regress_against_the_shipped_baseline(shipped, capsys):
    tmp, grid, out = shipped
    base = str(out / "baseline.json")
    assert regress_cli(["--baseline", base, "--candidate", str(grid)]) == 0
    # a rerun of one shipped backbone (a control) compares on the groups it has
    control = _grid(
        tmp, "control", {"model.backbone": ["transformer"], "model.conditioning": ["prefix", "cross"]}
    )
    assert regress_cli(["--baseline", base, "--candidate", str(control)]) == 1
    assert "MISSING GROUP" in capsys.readouterr().out  # the simba groups
    assert regress_cli(["--baseline", base, "--candidate", str(control), "--shared"]) == 0
    out_shared = capsys.readouterr().out
    assert "simba" not in out_shared and "6 ok, 0 regressed" in out_shared
    # a new backbone held to one shipped group's line: at that group's settings only
    one = _grid(tmp, "one", {"model.backbone": ["myssm"]}, **{"model.conditioning": "prefix"})
    assert (
        regress_cli(
            [
                "--baseline",
                base,
                "--candidate",
                str(one),
                "--group",
                "model.backbone=transformer|model.conditioning=prefix",
            ]
        )
        == 1
    )
    assert "REGRESSION" in capsys.readouterr().out  # FAKE: myssm's losses are 0.1 above the transformer's
    assert (
        cli.main(
            [
                "regress",
                "--baseline",
                base,
                "--candidate",
                str(one),
                "--group",
                "model.backbone=transformer|model.conditioning=cross",
            ]
        )
        == 2
    )
    assert "model.conditioning: yours 'prefix', baseline 'cross'" in capsys.readouterr().err
    # other settings: refused (exit 2) with the differing keys
    lr = _lr_grid(tmp)
    assert cli.main(["regress", "--baseline", base, "--candidate", str(lr), "--shared"]) == 2
    assert "train.lr: yours 0.001, baseline 0.002" in capsys.readouterr().err
    # a damaged settings record is an error naming it
    bad = json.loads((out / "baseline.json").read_text())
    bad["settings"]["groups"]["model.backbone=simba|model.conditioning=prefix"] = ["nope"]
    (tmp / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(
        ValueError, match=r"settings\.groups\['model\.backbone=simba\|model\.conditioning=prefix'\]"
    ):
        regress_cli(["--baseline", str(tmp / "bad.json"), "--candidate", str(grid)])
    # a baseline without settings (regress --write-baseline) does not check them
    old = json.loads((out / "baseline.json").read_text())
    del old["settings"]
    (tmp / "old.json").write_text(json.dumps(old))
    assert regress_cli(["--baseline", str(tmp / "old.json"), "--candidate", str(lr)]) == 1  # MISSING GROUP


# ----------------------------------------------------------------------------- this repository's results


def _matches_spec(folder: Path) -> None:
    """The shipped cells of `folder` are the cells its spec (repository-relative) and preset expand to."""
    s = load_settings(folder)
    spec = load_spec(ROOT / s["spec"])
    want = {c.name: c.hash for c in expand(spec, s["preset"])}
    have = {c["name"]: c["config_hash"] for c in s["cells"]}
    assert have == want, f"{folder}: shipped cells differ from {s['spec']} (preset {s['preset']})"
    assert all(config_hash(c["config"]) == c["config_hash"] for c in s["cells"]), folder


def test_shipped_results_match_specs():
    """Every shipped folder (reports/results/*/settings.json) holds the cells its spec and preset
    expand to."""
    found = sorted((ROOT / "reports" / "results").glob("*/settings.json"))
    if not found:
        pytest.skip("no shipped grid under reports/results yet")
    for path in found:
        _matches_spec(path.parent)


def test_a_shipped_repository_spec_names_its_spec_relative_to_the_repository(tmp_path):
    """The check above, on the zoo spec's tiny preset run with the FAKE cell function."""
    grid = runner.run_grid(
        ROOT / "ablations" / "backbones_cpu.yaml",
        tmp_path / "g",
        preset="tiny",
        cell_fn=fake_cell,
        report=False,
        progress=False,
        overrides={"data.root": str(tmp_path / "data")},
    )
    out = ship(grid, tmp_path / "zoo")
    s = load_settings(out)
    assert s["spec"] == "ablations/backbones_cpu.yaml" and s["preset"] == "tiny" and len(s["cells"]) == 14
    _matches_spec(out)


def test_results_command_runs_ships_and_rebuilds_the_findings(tmp_path, monkeypatch):
    """`ttm-bench results` over two FAKE grids: the second reuses the first's cell with the same
    config hash (not rerun), both are shipped, the findings page is rebuilt from the shipped files."""
    from ablations import results as R
    from reports import findings

    specs = {}
    for name, backbones in (("study", ["transformer", "simba"]), ("zoo", ["simba", "mamba2"])):
        specs[name] = tmp_path / f"{name}.yaml"
        specs[name].write_text(yaml.safe_dump({"name": name, "base": BASE, "axes": {"model.backbone": backbones},
                                               "seeds": [0, 1]}))
    for k in list(findings.GRIDS):
        monkeypatch.delitem(findings.GRIDS, k)
    for name, spec in specs.items():
        monkeypatch.setitem(findings.GRIDS, name, (str(spec), None))
    page = R.run_results(tmp_path / "runs", tmp_path / "shipped", progress=False, cell_fn=fake_cell, workers=1)
    ran = (tmp_path / "runs" / "zoo" / "calls.txt").read_text().split()
    assert sorted(n.split("-")[0] for n in ran) == ["mamba2", "mamba2"]  # simba came from the study grid
    for name in specs:
        assert (tmp_path / "shipped" / name / "settings.json").is_file()
        assert len(pd.read_csv(tmp_path / "shipped" / name / "results.csv")) == 4
    assert page == tmp_path / "shipped" / "README.md" and "## Verdicts" in page.read_text()
    with pytest.raises(ValueError, match="unknown grid"):
        R.run_results(tmp_path / "runs", tmp_path / "shipped", only=["nope"], cell_fn=fake_cell)
