#!/usr/bin/env bash
set -euo pipefail
for pair in kd/bottle-default:bottle-default ks/bottle-short:bottle-short kd/magnetic_tile-default:magnetic_tile-default ks/magnetic_tile:magnetic_tile-short; do
  src=${pair%%:*}; dst=${pair##*:}
  s=$(date +%s)
  python tools/refinish_run.py runs/$src --memory-rebuild-samples 120 --memory-rebuild-choice validation --out runs/v/$dst > runs/v/refinish-$dst.log 2>&1
  echo "$dst: $(( $(date +%s) - s )) s" >> runs/v/times.txt
done
echo done >> runs/v/times.txt
