"""Anti-aliased NumPy renderer for world scenes, at any square size.

Shapes are defined by signed distance functions (negative inside) in pixel units, evaluated on a supersampled grid
and box-filtered, so edges are anti-aliased and every pixel is an exact alpha blend
`background + coverage * (color - background)`. The verifier inverts exactly this model.
"""

from __future__ import annotations

import functools

import numpy as np

from editing_jax.data.world import spec

SUPERSAMPLE = 4


def cell_geometry(size: int, cell: str) -> tuple[float, float, float]:
    """Returns (center_x, center_y, cell_side) in pixels for a grid cell."""
    side = size / 3.0
    index = spec.CELLS.index(cell)
    row, col = divmod(index, 3)
    return (col + 0.5) * side, (row + 0.5) * side, side


def cell_box(size: int, cell: str, margin: int = 1) -> tuple[slice, slice]:
    """Pixel (rows, cols) slices covering a cell, grown by `margin` pixels and clipped to the canvas."""
    cx, cy, side = cell_geometry(size, cell)
    half = side / 2.0
    r0, r1 = int(np.floor(cy - half)) - margin, int(np.ceil(cy + half)) + margin
    c0, c1 = int(np.floor(cx - half)) - margin, int(np.ceil(cx + half)) + margin
    return slice(max(r0, 0), min(r1, size)), slice(max(c0, 0), min(c1, size))


def stroke_width(half_extent: float) -> float:
    """Outline stroke width in pixels for an object of the given half-extent."""
    return max(1.0, 0.25 * half_extent)


def _signed_distance(kind: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Signed distance (in pixels, negative inside) to a shape of half-extent `half` centered at the origin.

    Polygons use the max over their edges' half-plane distances, which is exact inside, so an outline of width w
    is `-w < d <= 0` for every kind.
    """
    ax, ay = np.abs(dx), np.abs(dy)
    if kind == "square":
        return np.maximum(ax, ay) - half
    if kind == "circle":
        return np.sqrt(dx * dx + dy * dy) - half
    if kind == "diamond":
        return (ax + ay - half) / np.sqrt(2.0)
    if kind == "triangle":  # Apex up, base at the bottom, bounding box 2*half x 2*half.
        bottom = dy - half
        sides = (ax - 0.5 * dy - 0.5 * half) / np.sqrt(1.25)
        return np.maximum(bottom, sides)
    raise ValueError(f"unknown kind {kind!r}")


@functools.lru_cache(maxsize=4)
def _supersampled_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    offsets = (np.arange(size * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    ys, xs = np.meshgrid(offsets, offsets, indexing="ij")  # [S*ss, S*ss] each
    return xs, ys


def _box_filter(mask: np.ndarray) -> np.ndarray:
    height, width = mask.shape
    blocks = mask.reshape(height // SUPERSAMPLE, SUPERSAMPLE, width // SUPERSAMPLE, SUPERSAMPLE)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def coverage(size: int, cell: str, kind: str, object_size: str, style: str) -> np.ndarray:
    """Fractional pixel coverage in [0, 1] of one object, float32 [size, size]. Cached per argument tuple."""
    return _coverage_cached(size, cell, kind, object_size, style).copy()


@functools.lru_cache(maxsize=4096)
def _coverage_cached(size: int, cell: str, kind: str, object_size: str, style: str) -> np.ndarray:
    cx, cy, side = cell_geometry(size, cell)
    half = 0.5 * spec.SIZE_FRACTIONS[object_size] * side
    rows, cols = cell_box(size, cell, margin=1)
    xs, ys = _supersampled_grid(size)
    ss_rows = slice(rows.start * SUPERSAMPLE, rows.stop * SUPERSAMPLE)
    ss_cols = slice(cols.start * SUPERSAMPLE, cols.stop * SUPERSAMPLE)
    distance = _signed_distance(kind, xs[ss_rows, ss_cols] - cx, ys[ss_rows, ss_cols] - cy, half)
    inside = distance <= 0.0
    if style == "outline":
        inside &= distance > -stroke_width(half)
    out = np.zeros((size, size), np.float32)
    out[rows, cols] = _box_filter(inside.astype(np.float32))
    out.setflags(write=False)
    return out


def object_coverage(size: int, obj: spec.SceneObject) -> np.ndarray:
    return _coverage_cached(size, obj.cell, obj.kind, obj.size, obj.style)


@functools.lru_cache(maxsize=64)
def _background_cached(size: int, background: str) -> np.ndarray:
    colors = np.asarray(spec.BACKGROUND_COLORS[background], np.float32)  # [n_colors, 3]
    image = np.empty((size, size, 3), np.float32)
    if background == "checkered":  # 8x8 checkerboard.
        index = (np.arange(size) * 8 // size)[:, None] + (np.arange(size) * 8 // size)[None, :]
        image[:] = colors[index % 2]
    elif background == "striped":  # 8 horizontal stripes.
        index = np.broadcast_to((np.arange(size) * 8 // size)[:, None], (size, size))
        image[:] = colors[index % 2]
    else:
        image[:] = colors[0]
    image.setflags(write=False)
    return image


def background_image(size: int, background: str) -> np.ndarray:
    """Float32 [size, size, 3] background in [0, 255]."""
    return _background_cached(size, background)


def render_float(scene: spec.Scene, size: int) -> np.ndarray:
    """Renders a scene to float32 [size, size, 3] in [0, 255] (before quantization)."""
    image = background_image(size, scene.background).copy()
    for obj in scene.objects:
        alpha = object_coverage(size, obj)[..., None]  # [S, S, 1]
        color = np.asarray(spec.OBJECT_COLORS[obj.color], np.float32)
        image += alpha * (color - image)
    return image


def render(scene: spec.Scene, size: int) -> np.ndarray:
    """Renders a scene to uint8 RGB [size, size, 3]."""
    if size < 24:
        raise ValueError(f"canvas size must be at least 24 pixels, got {size}")
    return np.clip(np.rint(render_float(scene, size)), 0, 255).astype(np.uint8)
