#!/usr/bin/env bash
# lane.sh CATEGORY DATA : seed 0 then seed 1, short recipe, feature_smoothing 1, one thread
set -u
cat=$1; data=$2; S=/work/shared
cd /work/main
for s in 0 1; do
  out=runs/nosmooth/$cat$([ $s = 1 ] && echo -seed1)
  memseg-edge train --config runs/nosmooth/k$s.yaml --data $data --category $cat --backbone mobilenet_v2 \
    --backbone-weights $S/weights/mobilenet_v2-imagenet-features.pth --textures $S/data/dtd/images \
    --iterations 400 --out $out --threads 1 --quiet > runs/nosmooth/train-$cat-seed$s.log 2>&1 || echo "FAILED $out" >> runs/nosmooth/train-$cat-seed$s.log
done
