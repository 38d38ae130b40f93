"""Server-side MemSeg trainer (installed as ``memseg_edge.train``).

Importing this package does not import torch: the metrics and synthesis modules are numpy-only, so the
evaluation of exported bundles can use them on a machine without PyTorch.
"""
