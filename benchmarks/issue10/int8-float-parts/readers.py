#!/usr/bin/env python
"""Candidate X of the INT8 float-parts rule (BENCHMARKS.md): the weighted ops that read a tensor computed
from the memory step (outputs of the memory subgraph or of the `memory_derived` group that
`calibration.int8.kept_fp32_nodes` finds), printed one name per line for `calibrate --keep-fp32`.

    python readers.py BUNDLE/model.onnx BUNDLE/model.json
"""
import json
import sys

import onnx

from memseg_edge.calibration.int8 import WEIGHTED_OPS, _name_nodes, kept_fp32_nodes, memory_prefix

model = onnx.load(sys.argv[1])
_name_nodes(model.graph)
prefix = memory_prefix(json.load(open(sys.argv[2])))
groups = kept_fp32_nodes(model, prefix, encoder=True)
sources = set(groups["memory_derived"]) | {n.name for n in model.graph.node if n.name.startswith(prefix)}
signal = {o for n in model.graph.node if n.name in sources for o in n.output}
readers = [n.name for n in model.graph.node
           if n.op_type in WEIGHTED_OPS and n.name not in sources and any(t in signal for t in n.input)]
names = [n.name for n in model.graph.node]
for r in readers:
    clash = [m for m in names if m.startswith(r) and m != r]
    if clash:
        sys.exit(f"{r} as a prefix also matches {clash}")
    print(r)
