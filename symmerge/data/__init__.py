"""Calibration data: the examples that statistics (Fisher, RegMean Grams) and data-driven matching
(activations, learned) are computed on. One loader for every source: ``zoo``, a text file, an ``.npz``."""

from symmerge.data.calibration import BATCH_SIZE, load_calibration

__all__ = ["BATCH_SIZE", "load_calibration"]
