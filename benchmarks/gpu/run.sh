#!/usr/bin/env bash
# One prepared GPU run of vllm-sab (issue 16): CUDA tests, kernel timings, transformers
# decode and a calibration timing, each in its own time box, in <= 8 minutes wall.
#
#   bash benchmarks/gpu/run.sh            # on the GPU machine (writes to $OUT)
#   bash benchmarks/gpu/run.sh --dry-run  # CPU, TRITON_INTERPRET=1, tiny shapes (CI)
#
# Outputs in $OUT (default .scratch/gpu-run or .scratch/gpu-dry-run): run.log, pytest.log,
# kernels.json, decode.json, calibrate.json, results.json, results.md, kernels.png (8 files,
# the device tool's limit; warm.json goes to a temporary folder).
# A part that fails or runs out of its time box loses only its own remaining rows; the
# script exits non-zero if any part failed, after all of them ran.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
REPO="$PWD"

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if (( DRY )); then
    OUT="${OUT:-$REPO/.scratch/gpu-dry-run}"
else
    OUT="${OUT:-$REPO/.scratch/gpu-run}"
fi
mkdir -p "$OUT"
WORK="$(mktemp -d -t sab-gpu-XXXXXX)"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; else PY="$(command -v python3)"; fi

if (( DRY )); then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    DRYFLAG=(--dry-run)
    # seconds: hard limit (timeout) and the part's own soft budget
    B_TESTS=120; B_WARM=60; B_KERNELS=90; S_KERNELS=60; B_DECODE=90; S_DECODE=60; B_CAL=120; S_CAL=100
else
    unset TRITON_INTERPRET
    DRYFLAG=()
    B_TESTS=110; B_WARM=100; B_KERNELS=160; S_KERNELS=140; B_DECODE=110; S_DECODE=95; B_CAL=75; S_CAL=65
fi
echo "== sab GPU run (dry=$DRY) in $REPO, python $PY, out $OUT"

# --- setup: vllm_sab.kernels / vllm_sab.calibrate live in kernels/ and calibrate/ (package-dir
# mapping), so a plain PYTHONPATH cannot import them: install editable (offline, no deps), or
# fall back to a symlink tree that has the installed layout.
importable() { "$PY" -c "import vllm_sab.kernels.triton_kernel, vllm_sab.calibrate.cli" >/dev/null 2>&1; }
if [[ "${SAB_GPU_SETUP:-}" == "shim" ]] || ! importable; then
    if [[ "${SAB_GPU_SETUP:-}" != "shim" ]]; then
        echo "== installing vllm-sab editable (--no-deps --no-build-isolation --no-index)"
        "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO" 2>&1 | tail -n 3
    fi
    if [[ "${SAB_GPU_SETUP:-}" == "shim" ]] || ! importable; then
        echo "== editable install unusable: symlink tree at $WORK/shim"
        mkdir -p "$WORK/shim/vllm_sab"
        for f in "$REPO"/vllm_sab/*; do ln -sfn "$f" "$WORK/shim/vllm_sab/$(basename "$f")"; done
        ln -sfn "$REPO/kernels" "$WORK/shim/vllm_sab/kernels"
        ln -sfn "$REPO/calibrate" "$WORK/shim/vllm_sab/calibrate"
        export PYTHONPATH="$WORK/shim${PYTHONPATH:+:$PYTHONPATH}"
        export PYTHONSAFEPATH=1  # the checkout's own vllm_sab/ (no kernels/ inside) must not shadow it
    fi
fi
"$PY" -c "import vllm_sab.kernels.triton_kernel as t; print('== vllm_sab.kernels from', t.__file__)" || {
    echo "== FATAL: vllm_sab.kernels does not import"; exit 2; }

declare -a STATUS=()
part() {  # part NAME HARD_LIMIT_S CMD...
    local name=$1 limit=$2 t=$(date +%s) rc
    shift 2
    echo "== [$(elapsed)s] $name (time box ${limit}s)"
    timeout -k 5 "$limit" "$@"
    rc=$?
    echo "== [$(elapsed)s] $name: rc=$rc after $(( $(date +%s) - t ))s"
    STATUS+=("$name=$rc")
}
BENCH=("$PY" "$REPO/benchmarks/gpu/bench.py")

# --- (a) CUDA tests (on CPU they are collected and skip: "needs CUDA"), with the kernel cache
# warmed for the timed parts in parallel on the GPU machine.
XDIST=()
if (( ! DRY )) && "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST=(-n 6); fi
# The log goes to pytest.log; its tail to the console.
TESTS=(bash -c '"$@" >"$0" 2>&1; rc=$?; tail -n 25 "$0"; exit $rc' "$OUT/pytest.log"
       "$PY" -m pytest -m cuda -q -p no:cacheprovider "${XDIST[@]}" tests/test_triton_kernels.py tests/test_kernels.py)
if (( DRY )); then
    part tests "$B_TESTS" "${TESTS[@]}"
    part warm "$B_WARM" "${BENCH[@]}" warm --out "$WORK" --budget-s "$B_WARM" "${DRYFLAG[@]}"
else
    timeout -k 5 "$B_WARM" "${BENCH[@]}" warm --out "$WORK" --budget-s "$B_WARM" >"$WORK/warm.log" 2>&1 &
    WARM_PID=$!
    part tests "$B_TESTS" "${TESTS[@]}"
    wait "$WARM_PID"; rc=$?
    echo "== [$(elapsed)s] warm: rc=$rc, $(grep -c '"result"' "$WORK/warm.json" 2>/dev/null || echo 0) variants compiled; log tail:"
    tail -n 3 "$WORK/warm.log"
    STATUS+=("warm=$rc")
fi

# --- (b) kernels vs cuBLAS, (c) decode, (d) calibration, then the report.
part kernels "$B_KERNELS" "${BENCH[@]}" kernels --out "$OUT" --budget-s "$S_KERNELS" "${DRYFLAG[@]}"
part decode "$B_DECODE" "${BENCH[@]}" decode --out "$OUT" --budget-s "$S_DECODE" "${DRYFLAG[@]}"
part calibrate "$B_CAL" "${BENCH[@]}" calibrate --out "$OUT" --budget-s "$S_CAL" "${DRYFLAG[@]}"
part report 30 "${BENCH[@]}" report --out "$OUT" "${DRYFLAG[@]}"

rm -rf "$WORK"
echo "== done in $(elapsed)s: ${STATUS[*]}"
for s in "${STATUS[@]}"; do [[ "${s#*=}" == 0 ]] || exit 1; done
exit 0
