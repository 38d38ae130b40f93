#!/usr/bin/env bash
set -ex
cd "$(dirname "$0")/../../.."   # the repository root
lane() {
  p=$1; root=$2; d=runs/int8-c/$p; rm -rf $d; mkdir -p $d runs/int8-c/probe
  cp runs/k/$p-default/bundle/model.onnx runs/k/$p-default/bundle/model.json $d/
  memseg-edge calibrate $d --images $root/$p/train/good --num 256 --quiet --threads 1 > $d/calibrate.log 2>&1
  python tools/probe_precision.py runs/k/$p-default --bundle $d --variant I=runs/k/$p-default/bundle/model.int8.onnx \
    --data $root --category $p --textures ../shared/data/dtd/images --json runs/int8-c/probe/$p.json > runs/int8-c/probe/$p.log 2>&1
}
lane bottle ../shared/data/mvtec_ad &
lane magnetic_tile ../shared/data &
wait
echo CDONE
