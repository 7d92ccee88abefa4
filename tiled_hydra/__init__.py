"""Tiled-ensemble anomaly detection for high-resolution images, as a Hydra experiment framework."""

__version__ = "0.1.0"
