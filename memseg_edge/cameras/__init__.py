"""Industrial (GenICam) cameras as frame sources: :mod:`.base` holds everything vendor-independent
(trigger modes, settings, frame ids from the camera's own counter, reconnect with back-off), a vendor
is one small subclass (:mod:`.pylon` for Basler through pypylon). A second vendor, e.g. any GenTL
producer through ``harvesters``, implements the same six methods (``_open``, ``_configure`` via
``_set``, ``_start``, ``_retrieve``, ``_execute``, ``_close``).
"""
from .base import CameraSettings, GenICamCamera, Grab, TRIGGERS

__all__ = ["CameraSettings", "GenICamCamera", "Grab", "TRIGGERS"]
