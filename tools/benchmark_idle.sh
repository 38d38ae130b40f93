#!/bin/bash
# The idle-machine measurements of BENCHMARKS.md (issues 12, 13): runtime overhead plain and with --metrics/--previews,
# the threads table, the demo alone and beside a competing single-threaded job. Run with nothing else on the machine.
# Usage: tools/benchmark_idle.sh [OUT_DIR]   (SHARED: the data folder, default ../shared)
cd "$(dirname "$0")/.."
out=${1:-runs/idle}; mkdir -p $out
bundle=${BUNDLE:-runs/bench/bundle}   # a MobileNetV2 256 px bundle, made as BENCHMARKS.md "Runtime after the hardening" says
[ -f "$bundle/model.json" ] || { echo "no bundle at $bundle: set BUNDLE=DIR" >&2; exit 2; }
uptime > $out/uptime-start.txt
python tools/benchmark_runtime.py "$bundle" --images ${SHARED:-../shared}/data/mvtec_ad/bottle/test/good \
    --count 20 --frames 32 --repeats 5 --threads 1 --ingest-seconds 3 --plant > $out/runtime.txt 2>&1
uptime >> $out/uptime-start.txt
python tools/benchmark_threads.py --seconds 5 --json $out/threads.json > $out/threads.txt 2>&1
uptime >> $out/uptime-start.txt
rm -rf /tmp/demo-idle /tmp/demo-busy
/usr/bin/time -f "%e s wall" memseg-edge demo --out /tmp/demo-idle > $out/demo-idle.txt 2>&1
uptime >> $out/uptime-start.txt
# a competing job on one core: a single-threaded numpy matrix loop (another user's computation)
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 python -c "
import numpy as np
a = np.random.rand(512, 512)
while True: a = (a @ a) / 512.0
" & burner=$!
/usr/bin/time -f "%e s wall" memseg-edge demo --out /tmp/demo-busy > $out/demo-busy.txt 2>&1
uptime >> $out/uptime-start.txt
kill $burner
echo PHASEDONE >> $out/uptime-start.txt
