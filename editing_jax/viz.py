"""Labelled image grids (dataset previews, sample and reconstruction grids)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """uint8/bool/float([0, 1]) images [H, W] or [H, W, 1|3] -> uint8 [H, W, 3]."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif np.issubdtype(image.dtype, np.floating):
        image = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"unsupported image dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an image [H, W] or [H, W, 3], got shape {image.shape}")
    return image


def image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    *,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    cell_size: int = 128,
    pad: int = 4,
    label_width: int = 200,
) -> np.ndarray:
    """Tiles images (nearest-neighbour upscaled to `cell_size`) with optional labels; returns uint8 [H, W, 3]."""
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one image")
    font = PIL.ImageFont.load_default()
    num_columns = max(len(r) for r in rows)
    header = 16 if column_labels else 0
    left = label_width if row_labels else 0
    width = left + num_columns * (cell_size + pad) + pad
    height = header + len(rows) * (cell_size + pad) + pad
    canvas = PIL.Image.new("RGB", (width, height), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels or ()):
        draw.text((left + pad + c * (cell_size + pad), 2), label, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        top = header + pad + r * (cell_size + pad)
        if row_labels:
            wrapped = "\n".join(textwrap.wrap(row_labels[r], width=max(label_width // 7, 8))[:8])
            draw.multiline_text((pad, top), wrapped, fill=(0, 0, 0), font=font)
        for c, image in enumerate(row):
            tile = PIL.Image.fromarray(to_rgb_uint8(image)).resize((cell_size, cell_size), PIL.Image.NEAREST)
            canvas.paste(tile, (left + pad + c * (cell_size + pad), top))
    return np.asarray(canvas)
