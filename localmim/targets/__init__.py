"""Reconstruction targets: multi-scale HOG (method §4) and per-patch-normalised pixels (method §5).

Pure torch, no gradients, device follows the input.
"""

from localmim.targets.hog import (
    cell_histograms,
    hog,
    hog_from_pooled,
    hog_multiscale,
    make_hog_bias,
    normalize_cells,
    orientation_bins,
    pixel_histograms,
    pool_cells,
    sobel_responses,
    to_tokens,
)
from localmim.targets.pixel import IMAGENET_MEAN, IMAGENET_STD, normalize, pixel_targets

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "cell_histograms",
    "hog",
    "hog_from_pooled",
    "hog_multiscale",
    "make_hog_bias",
    "normalize",
    "normalize_cells",
    "orientation_bins",
    "pixel_histograms",
    "pixel_targets",
    "pool_cells",
    "sobel_responses",
    "to_tokens",
]
