"""Calibration: the decision-threshold rule (and, later, INT8 calibration). Installed as
``memseg_edge.calibration``; numpy only."""
