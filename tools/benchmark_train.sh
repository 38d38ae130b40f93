#!/usr/bin/env bash
# Train and evaluate MemSeg on one product with the offline MobileNetV2 weights and DTD textures, as
# BENCHMARKS.md reports it. Usage: tools/benchmark_train.sh CATEGORY short|default [OUT_DIR] [extra train options]
#   CATEGORY: bottle (../shared/data/mvtec_ad) or magnetic_tile (../shared/data), or any category under
#             $DATA_ROOT if set
#   short:    --iterations 400, every other option at its default (target: < 10 min on 2 CPU cores)
#   default:  the default recipe (2700 iterations)
# Prints the training wall time and the evaluation table; writes OUT_DIR/{checkpoint.pt,metrics.json,plots/}.
set -euo pipefail
category=${1:?usage: $0 CATEGORY short|default [OUT_DIR] [extra train options]}
recipe=${2:?usage: $0 CATEGORY short|default [OUT_DIR] [extra train options]}
out=${3:-runs/$category-$recipe}
shift $(( $# >= 3 ? 3 : 2 ))
shared=${SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
if [ -n "${DATA_ROOT:-}" ]; then data=$DATA_ROOT
elif [ -d "$shared/data/mvtec_ad/$category" ]; then data=$shared/data/mvtec_ad
else data=$shared/data; fi
case $recipe in
  short) iters=(--iterations 400) ;;
  default) iters=() ;;
  *) echo "recipe must be short or default" >&2; exit 2 ;;
esac
echo "machine: $(nproc) CPU cores, $(python -c 'import platform; print(platform.processor() or platform.machine())'), torch $(python -c 'import torch; print(torch.__version__)')"
# A run stopped part-way (its checkpoint is written every train.checkpoint_every iterations) continues;
# the trainer then prints the training time summed over the run's sessions.
resume=()
if [ -f "$out/checkpoint.pt" ]; then resume=(--resume "$out"); echo "continuing the run in $out"; fi
start=$(date +%s)
memseg-edge train --data "$data" --category "$category" --backbone mobilenet_v2 \
  --backbone-weights "$shared/weights/mobilenet_v2-imagenet-features.pth" \
  --textures "$shared/data/dtd/images" "${iters[@]}" --out "$out" "${resume[@]}" "$@"
end=$(date +%s)
echo "training wall time of this session (process start to checkpoint written): $((end - start)) s"
memseg-edge eval "$out/checkpoint.pt" --data "$data" --category "$category" \
  --json "$out/metrics.json" --plots "$out/plots" --quiet
