#!/usr/bin/env bash
# Candidate Y's short runs, two at a time, one thread each (the probe needs no timing)
cd /work/main
t() { # category root out config
  memseg-edge train --data $2 --category $1 --backbone mobilenet_v2 --backbone-weights ../shared/weights/mobilenet_v2-imagenet-features.pth \
    --textures ../shared/data/dtd/images --iterations 400 --threads 1 --quiet --config $4 --out runs/y/$3 > runs/y/$3.log 2>&1
}
M="magnetic_tile ../shared/data"; B="bottle ../shared/data/mvtec_ad"
( t $M mag-leaky configs/decoder-leaky.yaml; t $B bottle-leaky configs/decoder-leaky.yaml; t $M mag-base-seed1 runs/y/seed1.yaml ) &
( t $B bottle-leaky-seed1 runs/y/seed1-leaky.yaml; t $M mag-leaky-seed1 runs/y/seed1-leaky.yaml; t $B bottle-base-seed1 runs/y/seed1.yaml ) &
wait
echo all done
