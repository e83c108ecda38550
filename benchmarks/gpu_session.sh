#!/usr/bin/env bash
# Every GPU check in one call: the CUDA-only tests, then the training-step figures of
# benchmarks/RESULTS.md (the open target first), then the data pipeline on the machine's cores.
# About 9 minutes on one H100/H200; each part has its own time limit, so a slow part costs only
# itself. The GPU machine lacks a few packages: `make gpu-wheels` here puts them in .whl/, which
# the call carries. Logs and JSON land in $OUT (default benchmarks/results/gpu).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)" \
    | tee -a "$OUT/gpu.txt"

part() {  # part NAME SECONDS COMMAND...: one step, its log in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

part cuda_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_late_read.py tests/test_optim.py \
    tests/test_worker_buffers.py tests/test_layers.py tests/test_train.py::test_training_steps_never_wait_for_the_device \
    tests/test_equivalence.py::test_fused_adamw_matches_foreach
# vitl >= 100 img/s is the open target: bf16 compiled at batch 32, the step alone and through the Trainer
part vitl 230 python3 benchmarks/train_step.py --encoders vitl --modes bf16-compile --batch 32 --trainer \
    --json "$OUT/train_step_vitl.json"
part vits_vitb 170 python3 benchmarks/train_step.py --encoders vits,vitb --modes bf16-compile --trainer \
    --json "$OUT/train_step_vits_vitb.json"
part data_pipeline 90 python3 benchmarks/data_pipeline.py --workers "1,$(nproc)" --json "$OUT/data_pipeline.json"
