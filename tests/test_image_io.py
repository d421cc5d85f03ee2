"""Tests for editing_jax.data.image_io; every fixture is generated in tmp_path."""

from __future__ import annotations

import io
import os
import re
import struct
import time
import warnings
import zlib
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from editing_jax.data import image_io
from editing_jax.data.image_io import (
    DEFAULT_BACKGROUND,
    DEFAULT_MAX_PIXELS,
    ImageError,
    center_crop_square,
    read_image,
    read_image_bytes,
    resize_image,
    write_image_atomic,
)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _raw_png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    """Builds a PNG from an already-compressed IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _png16(values: list[list[int]], color_type: int) -> bytes:
    """A 16-bit PNG with one scanline per row of big-endian samples."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    width = len(values[0]) // channels
    raw = b"".join(b"\x00" + struct.pack(f">{len(row)}H", *row) for row in values)
    return _raw_png(width, len(values), 16, color_type, zlib.compress(raw))


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def _noise_png(tmp_path: Path, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return _save(Image.fromarray(pixels), tmp_path / "noise.png")


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- modes


def test_constants() -> None:
    assert DEFAULT_MAX_PIXELS == 64 * 1024 * 1024
    assert DEFAULT_BACKGROUND == (255, 255, 255)
    assert issubclass(ImageError, ValueError)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_rgb_png_exact_and_output_contract(tmp_path: Path) -> None:
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    path = _save(Image.fromarray(pixels), tmp_path / "rgb.png")
    out = read_image(path)
    np.testing.assert_array_equal(out, pixels)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable


def test_mode_1(tmp_path: Path) -> None:
    img = Image.new("1", (3, 1))
    img.putpixel((1, 0), 1)
    out = read_image(_save(img, tmp_path / "bits.png"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 255, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])


def test_mode_l(tmp_path: Path) -> None:
    img = Image.fromarray(np.array([[0, 7, 200]], dtype=np.uint8))
    assert img.mode == "L"
    out = read_image(_save(img, tmp_path / "gray.png"))
    assert out.shape == (1, 3, 3)
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [7, 7, 7], [200, 200, 200]])


def test_rgba_composited_onto_background_with_round_to_nearest(tmp_path: Path) -> None:
    row = [(255, 0, 0, 128), (10, 20, 30, 0), (10, 20, 30, 255), (1, 1, 1, 128), (1, 1, 1, 127)]
    img = Image.fromarray(np.array([row], dtype=np.uint8))
    assert img.mode == "RGBA"
    path = _save(img, tmp_path / "alpha.png")

    white = read_image(path)
    # round((c * a + bg * (255 - a)) / 255) with bg = 255:
    # G of red: 255 * 127 / 255 = 127; (1, a=128): 0.502 + 127 -> 128; (1, a=127): 0.498 + 128 -> 128.
    np.testing.assert_array_equal(
        white[0], [[255, 127, 127], [255, 255, 255], [10, 20, 30], [128, 128, 128], [128, 128, 128]]
    )
    black = read_image(path, background=(0, 0, 0))
    # 255*128/255 = 128; 1*128/255 = 0.502 -> 1; 1*127/255 = 0.498 -> 0.
    np.testing.assert_array_equal(black[0], [[128, 0, 0], [0, 0, 0], [10, 20, 30], [1, 1, 1], [0, 0, 0]])
    custom = read_image(path, background=(0, 100, 200))
    np.testing.assert_array_equal(custom[0, 1], [0, 100, 200])


def test_la_composited(tmp_path: Path) -> None:
    img = Image.new("LA", (2, 1))
    img.putpixel((0, 0), (100, 128))
    img.putpixel((1, 0), (100, 0))
    out = read_image(_save(img, tmp_path / "la.png"))
    # 100*128/255 + 127 = 177.2 -> 177.
    np.testing.assert_array_equal(out[0], [[177, 177, 177], [255, 255, 255]])


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    img.putdata([0, 1, 2])
    path = _save(img, tmp_path / "pal.png", transparency=1)
    assert Image.open(path).mode == "P"
    out = read_image(path, background=(7, 8, 9))
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [7, 8, 9], [0, 0, 255]])


def test_palette_without_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([12, 34, 56, 78, 90, 123])
    img.putdata([1, 0])
    out = read_image(_save(img, tmp_path / "pal.png"), background=(0, 0, 0))
    np.testing.assert_array_equal(out[0], [[78, 90, 123], [12, 34, 56]])


def test_cmyk_jpeg(tmp_path: Path) -> None:
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    out = read_image(_save(img, tmp_path / "cmyk.jpg", quality=95))
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out[8, 8], [255, 0, 0], atol=8)


def test_i16_png_scaled_not_clamped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535, 128, 129]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "gray16.png")
    assert Image.open(path).mode == "I;16"
    out = read_image(path)
    # round(v / 257): 128/257 = 0.498 -> 0, 129/257 = 0.502 -> 1.
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255, 0, 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_i16_big_endian_tiff(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=">u2")
    path = _save(Image.fromarray(values), tmp_path / "gray16b.tif")
    assert Image.open(path).mode == "I;16B"
    np.testing.assert_array_equal(read_image(path)[0, :, 1], [0, 1, 128, 255])


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 257, 32768, 65535], [0, 1, 128, 255]),  # 16-bit range.
        ([0, 2**30, 2**31 - 1, 65536], [0, 128, 255, 0]),  # Non-negative int32 range.
        ([-(2**31), 0, 2**31 - 1, -1], [0, 128, 255, 127]),  # Full signed int32 range.
    ],
)
def test_mode_i_scaled_by_value_range(tmp_path: Path, values: list[int], expected: list[int]) -> None:
    path = _save(Image.fromarray(np.array([values], dtype=np.int32)), tmp_path / "int.tif")
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(read_image(path)[0, :, 0], expected)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.5, 1.0, 0.2, -0.5, np.nan], [0, 128, 255, 51, 0, 0]),  # Taken as [0, 1].
        ([0.0, 127.5, 255.0, 300.0, 2.0, np.inf], [0, 128, 255, 255, 2, 255]),  # [0, 255].
    ],
)
def test_mode_f(tmp_path: Path, values: list[float], expected: list[int]) -> None:
    path = _save(Image.fromarray(np.array([values], dtype=np.float32)), tmp_path / "f.tif")
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(read_image(path)[0, :, 2], expected)


def test_16bit_rgb_and_rgba_png() -> None:
    rgb = _png16([[0, 257, 32768, 65535, 65535, 0]], color_type=2)
    out = read_image_bytes(rgb, name="rgb16.png")
    np.testing.assert_array_equal(out[0], [[0, 1, 128], [255, 255, 0]])

    rgba = _png16([[65535, 0, 0, 0, 0, 65535, 0, 65535]], color_type=6)
    out = read_image_bytes(rgba, name="rgba16.png")
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [0, 255, 0]])


def test_exif_orientation_6(tmp_path: Path) -> None:
    raw = np.zeros((2, 3, 3), dtype=np.uint8)  # Stored 2 rows x 3 columns.
    raw[0, 0] = (255, 0, 0)  # Top-left: red.
    raw[1, 0] = (0, 255, 0)  # Bottom-left: green.
    exif = Image.Exif()
    exif[0x0112] = 6  # Rotate 90 degrees clockwise for display.
    path = _save(Image.fromarray(raw), tmp_path / "exif.png", exif=exif)
    out = read_image(path)
    assert out.shape == (3, 2, 3)
    np.testing.assert_array_equal(out[0, 1], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 0], [0, 255, 0])
    np.testing.assert_array_equal(out[2, :], 0)


def test_exif_orientation_8_jpeg(tmp_path: Path) -> None:
    raw = np.zeros((16, 24, 3), dtype=np.uint8)
    raw[:8, :8] = 255  # White block at the stored top-left.
    exif = Image.Exif()
    exif[0x0112] = 8  # Rotate 90 degrees counter-clockwise for display.
    out = read_image(_save(Image.fromarray(raw), tmp_path / "exif.jpg", exif=exif, quality=95))
    assert out.shape == (24, 16, 3)
    assert out[20, 4].min() > 230  # Stored top-left ends up bottom-left.
    assert out[4, 4].max() < 25


def test_animated_gif_and_apng_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    gif = _save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    apng = _save(frames[0], tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    assert Image.open(gif).n_frames == 2 and Image.open(apng).n_frames == 2
    np.testing.assert_array_equal(read_image(gif)[2, 2], [255, 0, 0])
    np.testing.assert_array_equal(read_image(apng)[2, 2], [255, 0, 0])


def test_read_image_bytes_matches_read_image(tmp_path: Path) -> None:
    path = _noise_png(tmp_path, size=8)
    np.testing.assert_array_equal(read_image_bytes(path.read_bytes()), read_image(path))


# --------------------------------------------------------------------------- errors


def _raises(name: str, message: str) -> AbstractContextManager[pytest.ExceptionInfo[ImageError]]:
    """Expects an ImageError whose message starts with ``name: message`` (a regex)."""
    return pytest.raises(ImageError, match="^" + re.escape(name) + ": " + message)


def test_truncated_png(tmp_path: Path) -> None:
    data = _noise_png(tmp_path).read_bytes()
    cut = tmp_path / "photo.png"
    cut.write_bytes(data[: len(data) // 2])
    with _raises(str(cut), "truncated or corrupt image data"):
        read_image(cut)


def test_corrupt_png_data() -> None:
    data = bytearray(_noise_png_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    with _raises("bad.png", "truncated or corrupt image data"):
        read_image_bytes(bytes(data), name="bad.png")


def _noise_png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_truncated_jpeg(tmp_path: Path) -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _save(Image.fromarray(pixels), tmp_path / "full.jpg").read_bytes()
    with _raises("cut.jpg", "truncated or corrupt image data"):
        read_image_bytes(data[: len(data) // 2], name="cut.jpg")


def test_garbage_bytes_and_text_file(tmp_path: Path) -> None:
    with _raises("junk.bin", re.escape("not a readable image (cannot identify image file)")):
        read_image_bytes(b"\x13\x37 definitely not an image " * 8, name="junk.bin")
    text = tmp_path / "notes.png"
    text.write_text("hello, world\n")
    with _raises(str(text), "not a readable image"):
        read_image(text)


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with _raises(str(empty), "empty file"):
        read_image(empty)
    with _raises("<bytes>", "empty file"):
        read_image_bytes(b"")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with _raises(str(tmp_path / "nope.png"), "no such file"):
        read_image(tmp_path / "nope.png")
    with _raises(str(tmp_path), "is a directory"):
        read_image(tmp_path)


def test_eps_is_not_opened() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\nshowpage\n"
    with _raises("x.eps", "not a readable image"):
        read_image_bytes(eps, name="x.eps")


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        read_image_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, name="x.png")
    assert "\n" not in str(info.value)


def test_bomb_rejected_from_header_before_decoding() -> None:
    # 10000 x 10000 1-bit PNG whose zlib stream holds one scanline and is never finished:
    # decoding it would fail as truncated, so the max_pixels message proves that the
    # check ran on the header alone.
    stream = zlib.compressobj()
    idat = stream.compress(b"\x00" + bytes(1250)) + stream.flush(zlib.Z_SYNC_FLUSH)
    data = _raw_png(10_000, 10_000, 1, 0, idat)
    assert len(data) < 200
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape.
        with _raises(
            "huge.png",
            re.escape("image is 10000x10000 = 100.0 MP, over the limit of 67.1 MP (max_pixels)"),
        ):
            read_image_bytes(data, name="huge.png")
    assert time.perf_counter() - start < 1.0


def test_max_pixels_small_limit(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (10, 10)), tmp_path / "small.png")
    with _raises(str(path), re.escape("image is 10x10 = 100 pixels, over the limit of 99 pixels")):
        read_image(path, max_pixels=99)
    assert read_image(path, max_pixels=100).shape == (10, 10, 3)
    assert read_image(path, max_pixels=None).shape == (10, 10, 3)


def test_pillow_bomb_error_and_warning_converted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    warned = _save(Image.new("RGB", (12, 12), (1, 2, 3)), tmp_path / "warned.png")
    refused = _save(Image.new("RGB", (20, 20)), tmp_path / "refused.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # 144 px: Pillow only warns; the warning is silenced and max_pixels decides.
        np.testing.assert_array_equal(read_image(warned)[5, 5], [1, 2, 3])
        # 400 px > 2 * MAX_IMAGE_PIXELS: Pillow raises DecompressionBombError.
        with _raises(str(refused), "image is too large to decode safely"):
            read_image(refused)


def test_invalid_arguments(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (2, 2)), tmp_path / "ok.png")
    with pytest.raises(ValueError, match="background"):
        read_image(path, background=(0, 0, 256))
    with pytest.raises(ValueError, match="background"):
        read_image(path, background=(0, 0))
    with pytest.raises(ValueError, match="max_pixels"):
        read_image(path, max_pixels=0)


# --------------------------------------------------------------------------- resize / crop


def test_resize_keeps_dtype_and_shape() -> None:
    image = np.full((48, 64, 3), 77, dtype=np.uint8)
    out = resize_image(image, (32, 32))
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    assert np.all(out == 77)
    assert resize_image(image, 16).shape == (16, 16, 3)


def test_resize_size_is_height_width() -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    assert resize_image(image, (10, 20)).shape == (10, 20, 3)
    assert resize_image(image[:, :, 0], (5, 3), resample="lanczos").shape == (5, 3)
    assert resize_image(image[:, :, :1], (4, 6)).shape == (4, 6, 1)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    assert resize_image(rgba, (4, 4)).shape == (4, 4, 4)


def test_resize_downscale_is_antialiased() -> None:
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    smooth = resize_image(checker, (8, 8), resample="bicubic")
    assert np.abs(smooth.astype(int) - 128).max() <= 2
    nearest = resize_image(checker, (8, 8), resample="nearest")
    assert set(np.unique(nearest)) <= {0, 255}


def test_resize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        resize_image(np.zeros((4, 4, 3), dtype=np.float32), 2)
    with pytest.raises(ValueError, match="shape"):
        resize_image(np.zeros((4, 4, 2), dtype=np.uint8), 2)
    with pytest.raises(ValueError, match="size"):
        resize_image(np.zeros((4, 4, 3), dtype=np.uint8), (0, 2))
    with pytest.raises(ValueError, match="resample"):
        resize_image(np.zeros((4, 4, 3), dtype=np.uint8), 2, resample="cubic")  # type: ignore[arg-type]


def test_center_crop_square() -> None:
    wide = np.arange(4 * 7).reshape(4, 7)
    np.testing.assert_array_equal(center_crop_square(wide), wide[:, 1:5])
    tall = np.arange(6 * 3 * 3).reshape(6, 3, 3)
    out = center_crop_square(tall)
    np.testing.assert_array_equal(out, tall[1:4])
    assert out.flags.c_contiguous
    with pytest.raises(ValueError):
        center_crop_square(np.zeros(5))


# --------------------------------------------------------------------------- writing


def test_write_png_round_trip_and_no_temp_files(tmp_path: Path) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "sub" / "dir" / "out.png"
    write_image_atomic(path, pixels)
    np.testing.assert_array_equal(read_image(path), pixels)
    assert _listing(path.parent) == ["out.png"]

    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

    write_image_atomic(str(path), pixels[::-1])  # Replaces the existing file.
    np.testing.assert_array_equal(read_image(path), pixels[::-1])
    assert _listing(path.parent) == ["out.png"]


def test_write_grayscale_and_float(tmp_path: Path) -> None:
    gray = np.array([[0, 100, 255]], dtype=np.uint8)
    write_image_atomic(tmp_path / "gray.png", gray)
    np.testing.assert_array_equal(read_image(tmp_path / "gray.png")[..., 1], gray)

    floats = np.array([[0.0, 0.5, 1.0, 1.2, -0.1, 0.2, 1 / 255, 0.5 / 255]], dtype=np.float64)
    write_image_atomic(tmp_path / "float.PNG", floats[..., None])
    np.testing.assert_array_equal(read_image(tmp_path / "float.PNG")[0, :, 0], [0, 128, 255, 255, 0, 51, 1, 1])

    rgb = np.stack([floats, floats, floats], axis=-1).astype(np.float32)
    write_image_atomic(tmp_path / "float_rgb.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "float_rgb.png")[0, :, 2], [0, 128, 255, 255, 0, 51, 1, 1])


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".webp"])
def test_write_lossy_formats(tmp_path: Path, suffix: str) -> None:
    if suffix == ".webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[:, :8] = (200, 30, 60)
    path = tmp_path / f"out{suffix}"
    write_image_atomic(path, image)
    expected = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}[suffix]
    assert Image.open(path).format == expected
    np.testing.assert_allclose(read_image(path)[8, 2], [200, 30, 60], atol=6)
    assert _listing(tmp_path) == [path.name]


@pytest.mark.parametrize(
    ("name", "image", "message"),
    [
        ("out.bmp", np.zeros((2, 2, 3), np.uint8), "unsupported image suffix '.bmp'"),
        ("out", np.zeros((2, 2, 3), np.uint8), "unsupported image suffix"),
        ("out.png", np.zeros((2, 2, 3), np.uint16), "dtype uint16"),
        ("out.png", np.zeros((2, 2, 3), bool), "dtype bool"),
        ("out.png", np.zeros((2, 2, 4), np.uint8), "shape"),
        ("out.png", np.zeros((2, 2, 2, 3), np.uint8), "shape"),
        ("out.png", np.zeros((0, 2, 3), np.uint8), "empty"),
        ("out.png", np.full((2, 2), np.nan), "NaN"),
    ],
)
def test_write_rejects_before_touching_disk(tmp_path: Path, name: str, image: np.ndarray, message: str) -> None:
    path = tmp_path / "new_dir" / name
    with pytest.raises(ImageError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        write_image_atomic(path, image)
    assert _listing(tmp_path) == []


def test_write_failure_keeps_old_file_and_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keep.png"
    path.write_bytes(b"old contents")

    def broken_save(self: Image.Image, fp: io.BufferedWriter, *args: object, **kw: object) -> None:
        fp.write(b"\x89PNG half written")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with _raises(str(path), re.escape("could not write image (disk full)")):
        write_image_atomic(path, np.zeros((4, 4, 3), np.uint8))
    assert path.read_bytes() == b"old contents"
    assert _listing(tmp_path) == ["keep.png"]


def test_write_onto_directory_fails_cleanly(tmp_path: Path) -> None:
    target = tmp_path / "taken.png"
    target.mkdir()
    with _raises(str(target), "could not write image"):
        write_image_atomic(target, np.zeros((4, 4, 3), np.uint8))
    assert target.is_dir()
    assert _listing(tmp_path) == ["taken.png"]


def test_module_exports() -> None:
    assert set(image_io.__all__) >= {"read_image", "read_image_bytes", "write_image_atomic"}
