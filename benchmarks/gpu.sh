#!/usr/bin/env bash
# Every GPU check and timing of the cost issue, in stages sized to fit one 10-minute device call each pair.
# Needs only torch, torchvision, timm, triton and pytest (what the card's machine has): saq runs from src/
# without installing.
#   bash benchmarks/gpu.sh [OUT_DIR] [STAGE...]     (default benchmarks/results; stages: all but compiled)
# Stages, with their expected time on one H100:
#   tests     the Triton LSQ kernels against the torch maths and the float64 reference, on CUDA (~1 min)
#   lsq       LSQ forward+backward per ResNet-50 tensor: ours, unfused, PyTorch's learnable, Triton (~1 min)
#   triton    the training-step table of the CNNs with the Triton LSQ op (~2 min)
#   profile   ResNet-20/50 steps profiled: GPU busy vs gaps per method, top kernels; autograd and Triton LSQ (~2 min)
#   eager     the full training-step table, every model, eager (~5 min)
#   compiled  the CNNs under torch.compile (~1 min compilation per model and method)
# Suggested loan: `bash benchmarks/gpu.sh OUT tests lsq triton profile` then `bash benchmarks/gpu.sh OUT eager`.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
shift || true
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests lsq triton eager)
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, torchvision, timm, triton; print('torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'timm', timm.__version__, 'triton', triton.__version__)"
status=0
for stage in "${stages[@]}"; do
  echo "== $stage"
  case "$stage" in
    tests) python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_quantizer.py \
             2>&1 | tee "$out/gpu_kernel_tests.log" || status=1 ;;
    lsq) python benchmarks/lsq_speed.py --device cuda --batch 32 --out "$out/lsq_cuda.md" || status=1 ;;
    triton) python benchmarks/cost.py --device cuda --amp --lsq-backend triton --only resnet20 resnet50 \
              --rounds 5 --iters 5 --warmup 3 --no-lsq --out "$out/cost_cuda_triton.md" || status=1 ;;
    profile) for m in resnet20 resnet50; do for b in autograd triton; do
               python benchmarks/profile_step.py --device cuda --amp --model $m --lsq-backend $b --steps 10 \
                 2>&1 | tee "$out/profile_cuda_${m}_$b.txt" || status=1; done; done ;;
    eager) python benchmarks/cost.py --device cuda --amp --rounds 5 --iters 5 --warmup 3 \
             --out "$out/cost_cuda.md" || status=1 ;;
    compiled) python benchmarks/cost.py --device cuda --amp --compile --only resnet20 resnet50 --rounds 5 \
                --iters 5 --warmup 5 --out "$out/cost_cuda_compiled.md" || status=1 ;;
    *) echo "unknown stage $stage (tests, lsq, triton, profile, eager, compiled)"; status=1 ;;
  esac
done
exit $status
