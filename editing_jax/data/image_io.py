"""Robust image reading and writing for user-supplied images.

Reading always yields a C-contiguous, writable ``uint8`` array of shape ``[H, W, 3]``:

* EXIF orientation is applied, so the array matches what an image viewer displays.
* Animated images (GIF, APNG, multi-page TIFF, ...) yield their first frame.
* Transparency (alpha channels, palette or ``tRNS`` transparency) is composited onto a
  solid ``background`` colour instead of being dropped (which would expose whatever colour
  the transparent pixels happen to store, often black). The rule is
  ``out = round((c * a + bg * (255 - a)) / 255)`` per channel, rounded to the nearest
  integer (exact halves cannot occur because 255 is odd). Transparency of 16/32-bit
  integer and float grayscale images is ignored.
* 16-bit and 32-bit integer grayscale (modes ``I;16*`` and ``I``) is scaled linearly from
  its full range to ``[0, 255]`` with round-to-nearest, e.g. 16-bit 257 -> 1,
  32768 -> 128, 65535 -> 255. Nothing is clamped; see :func:`read_image` for how the range
  of mode ``I`` is chosen.
* Float grayscale (mode ``F``) is taken to be in ``[0, 1]`` if its largest finite value is
  at most 1, otherwise in ``[0, 255]``; values outside the range are clipped, NaN becomes 0.
* 16-bit RGB(A) PNGs are reduced to 8 bits by Pillow itself (it keeps the high byte).
* CMYK is converted with Pillow's plain formula; embedded ICC profiles are ignored.

Every problem with the file itself (missing, unreadable, not an image, truncated, corrupt,
too large) raises :class:`ImageError` with a one-line message that starts with the file
name. Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never changed by this module;
if some other code enables it, truncated files are padded by Pillow instead of rejected.

Writing (:func:`write_image_atomic`) goes through a temporary file in the destination
directory and ``os.replace``, so readers never observe a partially written image.
"""

from __future__ import annotations

import io
import os
import secrets
import warnings
from collections.abc import Sequence
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_BACKGROUND",
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "center_crop_square",
    "read_image",
    "read_image_bytes",
    "resize_image",
    "write_image_atomic",
]

DEFAULT_MAX_PIXELS: int = 64 * 1024 * 1024
"""Largest accepted ``width * height`` (about 67.1 MP, 192 MiB as RGB uint8).

Checked against the header before any pixel data is decoded, as a guard against
decompression bombs. Pillow's own hard limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``, about
179 MP by default) applies in addition and also raises :class:`ImageError`.
"""

DEFAULT_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""RGB colour that transparent pixels are composited onto (white)."""

Resample = Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"]

_RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# Suffix -> (Pillow format, save options).
_WRITE_FORMATS: dict[str, tuple[str, dict[str, object]]] = {
    ".png": ("PNG", {}),
    ".jpg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".jpeg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".webp": ("WEBP", {"quality": 95}),
}

# Formats never opened: Pillow renders EPS by running Ghostscript on the file, which is
# not something to do with untrusted input.
_BLOCKED_FORMATS = frozenset({"EPS"})

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageError(ValueError):
    """An image file could not be read or written; the message names the file."""


def read_image(
    path: str | os.PathLike[str],
    *,
    background: Sequence[int] = DEFAULT_BACKGROUND,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Reads a user image as uint8 RGB ``[H, W, 3]``.

    See the module docstring for how orientation, animation, transparency and
    high-bit-depth modes are handled. For 32-bit integer grayscale (mode ``I``) the source
    range is the smallest of ``[0, 65535]``, ``[0, 2**31 - 1]`` and
    ``[-2**31, 2**31 - 1]`` that contains all pixel values (Pillow often stores 16-bit
    data in mode ``I``).

    Args:
        path: Path of the image file.
        background: RGB colour, each channel in ``[0, 255]``, that transparent pixels are
            composited onto.
        max_pixels: Largest accepted ``width * height``, checked before decoding. ``None``
            disables this check (Pillow's own limit still applies).

    Returns:
        A new C-contiguous, writable uint8 array of shape ``[H, W, 3]``.

    Raises:
        ImageError: The file is missing, unreadable, empty, not an image, truncated,
            corrupt, or larger than ``max_pixels``.
        ValueError: ``background`` or ``max_pixels`` is invalid.
    """
    name = os.fsdecode(path)
    bg = _check_read_args(background, max_pixels)
    try:
        f = open(path, "rb")
    except FileNotFoundError as e:
        raise ImageError(f"{name}: no such file") from e
    except IsADirectoryError as e:
        raise ImageError(f"{name}: is a directory, not an image file") from e
    except PermissionError as e:
        raise ImageError(f"{name}: permission denied") from e
    except OSError as e:
        raise ImageError(f"{name}: cannot open file ({_describe(e)})") from e
    with f:
        return _decode(f, name, bg, max_pixels)


def read_image_bytes(
    data: bytes | bytearray | memoryview,
    *,
    name: str = "<bytes>",
    background: Sequence[int] = DEFAULT_BACKGROUND,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Reads an encoded image held in memory as uint8 RGB ``[H, W, 3]``.

    Behaves exactly like :func:`read_image`.

    Args:
        data: The encoded image file contents.
        name: Name used in error messages, e.g. the original file name or URL.
        background: RGB colour that transparent pixels are composited onto.
        max_pixels: Largest accepted ``width * height``; ``None`` disables the check.

    Returns:
        A new C-contiguous, writable uint8 array of shape ``[H, W, 3]``.

    Raises:
        ImageError: ``data`` is empty, not an image, truncated, corrupt or too large.
        ValueError: ``background`` or ``max_pixels`` is invalid.
    """
    bg = _check_read_args(background, max_pixels)
    return _decode(io.BytesIO(bytes(data)), name, bg, max_pixels)


def resize_image(
    image: np.ndarray,
    size: int | tuple[int, int],
    *,
    resample: Resample = "bicubic",
) -> np.ndarray:
    """Resizes a uint8 image with Pillow.

    All filters except ``"nearest"`` are antialiased when downscaling (the filter support
    is widened by the scale factor), and alpha is premultiplied while resampling RGBA.

    Args:
        image: uint8 array of shape ``[H, W]`` or ``[H, W, C]`` with ``C`` in 1, 3 or 4.
        size: Output ``(height, width)``, or a single int for a square output.
        resample: One of ``"nearest"``, ``"box"``, ``"bilinear"``, ``"hamming"``,
            ``"bicubic"`` or ``"lanczos"``.

    Returns:
        A new uint8 array with the same number of dimensions and channels as ``image``.

    Raises:
        ValueError: Wrong dtype or shape, invalid ``size`` or unknown ``resample``.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"resize_image expects a uint8 image, got dtype {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
        raise ValueError(f"resize_image expects shape [H, W] or [H, W, C] with C in (1, 3, 4), got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"resize_image got an empty image of shape {arr.shape}")
    height, width = _check_size(size)
    if resample not in _RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; expected one of {sorted(_RESAMPLE)}")

    squeeze = arr.ndim == 3 and arr.shape[2] == 1
    pil = Image.fromarray(np.ascontiguousarray(arr[..., 0] if squeeze else arr))
    out = np.array(pil.resize((width, height), resample=_RESAMPLE[resample]), dtype=np.uint8)
    return out[..., None] if squeeze else out


def center_crop_square(image: np.ndarray) -> np.ndarray:
    """Crops the largest centred square from an image.

    When the excess is odd, the extra row or column is removed from the bottom or right.

    Args:
        image: Array of shape ``[H, W, ...]``.

    Returns:
        C-contiguous array of shape ``[S, S, ...]`` with ``S = min(H, W)``; it may share
        memory with ``image`` when no copy is needed.

    Raises:
        ValueError: ``image`` has fewer than two dimensions.
    """
    arr = np.asarray(image)
    if arr.ndim < 2:
        raise ValueError(f"center_crop_square expects shape [H, W, ...], got {arr.shape}")
    height, width = arr.shape[:2]
    side = min(height, width)
    top = (height - side) // 2
    left = (width - side) // 2
    return np.ascontiguousarray(arr[top : top + side, left : left + side])


def write_image_atomic(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Writes an image atomically; the format is chosen by the file suffix.

    The image is encoded into a temporary file in the destination directory, flushed to
    disk and then moved over ``path`` with ``os.replace``, so ``path`` either keeps its old
    contents or holds the complete new image. Missing parent directories are created.
    JPEG is written at quality 95 without chroma subsampling, WebP at quality 95, PNG
    losslessly.

    Args:
        path: Destination; the suffix (case-insensitive) must be ``.png``, ``.jpg``,
            ``.jpeg`` or ``.webp``.
        image: uint8 array, or float array with values in ``[0, 1]``, of shape
            ``[H, W, 3]`` (RGB), ``[H, W, 1]`` or ``[H, W]`` (grayscale). Floats are clipped
            to ``[0, 1]`` and mapped with ``floor(x * 255 + 0.5)``.

    Raises:
        ImageError: Unsupported suffix, dtype or shape, NaN values (all checked before
            anything is created on disk), or a failure while writing.
    """
    name = os.fsdecode(path)
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in _WRITE_FORMATS:
        raise ImageError(
            f"{name}: unsupported image suffix {suffix or '(none)'!r}; "
            f"expected one of {', '.join(sorted(_WRITE_FORMATS))}"
        )
    fmt, options = _WRITE_FORMATS[suffix]
    pil = Image.fromarray(_pixels_for_writing(image, name))

    directory, base = os.path.split(os.path.abspath(name))
    try:
        os.makedirs(directory, exist_ok=True)
        _save_and_replace(pil, fmt, options, directory, base)
    except Exception as e:
        raise ImageError(f"{name}: could not write image ({_describe(e)})") from e


def _check_read_args(background: Sequence[int], max_pixels: int | None) -> tuple[int, int, int]:
    """Validates the keyword arguments of the readers and returns the background."""
    bg = tuple(background)
    if len(bg) != 3 or not all(
        isinstance(c, int | np.integer) and not isinstance(c, bool) and 0 <= c <= 255 for c in bg
    ):
        raise ValueError(f"background must be three ints in [0, 255], got {background!r}")
    if max_pixels is not None and (not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels <= 0):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    return (int(bg[0]), int(bg[1]), int(bg[2]))


def _check_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """Returns ``(height, width)`` from an int or a pair of positive ints."""
    pair = (size, size) if isinstance(size, int | np.integer) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int | np.integer) and not isinstance(s, bool) and s > 0 for s in pair):
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return int(pair[0]), int(pair[1])


def _describe(e: BaseException) -> str:
    """One-line description of an exception."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _format_pixels(n: int) -> str:
    return f"{n / 1e6:.1f} MP" if n >= 100_000 else f"{n} pixels"


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{name}: image is {width}x{height} = {_format_pixels(width * height)}, "
            f"over the limit of {_format_pixels(max_pixels)} (max_pixels)"
        )


def _open_formats() -> list[str]:
    """All formats Pillow can open (including late-registered plugins) minus blocked ones."""
    Image.init()
    return [f for f in Image.ID if f not in _BLOCKED_FORMATS]


def _decode(fp: BinaryIO, name: str, background: tuple[int, int, int], max_pixels: int | None) -> np.ndarray:
    """Decodes the first frame of an open image file into uint8 RGB."""
    try:
        empty = not fp.read(1)
        fp.seek(0)
    except OSError as e:
        raise ImageError(f"{name}: cannot read file ({_describe(e)})") from e
    if empty:
        raise ImageError(f"{name}: empty file")

    # Our max_pixels check below is authoritative, so Pillow's DecompressionBombWarning
    # (emitted by Image.open for images above MAX_IMAGE_PIXELS) is silenced here.
    # Note: before Python 3.14, catch_warnings mutates process-global warning filters.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp, formats=_open_formats())
        except Image.DecompressionBombError as e:
            raise ImageError(f"{name}: image is too large to decode safely ({_describe(e)})") from e
        except UnidentifiedImageError as e:
            raise ImageError(f"{name}: not a readable image (cannot identify image file)") from e
        except Exception as e:
            raise ImageError(f"{name}: not a readable image ({_describe(e)})") from e

        with img:
            # Image.open only parsed the header, so this runs before any pixel decoding.
            _check_pixels(img.size, name, max_pixels)
            try:
                img.load()
            except Image.DecompressionBombError as e:
                raise ImageError(f"{name}: image is too large to decode safely ({_describe(e)})") from e
            except Exception as e:
                raise ImageError(f"{name}: truncated or corrupt image data ({_describe(e)})") from e
            _check_pixels(img.size, name, max_pixels)
            return _to_rgb(_exif_transpose(img), name, background)


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Applies the EXIF orientation; malformed EXIF metadata is ignored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


def _to_rgb(img: Image.Image, name: str, background: tuple[int, int, int]) -> np.ndarray:
    """Converts a loaded Pillow image of any mode to a new uint8 ``[H, W, 3]`` array."""
    try:
        if img.mode.startswith("I") or img.mode == "F":
            gray = _high_depth_to_uint8(np.asarray(img))
            out = np.repeat(gray[:, :, None], 3, axis=2)
        elif img.mode in _ALPHA_MODES or img.has_transparency_data:
            out = _composite(np.asarray(img.convert("RGBA")), background)
        else:
            out = np.array(img.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as e:
        raise ImageError(f"{name}: unsupported colour mode {img.mode} ({_describe(e)})") from e
    if out.ndim != 3 or out.shape[2] != 3 or out.shape[0] == 0 or out.shape[1] == 0:
        raise ImageError(f"{name}: decoded to unexpected shape {out.shape}")
    return np.ascontiguousarray(out, dtype=np.uint8)


def _composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Composites ``[H, W, 4]`` uint8 onto a background with round-to-nearest."""
    alpha = rgba[:, :, 3:]
    if np.all(alpha == 255):
        return np.array(rgba[:, :, :3])
    # c * a + bg * (255 - a) <= 255 * 255, so the sum plus 127 fits in uint16.
    a = alpha.astype(np.uint16)
    color = rgba[:, :, :3].astype(np.uint16)
    bg = np.asarray(background, dtype=np.uint16)
    total = color * a + bg * (255 - a) + 127
    return (total // 255).astype(np.uint8)


def _high_depth_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Maps integer or float grayscale of any depth to uint8 (see module docstring)."""
    if arr.dtype.kind == "f":
        x = arr.astype(np.float64)
        finite = x[np.isfinite(x)]
        scale = 255.0 if finite.size == 0 or finite.max() <= 1.0 else 1.0
        x = np.where(np.isnan(x), 0.0, x * scale)
        return np.floor(np.clip(x, 0.0, 255.0) + 0.5).astype(np.uint8)

    info = np.iinfo(arr.dtype)
    if arr.dtype.kind == "u":
        lo, hi = 0, int(info.max)
    else:
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 2**16 - 1:
            lo, hi = 0, 2**16 - 1
        elif lo >= 0:
            lo, hi = 0, int(info.max)
        else:
            lo, hi = int(info.min), int(info.max)
    # round((x - lo) * 255 / span) in exact integer arithmetic; fits in int64 for <= 32 bits.
    span = hi - lo
    x = arr.astype(np.int64) - lo
    return ((x * 510 + span) // (2 * span)).astype(np.uint8)


def _pixels_for_writing(image: np.ndarray, name: str) -> np.ndarray:
    """Validates an image for writing and returns it as uint8 ``[H, W]`` or ``[H, W, 3]``."""
    arr = np.asarray(image)
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3))):
        raise ImageError(f"{name}: cannot write array of shape {arr.shape}; expected [H, W, 3], [H, W, 1] or [H, W]")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{name}: cannot write empty image of shape {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind == "f":
        if np.isnan(arr).any():
            raise ImageError(f"{name}: cannot write image containing NaN values")
        x = np.clip(arr.astype(np.promote_types(arr.dtype, np.float32)), 0.0, 1.0)
        return np.floor(x * 255 + 0.5).astype(np.uint8)
    raise ImageError(f"{name}: cannot write array of dtype {arr.dtype}; expected uint8 or float in [0, 1]")


def _save_and_replace(
    pil: Image.Image,
    fmt: str,
    options: dict[str, object],
    directory: str,
    base: str,
) -> None:
    """Encodes into a new temporary file in ``directory``, then moves it onto ``base``."""
    while True:
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            # Mode 0o666 lets the process umask decide the final permissions, as for open().
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    replaced = False
    try:
        with open(fd, "wb") as f:
            pil.save(f, format=fmt, **options)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, base))
        replaced = True
    finally:
        if not replaced:
            try:
                os.unlink(tmp)
            except OSError:
                pass
