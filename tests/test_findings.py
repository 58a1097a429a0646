"""reports.findings: verdicts by the stated rules, and claims decided from synthetic shipped grids
whose true differences are known."""

from __future__ import annotations

import pandas as pd
import pytest

from reports import findings as F


@pytest.mark.parametrize(
    "d, floor, better, expected",
    [
        ((-0.5, -0.6, -0.4), 0.1, "lower", "better"),  # excludes 0, beyond the floor
        ((-0.5, -0.6, -0.4), 0.1, "higher", "worse"),
        ((0.02, 0.01, 0.03), 0.1, "lower", "no difference"),  # significant but inside the floor band
        ((0.0, -0.05, 0.05), 0.1, "lower", "no difference"),
        ((0.0, -0.5, 0.5), 0.1, "lower", "inconclusive"),  # interval wider than the band
        ((0.2, 0.05, 0.35), 0.1, "lower", "worse"),
        ((0.08, 0.05, 0.11), 0.1, "higher", "inconclusive"),  # neither beyond nor within the floor
        (None, 0.1, "lower", "inconclusive (under 2 seeds)"),
    ],
)
def test_verdict_rules(d, floor, better, expected):
    assert F.verdict(d, floor, better) == expected


def _cmp(v: str) -> F.Comparison:
    return F.Comparison("a", "b", F.VAL, None, None, None, None, v)


@pytest.mark.parametrize(
    "verdicts, expected",
    [
        (["better", "better", "inconclusive", "inconclusive"], "holds"),  # ahead early, level later
        (["better", "worse"], "fails"),
        (["no difference", "no difference"], "fails"),
        (["inconclusive", "no difference"], "inconclusive"),
    ],
)
def test_learns_faster_rule(verdicts, expected):
    c = F.Claim("1", "t", "s", parts=[(_cmp(v), "better") for v in verdicts], rule="any")
    assert c.verdict == expected


def test_claim_parts_combine():
    assert F.combine(["holds", "holds"]) == "holds"
    assert F.combine(["holds", "inconclusive"]) == "inconclusive"
    assert F.combine(["inconclusive", "fails"]) == "fails"


def _rows(arm: dict, n: int, means: dict, noise: float, start: int) -> list[dict]:
    out = []
    for s in range(n):
        r = {"run": f"{arm['label']}-s{s}", "seed": s, "status": "complete", "label": arm["label"],
             "family": arm["label"], "params": arm["params"], "steps": 400, "flops": 6.9e12,
             "train_time_s": 60.0, **{k: v for k, v in arm.items() if k not in ("label", "params")}}
        for col, mu in means.items():  # seeds spread by -noise, 0, +noise: the arm's mean is exact
            r[col] = mu * (1 + noise * (s - 1))
        r["val_info_gain.ci_low"], r["val_info_gain.ci_high"] = r["val_info_gain"] - 0.002, r["val_info_gain"] + 0.002
        for m in ("fd_probe", "kl_probe", "clap_probe", "adherence"):
            r[f"metric.{m}.resolvable_difference"] = {"fd_probe": 20.0, "kl_probe": 0.2}.get(m, 0.05)
            r[f"metric.{m}.n"] = 96
        out.append(r)
    return out


def _curves(rows: list[dict], offset: float) -> list[dict]:
    return [{"run": r["run"], "step": st, "flops": st * 1.7e10, "val_loss": r["val_loss"] + offset * (400 - st) / 400,
             "val_info_gain": r["val_info_gain"], "label": r["label"], "family": r["family"], "seed": r["seed"]}
            for r in rows for st in (50, 100, 200, 300, 400)]


def test_claims_from_a_synthetic_study_with_known_differences(tmp_path):
    """SiMBA's val loss is 0.3 lower at every step (seed spread 1%): claim 1 holds. FD equal (floor 20):
    level; KL 1.0 worse (floor 0.2): claim 2 fails. Quarter size: equal on every metric: claim 3 holds.
    No per-flop / two-stage grid: those claims are "not run", not guessed."""
    base = {"val_loss": 3.0, "val_info_gain": 0.05, "metric.fd_probe": 50.0, "metric.kl_probe": 0.5,
            "metric.clap_probe": 0.15, "metric.adherence": 0.5}
    rows, cv = [], []
    for size, params in (("full", 1e6), ("quarter", 2.5e5)):
        s = {"label": f"prefix-simba / {size}", "params": params, "backbone": "simba", "conditioning": "prefix",
             "axis.size": size}
        t = {"label": f"cross-transformer / {size}", "params": params, "backbone": "transformer",
             "conditioning": "cross", "axis.size": size}
        better = size == "full"
        rs = _rows(s, 3, {**base, "val_loss": 3.0 - (0.3 if better else 0.0),
                               "metric.kl_probe": 0.5 + (1.0 if better else 0.0)}, 0.01, 0)
        rt = _rows(t, 3, base, 0.01, 0)
        rows += rs + rt
        cv += _curves(rs, 1.0) + _curves(rt, 1.0)
    d = tmp_path / "study"
    d.mkdir()
    pd.DataFrame(rows).to_csv(d / "results.csv", index=False)
    pd.DataFrame(cv).to_csv(d / "curves.csv", index=False)

    claims = {c.key: c for c in F.study_claims(F.load(tmp_path))}
    assert claims["1"].verdict == "holds", claims["1"].reason()
    assert claims["2"].verdict == "fails", claims["2"].reason()
    # FD level (holds), KL worse (fails), CLAP no difference where "better" was claimed (fails)
    assert [c.verdict for c, _ in claims["2"].parts] == ["no difference", "worse", "no difference"]
    assert [F.part_outcome(c, k) for c, k in claims["2"].parts] == ["holds", "fails", "fails"]
    assert claims["3"].verdict == "holds", claims["3"].reason()
    assert claims["1f"].verdict == claims["4"].verdict == "not run"

    page = F.build(tmp_path).read_text()
    assert "| 1 | The SSM learns faster per iteration" in page and "**holds**" in page and "**fails**" in page
    assert "not run" in page
    assert (tmp_path / "findings" / "study_val_loss_vs_step.png").is_file()


def test_findings_refuse_an_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="none of the shipped grids"):
        F.build(tmp_path)
