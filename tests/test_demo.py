"""`ttm-bench demo --preset tiny` end to end, and the CI regression check against the stored
tiny baseline (reports/baselines/demo_tiny.json).

Regenerate the baseline after an intended change of results:
    TTM_WRITE_BASELINE=1 pytest tests/test_demo.py
"""

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from ablations.demo import run_demo
from reports import regress

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "reports" / "baselines" / "demo_tiny.json"
# tiny preset: 2 generated clips per model, so only the smooth quantities are checked in CI;
# the tolerance is wide (50%) because CPU kernels differ across machines
CHECKED = ["val_loss", "fd_probe"]

pytestmark = pytest.mark.slow  # the whole pipeline, end to end


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    report = run_demo("tiny", out, progress=False)
    assert report == out / "report.md"
    return out


def test_demo_tiny_writes_a_complete_comparison(demo_dir):
    df = pd.read_csv(demo_dir / "results.csv")
    assert set(df["backbone"]) == {"transformer", "simba"}
    for col in ["params", "steps", "flops", "val_loss", "train_time_s", "metric.fd_probe", "metric.adherence"]:
        assert pd.to_numeric(df[col], errors="coerce").notna().all(), col
    p = df["params"].astype(float)
    assert p.max() / p.min() - 1 < 0.02  # matched parameter count
    assert df["steps"].nunique() == 1  # same step budget
    md = (demo_dir / "report.md").read_text()
    assert "transformer" in md and "simba" in md and "fd_probe" in md and "n/a" not in md.split("## Training")[0]
    assert (demo_dir / "report.html").stat().st_size > 10_000
    for cell in (demo_dir / "cells").iterdir():
        rows = [json.loads(r) for r in (cell / "samples" / "samples.jsonl").read_text().splitlines()]
        assert rows and all((cell / "samples" / r["file"]).exists() for r in rows)


def test_demo_tiny_matches_the_stored_baseline(demo_dir):
    if os.environ.get("TTM_WRITE_BASELINE"):
        assert regress.cli(["--write-baseline", "--baseline", str(BASELINE), "--candidate", str(demo_dir),
                            "--metrics", *CHECKED, "--rel-eps", "0.5"]) == 0
    assert BASELINE.exists(), f"{BASELINE} missing: run with TTM_WRITE_BASELINE=1"
    assert regress.cli(["--baseline", str(BASELINE), "--candidate", str(demo_dir), "--metrics", *CHECKED]) == 0
