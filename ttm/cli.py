"""`ttm-bench VERB ...`: one command, verbs dispatched to the module that owns them."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

from ttm.util import Terminated

# verb -> ("module:function", help). Each function takes argv (list[str]) and returns an exit code.
VERBS: dict[str, tuple[str, str]] = {
    "data": ("ttm.data_cli:main", "build / import / tokenize datasets"),
    "train": ("ttm.runs:train_cli", "train one run from a YAML config"),
    "generate": ("ttm.runs:generate_cli", "generate audio from captions with a trained run"),
    "eval": ("eval.runner:cli", "evaluate generated audio against a reference"),
    "grid": ("ablations.runner:cli", "run an ablation grid (Optuna storage)"),
    "report": ("reports.shipped:report_cli", "report of a grid or demo (--beside: next to shipped results)"),
    "ship": ("reports.shipped:ship_cli", "write a grid's small result files to ship (reports/results/NAME)"),
    "backbones": ("backbones.cli:list_cli", "list registered backbones"),
    "check-backbone": ("backbones.cli:check_cli", "run the backbone contract suite on a backbone"),
    "demo": ("ablations.demo:cli", "the whole pipeline on the embedded dataset"),
    "bench": ("benchmarks.run:cli", "speed and memory benchmarks, as ratios vs peers"),
    "regress": ("reports.regress:cli", "compare a candidate against a baseline"),
    "findings": ("reports.findings:cli", "the findings page of the shipped results (reports/results)"),
    "results": ("ablations.results:cli", "rerun the shipped grids, ship them, rebuild the findings page"),
}


def _usage() -> str:
    lines = ["usage: ttm-bench VERB [args]", "", "verbs:"]
    lines += [f"  {v:<15} {h}" for v, (_, h) in VERBS.items()]
    return "\n".join(lines)


# Expected failures: bad input, files, missing optional packages. One line, exit 2.
EXPECTED = (ValueError, OSError, ImportError, EOFError, SyntaxError, LookupError)


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run one verb. Expected failures print one line (`ttm-bench VERB: error: ...`, exit 2);
    anything else prints one line and exit 1; `--debug` (anywhere) or TTM_DEBUG=1 re-raises with
    the traceback. Ctrl-C exits 130, SIGTERM 143."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TTM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"ttm-bench: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    mod, _, fn = VERBS[verb][0].partition(":")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return int(getattr(importlib.import_module(mod), fn)(rest) or 0)
    except KeyboardInterrupt as e:
        if debug:
            raise
        code = 143 if isinstance(e, Terminated) else 130
        print(f"ttm-bench {verb}: {'terminated' if code == 143 else 'interrupted'}", file=sys.stderr)
        return code
    except EXPECTED as e:
        if debug:
            raise
        print(f"ttm-bench {verb}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 -- an unexpected failure: still one line, traceback on request
        if debug:
            raise
        print(f"ttm-bench {verb}: internal error: {type(e).__name__}: {_one_line(e)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, LookupError):
        msg = f"{type(e).__name__}: {msg}"
    return msg


if __name__ == "__main__":
    sys.exit(main())
