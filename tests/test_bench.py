"""`ttm-bench bench` and the GPU check script: fast checks only (toy sizes, one case)."""

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ttm
from backbones.base import registered
from benchmarks import cases, common, run

REPO = Path(__file__).resolve().parents[1]
TINY = {"frames": 3, "d_model": 16, "n_layers": 1}


def _ssm_name() -> str | None:
    """A registered SSM backbone (the decode case sets a target for constant-state ones)."""
    reg = registered()
    return next((n for n in ("mamba2", "s4d", "mamba", "s5", "simba") if n in reg), None)


def test_run_case_decode_tiny_is_well_formed():
    ssm = _ssm_name()
    names = ["transformer"] + ([ssm] if ssm else [])
    res = run.run_case(
        "decode_recurrent_vs_recompute", quick=True, threads=1, overrides={**TINY, "backbones": names}
    )
    assert "error" not in res, res.get("error")
    assert res["case"] == "decode_recurrent_vs_recompute"
    assert res["peak_mb"] >= res["base_mb"] > 0
    assert res["cpu_steal_pct"] is None or 0.0 <= res["cpu_steal_pct"] <= 100.0  # None: no /proc/stat
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {f"decode_recurrent_vs_recompute[{n}]" for n in names}
    for r in rows.values():
        assert r["ours"] > 0 and r["peer"] > 0 and r["unit"] == "s"
        d = r["details"]
        assert r["ratio"] == pytest.approx(
            statistics.median(f / c for f, c in zip(d["recompute_s"], d["recurrent_s"], strict=True))
        )
        assert r["rounds"] == 2 and r["spread"][0] <= r["ratio"] <= r["spread"][1]
        assert r["details"]["frames"] == 3 and r["details"]["same_tokens"] is True
        if r["details"]["constant_state"]:
            assert r["target"] == 20.0 and r["met"] == (r["ratio"] >= 20.0)
        else:  # the transformer's KV cache grows: reported without a target
            assert r["target"] is None and r["met"] is None
    assert rows["decode_recurrent_vs_recompute[transformer]"]["details"]["constant_state"] is False


def test_cli_appends_one_json_line(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text('{"earlier": 1}\n')
    argv = [
        "--quick",
        "--json",
        "--threads",
        "1",
        "--only",
        "decode_recurrent_vs_recompute",
        "--results",
        str(results),
        "--set",
        'backbones=["transformer"]',
    ]
    argv += [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    assert run.cli(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    lines = results.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"earlier": 1}
    rec = json.loads(lines[1])
    assert rec == printed
    assert rec["quick"] is True and rec["cases"] == ["decode_recurrent_vs_recompute"]
    assert rec["overrides"]["frames"] == 3
    m = rec["machine"]
    assert m["cores"] >= 1 and m["torch"] == torch.__version__ and m["threads"] == 1 and m["cpu"]
    assert m["gomp_spincount"] == os.environ.get("GOMP_SPINCOUNT")
    assert m["gomp_spincount_by_ttm"] is ttm.OPENMP_DEFAULTS_SET
    for when in ("start", "end"):  # the machine's measured speed brackets the run
        st = rec["machine_state"][when]
        assert st["matmul_gflops"] > 0.1 and st["copy_gbps"] > 0.1
    assert rec["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", rec["git_commit"])
    (case,) = rec["results"]
    assert [r["name"] for r in case["rows"]] == ["decode_recurrent_vs_recompute[transformer]"]


def test_harness_overhead_tiny_in_process():
    """Reads per-step times from the harness's log.jsonl: breaks if the log format changes."""
    tiny = {"d_model": 16, "n_layers": 1, "frames": 6, "steps": 4, "rounds": 2, "batch": 2}
    (r,) = cases.run_case("harness_overhead", True, tiny)
    d = r["details"]
    assert r["name"] == "harness_overhead" and r["op"] == "<=" and r["target"] == 0.10
    assert [len(x) for x in d["harness_step_s"]] == [2, 2] and [len(x) for x in d["bare_step_s"]] == [2, 2]
    assert all(t > 0 for x in d["harness_step_s"] + d["bare_step_s"] for t in x)
    assert r["ratio"] == pytest.approx(statistics.median(d["round_ratios"]) - 1)
    assert 0 < d["backbone_forward_flop_share"] < 1 and d["backbone_s"] > 0
    assert r["met"] == (r["ratio"] <= 0.10)


def test_case_errors_are_reported_not_raised():
    res = run.run_case("harness_overhead", quick=True, overrides={"nonsense": 1}, threads=1)
    assert res["rows"] == [] and "nonsense" in res["error"]
    with pytest.raises(ValueError, match="nonsense"):
        cases.run_case("harness_overhead", True, {"nonsense": 1})
    with pytest.raises(ValueError, match="unknown case 'nope'"):
        run.run_case("nope")
    with pytest.raises(ValueError, match="--only: unknown case"):
        run.select_cases("cpu_mfu,nope")
    assert run.select_cases("cpu_mfu, data_throughput") == ["cpu_mfu", "data_throughput"]


def test_row_met_follows_op_and_target():
    assert cases.row("a", 1, 2, "s", 2.0, "speedup", 1.5)["met"] is True
    assert cases.row("a", 1, 2, "s", 1.2, "speedup", 1.5)["met"] is False
    assert cases.row("a", 1.2, 1, "s", 0.2, "overhead", 0.1, op="<=")["met"] is False
    assert cases.row("a", 1.05, 1, "s", 0.05, "overhead", 0.1, op="<=")["met"] is True
    assert cases.row("a", 1, 2, "s", 2.0, "speedup", None)["met"] is None
    assert cases.row("a", None, None, "s", float("nan"), "speedup", 1.5)["met"] is False
    with pytest.raises(ValueError, match="op must be"):
        cases.row("a", 1, 2, "s", 2.0, "speedup", 1.5, op=">")


def test_table_shows_raw_figures_and_not_met():
    results = [
        {
            "case": "x",
            "peak_mb": 512.4,
            "rows": [
                cases.row(
                    "x", 0.5, 2.0, "s", 4.0, "speedup", 20.0, ours_label="recurrent", peer_label="recompute"
                ),
                cases.row("y", 1.2, 1.0, "s/step", 0.2, "overhead", 0.1, op="<="),
                cases.row("z", 30.0, 90.0, "GFLOP/s", 1 / 3, "fraction", 0.35),
                cases.row("w", 2.0, 1.0, "audio s/s", 2.0, "x real time", 1.0),
                cases.row("v", None, None, "s/step", None, "speedup", 4.0, status="not available"),
            ],
        },
        {"case": "broken", "peak_mb": None, "rows": [], "error": "RuntimeError: boom"},
    ]
    lines = run.format_table(results).splitlines()
    by = {ln.split()[0]: ln for ln in lines[2:] if ln.strip()}
    assert "0.5 s (recurrent)" in by["x"] and "2 s (recompute)" in by["x"]
    assert "4x" in by["x"] and ">= 20x" in by["x"] and "NOT MET" in by["x"] and by["x"].endswith("512")
    assert "+20.0%" in by["y"] and "<= 10%" in by["y"] and "NOT MET" in by["y"]
    assert "33.3%" in by["z"] and ">= 35%" in by["z"] and "NOT MET" in by["z"]
    assert "2x" in by["w"] and "yes" in by["w"]
    assert "not available" in by["v"]
    assert "ERROR" in by["broken"] and "broken: ERROR RuntimeError: boom" in lines


def test_parse_sets():
    assert cases.parse_sets(["a=3", "b=[1, 2]", "c=text", "d=0.5"]) == {
        "a": 3,
        "b": [1, 2],
        "c": "text",
        "d": 0.5,
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cases.parse_sets(["novalue"])


def test_append_record_keeps_earlier_lines(tmp_path):
    p = tmp_path / "sub" / "r.jsonl"
    run.append_record(p, {"a": 1})
    run.append_record(p, {"b": [2]})
    assert [json.loads(x) for x in p.read_text().splitlines()] == [{"a": 1}, {"b": [2]}]


# ----------------------------------------------------------------------------- GPU check


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the real check would run")
def test_gpu_check_exits_cleanly_without_cuda(tmp_path):
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "OUT": str(tmp_path)},
    )
    assert p.returncode == 0, p.stderr
    assert "CUDA is not available" in p.stdout
    assert not (tmp_path / "gpu_check.json").exists()


def test_gpu_check_shell_script_parses():
    p = subprocess.run(
        ["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], check=False, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_section(tmp_path):
    """The whole script at toy sizes on the CPU: each section's figures land in the JSON."""
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_check.py"),
            "--cpu-dry-run",
            "--no-compile",
            "--backbones",
            "transformer",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env={**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    for sec in ("env", "peak", "train", "decode", "kernels"):
        assert "error" not in res[sec], (sec, res[sec])
    assert res["peak"]["bf16_flops"] > 0
    for model in ("prefix_simba", "cross_transformer"):
        t = res["train"][model]
        assert "error" not in t, t
        assert t["step_s"] > 0 and t["flops_per_step"] > 0 and 0 < t["mfu"]
        assert t["codebook_tokens_per_s"] == pytest.approx(t["batch"] * t["frames"] * 3 / t["step_s"])
        d = res["decode"][model]
        assert "error" not in d, d
        assert d["steps_per_s"] > 0 and d["recurrent_speedup_short"] > 0
    assert res["kernels"]["note"] and "transformer" not in res["kernels"]  # only SSMs are compared
    assert "[" in p.stdout and "all done" in p.stdout  # timestamped progress


def test_gpu_check_alarm_nests():
    from benchmarks.gpu_check import SectionTimeout, alarm

    t0 = time.time()
    with alarm(30):
        with pytest.raises(SectionTimeout), alarm(0.3):
            time.sleep(5)
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 25 < left <= 30  # the outer alarm is re-armed with its remaining time
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    assert time.time() - t0 < 3


# ----------------------------------------------------------------------------- spread, new cases


def test_row_spread_flags_a_target_inside_it():
    r = cases.row("a", 1, 2, "s", 1.6, "speedup", 1.5, spread=[1.4, 1.9], rounds=5)
    assert r["met"] is True and r["within_spread"] is True and r["spread"] == [1.4, 1.9] and r["rounds"] == 5
    r = cases.row("a", 1, 2, "s", 1.8, "speedup", 1.5, spread=[1.6, 1.9], rounds=5)
    assert r["met"] is True and r["within_spread"] is False
    assert cases.row("a", 1, 2, "s", 1.8, "speedup", None, spread=[1, 2])["within_spread"] is None
    assert cases.row("a", 1, 2, "s", 1.8, "speedup", 1.5)["within_spread"] is None


def test_table_prints_spread_and_in_spread_verdicts():
    rows = [
        cases.row("x", 1, 2, "s", 1.6, "speedup", 1.5, spread=[1.4, 1.9], rounds=5),
        cases.row("y", 1, 2, "s", 1.3, "slowdown", 1.5, op="<=", spread=[1.2, 1.4], rounds=5),
    ]
    out = run.format_table([{"case": "c", "peak_mb": 1.0, "rows": rows}])
    by = {ln.split()[0]: ln for ln in out.splitlines()[2:] if ln.strip() and not ln.startswith(("x:", "y:"))}
    assert "1.6x [1.4x-1.9x]" in by["x"] and "yes (in spread)" in by["x"]
    assert "1.3x [1.2x-1.4x]" in by["y"] and "yes" in by["y"] and "in spread" not in by["y"]
    assert "x: the target lies inside the spread over 5 rounds" in out


def test_default_results_path_is_outside_the_package():
    assert not run.DEFAULT_RESULTS.is_absolute() and run.DEFAULT_RESULTS.parts[0] == "runs"


@pytest.mark.slow
def test_decode_compiled_tiny_in_process():
    """Compiled vs eager rows per (backbone, length), and the compiled SSM vs the compiled KV cache."""
    torch._dynamo.reset()
    rows = cases.run_case(
        "decode_compiled", True, {"lengths": [4, 12], "backbones": ["transformer", "mamba2"], "tokens": 2,
                                  "rounds": 2, "kv_from": 10}
    )
    by = {r["name"]: r for r in rows}
    assert set(by) == {"decode_compiled[transformer@4]", "decode_compiled[transformer@12]",
                       "decode_compiled[mamba2@4]", "decode_compiled[mamba2@12]",
                       "decode_compiled_vs_kv_cache[mamba2@12]"}
    for r in rows:
        assert r["rounds"] == 2 and r["spread"][0] <= r["ratio"] <= r["spread"][1]
        assert r["ours"] > 0 and r["peer"] > 0 and r["unit"] == "s/token"
    assert by["decode_compiled[mamba2@12]"]["target"] is None
    assert by["decode_compiled[mamba2@12]"]["details"]["compile_s"] > 0
    assert by["decode_compiled_vs_kv_cache[mamba2@12]"]["target"] == 1.5


def test_decode_at_length_tiny_in_process():
    ssm = _ssm_name()
    names = ["transformer"] + ([ssm] if ssm else [])
    rows = cases.run_case(
        "decode_at_length", True, {"lengths": [12, 4], "backbones": names, "tokens": 2, "rounds": 2, "kv_from": 10}
    )
    by = {r["name"]: r for r in rows}
    assert by["decode_flatness[transformer]"]["target"] is None  # the KV cache grows: no target
    for r in rows:
        assert r["rounds"] == 2 and r["spread"][0] <= r["ratio"] <= r["spread"][1]
        assert r["ours"] > 0 and r["peer"] > 0 and r["unit"] == "s/token"
    if ssm:
        f = by[f"decode_flatness[{ssm}]"]
        assert f["target"] == 1.2 and f["op"] == "<=" and f["ours_label"] == "at 12" and f["peer_label"] == "at 4"
        kv = by[f"decode_vs_kv_cache[{ssm}@12]"]
        assert kv["target"] == 1.5 and kv["ratio"] == pytest.approx(
            statistics.median(
                a / b
                for a, b in zip(
                    by["decode_flatness[transformer]"]["details"]["per_token_s@12"],
                    f["details"]["per_token_s@12"],
                    strict=True,
                )
            )
        )


def test_ssm_train_step_tiny_builds_demo_models_through_the_factory():
    rows = cases.run_case(
        "ssm_train_step", True, {"backbones": ["s4d"], "batch": 2, "frames": 8, "rounds": 2, "mm_size": 64}
    )
    by = {r["name"]: r for r in rows}
    assert set(by) == {"ssm_train_step[s4d]", "train_mfu[transformer]", "train_mfu[s4d]"}
    r = by["ssm_train_step[s4d]"]
    assert r["op"] == "<=" and r["target"] == 1.5 and r["rounds"] == 2
    params = r["details"]["params"]
    assert abs(params - 1_000_000) / 1_000_000 < 0.03  # the demo's matched size
    assert r["ratio"] == pytest.approx(
        statistics.median(a / b for a, b in zip(r["details"]["ours_s"], r["details"]["peer_s"], strict=True))
    )
    assert by["train_mfu[s4d]"]["target"] == 0.30 and 0 < by["train_mfu[s4d]"]["ratio"]


@pytest.mark.slow
def test_grid_layout_tiny():
    (r,) = cases.run_case("grid_layout", True, {"steps": 1, "rounds": 1})
    assert r["name"] == "grid_layout" and r["target"] is None and r["ours"] > 0 and r["peer"] > 0
    assert r["details"]["cells"] == ["transformer", "simba"]


def test_paired_best_of_keeps_the_fastest_call_of_each_round():
    """best_of=3: a round's time is the fastest of three consecutive calls, so one slow call per
    round (a burst of other work) does not count; best_of=1 keeps it."""
    from benchmarks.common import paired

    calls = {"n": 0}

    def fn():  # every third call is slow, starting with the first of each round
        time.sleep(0.03 if calls["n"] % 3 == 0 else 0.001)
        calls["n"] += 1

    t = paired({"f": fn}, rounds=3, warmup=0, best_of=3)
    assert calls["n"] == 9 and len(t["f"]) == 3 and max(t["f"]) < 0.025
    calls["n"] = 0
    t1 = paired({"f": fn}, rounds=3, warmup=0)
    assert calls["n"] == 3 and max(t1["f"]) >= 0.03  # the first round's one call was the slow one


def test_history_summarises_ratios_across_runs_and_flags_flipping_verdicts(tmp_path, capsys):
    def rec(commit, quick, ratio, musicgen=None, steal=None):
        rows = [common.row("ssm_train_step[s5]", 1.0, 1.0, "s", ratio, "slowdown", 1.5, op="<=")]
        cases = [{"case": "ssm_train_step", "rows": rows}]
        if steal is not None:
            cases[0]["cpu_steal_pct"] = steal
        if musicgen is not None:
            mg = common.row("kv_cache_vs_musicgen", 1.0, 1.0, "s", musicgen, "speedup", 3.0)
            cases.append({"case": "kv_cache_vs_musicgen", "rows": [mg]})
        return {"git_commit": commit, "quick": quick, "results": cases}

    path = tmp_path / "results.jsonl"
    a, b = "a" * 40, "b" * 40
    lines = [rec(a, True, 1.46, 2.2), {"earlier": 1}, rec(a, True, 1.66, steal=6.25)]
    lines.append(rec(b, True, 1.56, steal=0.5))
    lines.append(rec(b + "+dirty", True, 1.56))  # uncommitted changes ran: kept apart in the commits
    lines.append(rec(a, False, 1.40))  # a full run
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert run.cli(["--history", "--results", str(path), "--only", "ssm_train_step"]) == 0
    out = capsys.readouterr().out
    quick = next(ln for ln in out.splitlines() if ln.startswith("ssm_train_step[s5] "))
    assert "  4  " in quick and "1.56x [1.46x-1.66x]" in quick and "1/4 runs" in quick
    assert "aaaaaaaaaa, bbbbbbbbbb, bbbbbbbbbb+dirty" in quick
    assert "[0.5-6.2]" in quick  # the runs' steal, where recorded
    full = next(ln for ln in out.splitlines() if ln.startswith("ssm_train_step[s5] (full)"))
    assert "1/1 runs" in full and " - " in full  # full runs kept apart; no steal recorded
    assert "met in 1 of 4 runs: the verdict changes from run to run" in out
    assert "kv_cache_vs_musicgen" not in out  # --only
    assert run.cli(["--history", "--results", str(path), "--commit", "bbb"]) == 0
    out = capsys.readouterr().out
    assert "  2  " in out and "1.56x [1.56x-1.56x]" in out and "kv_cache" not in out
    one_thread = rec(a, True, 1.30)
    one_thread["machine"] = {"threads": 1}  # the others recorded no thread count
    path.write_text("\n".join(json.dumps(x) for x in [*lines, one_thread]) + "\n")
    assert run.cli(["--history", "--results", str(path), "--only", "ssm_train_step"]) == 0
    out = capsys.readouterr().out  # runs at another thread count are kept apart, and named
    assert re.search(r"ssm_train_step\[s5\] \(1 thread\) +1 +1\.3x \(one run\)", out), out
    assert re.search(r"ssm_train_step\[s5\] \(threads not recorded\) +4 +1\.56x \[1\.46x-1\.66x\]", out)
    with pytest.raises(ValueError, match=r"no results file at .*missing\.jsonl"):
        run.cli(["--history", "--results", str(tmp_path / "missing.jsonl")])
    path.write_text(json.dumps(lines[0]) + "\nnot json\n")
    with pytest.raises(ValueError, match=r"results\.jsonl:2: invalid JSON"):
        run.cli(["--history", "--results", str(path)])


@pytest.mark.parametrize(
    ("env", "code", "expected"),
    [
        ({}, "import ttm", f"{ttm.GOMP_SPINCOUNT} True"),
        ({"GOMP_SPINCOUNT": "77"}, "import ttm", "77 False"),  # the user's value stays
        ({"OMP_WAIT_POLICY": "PASSIVE"}, "import ttm", "None False"),  # a GOMP_SPINCOUNT would override it
        ({}, "import torch, ttm", "None False"),  # too late: libgomp read its settings when torch loaded
    ],
)
def test_import_ttm_sets_gomp_spincount_only_before_torch(env, code, expected):
    """`import ttm` shortens libgomp's spinning (ttm.GOMP_SPINCOUNT) unless the user chose a spin count
    or wait policy, and says whether it did; checked in a fresh interpreter."""
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run(
        [sys.executable, "-c", f"{code}; import os; print(os.environ.get('GOMP_SPINCOUNT'), ttm.OPENMP_DEFAULTS_SET)"],
        env={**base, **env}, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert " ".join(out) == expected


def test_steal_is_read_from_proc_stat_and_noted_under_the_table(tmp_path):
    """`cpu_times` reads (steal, total) from /proc/stat's cpu line (guest time is inside user/nice, so
    not added again); a case's steal share between two readings gets a note from 2%."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 20 800 10 0 5 60 40 0\ncpu0 50 2 10 400 5 0 2 30 20 0\n")
    assert run.cpu_times(stat) == (60, 1000)
    stat.write_text("cpu  190 5 30 1500 10 0 5 100 80 0\n")
    assert run.cpu_times(stat) == (100, 1840)
    assert run.steal_pct((60, 1000), (100, 1840)) == pytest.approx(100 * 40 / 840)
    assert run.steal_pct(None, (100, 1840)) is None and run.steal_pct((60, 1000), (60, 1000)) is None
    assert run.cpu_times(tmp_path / "missing") is None
    stat.write_text("intr 1 2 3\n")
    with pytest.raises(ValueError, match=r"stat: expected a first line 'cpu user nice system idle"):
        run.cpu_times(stat)
    if run.cpu_times() is not None:  # this machine's own: steal within total
        steal, total = run.cpu_times()
        assert 0 <= steal <= total

    row = {"name": "c[x]", "ours": 1.0, "peer": 2.0, "unit": "s", "ours_label": "a", "peer_label": "b",
           "ratio": 2.0, "kind": "speedup", "target": None, "met": None, "status": "ok"}
    noted = run.format_table([{"case": "c", "peak_mb": 1.0, "cpu_steal_pct": 4.76, "rows": [row]}])
    assert "c: the hypervisor took 4.8% of the CPU time while it ran (steal)" in noted
    for quiet in (1.9, None):
        table = run.format_table([{"case": "c", "peak_mb": 1.0, "cpu_steal_pct": quiet, "rows": [row]}])
        assert "steal" not in table
