#!/usr/bin/env bash
cd /work/main
python tools/probe_validation.py runs/std/magnetic_tile runs/std/magnetic_tile-seed1 runs/nosmooth/magnetic_tile runs/nosmooth/magnetic_tile-seed1 \
  --data ../shared/data --category magnetic_tile --textures ../shared/data/dtd/images --sigmas 0,4 \
  --json runs/nosmooth/probe-magnetic_tile.json > runs/nosmooth/probe-magnetic_tile.log 2>&1 &
python tools/probe_validation.py runs/short-fused/bottle runs/seed1/bottle runs/nosmooth/bottle runs/nosmooth/bottle-seed1 \
  --data ../shared/data/mvtec_ad --category bottle --textures ../shared/data/dtd/images --sigmas 0,4 \
  --json runs/nosmooth/probe-bottle.json > runs/nosmooth/probe-bottle.log 2>&1 &
wait
echo probes-done >> runs/nosmooth/probe-bottle.log
