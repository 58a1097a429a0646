"""`ttm-bench VERB ...`: one command, verbs dispatched to the module that owns them."""

from __future__ import annotations

import importlib
import sys

# verb -> ("module:function", help). Each function takes argv (list[str]) and returns an exit code.
VERBS: dict[str, tuple[str, str]] = {
    "data": ("ttm.data_cli:main", "build / import / tokenize datasets"),
    "train": ("ttm.runs:train_cli", "train one run from a YAML config"),
    "generate": ("ttm.runs:generate_cli", "generate audio from captions with a trained run"),
    "eval": ("eval.runner:cli", "evaluate generated audio against a reference"),
    "grid": ("ablations.runner:cli", "run an ablation grid (Optuna storage)"),
    "report": ("reports.build:cli", "build the comparison report of a grid or demo"),
    "backbones": ("backbones.cli:list_cli", "list registered backbones"),
    "check-backbone": ("backbones.cli:check_cli", "run the backbone contract suite on a backbone"),
    "demo": ("ablations.demo:cli", "the whole pipeline on the embedded dataset"),
    "bench": ("benchmarks.run:cli", "speed and memory benchmarks, as ratios vs peers"),
    "regress": ("reports.regress:cli", "compare a candidate against a baseline"),
}


def _usage() -> str:
    lines = ["usage: ttm-bench VERB [args]", "", "verbs:"]
    lines += [f"  {v:<15} {h}" for v, (_, h) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"ttm-bench: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    mod, _, fn = VERBS[verb][0].partition(":")
    try:
        return int(getattr(importlib.import_module(mod), fn)(rest) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"ttm-bench {verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
