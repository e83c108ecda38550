#!/usr/bin/env bash
# Every GPU check in one call: the training-step figure of the open target (vitl) first, then the
# CUDA-only tests, vits and vitb, and the data pipeline on the machine's cores. The whole script
# keeps to DEADLINE seconds (default 480): each part runs under its own limit, cut to the time
# left, and a part with under 30 s left is skipped, so a slow part costs only what comes after it.
# The GPU machine lacks a few packages: `make gpu-wheels` here puts them in .whl/, which the call
# carries (WHEELS names another folder). Logs and JSON land in $OUT (default benchmarks/results/gpu).
#
# TRAIN_STEP_ARGS, DATA_ARGS and PYTEST_ARGS are appended to the parts' commands (argparse keeps
# the last value of an option), so the same script runs as a short smoke test on the CPU
# (tests/test_benchmarks.py).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
DEADLINE=${DEADLINE:-480}
read -r -a train_step_args <<< "${TRAIN_STEP_ARGS:-}"
read -r -a data_args <<< "${DATA_ARGS:-}"
read -r -a pytest_args <<< "${PYTEST_ARGS:-}"
mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# without the carried wheels every part would fail on its first import: stop here, saying so
python3 -c "import omegaconf, webdataset, braceexpand" 2>/dev/null \
    || { echo "missing omegaconf/webdataset/braceexpand: run make gpu-wheels and carry .whl" | tee "$OUT/gpu.txt"; exit 2; }
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; } \
    | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)" \
    | tee -a "$OUT/gpu.txt"

part() {  # part NAME SECONDS COMMAND...: one step, its log in $OUT/NAME.log
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS))
    shift 2
    if (( left < 30 )); then
        echo "== $name: skipped, ${left}s left of ${DEADLINE}s" | tee "$OUT/$name.log"
        return
    fi
    (( limit > left )) && limit=$left
    echo "== $name (limit ${limit}s): $*"
    # SIGTERM at the limit, SIGKILL 15 s later: a compile or a step in progress must not outlive it
    timeout -k 15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after ${SECONDS}s"
}

# vitl >= 100 img/s is the open target: bf16 compiled at batch 32, the step alone and through the Trainer
part vitl 230 python3 benchmarks/train_step.py --encoders vitl --modes bf16-compile --batch 32 --trainer \
    --json "$OUT/train_step_vitl.json" "${train_step_args[@]}"
part cuda_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_late_read.py tests/test_optim.py \
    tests/test_worker_buffers.py tests/test_layers.py tests/test_train.py::test_training_steps_never_wait_for_the_device \
    tests/test_equivalence.py::test_fused_adamw_matches_foreach "${pytest_args[@]}"
# the trainer column once (vitl) is enough: it costs each encoder a Lightning start-up
part vits_vitb 150 python3 benchmarks/train_step.py --encoders vits,vitb --modes bf16-compile \
    --json "$OUT/train_step_vits_vitb.json" "${train_step_args[@]}"
part data_pipeline 90 python3 benchmarks/data_pipeline.py --workers "1,$(nproc)" --json "$OUT/data_pipeline.json" \
    "${data_args[@]}"
