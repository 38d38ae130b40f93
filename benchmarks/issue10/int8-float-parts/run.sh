#!/usr/bin/env bash
# The INT8 float-parts rule (BENCHMARKS.md): I, X, H, G calibrated on each run's bundle, then the probe.
# Usage (from anywhere): benchmarks/issue10/int8-float-parts/run.sh RUN ROOT   (one product per call)
set -ex
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../../.."   # the repository root
run=$1; root=$2
p=$(python -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["category"])' "$run/config.yaml")
out=runs/int8-parts/$p; rm -rf "$out"; mkdir -p "$out"
[ -f "$run/bundle/model.onnx" ] || memseg-edge export "$run" --out "$run/bundle"
memseg-edge calibrate "$run/bundle" --images "$root/$p/train/good" --quiet --threads 1 > "$out/calibrate-I.log" 2>&1
python "$here/readers.py" "$run/bundle/model.onnx" "$run/bundle/model.json" > "$out/X-readers.txt"
keep_X=(); while read -r n; do keep_X+=(--keep-fp32 "$n"); done < "$out/X-readers.txt"
keep_H=(--keep-fp32 /model/decoder/final_up --keep-fp32 /model/decoder/head)
keep_G=(--keep-fp32 /model/fusion/)
for c in X H G; do
  mkdir -p "$out/$c"; cp "$run/bundle/model.onnx" "$run/bundle/model.json" "$out/$c/"
  declare -n keep="keep_$c"
  memseg-edge calibrate "$out/$c" --images "$root/$p/train/good" --quiet --threads 1 "${keep[@]}" > "$out/calibrate-$c.log" 2>&1
done
python tools/probe_precision.py "$run" --variant X="$out/X/model.int8.onnx" --variant H="$out/H/model.int8.onnx" \
  --variant G="$out/G/model.int8.onnx" --data "$root" --category "$p" --textures ../shared/data/dtd/images \
  --json "$out/probe.json" > "$out/probe.log" 2>&1
echo "done $p"
