#!/usr/bin/env bash
# Train and evaluate MemSeg on MVTec AD bottle with the offline MobileNetV2 weights and DTD textures,
# as BENCHMARKS.md reports it. Usage: tools/benchmark_bottle.sh short|default [OUT_DIR] [extra train options]
#   short:   --iterations 400, every other option at its default (target: < 10 min on 2 CPU cores)
#   default: the default recipe (2700 iterations)
# Prints the training wall time and the evaluation table; writes OUT_DIR/{checkpoint.pt,metrics.json,plots/}.
set -euo pipefail
recipe=${1:?usage: $0 short|default [OUT_DIR] [extra train options]}
out=${2:-runs/bottle-$recipe}
shift $(( $# >= 2 ? 2 : 1 ))
shared=${SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
case $recipe in
  short) iters=(--iterations 400) ;;
  default) iters=() ;;
  *) echo "recipe must be short or default" >&2; exit 2 ;;
esac
echo "machine: $(nproc) CPU cores, $(python -c 'import platform; print(platform.processor() or platform.machine())'), torch $(python -c 'import torch; print(torch.__version__, "threads", torch.get_num_threads())')"
start=$(date +%s)
memseg-edge train --data "$shared/data/mvtec_ad" --category bottle --backbone mobilenet_v2 \
  --backbone-weights "$shared/weights/mobilenet_v2-imagenet-features.pth" \
  --textures "$shared/data/dtd/images" "${iters[@]}" --out "$out" "$@"
end=$(date +%s)
echo "training wall time (process start to checkpoint written): $((end - start)) s"
memseg-edge eval "$out/checkpoint.pt" --data "$shared/data/mvtec_ad" --category bottle \
  --json "$out/metrics.json" --plots "$out/plots" --quiet
