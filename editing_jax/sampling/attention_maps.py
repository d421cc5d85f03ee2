"""In-graph (pure jnp, jittable) tools for text->image attention maps: consolidation and smoothing filters.

EditMGT consolidates cross-attention from several layers into one map per example and smooths it before
thresholding it for region hold. All functions here take maps of shape [B, H, W]; filter sizes (sigma, radius)
are static Python numbers, map values may be traced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SMOOTHING_METHODS = ("none", "gaussian", "bilateral", "morphological", "adaptive")
# 'minmax' (the paper's): (m - min) / (max - min), so every map reaches 0 somewhere, even a flat one.
# 'max': m / max for non-negative maps, so a flat map stays near 1 everywhere and region hold keeps nothing of it.
# 'none': only clipped to [0, 1], for maps that are already probabilities (the text cross-attention's).
SCALINGS = ("minmax", "max", "none")
_EPS = 1e-6


def rescale(maps: jax.Array, scaling: str = "minmax") -> jax.Array:
    """Rescales each [H, W] map to [0, 1] by `scaling` (one of SCALINGS); (near-)constant maps are only clipped
    to [0, 1] under 'minmax'."""
    if scaling == "none":
        return jnp.clip(maps, 0.0, 1.0)
    hi = jnp.max(maps, axis=(-2, -1), keepdims=True)
    if scaling == "max":
        return jnp.clip(maps / jnp.maximum(hi, _EPS), 0.0, 1.0)
    if scaling != "minmax":
        raise ValueError(f"Unknown scaling {scaling!r}; expected one of {SCALINGS}.")
    lo = jnp.min(maps, axis=(-2, -1), keepdims=True)
    span = hi - lo
    scaled = (maps - lo) / jnp.maximum(span, _EPS)
    return jnp.where(span > _EPS, scaled, jnp.clip(maps, 0.0, 1.0))


def consolidate(
    probs_per_layer: jax.Array | Sequence[jax.Array],
    layer_range: tuple[int, int],
    text_positions: jax.Array,
    image_slice: slice,
    *,
    grid_shape: tuple[int, int] | None = None,
    text_offset: int = 0,
    scaling: str = "minmax",
    sum_text: bool = False,
) -> jax.Array:
    """Averages text->image attention over layers, heads and selected text tokens into one map per example.

    Args:
        probs_per_layer: [N, B, heads, Lq, Lk] attention probabilities, or a list of N [B, heads, Lq, Lk] arrays.
        layer_range: (start, stop) layers to average, Python-slice semantics.
        text_positions: [B, Lt] bool/float mask of the text tokens to average; they are query positions
            text_offset .. text_offset + Lt (text first in a Flux-style joint sequence).
        image_slice: key positions of the image tokens, h * w of them in raster order.
        grid_shape: (h, w) of the image token grid; square by default.
        text_offset: first query position of the text tokens.
        scaling: how each map is rescaled to [0, 1] (`rescale`).
        sum_text: sum over the selected text tokens instead of averaging (for maps whose values are an image
          token's attention *to* the text: the sum is the share of its attention on the selected words).

    Returns:
        [B, h, w] maps rescaled to [0, 1] per example.
    """
    start, stop = layer_range
    if isinstance(probs_per_layer, (list, tuple)):
        probs = jnp.stack(list(probs_per_layer)[start:stop])  # [N', B, heads, Lq, Lk]
    else:
        probs = probs_per_layer[start:stop]
    num_text = text_positions.shape[1]
    text_to_image = probs[:, :, :, text_offset : text_offset + num_text, image_slice]  # [N', B, heads, Lt, Li]
    per_text = jnp.mean(text_to_image.astype(jnp.float32), axis=(0, 2))  # [B, Lt, Li]
    weights = text_positions.astype(jnp.float32)  # [B, Lt]
    summed = jnp.einsum("bt,bti->bi", weights, per_text)  # [B, Li]
    maps = summed if sum_text else summed / jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1.0)  # [B, Li]
    num_image = maps.shape[1]
    if grid_shape is None:
        side = math.isqrt(num_image)
        if side * side != num_image:
            raise ValueError(f"{num_image} image tokens do not form a square grid; pass grid_shape.")
        grid_shape = (side, side)
    return rescale(maps.reshape(maps.shape[0], *grid_shape), scaling)


def _shifted_windows(maps: jax.Array, radius: int) -> tuple[jax.Array, list[tuple[int, int]]]:
    """Edge-pads [B, H, W] maps by `radius` and returns (padded, offsets) for (2r+1)^2 neighbour views."""
    padded = jnp.pad(maps, ((0, 0), (radius, radius), (radius, radius)), mode="edge")
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    return padded, offsets


def _view(padded: jax.Array, radius: int, dy: int, dx: int, height: int, width: int) -> jax.Array:
    return padded[:, radius + dy : radius + dy + height, radius + dx : radius + dx + width]


def _separable(maps: jax.Array, kernel: np.ndarray) -> jax.Array:
    """Convolves [B, H, W] maps with a 1-D kernel along H and W, edge padding."""
    radius = (len(kernel) - 1) // 2
    height, width = maps.shape[-2:]
    padded = jnp.pad(maps, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    maps = sum(float(k) * padded[:, i : i + height, :] for i, k in enumerate(kernel))
    padded = jnp.pad(maps, ((0, 0), (0, 0), (radius, radius)), mode="edge")
    return sum(float(k) * padded[:, :, i : i + width] for i, k in enumerate(kernel))


def _gaussian_kernel(sigma: float, radius: int | None = None) -> np.ndarray:
    radius = max(1, math.ceil(3.0 * sigma)) if radius is None else radius
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian(maps: jax.Array, sigma: float = 1.0) -> jax.Array:
    """Gaussian blur of [B, H, W] maps (separable, radius ceil(3 sigma), edge padding)."""
    if sigma <= 0:
        return maps
    return _separable(maps.astype(jnp.float32), _gaussian_kernel(sigma))


def bilateral(maps: jax.Array, sigma_space: float = 1.0, sigma_range: float = 0.1, radius: int = 2) -> jax.Array:
    """Edge-preserving bilateral filter: neighbours weighted by spatial distance and by value difference."""
    maps = maps.astype(jnp.float32)
    height, width = maps.shape[-2:]
    padded, offsets = _shifted_windows(maps, radius)
    total = jnp.zeros_like(maps)
    norm = jnp.zeros_like(maps)
    for dy, dx in offsets:
        neighbour = _view(padded, radius, dy, dx, height, width)
        spatial = math.exp(-(dy * dy + dx * dx) / (2.0 * sigma_space**2))
        weight = spatial * jnp.exp(-((neighbour - maps) ** 2) / (2.0 * sigma_range**2))
        total = total + weight * neighbour
        norm = norm + weight
    return total / norm  # norm >= 1 (the centre tap)


def _erode(maps: jax.Array, radius: int) -> jax.Array:
    size = 2 * radius + 1
    return jax.lax.reduce_window(maps, jnp.inf, jax.lax.min, (1, size, size), (1, 1, 1), "SAME")


def _dilate(maps: jax.Array, radius: int) -> jax.Array:
    size = 2 * radius + 1
    return jax.lax.reduce_window(maps, -jnp.inf, jax.lax.max, (1, size, size), (1, 1, 1), "SAME")


def morphological(maps: jax.Array, radius: int = 1) -> jax.Array:
    """Grey opening (removes bright specks) then closing (fills dark holes), square (2r+1)^2 element."""
    maps = maps.astype(jnp.float32)
    opened = _dilate(_erode(maps, radius), radius)
    return _erode(_dilate(opened, radius), radius)


def _box_mean(maps: jax.Array, radius: int) -> jax.Array:
    size = 2 * radius + 1
    return _separable(maps, np.full((size,), 1.0 / size))


def adaptive(maps: jax.Array, radius: int = 2, sigma: float = 1.0) -> jax.Array:
    """Blends each map with its Gaussian blur, keeping detail where the local variance is high.

    w = var_local / (var_local + mean(var_local)) per pixel; output = w * map + (1 - w) * gaussian(map, sigma).
    """
    maps = maps.astype(jnp.float32)
    mean = _box_mean(maps, radius)
    variance = jnp.maximum(_box_mean(maps * maps, radius) - mean * mean, 0.0)  # [B, H, W]
    reference = jnp.mean(variance, axis=(-2, -1), keepdims=True)
    weight = variance / jnp.maximum(variance + reference, _EPS)
    return weight * maps + (1.0 - weight) * gaussian(maps, sigma)


def preserve_peaks(original: jax.Array, smoothed: jax.Array, alpha: float = 0.7, quantile: float = 0.9) -> jax.Array:
    """Where `original` is at or above its per-map `quantile`, returns alpha * original + (1 - alpha) * smoothed."""
    threshold = jnp.quantile(original, quantile, axis=(-2, -1), keepdims=True)  # [B, 1, 1]
    blended = alpha * original + (1.0 - alpha) * smoothed
    return jnp.where(original >= threshold, blended, smoothed)


def smooth(
    maps: jax.Array,
    method: str = "gaussian",
    *,
    sigma: float = 1.0,
    sigma_range: float = 0.1,
    radius: int = 2,
    keep_peaks: bool = False,
    alpha: float = 0.7,
    quantile: float = 0.9,
    scaling: str = "minmax",
) -> jax.Array:
    """Smooths [B, H, W] maps with `method` (one of SMOOTHING_METHODS), optionally keeps peaks, rescales to [0, 1]
    by `scaling`."""
    maps = maps.astype(jnp.float32)
    if method == "none":
        smoothed = maps
    elif method == "gaussian":
        smoothed = gaussian(maps, sigma)
    elif method == "bilateral":
        smoothed = bilateral(maps, sigma, sigma_range, radius)
    elif method == "morphological":
        smoothed = morphological(maps, radius)
    elif method == "adaptive":
        smoothed = adaptive(maps, radius, sigma)
    else:
        raise ValueError(f"Unknown smoothing method {method!r}; expected one of {SMOOTHING_METHODS}.")
    if keep_peaks:
        smoothed = preserve_peaks(maps, smoothed, alpha, quantile)
    return rescale(smoothed, scaling)
