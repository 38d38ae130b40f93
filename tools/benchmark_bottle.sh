#!/usr/bin/env bash
# Bottle, as BENCHMARKS.md reports it: tools/benchmark_train.sh bottle RECIPE [OUT_DIR] [extra train options].
# Usage: tools/benchmark_bottle.sh short|default [OUT_DIR] [extra train options]
set -euo pipefail
recipe=${1:?usage: $0 short|default [OUT_DIR] [extra train options]}
out=${2:-runs/bottle-$recipe}
shift $(( $# >= 2 ? 2 : 1 ))
exec "$(dirname "$0")/benchmark_train.sh" bottle "$recipe" "$out" "$@"
