"""Calibration: the decision-threshold rule, INT8 (Q/DQ) quantization and FP16 conversion. Installed as
``memseg_edge.calibration``; numpy, onnx and onnxruntime: never torch."""
