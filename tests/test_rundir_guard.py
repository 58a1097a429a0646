"""A run directory is guarded: one trainer at a time, damaged files named, clean stops on signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.synthetic import synthetic_prepared, tiny_config
from ttm.rundir import RunDir, RunInUse
from ttm.train import run

ROOT = Path(__file__).resolve().parents[1]


def _train(path, **over):
    return run(tiny_config(**{"train.steps": 4, **over}), path, data=synthetic_prepared(), progress=False)


def test_a_second_trainer_is_refused_while_the_first_holds_the_run(tmp_path):
    with RunDir(tmp_path).lock():
        with pytest.raises(RunInUse, match=rf"in use by pid {os.getpid()} on .*write every step twice"):
            _train(tmp_path)
    assert not (tmp_path / "log.jsonl").exists()  # the refused trainer wrote nothing
    assert _train(tmp_path)["status"] == "ok"  # released: the run trains


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_a_damaged_checkpoint_is_named_and_nothing_is_overwritten(tmp_path, damage):
    _train(tmp_path)
    ck = tmp_path / "checkpoint.pt"
    blob = ck.read_bytes()
    ck.write_bytes({"empty": b"", "truncated": blob[: len(blob) // 2], "garbage": b"not a checkpoint"}[damage])
    log_before = (tmp_path / "log.jsonl").read_text()
    with pytest.raises(ValueError, match=r"checkpoint.pt: damaged checkpoint"):
        _train(tmp_path)
    assert (tmp_path / "log.jsonl").read_text() == log_before
    assert ck.read_bytes() != blob  # left as found, for the user to restore or move away


def test_a_half_written_log_line_is_skipped_with_a_message(tmp_path, capsys):
    _train(tmp_path, **{"train.steps": 4})
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 2.')  # a crash mid-write
    s = run(tiny_config(**{"train.steps": 4}), tmp_path, data=synthetic_prepared(), progress=False)
    assert s["status"] == "ok"
    err = capsys.readouterr().err
    assert "log.jsonl: line 5 is damaged and skipped" in err
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigterm_writes_a_final_checkpoint_and_resume_matches(tmp_path):
    """No periodic checkpoint (ckpt_every 1000): the one on disk after SIGTERM was written at the
    stop, and resuming from it reproduces the uninterrupted run exactly."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TTM_TEST_STEP_DELAY": "0.1"}
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    subprocess.run([sys.executable, "tests/synthetic.py", str(full), "14", "1000"], cwd=ROOT, env=env, check=True)
    p = subprocess.Popen([sys.executable, "tests/synthetic.py", str(stopped), "14", "1000"], cwd=ROOT, env=env,
                         stderr=subprocess.PIPE, text=True)
    log = stopped / "log.jsonl"
    t0 = time.time()
    while not (log.exists() and len(log.read_text().splitlines()) >= 4):
        assert time.time() - t0 < 120 and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "checkpoint written" in err
    step = torch.load(stopped / "checkpoint.pt", weights_only=True)["counters"]["step"]
    assert 4 <= step < 14
    assert not (stopped / "summary.json").exists()  # not finished
    subprocess.run([sys.executable, "tests/synthetic.py", str(stopped), "14", "1000"], cwd=ROOT, env=env, check=True)
    loss = lambda d: [json.loads(x)["loss"] for x in (d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert loss(stopped) == loss(full)
