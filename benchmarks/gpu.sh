#!/usr/bin/env bash
# GPU cost tables: eager (under 5 minutes on one H100-class card), then the compiled CNNs (not yet timed). Needs only torch, torchvision and timm
# (what the card's machine has): saq runs from src/ without installing.
#   bash benchmarks/gpu.sh [OUT_DIR]      (default benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
python benchmarks/cost.py --device cuda --amp --rounds 5 --iters 5 --warmup 3 --out "$out/cost_cuda.md"
# the same table with every forward under torch.compile (the cost issue's "both compiled" targets); the
# CNNs only, which compile in about a minute each
python benchmarks/cost.py --device cuda --amp --compile --only resnet20 resnet50 --rounds 5 --iters 5 --warmup 5 \
    --out "$out/cost_cuda_compiled.md" || echo "compiled table FAILED (the eager table above stands)"
