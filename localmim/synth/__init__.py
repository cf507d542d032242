"""Embedded mini datasets in the real on-disk layouts (ImageNet, ADE20K, COCO), generated from a seed.

Every class is a *kind of shape* (circle, square, triangle, star, ...). Each image draws shapes with a random
pose (position, size, rotation, slight aspect jitter), a random fill colour and texture (solid, stripes, checker,
noise) over a random background (solid, gradient, low-frequency noise), on an image of random size and aspect.
The class is therefore decidable from the content only, so accuracy above chance means something was learned.

All shapes are polygons (a circle is a 48-gon), so the COCO polygon segmentation is the exact outline that was
filled; the ADE20K annotation is the same filled mask, pixel for pixel.

Determinism: each image draws from its own ``numpy.random.default_rng([seed, dataset, split, index])``, and
the encoders (PIL JPEG/PNG, ``json.dumps``) are deterministic, so the same seed gives byte-identical files.
Only numpy and PIL are used.

Modules: :mod:`.shapes` (outlines, rasterisation), :mod:`.draw` (pixels, :func:`render`, encoders),
:mod:`.datasets` (the three writers and :func:`generate_all`).
"""

from localmim.synth.datasets import (
    IMAGENET_COLOUR_PRIOR,
    class_dir_name,
    generate_all,
    write_ade20k,
    write_coco,
    write_imagenet,
)
from localmim.synth.draw import DrawnObject, encode_jpeg, encode_png, image_size, render
from localmim.synth.shapes import MAX_CLASSES, SHAPE_NAMES, SHAPES, polygon_mask, shape_outline

__all__ = [
    "IMAGENET_COLOUR_PRIOR",
    "MAX_CLASSES",
    "SHAPES",
    "SHAPE_NAMES",
    "DrawnObject",
    "class_dir_name",
    "encode_jpeg",
    "encode_png",
    "generate_all",
    "image_size",
    "polygon_mask",
    "render",
    "shape_outline",
    "write_ade20k",
    "write_coco",
    "write_imagenet",
]
