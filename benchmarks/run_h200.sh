#!/usr/bin/env bash
# The GPU variant of the speed benchmark: every part of benchmarks/speed.py on CIFAR-10
# with a full-width ResNet-18 (CIFAR stem) at batch 256 and 512, on one GPU. It is meant
# for an H200 with its own PyTorch 2.11 and torchvision 0.26 and needs nothing else of
# this project's environment. The run is capped at LIMIT_S seconds (default 280).
# NOTE: it has run on a CPU in tiny mode only; its GPU run time is an estimate.
#
#   1. here:            DCL_DATA_ROOT=/path/to/data bash benchmarks/prepare_payload.sh
#   2. on the GPU host: bash benchmarks/run_h200.sh OUT_DIR   (default OUT_DIR: $OUT, else docs)
#   3. copy OUT_DIR/benchmarks_h200.{md,csv} into docs/ and rerun benchmarks/speed.py,
#      whose page then shows the GPU table.
#
# TINY=1 DEVICE=cpu runs the same path on a CPU in seconds, to check it before a GPU run.
set -euo pipefail
payload=benchmarks/payload
if [[ ! -f $payload/cifar10_train.npz ]]; then
    echo "no $payload/cifar10_train.npz: run benchmarks/prepare_payload.sh first" >&2
    exit 2
fi
out=${1:-${OUT:-docs}}
mkdir -p "$out"
# The payload's pure-Python packages come before the machine's own site-packages.
export PYTHONPATH="$PWD:$PWD/$payload/site"
export OMP_WAIT_POLICY=PASSIVE
python=${PYTHON:-python}
args=(--device "${DEVICE:-cuda}" --data "$payload/cifar10_train.npz" --config "$payload/settings.json"
      --out-md "$out/benchmarks_h200.md" --out-csv "$out/benchmarks_h200.csv" --gpu-csv none)
if [[ -n ${TINY:-} ]]; then
    args+=(--tiny)
else
    args+=(--threads 16 --width 64 --batches 256 512 --full-width-steps 0 --precision bf16
           --lever-batch 512 --rounds 2 --warmup 3 --steps 10)
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
"$python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
timeout "${LIMIT_S:-280}" "$python" -m benchmarks.speed "${args[@]}"
