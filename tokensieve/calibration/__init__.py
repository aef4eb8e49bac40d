"""Calibration from data: keep ratios, thresholds and bucket edges for the adaptive methods; quantization calibration.

Empty until the first data-dependent method lands (see the buckets issue).
"""
