"""Comparisons only at equal n: the report flags, and `regress` refuses, rows whose evaluation n
differ (the hooks in reports/ that read eval.json's n and resolvable_difference)."""

from __future__ import annotations

import pandas as pd

from reports import regress
from reports.build import unequal_n


def _df(ns: list[int]) -> pd.DataFrame:
    return pd.DataFrame({
        "group": [f"g{i}" for i in range(len(ns))], "label": [f"g{i}" for i in range(len(ns))],
        "status": ["complete"] * len(ns), "metric.fd_probe": [5.0] * len(ns), "metric.fd_probe.n": ns,
        "metric.adherence": [0.5] * len(ns), "metric.adherence.n": [96] * len(ns),
    })


def test_report_flags_metrics_evaluated_at_different_n():
    assert unequal_n(_df([96, 96])) == {}
    assert unequal_n(_df([96, 16])) == {"fd_probe": [16, 96]}


def test_regress_refuses_a_candidate_evaluated_at_another_n(monkeypatch):
    baseline = {"k": 3.0, "rel_eps": 0.02, "groups": {"g0": {"metrics": {
        "fd_probe": {"mean": 5.0, "std": 0.0, "n": 1, "floor": None, "direction": "lower", "eval_n": [96]}}}}}
    monkeypatch.setattr(regress, "collect", lambda root: _df([16]))
    rows = regress.compare(baseline, "unused")
    assert rows[0]["verdict"] == "N DIFFERS ([96] vs [16] clips)" and rows[0]["delta"] is None
    monkeypatch.setattr(regress, "collect", lambda root: _df([96]))
    assert regress.compare(baseline, "unused")[0]["verdict"] == "ok"
    assert regress._stats(_df([96]), None, {})["g0"]["metrics"]["fd_probe"]["eval_n"] == [96]
