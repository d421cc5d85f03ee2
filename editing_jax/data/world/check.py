"""Self-check of the world: is the verifier exact, are edits non-trivial, is it robust to blur, is it fast?

`check_world` is what `editing-jax data check` prints and what docs/RESULTS.md reports.
"""

from __future__ import annotations

import io
import time

import numpy as np
import PIL.Image
import PIL.ImageFilter

from editing_jax.data.world import edits, spec, verifier

# Degradation standing in for a tokenizer reconstruction: Gaussian blur with sigma = size / 64 pixels (0.5 px at
# 32 px, 1 px at 64 px), then JPEG at quality 85 without chroma subsampling.
DEFAULT_BLUR_PER_PIXEL = 1.0 / 64.0
DEFAULT_JPEG_QUALITY = 85


def degrade(image: np.ndarray, blur_sigma: float, jpeg_quality: int | None, chroma_subsampling: int = 0) -> np.ndarray:
    """Blurs then JPEG-compresses a uint8 RGB image [S, S, 3]; returns uint8 [S, S, 3]."""
    pil = PIL.Image.fromarray(np.asarray(image, np.uint8))
    if blur_sigma > 0:
        pil = pil.filter(PIL.ImageFilter.GaussianBlur(blur_sigma))
    if jpeg_quality:
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=jpeg_quality, subsampling=chroma_subsampling)
        pil = PIL.Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return np.asarray(pil, np.uint8)


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def psnr_from_mse(value: float) -> float:
    return float("inf") if value == 0 else float(10.0 * np.log10(255.0**2 / value))


def check_world(
    num: int,
    size: int,
    seed: int = 0,
    split: str = "train",
    blur_sigma: float | None = None,
    jpeg_quality: int | None = DEFAULT_JPEG_QUALITY,
    progress: bool = False,
) -> dict:
    """Generates `num` samples and measures the verifier figures; returns a JSON-serializable dict."""
    config = edits.WorldConfig(size=size)
    blur_sigma = size * DEFAULT_BLUR_PER_PIXEL if blur_sigma is None else blur_sigma
    indices = range(num)
    if progress:
        import tqdm

        indices = tqdm.tqdm(indices, desc=f"world check {size}px", unit="sample")
    generate_seconds = 0.0
    verify_seconds = 0.0
    per_type: dict[str, dict[str, int]] = {t: {"n": 0, "source_fails": 0} for t in spec.EDIT_TYPES}
    target_ok, attribute_hits, attribute_total, degraded_ok, degraded_mse = 0, 0, 0, 0, []
    for index in indices:
        start = time.perf_counter()
        sample = edits.generate_sample(split, seed, index, config)
        generate_seconds += time.perf_counter() - start
        target = sample.edit.target
        degraded = degrade(sample.target_image, blur_sigma, jpeg_quality)
        start = time.perf_counter()
        result = verifier.verify([sample.target_image, sample.source_image, degraded], [target] * 3)
        verify_seconds += time.perf_counter() - start
        target_ok += bool(result.success[0])
        checks = result.attributes[0]
        attribute_hits += sum(checks.values())
        attribute_total += len(checks)
        counts = per_type[sample.edit.edit_type]
        counts["n"] += 1
        counts["source_fails"] += not bool(result.success[1])
        degraded_ok += bool(result.success[2])
        degraded_mse.append(mse(degraded, sample.target_image))
    edited = {t: c for t, c in per_type.items() if t != "identity" and c["n"]}
    return {
        "num": num,
        "size": size,
        "seed": seed,
        "split": split,
        "target_success": target_ok / num,
        "attribute_accuracy": attribute_hits / max(attribute_total, 1),
        "source_fails_min_over_types": min((c["source_fails"] / c["n"] for c in edited.values()), default=1.0),
        "source_fails_by_type": {t: c["source_fails"] / c["n"] for t, c in edited.items()},
        "degradation": {"blur_sigma": blur_sigma, "jpeg_quality": jpeg_quality, "chroma_subsampling": "4:4:4"},
        "degraded_psnr_db": psnr_from_mse(float(np.mean(degraded_mse))),  # PSNR of the mean MSE
        "degraded_target_success": degraded_ok / num,
        "generate_samples_per_s": num / generate_seconds,
        "verify_images_per_s": 3 * num / verify_seconds,
    }
