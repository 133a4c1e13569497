"""PNG grids of image-shaped samples (``stepopt sample --grid``).

Samples in [-1, 1] (clipped) become 8-bit pixels ``round((x + 1) * 127.5)``; up to 64 of them are
laid out row-major on a near-square grid. Tiny images (the 8x8 digits) are enlarged with
nearest-neighbour pixels to at least :data:`MIN_CELL` pixels so that the grid is visible.

>>> is_image_shape((1, 8, 8)), is_image_shape((3, 32, 32)), is_image_shape((2, 8, 8))
(True, True, False)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stepopt.errors import StepoptError
from stepopt.io import atomic_write

MAX_IMAGES = 64
MIN_CELL = 64  # pixels: images smaller than this are enlarged by an integer factor
PAD = 2  # pixels between cells
PAD_VALUE = 128  # mid grey, so that cells with dark backgrounds stay apart


def is_image_shape(shape: Sequence[int]) -> bool:
    """``(C, H, W)`` with 1 (grey) or 3 (RGB) channels."""
    return len(shape) == 3 and shape[0] in (1, 3) and shape[1] > 0 and shape[2] > 0


def grid_array(samples: np.ndarray, max_images: int = MAX_IMAGES, min_cell: int = MIN_CELL) -> np.ndarray:
    """An ``(H, W)`` or ``(H, W, 3)`` uint8 grid of the first ``max_images`` samples ``(n, C, h, w)``."""
    x = np.asarray(samples, dtype=np.float64)[:max_images]
    if x.ndim != 4 or not is_image_shape(x.shape[1:]) or x.shape[0] == 0:
        shape = tuple(np.shape(samples))[1:]
        raise StepoptError(f"samples of shape {shape} are not images; a PNG grid needs (C, H, W) with C = 1 or 3")
    n, c, h, w = x.shape
    scale = max(1, math.ceil(min_cell / max(h, w)))
    pix = np.rint((np.clip(np.nan_to_num(x), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    pix = pix.repeat(scale, axis=2).repeat(scale, axis=3)  # nearest-neighbour enlargement
    ch, cw = h * scale, w * scale
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((c, rows * (ch + PAD) + PAD, cols * (cw + PAD) + PAD), PAD_VALUE, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        top, left = PAD + r * (ch + PAD), PAD + k * (cw + PAD)
        grid[:, top : top + ch, left : left + cw] = pix[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def save_grid(
    path: str | os.PathLike[str], samples: np.ndarray, max_images: int = MAX_IMAGES, min_cell: int = MIN_CELL
) -> Path:
    """Write :func:`grid_array` of ``samples`` as a PNG file, atomically."""
    from PIL import Image

    img = Image.fromarray(grid_array(samples, max_images, min_cell))
    return atomic_write(path, lambda f: img.save(f, format="PNG"), binary=True)
