#!/usr/bin/env bash
# From a trained run to everything BENCHMARKS.md reports about precision and engines, on the run's own
# product (data.root and data.category of RUN_DIR/config.yaml): export (with the onnxruntime-vs-PyTorch
# check), FP16 and INT8 variants (INT8 calibrated on the product's train/good), the FP32/FP16/INT8
# accuracy/size/CPU-speed table on its test set, and TensorRT-RTX engines of each variant (built on the
# CPU; sizes and build times from their sidecars).
# Usage: tools/benchmark_bundle.sh RUN_DIR [BUNDLE_DIR]
set -euo pipefail
run=${1:?usage: $0 RUN_DIR [BUNDLE_DIR]}
bundle=${2:-$run/bundle}
read -r category root < <(python -c 'import sys, yaml; d = yaml.safe_load(open(sys.argv[1]))["data"]; print(d["category"], d["root"])' "$run/config.yaml")
echo "product: $category under $root"
memseg-edge export "$run" --out "$bundle"
memseg-edge calibrate "$bundle" --images "$root/$category/train/good" --fp16 --quiet
python "$(dirname "$0")/benchmark_precision.py" "$bundle" --data "$root" --category "$category" --json "$bundle/precision.json"
for p in fp32 fp16 int8; do
  memseg-edge build-engine "$bundle" --precision "$p" --backend tensorrt-rtx --max-batch 8 --out "$bundle/engines/model.rtx.$p.engine"
done
selection=$(python -c 'import json, sys; print(json.load(open(sys.argv[1])).get("memory_selection", "sum"))' "$bundle/model.json")
if [ "$selection" = patch ]; then
  echo "no plugin engine: the fused plugin serves the whole-image memory step, this bundle's is 'patch'"
else
  memseg-edge build-engine "$bundle" --precision fp16 --plugin --backend tensorrt-rtx --max-batch 8 \
    --out "$bundle/engines/model.rtx.fp16.plugin.engine"
fi
python - "$bundle/engines" <<'PY'
import json, sys, pathlib
print("| engine | precision | plugin | MB | build s | TensorRT |")
print("| --- | --- | --- | ---: | ---: | --- |")
for side in sorted(pathlib.Path(sys.argv[1]).glob("*.engine.json")):
    m = json.loads(side.read_text())
    print(f"| {m['engine_file']} | {m['precision']} | {'yes' if m['plugins'] else 'no'} | {m['engine_bytes'] / 1e6:.1f} | "
          f"{m['build_seconds']:.1f} | {m['flavour']} {m['trt_version']} |")
PY
