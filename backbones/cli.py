"""`ttm-bench backbones` (list registered backbones) and `ttm-bench check-backbone` (contract suite)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import yaml


def _fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def describe_backbone(name: str, d_model: int, n_layers: int, n_heads: int, seq_len: int,
                      memory_len: int = 0) -> dict[str, Any]:
    """Size and cost of one registered backbone, built on the meta device (no memory).

    FLOPs/token and state size are for the prefix-conditioned model (no cross-attention)
    at `seq_len`; `params_cross` is the same model with cross-attention sublayers.
    """
    import torch

    from backbones.base import count_params, get_backbone_cls

    cls = get_backbone_cls(name)
    row: dict[str, Any] = {"name": name, "class": f"{cls.__module__}:{cls.__qualname__}",
                           "description": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""}
    kw = {"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads}
    models: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for mode, cross in (("prefix", False), ("cross", True)):
        try:
            with torch.device("meta"):
                models[mode] = cls(**kw, cross_attention=cross)
        except Exception as e:  # a mode the backbone cannot build is reported, not fatal
            errors[mode] = f"{type(e).__name__}: {e}"
    row["conditioning"] = [m for m in ("prefix", "cross") if m in models]
    row["params_prefix"] = count_params(models["prefix"]) if "prefix" in models else None
    row["params_cross"] = count_params(models["cross"]) if "cross" in models else None
    if "prefix" in models:
        m = models["prefix"]
        row["train_flops_per_token"] = m.flops_per_token(seq_len, memory_len, mode="train")
        row["decode_flops_per_token"] = m.flops_per_token(seq_len, memory_len, mode="decode")
        row["state_size"] = m.state_size(1, seq_len)
        row["constant_state"] = bool(m.constant_state)
    else:
        row.update(train_flops_per_token=None, decode_flops_per_token=None, state_size=None, constant_state=None)
    if errors:
        row["errors"] = errors
    return row


def list_cli(argv: list[str]) -> int:
    """`ttm-bench backbones [--json] [--d-model 64 --n-layers 2 --n-heads 4 --seq-len 512]`."""
    ap = argparse.ArgumentParser(prog="ttm-bench backbones", description="List the registered backbones.")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512, help="sequence length for FLOPs and state size")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args(argv)
    if min(a.d_model, a.n_layers, a.n_heads, a.seq_len) < 1:
        raise ValueError("--d-model, --n-layers, --n-heads and --seq-len must be positive")
    from backbones.base import registered

    rows = [describe_backbone(n, a.d_model, a.n_layers, a.n_heads, a.seq_len) for n in registered()]
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    headers = ["backbone", "params", "params+cross", "conditioning", "train FLOPs/tok", "decode FLOPs/tok",
               f"state@{a.seq_len}", "constant_state"]
    table = [
        [r["name"], _fmt_count(r["params_prefix"]), _fmt_count(r["params_cross"]), ",".join(r["conditioning"]) or "-",
         _fmt_count(r["train_flops_per_token"]), _fmt_count(r["decode_flops_per_token"]),
         _fmt_count(r["state_size"]), "-" if r["constant_state"] is None else ("yes" if r["constant_state"] else "no")]
        for r in rows
    ]
    print(f"d_model {a.d_model}, {a.n_layers} layers, {a.n_heads} heads; FLOPs and state (elements, batch 1) "
          f"at {a.seq_len} tokens, prefix model")
    print(_table(headers, table))
    for r in rows:
        for mode, err in r.get("errors", {}).items():
            print(f"{r['name']}: cannot build {mode} mode: {err}")
    from backbones.fla import unavailable

    for name, why in unavailable().items():
        print(f"{name}: not available: {why}")
    return 0


def _parse_kw(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or not key:
            raise ValueError(f"--kw expects KEY=VALUE, got {it!r}")
        out[key.replace("-", "_")] = yaml.safe_load(val)
    return out


def check_cli(argv: list[str]) -> int:
    """`ttm-bench check-backbone NAME_OR_PATH [--kw KEY=VALUE ...] [--json]`: exit 1 if any check failed."""
    ap = argparse.ArgumentParser(
        prog="ttm-bench check-backbone",
        description="Run the backbone contract suite on a tiny instance of a backbone.",
    )
    ap.add_argument("backbone", help="a registered name, pkg.module:Class, or path/file.py:Class")
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=12)
    ap.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE",
                    help="a backbone knob (value parsed as YAML), e.g. --kw d_state=16; repeatable")
    ap.add_argument("--checks", default=None, help="comma-separated subset of the checks")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args(argv)
    from backbones.contract import format_results, run_contract

    if ("." in a.backbone or ":" in a.backbone) and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # let `mypkg.mod:Class` resolve from the current folder
    results = run_contract(
        a.backbone, seq_len=a.seq_len, checks=a.checks.split(",") if a.checks else None,
        d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads, **_parse_kw(a.kw),
    )
    if a.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        print(f"contract checks for {a.backbone} (d_model {a.d_model}, {a.n_layers} layers, seq_len {a.seq_len})")
        print(format_results(results))
    return 1 if any(r.passed is False for r in results) else 0
