"""memseg-edge: MemSeg surface-defect segmentation from training to TensorRT engines at the line.

The edge side (this package, outside ``memseg_edge.train``) never imports torch.
"""
__version__ = "0.1.0"
