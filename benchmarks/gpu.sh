#!/usr/bin/env bash
# One-shot GPU benchmark: the six seed methods on a random ViT-B/16, fp32 and bf16, side by side
# with lime_image and captum (benchmarks/bench.py), in under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu.sh            # on the GPU machine; JSON to benchmarks/results/
#   bash benchmarks/gpu.sh --smoke    # the same commands on the CPU with the bundled model and
#                                     # tiny sample counts (--quick), JSON to a temporary folder
#
# Each precision gets at most $BUDGET seconds (a run over it is stopped, the next one still
# runs). Rows: floor; vitxai lime, kernel_shap (1000 samples), paired orthogonal-array LIME and
# paired leverage-sampled KernelSHAP, both with the logistic surrogate, at the counts where
# benchmarks/convergence.py found them as accurate as lime_image / captum's KernelShap at 1000
# samples, integrated_gradients (50 steps), gradient_shap (50 samples), attention_rollout and
# chefer2021a on the shared pass;
# paired LIME and KernelSHAP on removed patch tokens (removal="drop") at 1000 samples; lime_image (batch 10 and 64) and captum Lime, KernelShap (perturbations_per_eval
# 1 and 64), IntegratedGradients and GradientShap. The bf16 run keeps the references in fp32,
# as people run them.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; fi
METHODS=lime,kernel_shap,integrated_gradients,gradient_shap,attention_rollout,chefer2021a
EQUAL_ERROR=${EQUAL_ERROR:-lime=316,kernel_shap=224}  # benchmarks/results/convergence.md
export HF_HUB_OFFLINE=1  # random weights: nothing to download

if [[ $SMOKE == 1 ]]; then
    MODEL=bundled DEVICE=cpu IMAGES=1 BUDGET=300 OUT=$(mktemp -d)
    EXTRA=(--quick --equal-error lime=10,kernel_shap=10 --sampling leverage --surrogate logistic
           --lime-sampling orthogonal)
else
    MODEL=vit_base_patch16_224 DEVICE=cuda IMAGES=4 BUDGET=225 OUT=benchmarks/results
    EXTRA=(--samples 1000 --repeats 1 --equal-error "$EQUAL_ERROR" --sampling leverage
           --surrogate logistic --lime-sampling orthogonal)
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi

status=0
for precision in fp32 bf16; do
    name=$([[ $SMOKE == 1 ]] && echo smoke || echo vit-b16-gpu)-$precision
    start=$(date +%s)
    if ! timeout "$BUDGET" python benchmarks/bench.py --model "$MODEL" --device "$DEVICE" \
            --precision "$precision" --reference-precision fp32 --images "$IMAGES" \
            --sections floor,vitxai,tokens,references --only "$METHODS" "${EXTRA[@]}" \
            --out "$OUT/$name.json"; then
        echo "gpu.sh: the $precision run failed or passed ${BUDGET} s" >&2
        status=1
    fi
    echo "gpu.sh: $precision took $(( $(date +%s) - start )) s; results $OUT/$name.json"
done
exit $status
