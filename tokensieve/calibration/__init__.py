"""Calibration from data: keep ratios, thresholds and bucket edges (used by the adaptive methods), quantization calibration."""
