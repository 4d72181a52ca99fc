"""ovdiff-ray: OVDiff open-vocabulary segmentation on Ray."""
__version__ = "0.1.0"
