"""Grid specs, expansion, and the Optuna grid runner (with a FAKE cell function, test-only)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from ablations import cells as grid_cells
from ablations import claims, runner, storage
from ablations.spec import config_hash, expand, load_spec, parse_spec
from ttm.config import RunConfig, config_from_dict
from ttm.util import json_hash

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
GOLDEN_DEFAULT_HASH = "8ceafdebe2"  # config_hash of the default RunConfig (changes with any default)


# ----------------------------------------------------------------------------- the FAKE cell (tests only)

FAKE_QUALITY = {"transformer": 0.0, "simba": 0.3, "mamba": 0.2}


def fake_cell(config: dict, run_dir: Path) -> dict:
    """FAKE cell function for tests: writes a plausible run dir (log, samples, summary) in milliseconds.

    Behaviour knobs in config["fake"]: sleep (s), crash_backbone (raise once for that backbone),
    degrade (added to every loss/FD). Every call appends the run-dir name to GRID/calls.txt.
    """
    run_dir = Path(run_dir)
    grid = run_dir.parent.parent
    fake = config.get("fake", {})
    with open(grid / "calls.txt", "a") as f:
        f.write(run_dir.name + "\n")
    model, train = config.get("model", {}), config.get("train", {})
    backbone, cond = model.get("backbone", "transformer"), model.get("conditioning", "prefix")
    seed, steps = int(config.get("seed", 0)), int(train.get("steps", 40))
    d_model = int(model.get("d_model", 32))
    if fake.get("sleep"):
        time.sleep(float(fake["sleep"]))
    flag = grid / f"crashed-{run_dir.name}"
    if fake.get("crash_backbone") == backbone and not flag.exists():
        flag.touch()
        raise RuntimeError("FAKE crash in the cell function")
    q = FAKE_QUALITY.get(backbone, 0.1) + float(fake.get("degrade", 0.0)) + 0.01 * seed - 0.001 * d_model
    params = 1000 * d_model + {"transformer": 500, "simba": 300}.get(backbone, 400)
    rows = []
    for step in range(10, steps + 1, 10):
        loss = 3.0 * math.exp(-2.0 * step / steps) + 1.0 + q
        row = {
            "step": step,
            "loss": loss,
            "tokens": step * 64,
            "flops": step * params * 6 * 64,
            "wall_time": step * 0.01,
        }
        if step % 20 == 0 or step == steps:
            row["val_loss"] = loss + 0.05
        rows.append(row)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    sdir = run_dir / "samples"
    sdir.mkdir(exist_ok=True)
    caps = ["a calm piano piece", "fast drums"]
    srows = []
    for i, cap in enumerate(caps):
        t = np.arange(4000) / 8000.0
        freq = 220.0 * (1 + i) * (1.5 if backbone == "simba" else 1.0)
        sf.write(sdir / f"{i}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 8000)
        srows.append({"file": f"{i}.wav", "caption": cap, "seed": seed, "attributes": {}})
    (sdir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in srows))
    vl = rows[-1]["loss"] + 0.05
    summary = {
        "status": "ok",
        "backbone": backbone,
        "conditioning": cond,
        "params": params,
        "non_embedding_params": params - 100,
        "steps": steps,
        "tokens": steps * 64,
        "flops": rows[-1]["flops"],
        "val_loss": vl,
        "val_info_gain": 0.5 - q,  # FAKE text information gain and its interval over clips
        "val_info_gain_ci": [0.4 - q, 0.6 - q],
        "train_time_s": steps * 0.01,
        "budget": {"kind": "steps", "limit": steps, "used": steps, "binding": "steps"},
        "metrics": {
            "fd_probe": {
                "value": 10 * q + 5,
                "ci_low": 10 * q + 4,
                "ci_high": 10 * q + 6,
                "n": 2,
                "floors": {"noise": 4.5},
            },
            "adherence": {
                "value": 0.8 - q / 10,
                "ci_low": 0.7 - q / 10,
                "ci_high": 0.9 - q / 10,
                "floors": {"noise": 0.95},
            },
            "clap": {"value": None, "reason": "FAKE: CLAP weights not available"},
        },
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return summary


def calls(grid: Path) -> list[str]:
    p = grid / "calls.txt"
    return p.read_text().split() if p.exists() else []


def write_spec(path: Path, **over) -> Path:
    spec = {
        "name": "t",
        "base": {"model.d_model": 32, "train.steps": 40, "fake": {"sleep": 0.0}},
        "axes": {"model.backbone": ["transformer", "simba"]},
        "seeds": [0, 1],
    }
    spec.update(over)
    path.write_text(yaml.safe_dump(spec))
    return path


# ----------------------------------------------------------------------------- spec validation


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "axis": {"model.backbone": ["a"]}}))
    with pytest.raises(ValueError) as e:
        load_spec(p)
    assert str(p) in str(e.value) and "unknown key 'axis'" in str(e.value)

    p.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "search": {"n_trials": 2, "params": {"train.lr": {"low": 1e-4, "high": 1e-2}}, "trails": 3},
            }
        )
    )
    with pytest.raises(ValueError, match=r"bad\.yaml.*unknown key 'search\.trails'"):
        load_spec(p)


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"name": "x", "axes": {"model.backbone": []}}, "axes.*non-empty"),
        ({"name": "x", "axes": {"arch": [{"model.backbone": "a"}, "b"]}}, "mixes bundles"),
        ({"name": "x", "axes": {"arch": [{"bad key": 1}]}}, "not a dotted config key"),
        ({"name": "x", "axes": {"backbone choice": ["a"]}}, "dotted config key"),
        ({"name": "x", "seeds": [0, 0]}, "duplicates"),
        (
            {"name": "x", "axes": {"model.backbone": ["a"]}, "presets": {"tiny": {"axes": {"nope": [1]}}}},
            r"presets\.tiny\.axes\.nope: no such axis",
        ),
        (
            {"name": "x", "search": {"n_trials": 2, "params": {"train.lr": {"low": 1, "high": 0}}}},
            "below high",
        ),
        ({"name": "x", "search": {"n_trials": 0, "params": {"train.lr": {"low": 0, "high": 1}}}}, "n_trials"),
    ],
)
def test_spec_errors(data, pattern):
    with pytest.raises(ValueError, match=pattern) as e:
        parse_spec(data, "spec.yaml")
    assert str(e.value).startswith("spec.yaml")


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_spec(tmp_path / "nope.yaml")
    spec = load_spec(write_spec(tmp_path / "s.yaml", presets={"tiny": {"train.steps": 20}}))
    with pytest.raises(ValueError, match=r"no preset 'huge' \(presets: tiny\)"):
        expand(spec, "huge")


# ----------------------------------------------------------------------------- expansion and hashes


def test_config_hash_is_stable():
    a = {"model": {"backbone": "mamba", "d_model": 64}, "seed": 1}
    b = {"seed": 1, "model": {"d_model": 64, "backbone": "mamba"}}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "seed": 2})
    # golden values: changing the hashing renames every cell of existing grids (a rerun adopts the
    # old directories, see test_rerun_adopts_cells_named_by_the_old_hash, but other tools may not).
    # A config that is not a RunConfig (a user's cell function's own keys) is hashed raw, as before:
    assert config_hash({"a": 1}) == "9f89c740ce"
    # a RunConfig is hashed validated (changed deliberately from the raw hash, issue 13):
    assert config_hash({}) == config_hash(RunConfig()) == RunConfig().hash() == GOLDEN_DEFAULT_HASH


def test_config_hash_is_taken_on_the_validated_config():
    a = {"model": {"backbone": "mamba", "d_model": 64}, "seed": 1}
    spelled = {**a, "model": {**a["model"], "dropout": 0.0, "positions": "auto"}, "train": {"lr": 1e-3}}
    assert config_hash(spelled) == config_hash(a) == config_from_dict(a).hash()
    # location and name are not settings
    assert config_hash({**a, "data": {"root": "/elsewhere"}, "name": "x"}) == config_hash(a)
    assert config_hash({**a, "data": {"seed": 3}}) != config_hash(a)
    # a config with keys of its own falls back to the raw hash (minus location/name)
    raw = {**a, "fake": {"sleep": 0}}
    assert config_hash(raw) == json_hash(raw, compact=True)
    assert config_hash({**raw, "model": {**raw["model"], "dropout": 0.0}}) != config_hash(raw)


@pytest.mark.slow
def test_grid_rerun_after_the_hash_change_retrains_nothing(tmp_path):
    """A grid finished under the old hashing (cells named by the raw-config hash, its Optuna study
    named after them): a rerun adopts every cell, runs none, and reports them all complete."""
    spec = write_spec(tmp_path / "s.yaml", base={"model.d_model": 32, "train.steps": 40})
    grid = runner.run_grid(spec, tmp_path / "g", cell_fn=fake_cell, report=False, progress=False)
    cells = expand(load_spec(spec))
    for c in cells:  # turn the grid into what the old runner left
        legacy = f"{c.name.rsplit('-', 1)[0]}-{json_hash(c.config, compact=True)}"
        (grid / "cells" / c.name).rename(grid / "cells" / legacy)
    (grid / "grid.db").unlink()  # the old study had other cell hashes in its name
    before = calls(grid)
    runner.run_grid(spec, grid, cell_fn=fake_cell, report=False, progress=False)
    assert calls(grid) == before  # nothing ran again
    assert sorted(p.name for p in (grid / "cells").iterdir()) == sorted(c.name for c in cells)
    import pandas as pd

    assert set(pd.read_csv(grid / "results.csv")["status"]) == {"complete"}


def test_cells_spelling_out_a_default_are_duplicates(tmp_path):
    spec = parse_spec({"name": "d", "axes": {"arch": [
        {"label": "a", "model.backbone": "transformer"}, {"label": "b", "model.conditioning": "prefix"}]}})
    with pytest.raises(ValueError, match="resolve to the same config"):
        expand(spec)


def test_rerun_adopts_cells_named_by_the_old_hash(tmp_path):
    """Hash migration: a finished cell directory named by the old (raw-config) hash with the same
    config is renamed to the new name and recorded, not run again; one with another config is not."""
    spec = parse_spec({"name": "m", "base": {"model.d_model": 32, "train.steps": 20},
                       "axes": {"model.backbone": ["transformer", "simba"]}})
    grid = tmp_path / "g"
    cells = expand(spec)
    # the cell's name, the run's summary (config_hash of the run config, named) and duplicates: one hash
    assert all(config_hash(c.run_config()) == config_from_dict(c.run_config()).hash() == c.hash for c in cells)
    olds = []
    for c in cells:  # what the old runner left: <slug>-<json_hash(raw config)>
        legacy = json_hash(c.config, compact=True)
        assert legacy != c.hash
        old = grid / "cells" / f"{c.name.rsplit('-', 1)[0]}-{legacy}"
        config = c.config if c.config["model"]["backbone"] == "transformer" else {**c.config, "seed": 5}
        old.mkdir(parents=True)
        fake_cell({**config, "name": old.name}, old)
        (old / "cell.json").write_text(json.dumps({**c.manifest(), "name": old.name, "hash": legacy,
                                                   "config": config}))
        olds.append(old)
    (grid / "calls.txt").unlink()
    _, ran = grid_cells.run_one(cells[0], grid, fake_cell)  # same config: adopted
    assert not ran and not olds[0].exists() and (grid / "cells" / cells[0].name).is_dir()
    assert json.loads((grid / "cells" / cells[0].name / "cell.json").read_text())["renamed_from"] == olds[0].name
    assert not (grid / "calls.txt").exists()
    _, ran = grid_cells.run_one(cells[1], grid, fake_cell)  # another config: run anew
    assert ran and olds[1].exists()
    assert calls(grid) == [cells[1].name]


def test_expand_axes_bundles_seeds_presets(tmp_path):
    base_cfg = tmp_path / "base.yaml"
    base_cfg.write_text(yaml.safe_dump({"model": {"d_model": 16, "n_layers": 2}, "train": {"lr": 0.01}}))
    spec = parse_spec(
        {
            "name": "e",
            "base_config": str(base_cfg),
            "base": {"model.d_model": 32},
            "axes": {
                "arch": [
                    {"label": "cross-tf", "model.backbone": "transformer", "model.conditioning": "cross"},
                    {"model.backbone": "simba", "model.conditioning": "prefix"},
                ],
                "train.lr": [0.001, 0.01],
            },
            "seeds": [0, 1, 2],
            "presets": {"tiny": {"train.steps": 5, "seeds": [0], "axes": {"train.lr": [0.001]}}},
        },
        str(tmp_path / "e.yaml"),
    )
    cells = expand(spec)
    assert len(cells) == 2 * 2 * 3
    assert [c.seed for c in cells[:4]] == [0, 0, 0, 0]  # seeds outermost
    c0 = cells[0]
    assert c0.axes == {"arch": "cross-tf", "train.lr": "0.001"}
    assert c0.config["model"] == {
        "d_model": 32,
        "n_layers": 2,
        "backbone": "transformer",
        "conditioning": "cross",
    }
    assert c0.config["train"]["lr"] == 0.001 and c0.config["seed"] == 0
    assert cells[2].axes["arch"] == "backbone=simba,conditioning=prefix"
    assert c0.name.startswith("cross-tf-0.001-s0-") and c0.name.endswith(c0.hash)
    assert len({c.name for c in cells}) == len(cells)
    assert [c.hash for c in expand(spec)] == [c.hash for c in cells]  # stable across expansions
    assert c0.group == "arch=cross-tf|train.lr=0.001"
    tiny = expand(spec, "tiny")
    assert len(tiny) == 2 and all(c.config["train"]["steps"] == 5 for c in tiny)
    assert {c.hash for c in tiny}.isdisjoint({c.hash for c in cells})


def test_duplicate_configs_are_an_error():
    spec = parse_spec(
        {"name": "d", "axes": {"model.backbone": ["a", "b"]}, "presets": {"p": {"model.backbone": "c"}}},
        "d.yaml",
    )
    assert len(expand(spec)) == 2
    # the preset sits under the axes, so axes still win; a bundle that undoes the axis collides
    spec = parse_spec(
        {"name": "d", "axes": {"model.backbone": ["a", "b"], "x": [{"model.backbone": "z"}]}}, "d.yaml"
    )
    with pytest.raises(ValueError, match="resolve to the same config"):
        expand(spec)


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "ablations").glob("*.yaml")))
def test_shipped_grids_expand_and_validate(name):  # every grid spec shipped in ablations/
    from ablations.spec import validate_run_configs

    path = ROOT / "ablations" / f"{name}.yaml"
    spec = load_spec(path)
    for preset in [None, *spec.presets]:
        cells = expand(spec, preset)
        assert cells
        validate_run_configs(cells, str(path))  # every cell is a valid RunConfig
    if name == "backbones_cpu":
        cells = expand(spec)
        assert {c.config["model"]["backbone"] for c in cells} == {
            "transformer",
            "mamba",
            "mamba2",
            "s4d",
            "s5",
            "simba",
            "hybrid",
        }
        assert {c.config["model"]["conditioning"] for c in cells} == {"prefix", "cross"}
        assert len(cells) == 7 * 2 * 3
    if name == "scaling_down":
        sizes = {c.config["model"]["target_params"] for c in expand(spec)}
        assert len(sizes) == 2 and max(sizes) == 4 * min(sizes)


# ----------------------------------------------------------------------------- the runner


@pytest.mark.slow
def test_tiny_grid_runs_to_completion(tmp_path):
    spec = write_spec(tmp_path / "s.yaml")
    grid = runner.run_grid(spec, tmp_path / "g", cell_fn=fake_cell, report=False, progress=False)
    cells = expand(load_spec(spec))
    assert sorted(calls(grid)) == sorted(c.name for c in cells)
    for c in cells:
        assert grid_cells.summary_complete(grid / "cells" / c.name)
        assert json.loads((grid / "cells" / c.name / "cell.json").read_text())["hash"] == c.hash
    import pandas as pd

    df = pd.read_csv(grid / "results.csv")
    assert len(df) == 4 and set(df["status"]) == {"complete"}
    assert set(df["axis.model.backbone"]) == {"transformer", "simba"}
    for col in (
        "seed",
        "params",
        "flops",
        "steps",
        "val_loss",
        "metric.fd_probe",
        "metric.fd_probe.ci_low",
        "metric.fd_probe.floor.noise",
        "metric.clap.reason",
    ):
        assert col in df.columns, col
    assert len(pd.read_json(grid / "results.jsonl", lines=True)) == 4
    # a rerun records the finished cells without running them again
    runner.run_grid(spec, tmp_path / "g", cell_fn=fake_cell, report=False, progress=False)
    assert len(calls(grid)) == 4
    # a fresh storage (new db) still does not re-run cells whose run dir is complete
    (grid / "grid.db").unlink()
    runner.run_grid(spec, tmp_path / "g", cell_fn=fake_cell, report=False, progress=False)
    assert len(calls(grid)) == 4


@pytest.mark.slow
def test_optuna_trials_carry_cells_and_headline_metrics(tmp_path):
    import optuna

    spec = write_spec(tmp_path / "s.yaml", seeds=[0])
    grid = runner.run_grid(spec, tmp_path / "g", cell_fn=fake_cell, report=False, progress=False)
    storage = f"sqlite:///{grid / 'grid.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
    assert sorted(t.params["cell"] for t in trials) == [0, 1]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    t = trials[0]
    assert t.user_attrs["val_loss"] == pytest.approx(t.value)
    assert "metric.fd_probe" in t.user_attrs and t.user_attrs["recorded"] is False


@pytest.mark.slow
def test_crash_then_rerun_repeats_nothing_finished(tmp_path, capsys):
    spec = write_spec(
        tmp_path / "s.yaml",
        base={"model.d_model": 32, "train.steps": 40, "fake": {"crash_backbone": "simba"}},
    )
    grid = tmp_path / "g"
    assert runner.cli([str(spec), "--out", str(grid), "--no-report", "--cell-fn", "test_grid:fake_cell",
                       "--workers", "1"]) == 1  # one worker: it never retries a cell that failed in it
    err = capsys.readouterr().err
    assert "2 cell(s) not complete" in err and "FAKE crash" in err
    first = calls(grid)
    assert len(first) == 4  # every cell tried once; the two simba cells crashed
    manifest = json.loads((grid / "grid.json").read_text())
    assert len(manifest["failed"]) == 2 and all("simba" in n for n in manifest["failed"])
    assert runner.cli([str(spec), "--out", str(grid), "--no-report", "--cell-fn", "test_grid:fake_cell"]) == 0
    second = calls(grid)[4:]
    assert sorted(second) == sorted(manifest["failed"])  # only the crashed cells ran again
    assert json.loads((grid / "grid.json").read_text())["failed"] == {}


def _env():
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    return env


def _runner_cmd(spec: Path, grid: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ablations.runner",
        str(spec),
        "--out",
        str(grid),
        "--no-report",
        "--cell-fn",
        "test_grid:fake_cell",
        *extra,
    ]


@pytest.mark.slow
def test_sigkill_mid_grid_then_rerun_completes(tmp_path):
    spec = write_spec(
        tmp_path / "s.yaml", base={"model.d_model": 32, "train.steps": 40, "fake": {"sleep": 1.0}}
    )
    grid = tmp_path / "g"
    proc = subprocess.Popen(
        _runner_cmd(spec, grid, "--workers", "1"), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    cells = expand(load_spec(spec))
    t0 = time.time()
    while len(calls(grid)) < 2:  # the first cell finished and the second started
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() - t0 < 60
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done_before = [c.name for c in cells if grid_cells.summary_complete(grid / "cells" / c.name)]
    assert len(done_before) == 1
    killed = calls(grid)[1]
    t0 = time.time()
    runner.run_grid(spec, grid, cell_fn=fake_cell, report=False, progress=False, heartbeat_s=30)
    # the dead worker was on this machine: its cell is retried at once, not after the 60 s grace period
    assert time.time() - t0 < 30
    c = calls(grid)
    assert sorted(set(c)) == sorted(x.name for x in cells)
    assert c.count(killed) == 2 and c.count(done_before[0]) == 1
    assert all(c.count(x.name) == 1 for x in cells if x.name != killed)


@pytest.mark.slow
def test_stale_heartbeat_of_another_machine_is_retried(tmp_path):
    """A RUNNING cell whose worker (elsewhere) stopped sending heartbeats is failed and run again."""
    from optuna.trial import TrialState

    spec_path = write_spec(tmp_path / "s.yaml", seeds=[0])
    spec = load_spec(spec_path)
    cells = expand(spec)
    grid = tmp_path / "g"
    grid.mkdir()
    st = storage.open_storage(f"sqlite:///{grid / 'grid.db'}", heartbeat_s=1, grace_s=2)
    study = claims.grid_study(st, claims._study_name(spec, None, cells, "grid"), cells)
    t = claims._claim(study, st, set())  # claimed by a worker on another machine that then vanished
    st.set_trial_user_attr(
        t._trial_id, "worker", {"machine": "elsewhere:boot:ns", "host": "elsewhere", "pid": 1}
    )
    t0 = time.time()
    counts = claims.work_grid(st, study, cells, grid, fake_cell, heartbeat_s=1)
    assert 2 <= time.time() - t0 < 30  # waited for the grace period, then retried
    assert counts == {"ran": 2, "recorded": 0, "failed": 0}
    trials = study.get_trials()
    assert [x.state for x in trials].count(TrialState.FAIL) == 1
    assert sorted(x.user_attrs["cell"] for x in trials if x.state == TrialState.COMPLETE) == [0, 1]
    assert sorted(calls(grid)) == sorted(c.name for c in cells)


@pytest.mark.slow
def test_two_worker_processes_share_one_sqlite_grid(tmp_path):
    spec = write_spec(
        tmp_path / "s.yaml",
        base={"model.d_model": 32, "train.steps": 40, "fake": {"sleep": 0.3}},
        axes={"model.backbone": ["transformer", "simba", "mamba"]},
    )
    grid = tmp_path / "g"
    procs = [
        subprocess.Popen(
            _runner_cmd(spec, grid, "--workers", "1"), env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    c = calls(grid)
    cells = expand(load_spec(spec))
    assert sorted(c) == sorted(x.name for x in cells)  # each cell exactly once
    assert all("started" in o for o in outs), outs  # both workers did work


@pytest.mark.slow
def test_search_mode_finds_best_per_group(tmp_path):
    spec = write_spec(
        tmp_path / "s.yaml",
        seeds=[0],
        search={
            "n_trials": 4,
            "metric": "val_loss",
            "direction": "minimize",
            "params": {"model.d_model": {"low": 8, "high": 64}},
        },
    )
    grid = runner.run_grid(spec, tmp_path / "g", cell_fn=fake_cell, report=False, progress=False)
    best = json.loads((grid / "search_best.json").read_text())
    assert set(best) == {"model.backbone=transformer", "model.backbone=simba"}
    for g, b in best.items():
        assert b["n_complete"] == 4
        # the FAKE loss falls with d_model: the best trial is the one with the largest d_model tried
        rows = [json.loads((p / "cell.json").read_text()) for p in (grid / "cells").iterdir()]
        tried = [r["params"]["model.d_model"] for r in rows if r["group"] == g]
        assert b["params"]["model.d_model"] == max(tried)  # a repeated value reuses its cell
    n_calls = len(calls(grid))
    assert n_calls == len(list((grid / "cells").iterdir())) <= 8
    runner.run_grid(spec, tmp_path / "g", cell_fn=fake_cell, report=True, progress=False)
    assert len(calls(grid)) == n_calls  # the budget is spent: nothing more runs
    md = (grid / "report.md").read_text()
    assert "## Search: best config per group" in md and '{"model.d_model": ' in md


def _pg_bin() -> Path | None:
    import glob
    import shutil

    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(cand) / "initdb").exists() and (Path(cand) / "pg_ctl").exists():
            return Path(cand)
    w = shutil.which("initdb")
    return Path(w).resolve().parent if w and shutil.which("pg_ctl") else None


@pytest.mark.slow
def test_two_workers_on_postgresql(tmp_path):
    import shutil
    import socket

    pg = _pg_bin()
    if pg is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found; apt-get install postgresql")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 not installed (pip install psycopg2-binary)")
    import tempfile

    pgroot = Path(tempfile.mkdtemp(prefix="ttm-pg-"))  # under /tmp: reachable by another user
    data, sock = pgroot / "data", pgroot / "sock"
    data.mkdir()
    sock.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prefix: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root and runuser is missing: cannot start PostgreSQL as another user")
        os.chmod(pgroot, 0o755)
        shutil.chown(data, "nobody")
        shutil.chown(sock, "nobody")
        prefix = [runuser, "-u", "nobody", "--"]
    try:
        r = subprocess.run(
            prefix
            + [str(pg / "initdb"), "-D", str(data), "-U", "ttm", "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=False,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run(
            prefix
            + [
                str(pg / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(data / "log"),
                "-w",
                "-o",
                f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off",
                "start",
            ],
            check=False,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        url = f"postgresql+psycopg2://ttm@127.0.0.1:{port}/postgres"
        spec = write_spec(
            tmp_path / "s.yaml",
            base={"model.d_model": 32, "train.steps": 40, "fake": {"sleep": 0.3}},
            axes={"model.backbone": ["transformer", "simba", "mamba"]},
        )
        grid = tmp_path / "g"
        # one runner with two worker processes (--workers 2) against the PostgreSQL storage
        p = subprocess.run(
            _runner_cmd(spec, grid, "--storage", url, "--workers", "2"),
            env=_env(),
            cwd=ROOT,
            check=False,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert p.returncode == 0, p.stdout + p.stderr
        assert sorted(calls(grid)) == sorted(c.name for c in expand(load_spec(spec)))  # each cell once
        assert "w0 [" in p.stdout and "w1 [" in p.stdout, p.stdout  # both worker processes ran cells
        assert not (grid / "grid.db").exists()
    finally:
        subprocess.run(
            prefix + [str(pg / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(pgroot, ignore_errors=True)


@pytest.mark.slow
def test_submitit_launcher_runs_each_cell_once(tmp_path, monkeypatch):
    """`--launcher submitit-local`: worker jobs through submitit's local executor (the SLURM path's
    stand-in in CI) share the grid's storage; each cell runs once and the results are complete."""
    pytest.importorskip("submitit")
    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    spec = write_spec(
        tmp_path / "s.yaml",
        base={"model.d_model": 32, "train.steps": 40, "fake": {"sleep": 0.2}},
        axes={"model.backbone": ["transformer", "simba", "mamba"]},
    )
    grid = tmp_path / "g"
    code = runner.cli([str(spec), "--out", str(grid), "--no-report", "--cell-fn", "test_grid:fake_cell",
                       "--launcher", "submitit-local", "--workers", "2"])
    assert code == 0
    cells = expand(load_spec(spec))
    assert sorted(calls(grid)) == sorted(x.name for x in cells)  # each cell exactly once
    rows = (grid / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(cells)
    assert len(list((grid / "jobs").glob("*_log.out"))) == 2  # two jobs, their logs kept


def test_slurm_options_reach_the_executor(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    from ablations.launch import SlurmOptions, executor

    fake_bin = tmp_path / "bin"  # submitit only checks that srun exists; nothing is submitted here
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    ex = executor("slurm", tmp_path, SlurmOptions(partition="gpu", gpus=1, cpus=8, time_min=90,
                                                  extra={"constraint": "h100"}))
    assert isinstance(ex._executor, submitit.SlurmExecutor)
    p = ex._executor.parameters
    assert (p["partition"], p["gpus_per_node"], p["cpus_per_task"], p["time"], p["constraint"]) == (
        "gpu", 1, 8, 90, "h100")
    with pytest.raises(ValueError, match="--launcher"):
        executor("pbs", tmp_path)


def test_dry_run_validates_every_cell_like_the_real_run(tmp_path, capsys):
    bad = write_spec(tmp_path / "bad.yaml", axes={"model.n_heads": [4, 3]}, base={"model.d_model": 32})
    with pytest.raises(ValueError, match=r"bad.yaml \(cell .*divisible by n_heads"):
        runner.cli([str(bad), "--dry-run"])
    with pytest.raises((ImportError, ValueError)):
        runner.cli([str(bad), "--dry-run", "--cell-fn", "no_such_module:fn"])
    good = write_spec(tmp_path / "good.yaml", base={"model.d_model": 32})
    assert runner.cli([str(good), "--dry-run"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(expand(load_spec(good)))
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("*.db"))


def test_grid_datasets_live_under_the_grid_unless_data_root_is_set(tmp_path, monkeypatch):
    from ablations import pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run_cell", lambda cfg, run_dir, progress=True: seen.setdefault("root", cfg.data.root))
    run_dir = tmp_path / "grid" / "cells" / "c0"
    run_dir.mkdir(parents=True)
    pipeline.pipeline_cell({"model": {"backbone": "transformer"}}, run_dir)
    assert seen.pop("root") == str((tmp_path / "grid" / "data").resolve())
    pipeline.pipeline_cell({"data": {"root": "/shared/datasets"}}, run_dir)
    assert seen.pop("root") == "/shared/datasets"


def test_explicit_workers_split_the_cores_instead_of_oversubscribing_them():
    assert runner.local_layout(2, 18, n_cores=2) == (2, 1)
    assert runner.local_layout(3, 18, n_cores=16) == (3, 5)
    assert runner.local_layout(4, 18, n_cores=2) == (4, 1)  # more workers than cores: one thread each
    assert runner.local_layout(1, 18, n_cores=2) == (1, None)  # one worker: torch's default
    assert runner.local_layout(None, 18, n_cores=2) == runner.default_layout(18, n_cores=2)


def test_default_layout_is_one_single_threaded_worker_per_core_on_small_machines():
    assert runner.default_layout(18, n_cores=2) == (2, 1)
    assert runner.default_layout(3, n_cores=4) == (3, 1)
    assert runner.default_layout(1, n_cores=2) == (1, 2)  # one cell: all the threads
    assert runner.default_layout(18, n_cores=16) == (1, 16)  # larger machines: one worker


def test_finished_cells_are_reused_from_another_grid_not_rerun(tmp_path):
    """--reuse: a cell whose config hash matches a finished cell of another grid is copied (under this
    grid's name), the others run."""
    first = write_spec(tmp_path / "a.yaml", axes={"model.backbone": ["transformer", "simba"]}, seeds=[0])
    ga = runner.run_grid(first, tmp_path / "a", cell_fn=fake_cell, report=False, progress=False)
    second = write_spec(tmp_path / "b.yaml", name="b", axes={"model.backbone": ["simba", "mamba2"]}, seeds=[0])
    gb = runner.run_grid(second, tmp_path / "b", cell_fn=fake_cell, report=False, progress=False, reuse=[ga])
    ran = calls(gb)
    assert len(ran) == 1 and ran[0].startswith("mamba2"), ran  # simba was copied
    simba = next(c for c in expand(load_spec(second)) if c.axes["model.backbone"] == "simba")
    summary = json.loads((gb / "cells" / simba.name / "summary.json").read_text())
    assert summary["reused_from"].endswith(simba.name)  # same hash, so the same name in both grids
    import pandas as pd

    assert set(pd.read_csv(gb / "results.csv")["status"]) == {"complete"}
    with pytest.raises(ValueError, match="not a grid directory"):
        runner.run_grid(second, tmp_path / "c", cell_fn=fake_cell, report=False, progress=False,
                        reuse=[tmp_path / "nothing"])
