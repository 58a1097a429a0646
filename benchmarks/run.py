"""`ttm-bench bench [--quick] [--json] [--only NAME,...]`: speed and memory benchmarks, each
printed as a ratio against a peer measured in the same run.

Every case runs in its own process (`python -m benchmarks.cases CASE`), so the peak
memory reported for it is that process's own (resource.getrusage ru_maxrss). The table
shows both raw figures, their ratio, the target and whether it is met; a target that is
not met is printed as NOT MET, never hidden. A ratio is the median over interleaved rounds
and is printed with its [min-max] spread; when the target lies inside that spread the verdict
is marked "(in spread)": the margin is within the machine's noise. Every run appends one
JSON line (time, git commit, machine, its measured speed at the start and the end of the run,
all results) to `--results PATH`, else
`$TTM_BENCH_RESULTS`, else `runs/bench/results.jsonl` under the current directory (never
into the installed package). `--history` reads that file back: each row's ratio across runs and in
how many runs its target was met (on a shared machine a verdict near its target can change from
run to run; one run's spread does not show that).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import ttm
from benchmarks.cases import CASES, RESULT_MARK, parse_sets
from benchmarks.common import machine_state
from ttm.util import code_version, read_jsonl_objects

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = Path("runs") / "bench" / "results.jsonl"  # relative to the working directory


# ----------------------------------------------------------------------------- running

PROC_STAT = Path("/proc/stat")
#: steal above this share of a case's CPU time gets a note under the table
STEAL_NOTE_PCT = 2.0


def cpu_times(path: Path = PROC_STAT) -> tuple[int, int] | None:
    """(steal, total) CPU time in clock ticks over all CPUs since boot, from the "cpu" line of
    /proc/stat (Linux); None where there is no such file. Steal is the time a virtual machine's
    CPUs were ready to run while the hypervisor ran something else: a neighbour's load."""
    try:
        fields = path.read_text().splitlines()[0].split()
    except OSError:
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        raise ValueError(f"{path}: expected a first line 'cpu user nice system idle iowait irq softirq "
                         f"steal ...', got {' '.join(fields[:4])!r}")
    ticks = [int(v) for v in fields[1:]]
    return ticks[7], sum(ticks[:8])  # guest time is already counted in user and nice


def steal_pct(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of CPU time stolen by the hypervisor between two `cpu_times` readings, in %."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


def run_case(
    name: str,
    quick: bool = False,
    overrides: dict[str, Any] | None = None,
    threads: int | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run one case in a child process; returns {case, rows, peak_mb, base_mb, wall_s, error?}.

    A crash, a timeout or an error inside the case becomes `error` (rows may then be empty);
    it never raises, so the other cases still run. Unknown case names raise ValueError.
    """
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; expected one of {', '.join(CASES)}")
    cmd = [sys.executable, "-m", "benchmarks.cases", name]
    if quick:
        cmd.append("--quick")
    if threads:
        cmd += ["--threads", str(threads)]
    for k, v in (overrides or {}).items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    t0, cpu0 = time.perf_counter(), cpu_times()
    try:
        p = subprocess.run(
            cmd, cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {
            "case": name,
            "rows": [],
            "wall_s": time.perf_counter() - t0,
            "peak_mb": None,
            "cpu_steal_pct": steal_pct(cpu0, cpu_times()),
            "error": f"timed out after {timeout:.0f} s",
        }
    wall, steal = time.perf_counter() - t0, steal_pct(cpu0, cpu_times())
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith(RESULT_MARK)), None)
    if line is None:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {
            "case": name,
            "rows": [],
            "wall_s": wall,
            "peak_mb": None,
            "cpu_steal_pct": steal,
            "error": f"exit code {p.returncode}, no result: {tail}",
        }
    out = json.loads(line[len(RESULT_MARK) :])
    out["process_wall_s"] = wall
    out["cpu_steal_pct"] = steal  # the whole machine's, over the case's process (None: not Linux)
    return out


# ----------------------------------------------------------------------------- machine and record


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int | None = None) -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": threads or torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        # libgomp's spin count, and whether `import ttm` set it (before torch loaded)
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "gomp_spincount_by_ttm": ttm.OPENMP_DEFAULTS_SET,
    }


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line with a single write (O_APPEND), so concurrent runs never interleave lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- table


def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    s = f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{s} {unit}".strip()


def _fmt_ratio(v: float, kind: str | None) -> str:
    if kind == "overhead":
        return f"{v:+.1%}"
    if kind == "fraction":
        return f"{v:.1%}"
    return f"{v:,.0f}x" if abs(v) >= 1000 else f"{v:.3g}x"


def _ratio(r: dict) -> str:
    v = r.get("ratio")
    if v is None:
        return "-"
    kind = r.get("ratio_kind")
    out = _fmt_ratio(v, kind)
    sp = r.get("spread")
    if sp:
        out += f" [{_fmt_ratio(sp[0], kind)}-{_fmt_ratio(sp[1], kind)}]"
    return out


def _target(r: dict) -> str:
    t = r.get("target")
    if t is None:
        return "-"
    kind = r.get("ratio_kind")
    s = f"{t:.0%}" if kind in ("overhead", "fraction") else f"{t:g}x"
    return f"{r.get('op', '>=')} {s}"


def _met(r: dict) -> str:
    if r.get("status") != "ok":
        return r.get("status", "?")
    m = r.get("met")
    if m is None:
        return "-"
    return ("yes" if m else "NOT MET") + (" (in spread)" if r.get("within_spread") else "")


def table_rows(results: list[dict]) -> list[list[str]]:
    """One list of cells per result row (errors and unavailable cases included)."""
    out = []
    for c in results:
        mb = "-" if c.get("peak_mb") is None else f"{c['peak_mb']:.0f}"
        if c.get("error"):
            out.append([c["case"], "-", "-", "-", "-", "ERROR", mb])
        for r in c.get("rows", []):
            ours = f"{_num(r['ours'], r['unit'])} ({r['ours_label']})" if r.get("ours") is not None else "-"
            peer = f"{_num(r['peer'], r['unit'])} ({r['peer_label']})" if r.get("peer") is not None else "-"
            out.append([r["name"], ours, peer, _ratio(r), _target(r), _met(r), mb])
    return out


def render(head: list[str], body: list[list[str]], notes: list[str]) -> str:
    """A plain-text table with aligned columns, then the notes (if any) after a blank line."""
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    lines = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
    return "\n".join(lines + ([""] + notes if notes else []))


def format_table(results: list[dict]) -> str:
    head = ["case", "ours", "peer", "ratio [min-max]", "target", "met", "peak MB"]
    notes = []
    for c in results:
        if c.get("error"):
            notes.append(f"{c['case']}: ERROR {c['error']}")
        if (c.get("cpu_steal_pct") or 0.0) >= STEAL_NOTE_PCT:
            notes.append(f"{c['case']}: the hypervisor took {c['cpu_steal_pct']:.1f}% of the CPU time while "
                         "it ran (steal): a neighbour's load, which moves its timings")
        for r in c.get("rows", []):
            if r.get("note"):
                notes.append(f"{r['name']}: {r['note']}")
            if r.get("within_spread"):
                notes.append(
                    f"{r['name']}: the target lies inside the spread over {r.get('rounds')} rounds: "
                    "the verdict is within the machine's noise"
                )
    return render(head, table_rows(results), notes)


# ----------------------------------------------------------------------------- history


def short_commit(commit: str | None) -> str:
    """A recorded commit as printed: its first 10 hex digits, with "+dirty" kept."""
    c = commit or "unknown"
    return c[:10] + ("+dirty" if c.endswith("+dirty") else "")


def history(records: list[dict], only: list[str] | None = None, commit: str | None = None) -> list[dict]:
    """Every result row's ratios across recorded runs (quick and full runs apart, and runs at different
    thread counts), in first-seen order: [{name, quick, threads, ratios, met, steal, commits, row}];
    `row` is the latest run's (its target and kind), `steal` each run's `cpu_steal_pct` of the case
    (None: not recorded). `only`: these cases; `commit`: runs whose git commit starts with it. Lines
    without results are skipped."""
    groups: dict[tuple[str, bool, int | None], dict] = {}
    for rec in records:
        if "results" not in rec or (commit and not (rec.get("git_commit") or "").startswith(commit)):
            continue
        for c in rec["results"]:
            if only and c.get("case") not in only:
                continue
            for r in c.get("rows", []):
                if r.get("ratio") is None:
                    continue
                quick, threads = bool(rec.get("quick")), (rec.get("machine") or {}).get("threads")
                g = groups.setdefault(
                    (r["name"], quick, threads),
                    {"name": r["name"], "quick": quick, "threads": threads,
                     "ratios": [], "met": [], "steal": [], "commits": []},
                )
                g["ratios"].append(r["ratio"])
                g["met"].append(r.get("met"))
                g["steal"].append(c.get("cpu_steal_pct"))
                short = short_commit(rec.get("git_commit"))
                if short not in g["commits"]:
                    g["commits"].append(short)
                g["row"] = r
    return list(groups.values())


def format_history(groups: list[dict]) -> str:
    """A table of `history`: runs, the median of the runs' ratios with their [min-max], the target, in
    how many runs it was met and the runs' CPU steal [min-max]; a note for every row whose verdict
    differs between runs."""
    head = ["case", "runs", "ratio: median of runs [min-max]", "target", "met", "steal %", "commits"]
    body, notes = [], []
    several = len({g.get("threads") for g in groups}) > 1  # then each row names its thread count
    for g in groups:
        r, rs = g["row"], g["ratios"]
        kind = r.get("ratio_kind")
        met = [m for m in g["met"] if m is not None]
        th = g.get("threads")
        threads = "threads not recorded" if th is None else f"{th} thread{'' if th == 1 else 's'}"
        tags = ([] if g["quick"] else ["full"]) + ([threads] if several else [])
        name = g["name"] + (f" ({', '.join(tags)})" if tags else "")
        spread = f"[{_fmt_ratio(min(rs), kind)}-{_fmt_ratio(max(rs), kind)}]" if len(rs) > 1 else "(one run)"
        st = [v for v in g.get("steal", []) if v is not None]
        steal = "-" if not st else f"{st[0]:.1f}" if len(st) == 1 else f"[{min(st):.1f}-{max(st):.1f}]"
        body.append([
            name, str(len(rs)), f"{_fmt_ratio(statistics.median(rs), kind)} {spread}",
            _target(r), f"{sum(met)}/{len(met)} runs" if met else "-", steal, ", ".join(g["commits"]),
        ])
        if 0 < sum(met) < len(met):
            notes.append(f"{name}: met in {sum(met)} of {len(met)} runs: the verdict changes from run to run")
    return render(head, body, notes)


def read_records(path: Path) -> list[dict]:
    """The JSON lines of a results file (ttm.util.read_jsonl_objects: a line that is not a JSON
    object is an error naming the file and line); a missing file is an error too."""
    if not Path(path).is_file():
        raise ValueError(
            f"--history: no results file at {path} (run `ttm-bench bench` first, or pass --results)"
        )
    return [obj for _, obj in read_jsonl_objects(path)]


# ----------------------------------------------------------------------------- CLI


def select_cases(only: str | None) -> list[str]:
    if not only:
        return list(CASES)
    names = [n.strip() for n in only.split(",") if n.strip()]
    bad = [n for n in names if n not in CASES]
    if bad:
        raise ValueError(f"--only: unknown case(s) {', '.join(bad)}; expected some of {', '.join(CASES)}")
    return names


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ttm-bench bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: the whole run in a few minutes")
    ap.add_argument("--json", action="store_true", help="print the record as JSON instead of a table")
    ap.add_argument("--only", help="comma-separated cases: " + ", ".join(CASES))
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads in every case (default: torch's)"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a case setting (JSON value) in every selected case, e.g. frames=20",
    )
    ap.add_argument(
        "--results",
        default=None,
        help=f"JSONL file to append to (default $TTM_BENCH_RESULTS or {DEFAULT_RESULTS})",
    )
    ap.add_argument("--timeout", type=float, default=None, help="seconds per case (default: none)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is NOT MET")
    ap.add_argument(
        "--history", action="store_true",
        help="run nothing: summarise the ratios of every run in the results file (with --only, --commit)",
    )
    ap.add_argument(
        "--commit", default=None, help="with --history: only runs whose git commit starts with this"
    )
    a = ap.parse_args(argv)
    names = select_cases(a.only)
    overrides = parse_sets(a.set)
    results_path = Path(a.results or os.environ.get("TTM_BENCH_RESULTS") or DEFAULT_RESULTS)
    if a.history:
        groups = history(read_records(results_path), names if a.only else None, a.commit)
        if not groups:
            raise ValueError(
                f"--history: no recorded ratios in {results_path} for the cases and commit asked"
            )
        print(format_history(groups))
        return 0

    started = time.time()
    if a.threads:  # the probes run here, with the cases' thread count
        torch.set_num_threads(a.threads)
    speed = {"start": machine_state()}
    results = []
    for name in names:
        print(f"[{time.strftime('%H:%M:%S')}] bench {name} ...", file=sys.stderr, flush=True)
        res = run_case(name, a.quick, overrides, a.threads, a.timeout)
        results.append(res)
        state = "error: " + res["error"] if res.get("error") else f"{res.get('wall_s', 0):.1f} s"
        print(f"[{time.strftime('%H:%M:%S')}] bench {name}: {state}", file=sys.stderr, flush=True)
    speed["end"] = machine_state()
    record = {
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_commit": code_version(),  # "+dirty": uncommitted changes ran
        "machine": machine_info(a.threads),
        "machine_state": speed,
        "quick": a.quick,
        "cases": names,
        "overrides": overrides,
        "total_s": time.time() - started,
        "results": results,
    }
    append_record(results_path, record)
    if a.json:
        print(json.dumps(record, indent=1, default=str))
    else:
        m = record["machine"]
        print(
            f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads; "
            f"commit {short_commit(record['git_commit'])}; {'quick' if a.quick else 'full'} run "
            f"in {record['total_s']:.0f} s"
        )
        st = {k: f"{v['matmul_gflops']:.0f} GFLOP/s matmul, {v['copy_gbps']:.1f} GB/s copy"
              for k, v in speed.items()}
        print(f"machine state at the start: {st['start']}; at the end: {st['end']} (ratios of memory-bound "
              f"and compute-bound work move with the balance of the two)")
        print(format_table(results))
        print(f"\nappended to {results_path}")
    failed = any(r.get("error") for r in results)
    unmet = any(row.get("met") is False for r in results for row in r.get("rows", []))
    return 1 if failed or (a.strict and unmet) else 0


if __name__ == "__main__":
    sys.exit(cli())
