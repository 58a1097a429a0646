#!/usr/bin/env bash
# The suite's check on a CUDA machine: kernels, torch.compile and our fast pure paths vs the
# pure-PyTorch references, a decoding step under CUDA graphs (torch.compile reduce-overhead),
# bf16 training throughput and MFU at the study's full scale, decoding speed.
# Writes $OUT/gpu_check.json (./gpu_check.json when OUT is unset). Finishes in under 8 minutes:
# the Python script guards its own budget (--budget-s, default 450 s) and this wrapper kills
# it at 470 s in any case. Without CUDA it says so and exits 0.
#
#   bash benchmarks/gpu_check.sh [--sections env,peak,train,decode,kernels] [--no-compile] ...
#
# The interpreter: $PYTHON if set, else the first of .venv/bin/python, python3, python that
# imports torch with CUDA (else the first that imports torch, which then reports no CUDA).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

pick_python() {
    local c first=""
    for c in "${PYTHON:-}" .venv/bin/python python3 python; do
        [ -n "$c" ] || continue
        command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
        "$c" -c "import torch" >/dev/null 2>&1 || continue
        [ -n "$first" ] || first="$c"
        if "$c" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
            echo "$c"
            return 0
        fi
    done
    [ -n "$first" ] || return 1
    echo "$first"
}

PY="$(pick_python)" || { echo "gpu_check: no Python with torch found (set PYTHON=...)"; exit 1; }
echo "[$(date +%H:%M:%S)] gpu_check: using $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/  gpu: /'
fi

if command -v timeout >/dev/null 2>&1; then
    timeout --signal=INT --kill-after=10 470 "$PY" benchmarks/gpu_check.py "$@"
else
    "$PY" benchmarks/gpu_check.py "$@"
fi
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ]; then
    echo "[$(date +%H:%M:%S)] gpu_check: stopped by the 470 s wrapper limit; sections finished before it are in ${OUT:-.}/gpu_check.json"
fi
exit "$rc"
