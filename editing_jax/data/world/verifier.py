"""Exact verifier: parses any RGB image back into a scene graph and scores it against a target scene.

Parsing inverts the renderer's image model `image = background + alpha * (color - background)`:
1. the background is the candidate whose rendering has the smallest median distance to the image;
2. each grid cell with enough non-background pixels holds an object; its color is the palette color whose
   alpha-blend model explains the cell's pixels best, which also yields a per-pixel alpha (coverage) map;
3. kind, size and style come from the rendered template whose coverage is closest (L2) to that alpha map.
Blur and compression only perturb alpha, so parsing degrades gracefully. Coherence measures how much of the image
is explained by the parsed objects: stray blobs and off-grid shapes lower it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
import scipy.ndimage

from editing_jax.data.world import render, spec

# A pixel is foreground when it is this far (RGB L2) from the background; below the smallest color-background gap.
FOREGROUND_DISTANCE = 45.0
# A cell holds an object when its foreground covers this fraction of the smallest template's area.
MIN_OBJECT_FRACTION = 0.3
# A parsed object is well formed when its template explains this fraction of its alpha mass (soft IoU).
MIN_TEMPLATE_FIT = 0.5
# The scene is coherent when stray foreground (outside every parsed object, after removing isolated pixels) covers at
# most this fraction of one grid cell, and every object fits its template.
MAX_STRAY_CELL_FRACTION = 0.01

_COLOR_TABLE = np.asarray([spec.OBJECT_COLORS[c] for c in spec.COLORS], np.float32)  # [n_colors, 3]
_TEMPLATE_KEYS = tuple((k, s, st) for k in spec.KINDS for s in spec.SIZES for st in spec.STYLES)


@dataclasses.dataclass(frozen=True)
class ParsedScene:
    scene: spec.Scene
    template_fit: tuple[float, ...]  # Soft IoU of each parsed object with its template.
    stray_pixels: int  # Foreground pixels in blobs not covered by any parsed object.
    foreground_pixels: int
    cell_area: float

    @property
    def coherent(self) -> bool:
        stray_ok = self.stray_pixels <= MAX_STRAY_CELL_FRACTION * self.cell_area
        return stray_ok and all(f >= MIN_TEMPLATE_FIT for f in self.template_fit)

    @property
    def coherence(self) -> float:
        """Coherence in [0, 1]: explained fraction of the foreground times the worst template fit."""
        explained = 1.0 - self.stray_pixels / max(self.foreground_pixels, 1)
        return float(explained * min(self.template_fit, default=1.0))


@functools.lru_cache(maxsize=8)
def _templates(size: int, cell: str) -> tuple[tuple[slice, slice], np.ndarray]:
    """Cell box and template coverages [n_templates, h, w] restricted to that box."""
    rows, cols = render.cell_box(size, cell, margin=0)
    stack = np.stack([render.coverage(size, cell, k, s, st)[rows, cols] for k, s, st in _TEMPLATE_KEYS])
    return (rows, cols), stack


@functools.lru_cache(maxsize=8)
def _min_object_pixels(size: int) -> float:
    _, stack = _templates(size, "center")
    return MIN_OBJECT_FRACTION * float(stack.sum(axis=(1, 2)).min())


@functools.lru_cache(maxsize=64)
def _cell_core(size: int, cell: str) -> tuple[slice, slice]:
    """Pixel slices of a cell shrunk so that no neighbour's anti-aliased edge reaches inside."""
    rows, cols = render.cell_box(size, cell, margin=0)
    inset = int(np.ceil(0.08 * size / 3.0))
    return slice(rows.start + inset, rows.stop - inset), slice(cols.start + inset, cols.stop - inset)


def _as_float_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square RGB image [S, S, 3], got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32)
    if np.issubdtype(image.dtype, np.floating):  # Floats are taken as [0, 1].
        return np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0
    raise ValueError(f"expected uint8 or float image, got {image.dtype}")


def _parse_background(image: np.ndarray) -> tuple[str, np.ndarray]:
    size = image.shape[0]
    scores = [np.median(np.linalg.norm(image - render.background_image(size, b), axis=-1)) for b in spec.BACKGROUNDS]
    best = spec.BACKGROUNDS[int(np.argmin(scores))]
    return best, render.background_image(size, best)


def _fit_color(pixels: np.ndarray, background: np.ndarray) -> tuple[int, np.ndarray]:
    """Best palette color for pixels [n, 3] over background [n, 3]; returns (color index, alpha [n])."""
    direction = _COLOR_TABLE[:, None, :] - background[None]  # [n_colors, n, 3]
    offset = pixels[None] - background[None]  # [1, n, 3]
    alpha = np.clip((offset * direction).sum(-1) / np.maximum((direction**2).sum(-1), 1e-6), 0.0, 1.0)
    residual = ((offset - alpha[..., None] * direction) ** 2).sum(axis=(1, 2))  # [n_colors]
    best = int(np.argmin(residual))
    return best, alpha[best]


def parse(image: np.ndarray) -> ParsedScene:
    """Parses an RGB image (uint8, or float in [0, 1]) [S, S, 3] into a scene graph."""
    image = _as_float_image(image)
    size = image.shape[0]
    background_name, background = _parse_background(image)
    foreground = np.linalg.norm(image - background, axis=-1) > FOREGROUND_DISTANCE  # [S, S]
    explained = np.zeros_like(foreground)
    objects, fits = [], []
    for cell in spec.CELLS:
        (rows, cols), stack = _templates(size, cell)
        # Occupancy and color look only at the cell's core, which neighbouring objects never reach.
        core_rows, core_cols = _cell_core(size, cell)
        core_foreground = foreground[core_rows, core_cols]
        if core_foreground.sum() < _min_object_pixels(size):
            continue
        color_index, _ = _fit_color(
            image[core_rows, core_cols][core_foreground],
            background[core_rows, core_cols][core_foreground],
        )
        direction = _COLOR_TABLE[color_index] - background[rows, cols]  # [h, w, 3]
        alpha = (image[rows, cols] - background[rows, cols]) * direction
        alpha = np.clip(alpha.sum(-1) / np.maximum((direction**2).sum(-1), 1e-6), 0.0, 1.0)  # [h, w]
        errors = ((stack - alpha[None]) ** 2).sum(axis=(1, 2))  # [n_templates]
        best = int(np.argmin(errors))
        template = stack[best]
        fits.append(_soft_iou(template, alpha, sigma=size / 64.0))
        kind, object_size, style = _TEMPLATE_KEYS[best]
        objects.append(spec.SceneObject(cell, kind, spec.COLORS[color_index], object_size, style))
        grown = np.zeros((size, size), bool)
        grown[rows, cols] = template > 0
        explained |= _dilate(grown)
    # Isolated foreground pixels (compression ringing, noise) are not blobs.
    stray = scipy.ndimage.binary_opening(foreground & ~explained)
    return ParsedScene(
        scene=spec.Scene(background_name, tuple(objects)),
        template_fit=tuple(fits),
        stray_pixels=int(stray.sum()),
        foreground_pixels=int(foreground.sum()),
        cell_area=(size / 3.0) ** 2,
    )


def _soft_iou(template: np.ndarray, alpha: np.ndarray, sigma: float) -> float:
    """Soft IoU after a small blur of both maps, so mild blur in the image does not count as a bad fit."""
    template = scipy.ndimage.gaussian_filter(template, sigma, mode="constant")
    alpha = scipy.ndimage.gaussian_filter(alpha, sigma, mode="constant")
    return float(np.minimum(template, alpha).sum() / max(np.maximum(template, alpha).sum(), 1e-6))


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= out[:, :-1].copy()
    out[:, :-1] |= out[:, 1:].copy()
    return out


_OBJECT_ATTRIBUTES = ("kind", "color", "size", "style")


def score(parsed: spec.Scene, target: spec.Scene) -> dict[str, bool]:
    """Per-attribute correctness of a parsed scene against a target scene.

    Keys: 'background', 'no_extra_objects', and for each target object '<cell>.present' and '<cell>.<attribute>'.
    Objects of `target.position_free` are matched by attributes in any cell and scored as 'count'.
    """
    results = {"background": parsed.background == target.background}
    by_cell = {o.cell: o for o in parsed.objects}
    free = target.position_free
    fixed = [o for o in target.objects if o.composition != free]
    matched = set()
    for obj in fixed:
        found = by_cell.get(obj.cell)
        results[f"{obj.cell}.present"] = found is not None and found.composition != free
        for attribute in _OBJECT_ATTRIBUTES:
            results[f"{obj.cell}.{attribute}"] = found is not None and getattr(found, attribute) == getattr(
                obj, attribute
            )
        if found is not None:
            matched.add(found.cell)
    if free is not None:
        wanted = sorted((o.size, o.style) for o in target.objects if o.composition == free)
        candidates = [o for o in parsed.objects if o.cell not in matched and o.composition == free]
        results["count"] = len(candidates) == len(wanted)
        results["count.attributes"] = sorted((o.size, o.style) for o in candidates) == wanted
        matched.update(o.cell for o in candidates)
    results["no_extra_objects"] = all(o.cell in matched for o in parsed.objects)
    return results


@dataclasses.dataclass(frozen=True)
class VerifierResult:
    """Batched verifier outputs; every array is [B]."""

    success: np.ndarray  # bool: every attribute right and the scene coherent
    attribute_accuracy: np.ndarray  # float: fraction of attributes right
    coherence: np.ndarray  # float in [0, 1]
    coherent: np.ndarray  # bool
    preservation_l1: np.ndarray  # float: mean |image - source| / 255 outside the edit mask (nan without source)
    attributes: tuple[dict[str, bool], ...]
    parsed: tuple[spec.Scene, ...]


def preservation_l1(image: np.ndarray, source: np.ndarray, edit_mask: np.ndarray) -> float:
    """Mean absolute difference in [0, 1] units over pixels outside the edit mask."""
    keep = ~np.asarray(edit_mask, bool)
    if not keep.any():
        return 0.0
    diff = np.abs(_as_float_image(image) - _as_float_image(source)) / 255.0  # [S, S, 3]
    return float(diff[keep].mean())


def verify(
    images: Sequence[np.ndarray] | np.ndarray,
    targets: Sequence[spec.Scene | str],
    sources: Sequence[np.ndarray] | np.ndarray | None = None,
    edit_masks: Sequence[np.ndarray] | np.ndarray | None = None,
) -> VerifierResult:
    """Scores a batch of images [B, S, S, 3] against target scenes (Scene objects or their JSON).

    NumPy only, so it runs off the device as an RL reward or an evaluation metric.
    """
    if len(images) != len(targets):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    success, accuracy, coherence, coherent, l1, attributes, parsed_scenes = (
        [],
        [],
        [],
        [],
        [],
        [],
        [],
    )
    for i, (image, target) in enumerate(zip(images, targets, strict=True)):
        target = spec.Scene.from_json(target) if isinstance(target, str) else target
        parsed = parse(image)
        checks = score(parsed.scene, target)
        attributes.append(checks)
        parsed_scenes.append(parsed.scene)
        accuracy.append(float(np.mean(list(checks.values()))))
        coherent.append(parsed.coherent)
        coherence.append(parsed.coherence)
        success.append(all(checks.values()) and parsed.coherent)
        if sources is not None:
            mask = edit_masks[i] if edit_masks is not None else np.zeros(np.shape(image)[:2], bool)
            l1.append(preservation_l1(image, sources[i], mask))
        else:
            l1.append(np.nan)
    return VerifierResult(
        success=np.asarray(success, bool),
        attribute_accuracy=np.asarray(accuracy, np.float32),
        coherence=np.asarray(coherence, np.float32),
        coherent=np.asarray(coherent, bool),
        preservation_l1=np.asarray(l1, np.float32),
        attributes=tuple(attributes),
        parsed=tuple(parsed_scenes),
    )
