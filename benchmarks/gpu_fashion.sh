#!/usr/bin/env bash
# Fashion-MNIST accuracy on one GPU in under 10 minutes: ResNet-20 with one input channel (the paper's CIFAR
# network) on the full training set, data kept on the card, 14 runs at once, seed-major order (a run cut off by
# the time limit leaves whole seeds), then the table from whatever finished. Needs only torch, torchvision,
# timm, safetensors, scipy, matplotlib (what the card's machine has): saq runs from src/ without installing.
#   bash benchmarks/gpu_fashion.sh [DATA_DIR] [OUT_DIR] [SECONDS]   (DATA_DIR: the four Fashion-MNIST IDX files)
set -uo pipefail
cd "$(dirname "$0")/.."
data="${1:-.data/fashion-mnist}"
out="${2:-benchmarks/results}"
budget="${3:-450}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__)"
[ -n "${PROBE:-}" ] && python benchmarks/gpu_throughput.py --data-dir "$data" --procs 1 14 --batches 30 | tee "$out/gpu_throughput.md"
# Sized to one loan from the H200 throughput measured (85 QAT iterations/s over 14 runs, ~2 min for the float
# models): 3 seeds x 2 bit-widths x (LSQ, LIQ_wn) x (base, SAQ) x 4 QAT epochs ~ 6 min. The whole protocol
# (--seeds 5, 10 epochs, every method, a rho sweep) needs ~30 min: run it in parts, or make the step faster.
args=(--preset gpu --device cuda --data-dir "$data" --out "$out" --float-dir /tmp/fashion_float --workers 14
      --bits 2 4 --seeds "${SEEDS:-3}" --other-seeds 3 --rhos 0.05 --float-epochs 12 --qat-epochs "${QAT_EPOCHS:-4}"
      --methods "base (LSQ QAT)" "SAQ (case 3)" "base (LIQ_wn)" "SAQ (LIQ_wn)")
timeout "$budget" python benchmarks/fashion.py "${args[@]}"
python benchmarks/fashion.py "${args[@]}" --report-only
