#!/usr/bin/env bash
# The first GPU hour (make gpu-check), as two parts that each fit one command of the device tool:
#   bash bench/gpu/check.sh 1       set-up, compile checks, GPU tests (the flow families' apart), kernel micro-benchmark
#   bash bench/gpu/check.sh 2       set-up (skipped when already done), the short sampling suite
#   bash bench/gpu/check.sh setup   the set-up alone;   bash bench/gpu/check.sh plan   the budget, runs nothing
# Set-up, offline, on the image's own interpreter ($PY, default python3: on the lent image a venv holding
# torch and triton, without diffusers): the wheels of $GPU_KIT (make gpu-kit) with --no-index --no-deps, then
# the project, editable, with --no-build-isolation --use-pep517 (setuptools from the image), then an import check.
# Each stage runs under a wall-clock timeout (SIGKILL $GRACE s after SIGTERM), even when an earlier one failed;
# its output goes to $GPU_CHECK_DIR/<stage>.log and "<stage> exit=N seconds=S" to stages-<part>.txt. A part
# exits non-zero when one of its stages failed.
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
GPU_KIT=${GPU_KIT:-.gpu-kit}
GPU_CHECK_DIR=${GPU_CHECK_DIR:-bench/results/gpu-check-$(date -u +%F)-$(git rev-parse --short HEAD 2>/dev/null)}
GRACE=5
export PY GPU_KIT
# nothing is fetched: random weights, no hub access (the lent machine has no network, where a lookup would hang)
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
SETUP_TIMEOUT=${SETUP_TIMEOUT:-35}
AOT_TIMEOUT=${AOT_TIMEOUT:-90}
GPU_TESTS_TIMEOUT=${GPU_TESTS_TIMEOUT:-110}
FLOW_TESTS_TIMEOUT=${FLOW_TESTS_TIMEOUT:-85}
KERNELS_TIMEOUT=${KERNELS_TIMEOUT:-150}
SUITE_TIMEOUT=${SUITE_TIMEOUT:-260}
# device tool limits (its README): 600 s a command; this plan: each part <= 540 s, both <= 810 s (13.5 min of the 15; the first run (H200, 2026-12-04) took: set-up 19 s, AOT 32 s, GPU tests 64 s, flow tests 57 s, kernels ~125 s, suite 158 s)
PART_LIMIT=540
TOTAL_LIMIT=810
SUITE="--models dit-xl-2-256 pixart-alpha-1024 --steps 20 --configs no-cache fora:2 harmonica
 --modes eager fused graphs graphs-step compile --repeat 3 --max-compiled-graphs 2"

IMPORT_CHECK='import sys, diffusers, torch, triton, harmonica.kernels; print("python", sys.version.split()[0],
 "torch", torch.__version__, "triton", triton.__version__, "diffusers", diffusers.__version__,
 "cuda", torch.cuda.is_available())'

setup() {
    # -I: not the working directory's egg-info, only what the interpreter has installed
    if "$PY" -I -c 'import importlib.metadata as m; m.version("harmonica-dit"); m.version("diffusers")' 2>/dev/null
    then
        echo "set-up: already done"
    else
        local wheels=("$GPU_KIT"/*.whl)
        [ -e "${wheels[0]}" ] || { echo "set-up: no wheels in $GPU_KIT (run make gpu-kit, carry it)"; return 2; }
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "${wheels[@]}" || return
        "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --no-build-isolation --use-pep517 -e . \
            || return
    fi
    "$PY" -c "$IMPORT_CHECK"
}

# stage <part> <name> <timeout> <command...>
stage() {
    local part=$1 name=$2 limit=$3 start rc
    shift 3
    echo "== $name (timeout $limit s)"
    start=$(date +%s)
    timeout -k $GRACE "$limit" "$@" 2>&1 | tee "$GPU_CHECK_DIR/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$name exit=$rc seconds=$(($(date +%s) - start))" | tee -a "$GPU_CHECK_DIR/stages-$part.txt"
}

# the stages of each part: name, timeout, command (word-split)
stages() {
    case $1 in
        1) echo "setup-1 $SETUP_TIMEOUT bash bench/gpu/check.sh setup"
           echo "aot-compile $AOT_TIMEOUT $PY -m pytest tests/test_aot_compile.py -q -p no:cacheprovider"
           echo "gpu-tests $GPU_TESTS_TIMEOUT $PY -m pytest -m gpu -v -p no:cacheprovider --durations=20" \
                "--ignore=tests/test_flow_graphs.py"
           echo "gpu-flow-tests $FLOW_TESTS_TIMEOUT $PY -m pytest -m gpu -v -p no:cacheprovider --durations=10" \
                "tests/test_flow_graphs.py"
           echo "kernels $KERNELS_TIMEOUT $PY -m harmonica.bench --part kernels --out $GPU_CHECK_DIR/kernels.json" ;;
        2) echo "setup-2 $SETUP_TIMEOUT bash bench/gpu/check.sh setup"
           echo "suite $SUITE_TIMEOUT $PY -m harmonica.bench --part suite" $SUITE \
                "--no-progress --out $GPU_CHECK_DIR/suite.json" ;;
    esac
}

run_part() {
    local part=$1 name limit command
    mkdir -p "$GPU_CHECK_DIR" && rm -f "$GPU_CHECK_DIR/stages-$part.txt"
    while read -r name limit command; do
        # shellcheck disable=SC2086
        stage "$part" "$name" "$limit" $command
    done < <(stages "$part")
    awk '$2 != "exit=0" {failed = 1; print "FAILED: " $0} END {exit failed}' "$GPU_CHECK_DIR/stages-$part.txt" \
        && echo "gpu-check part $part: every stage passed; results in $GPU_CHECK_DIR"
}

# worst case of a part: every stage at its timeout plus the kill grace
worst() {
    local total=0 name limit command
    while read -r name limit command; do total=$((total + limit + GRACE)); done < <(stages "$1")
    echo $total
}

plan() {
    local one two commit
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    one=$(worst 1) two=$(worst 2)
    echo "First GPU hour: two device commands (carry .gpu-kit: make gpu-kit here first). Worst case: every stage"
    echo "at its timeout, plus ${GRACE} s kill grace each. Results: the files under \$OUT (GPU_CHECK_DIR=\$OUT)."
    for part in 1 2; do
        echo
        echo "part $part: worst case $(worst $part) s (limit $PART_LIMIT s); device run:"
        echo "  run(command='PYTHONUNBUFFERED=1 HARMONICA_COMMIT=$commit GPU_CHECK_DIR=\$OUT bash bench/gpu/check.sh $part'," \
             "carry=['.gpu-kit'], timeout_s=$(($(worst $part) + 5)))"
        while read -r name limit command; do
            printf '  %-12s %4s s  %s\n' "$name" "$limit" "$command"
        done < <(stages "$part")
    done
    echo
    echo "result files: part 1: setup-1.log aot-compile.log gpu-tests.log gpu-flow-tests.log kernels.log kernels.json"
    echo "  stages-1.txt (7);"
    echo "  part 2: setup-2.log suite.log suite.json suite.png stages-2.txt (5); each part <= 8 (the device tool's limit)"
    echo "both parts: worst case $((one + two)) s (limit $TOTAL_LIMIT s)"
    [ "$one" -le $PART_LIMIT ] && [ "$two" -le $PART_LIMIT ] && [ $((one + two)) -le $TOTAL_LIMIT ] \
        || { echo "OVER THE LIMITS"; return 1; }
}

case ${1:-} in
    1|2) run_part "$1" ;;
    setup) setup ;;
    plan) plan ;;
    suite-args) echo $SUITE ;;
    *) echo "usage: bench/gpu/check.sh 1|2|setup|plan|suite-args"; exit 2 ;;
esac
