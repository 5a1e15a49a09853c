#!/bin/sh
# The ViT benchmark of docs/vit.md (issue 22), stage by stage in priority order. Every stage is
# benchmarks/fashion.py with a ViT preset; runs are cached in benchmarks/results/fashion_runs_<preset>.jsonl, so
# a stage repeats nothing an earlier one ran, and the script resumes where it was stopped.
#   nohup nice -n 10 sh benchmarks/vit_fashion.sh > /tmp/vit_bench.log 2>&1 &      # 2 CPU cores, one worker
#   PRESET=vit_gpu WORKERS=8 sh benchmarks/vit_fashion.sh --device cuda             # one GPU
set -e
cd "$(dirname "$0")/.."
PRESET=${PRESET:-vit_gap}
run() { python benchmarks/fashion.py --preset "$PRESET" --workers "${WORKERS:-1}" "$@"; }
BASE="base (LSQ QAT)"; SAQ="SAQ (case 3)"; PREV="SAQ prev_grad"
# 1. plain AdamW QAT vs SAQ at 2 paired seeds: w4a4 (the headline), then w2a2 (where the gap to float is larger)
run --bits 4 --methods "$BASE" "$SAQ" --seeds 2 --report "fashion_${PRESET}_w4" "$@"
run --bits 2 4 --methods "$BASE" "$SAQ" --seeds 2 --report "fashion_${PRESET}_w24" "$@"
# 2. 10 paired seeds at both, then the one-pass strategy (its own rho sweep)
run --bits 2 4 --methods "$BASE" "$SAQ" --seeds 10 --report "fashion_${PRESET}_w24" "$@"
run --bits 2 4 --methods "$BASE" "$SAQ" "$PREV" --seeds 10 --report "fashion_${PRESET}_w24" "$@"
# 3. SAM on the quantized model (3 seeds) and w3a3 (rho of the nearer swept bit-width)
run --bits 2 3 4 --methods "$BASE" "$SAQ" "$PREV" "SAM" --seeds 10 --other-seeds 3 "$@"
# 4. the float control: the same AdamW fine-tune without quantization, with and without SAM
run --bits 32 --methods "float fine-tune (SGD)" "float fine-tune (SAM)" --seeds 10 --report "fashion_${PRESET}_float" "$@"
# 5. the diagnoses, on float models trained again (paired among themselves, cache and floats in their own folder):
#    at w4a4 (where SAQ wins) which tensors SAQ perturbs, ASAM, and 4x the fine-tune's length; at w2a2 the length.
#    rho fixed to the sweep's choice of stage 1 (0.05 at w4a4, 0.02 at w2a2). vit_gap's: in a folder of their own,
#    with float models trained again on another machine (stages 1-4's were not kept)
D=benchmarks/results
if [ "$PRESET" = vit_gap ]; then D=benchmarks/results/vit_gap_avx512; fi
run --bits 4 --methods "$BASE" "$SAQ" --seeds 10 --rhos 0.05 --diagnose --diagnose-bits 4 --diagnoses \
    "no perturbation of LayerNorm" "no perturbation of pos_embed/cls_token" "no perturbation of norm/bias" \
    "ASAM (adaptive), rho 0.5" "4x QAT epochs" --report "fashion_${PRESET}_w4_diag" --out "$D" "$@"
run --bits 4 --methods "$BASE" "$SAQ" "SAQ ASAM" --seeds 10 --rhos 0.05 --method-rhos "SAQ ASAM=0.1,0.2,0.5,1,2" \
    --report "fashion_${PRESET}_w4_asam" --out "$D" "$@"
run --bits 2 --methods "$BASE" "$SAQ" --seeds 10 --rhos 0.02 --diagnose --diagnose-bits 2 --diagnoses \
    "4x QAT epochs" --report "fashion_${PRESET}_w2_diag" --out "$D" "$@"
# 6. more data (10,000 augmented images): w4a4 and w2a2, plain QAT vs SAQ (rho swept at both)
if [ "$PRESET" = vit_gap ]; then
    PRESET=vit_cpu run --bits 2 4 --methods "$BASE" "$SAQ" --seeds 10 --rhos 0.01 0.02 0.05 --sweep-bits 2 4 \
        --report fashion_vit_cpu "$@"
fi
