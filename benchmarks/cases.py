"""The benchmark cases of `ttm-bench bench`: each measures our code against a peer in the
same process and returns rows of raw figures plus their ratio (median over interleaved
rounds, with its min-max spread) against a target. The cases live by concern in
cases_train.py, cases_decode.py, cases_data.py and cases_grid.py; the row format and shared
helpers in common.py. This module is their registry and their per-process entry point:

    python -m benchmarks.cases CASE [--quick] [--set KEY=VALUE ...] [--threads N]

runs one case and prints its result as one JSON line prefixed with `RESULT_MARK`, with
this process's peak resident memory (`resource.getrusage`), so that `benchmarks.run`
can give every case its own process and its own peak. Everything runs on the CPU.
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.cases_data import data_throughput
from benchmarks.cases_decode import (
    decode_at_length,
    decode_compiled,
    decode_recurrent_vs_recompute,
    kv_cache_vs_musicgen,
)
from benchmarks.cases_grid import grid_layout
from benchmarks.cases_train import cpu_mfu, harness_overhead, mamba_vs_mambapy, ssm_train_step
from benchmarks.common import row
from ttm.util import keep_freed_memory

__all__ = ["CASES", "RESULT_MARK", "main", "parse_sets", "peak_rss_mb", "row", "run_case"]

RESULT_MARK = "BENCH_RESULT "

CASES: dict[str, Callable[..., list[dict]]] = {
    "mamba_vs_mambapy": mamba_vs_mambapy,
    "harness_overhead": harness_overhead,
    "ssm_train_step": ssm_train_step,
    "decode_recurrent_vs_recompute": decode_recurrent_vs_recompute,
    "decode_at_length": decode_at_length,
    "decode_compiled": decode_compiled,
    "kv_cache_vs_musicgen": kv_cache_vs_musicgen,
    "cpu_mfu": cpu_mfu,
    "data_throughput": data_throughput,
    "grid_layout": grid_layout,
}


def run_case(name: str, quick: bool, overrides: dict[str, Any] | None = None) -> list[dict]:
    """Run one case in this process; unknown names or override keys raise ValueError."""
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; expected one of {', '.join(CASES)}")
    fn = CASES[name]
    overrides = dict(overrides or {})
    allowed = [p for p in inspect.signature(fn).parameters if p != "quick"]
    bad = sorted(set(overrides) - set(allowed))
    if bad:
        raise ValueError(
            f"{name}: unknown setting(s) {', '.join(bad)}; expected some of {', '.join(allowed)}"
        )
    return fn(quick, **overrides)


def peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished children, in MiB (Linux: kB units)."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) * scale


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs; a value is JSON when it parses as JSON, else a string."""
    out: dict[str, Any] = {}
    for it in items:
        key, eq, val = it.partition("=")
        if not eq or not key:
            raise ValueError(f"--set: expected KEY=VALUE, got {it!r}")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cases", description="run one benchmark case")
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a case setting")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    base_mb = peak_rss_mb()
    t0 = time.perf_counter()
    out: dict[str, Any] = {"case": a.case, "quick": a.quick, "threads": torch.get_num_threads(),
                           "malloc": keep_freed_memory()}  # as training runs (ttm.train.setup_processes)
    rc = 0
    try:
        out["rows"] = run_case(a.case, a.quick, parse_sets(a.set))
    except Exception as e:  # noqa: BLE001 - reported as the case's error; the other cases still run
        out["rows"], out["error"] = [], f"{type(e).__name__}: {e}"
        rc = 1
    out["wall_s"] = time.perf_counter() - t0
    out["peak_mb"] = peak_rss_mb()
    out["base_mb"] = base_mb
    print(RESULT_MARK + json.dumps(out, default=str), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
