#!/usr/bin/env bash
# Before/after on one machine: run bench cases on this checkout and on a git ref (e.g. main),
# alternating (ref, this, ref, this ...) so a change in load hits both, with the SAME case
# code (this checkout's benchmarks/ is copied over the ref's tree). Prints every run's table.
#
#   bash benchmarks/vs_ref.sh REF [ROUNDS] [CASES]
#   bash benchmarks/vs_ref.sh main 2 ssm_train_step,decode_at_length,mamba_vs_mambapy
#
# PYTHON (default: .venv/bin/python, else python3) runs the cases; BENCH_ARGS adds flags to
# every run (default: --quick). Records go to runs/bench/vs_ref.jsonl.
set -euo pipefail

cd "$(dirname "$0")/.." || exit 1
HERE="$PWD"
REF="${1:?usage: vs_ref.sh REF [ROUNDS] [CASES]}"
ROUNDS="${2:-2}"
CASES="${3:-ssm_train_step,decode_at_length,mamba_vs_mambapy}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo "$HERE/.venv/bin/python" || command -v python3 )}"
ARGS="${BENCH_ARGS:---quick}"
OUT="$HERE/runs/bench/vs_ref.jsonl"
mkdir -p "$(dirname "$OUT")"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
git archive "$REF" | tar -x -C "$TMP"
rm -rf "$TMP/benchmarks" && cp -r "$HERE/benchmarks" "$TMP/benchmarks"

for r in $(seq 1 "$ROUNDS"); do
    for tree in "$TMP" "$HERE"; do
        name=$([ "$tree" = "$HERE" ] && echo "this checkout" || echo "$REF")
        echo "=== round $r: $name"
        (cd "$tree" && PYTHONPATH="$tree" "$PY" -m benchmarks.run $ARGS --only "$CASES" --results "$OUT")
    done
done
