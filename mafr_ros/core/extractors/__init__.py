"""Registry of frozen feature extractors (``build_extractor(name, weights=...)``).

Importing this package registers every built-in extractor.
"""
from .base import (FeatureExtractor, available, build_extractor, extractor_options, register,
                   valid_mask_from_xyz)

__all__ = ["FeatureExtractor", "available", "build_extractor", "extractor_options", "register",
           "valid_mask_from_xyz"]

# Built-in extractors register themselves on import.
from . import dino, lite, pointmae  # noqa: E402,F401
