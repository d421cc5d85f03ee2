"""Tests for editing_jax.data.manifest: validation of JSONL manifests and image reading."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from editing_jax.data import image_io, pipeline
from editing_jax.data.manifest import ManifestError, ManifestSource, load_manifest


def write_png(path: pathlib.Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def gradient(height: int, width: int, offset: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 7 + offset, y * 5, (x + y) * 3], axis=-1) % 256
    return image.astype(np.uint8)  # [H, W, 3]


@pytest.fixture
def root(tmp_path):
    """A data root with images, a mask and an image outside it (returned as root)."""
    data = tmp_path / "data"
    write_png(data / "imgs" / "a.png", gradient(12, 10))
    write_png(data / "imgs" / "a_edit.png", gradient(12, 10, offset=40))
    write_png(data / "imgs" / "b.png", gradient(12, 10, offset=90))
    mask = np.zeros((12, 10), np.uint8)
    mask[2:5, 3:8] = 200
    write_png(data / "masks" / "a.png", mask)
    write_png(tmp_path / "outside.png", gradient(4, 4))
    return data


def write_manifest(root: pathlib.Path, lines: list[object]) -> pathlib.Path:
    path = root / "manifest.jsonl"
    text = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path.write_text("\n".join(text) + "\n")
    return path


GOOD = {"source": "imgs/a.png", "instruction": "make it red"}


def test_good_manifest_loads(root):
    path = write_manifest(
        root,
        [
            {
                "source": "imgs/a.png",
                "instruction": "make it red",
                "target": "imgs/a_edit.png",
                "mask": "masks/a.png",
            },
            "",
            {"source": "./imgs/b.png", "instruction": "add a cat", "target": None},
        ],
    )
    entries = load_manifest(path)
    assert [e.line for e in entries] == [1, 3]
    assert entries[0].source == root.resolve() / "imgs" / "a.png"
    assert entries[0].target == root.resolve() / "imgs" / "a_edit.png"
    assert entries[0].mask == root.resolve() / "masks" / "a.png"
    assert entries[1].target is None and entries[1].mask is None
    assert entries[1].instruction == "add a cat"
    assert entries[1].location.endswith("manifest.jsonl:3")


def test_explicit_root(root, tmp_path):
    manifest = tmp_path / "lists" / "m.jsonl"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps(GOOD) + "\n")
    assert load_manifest(manifest, root=root)[0].source.name == "a.png"
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: 'source' file 'imgs/a\.png' does not"):
        load_manifest(manifest)


def test_symlink_inside_root_is_allowed(root):
    os.symlink(root / "imgs" / "b.png", root / "link.png")
    entries = load_manifest(write_manifest(root, [{**GOOD, "target": "link.png"}]))
    assert entries[0].target == root.resolve() / "imgs" / "b.png"


@pytest.mark.parametrize(
    "bad_line, match",
    [
        ({**GOOD, "source": "../outside.png"}, r"'source' path '\.\./outside\.png' has a '\.\.'"),
        ({**GOOD, "target": "imgs/../../outside.png"}, r"'target' path .* has a '\.\.'"),
        ({**GOOD, "mask": "ABSOLUTE"}, r"'mask' path '/.*outside\.png' is absolute"),
        ({**GOOD, "source": "escape.png"}, r"'source' path 'escape\.png' resolves to .*outside"),
        ({**GOOD, "source": "dirlink/outside.png"}, r"'source' path 'dirlink/outside\.png' resolves to"),
        ({**GOOD, "target": "imgs/missing.png"}, r"'target' file 'imgs/missing\.png' does not"),
        ({**GOOD, "source": "imgs"}, r"'source' path 'imgs' is not a regular file"),
        ('{"source": "imgs/a.png", "instruction": ', r"invalid JSON"),
        ('["imgs/a.png", "make it red"]', r"expected a JSON object, got list"),
        ({"source": "imgs/a.png"}, r"missing required key\(s\) 'instruction'"),
        ({"instruction": "make it red"}, r"missing required key\(s\) 'source'"),
        ({**GOOD, "instruction": 3}, r"'instruction' must be a string, got int"),
        ({**GOOD, "instruction": "  "}, r"'instruction' is empty"),
        ({**GOOD, "source": 5}, r"'source' must be a string path, got int"),
        ({**GOOD, "tagret": "imgs/b.png"}, r"unknown key\(s\) 'tagret'"),
    ],
)
def test_bad_line_is_rejected_with_its_line_number(root, bad_line, match):
    outside = (root.parent / "outside.png").resolve()
    os.symlink(outside, root / "escape.png")
    os.symlink(root.parent, root / "dirlink")
    if isinstance(bad_line, dict) and bad_line.get("mask") == "ABSOLUTE":
        bad_line = {**bad_line, "mask": str(outside)}
    path = write_manifest(root, [GOOD, bad_line, GOOD])
    with pytest.raises(ManifestError, match=r"manifest\.jsonl:2: " + match) as info:
        load_manifest(path)
    assert "\n" not in str(info.value)


def test_absolute_path_inside_root_is_still_rejected(root):
    line = {**GOOD, "source": str((root / "imgs" / "a.png").resolve())}
    with pytest.raises(ManifestError, match=r"manifest\.jsonl:1: 'source' path .* is absolute"):
        load_manifest(write_manifest(root, [line]))


def test_missing_or_empty_manifest(root):
    with pytest.raises(ManifestError, match="no such file"):
        load_manifest(root / "nope.jsonl")
    with pytest.raises(ManifestError, match="no entries"):
        load_manifest(write_manifest(root, ["", "  "]))


def test_source_reads_images_and_masks(root):
    path = write_manifest(
        root,
        [
            {**GOOD, "target": "imgs/a_edit.png", "mask": "masks/a.png"},
            {"source": "imgs/b.png", "instruction": "add a cat"},
        ],
    )
    source = ManifestSource(load_manifest(path))
    assert len(source) == 2
    first, second = source[0], source[1]
    np.testing.assert_array_equal(first["source_image"], gradient(12, 10))
    np.testing.assert_array_equal(first["target_image"], gradient(12, 10, offset=40))
    assert first["edit_mask"].dtype == bool and first["edit_mask"].shape == (12, 10)
    expected_mask = np.zeros((12, 10), bool)
    expected_mask[2:5, 3:8] = True
    np.testing.assert_array_equal(first["edit_mask"], expected_mask)
    assert bool(first["has_target"]) and bool(first["has_mask"])
    assert first["instruction"] == "make it red"
    # Entries without target/mask get placeholders flagged as absent.
    assert not second["has_target"] and not second["has_mask"]
    assert not second["edit_mask"].any() and not second["target_image"].any()


def test_source_resizes_and_batches(root):
    path = write_manifest(
        root,
        [
            {**GOOD, "mask": "masks/a.png"},
            {"source": "imgs/b.png", "instruction": "add a cat", "mask": "masks/a.png"},
        ],
    )
    source = ManifestSource(load_manifest(path), size=8)
    example = source[0]
    assert example["source_image"].shape == (8, 8, 3) and example["source_image"].dtype == np.uint8
    assert "target_image" not in example
    want = image_io.resize_image(gradient(12, 10), 8, resample="bicubic")
    np.testing.assert_array_equal(example["source_image"], want)
    assert example["edit_mask"].shape == (8, 8) and 0 < example["edit_mask"].sum() < 64

    batch = next(iter(pipeline.make_dataset(source, batch_size=2, seed=0, shuffle=False)))
    assert batch["source_image"].shape == (2, 8, 8, 3)
    assert batch["edit_mask"].shape == (2, 8, 8)
    assert list(batch["instruction"]) == ["make it red", "add a cat"]


def test_transparent_mask_pixels_are_outside_the_region(root):
    rgba = np.zeros((12, 10, 4), np.uint8)
    rgba[..., :3] = 255  # White everywhere, but only a 2x2 block is opaque.
    rgba[0:2, 0:2, 3] = 255
    write_png(root / "masks" / "alpha.png", rgba)
    path = write_manifest(root, [{**GOOD, "mask": "masks/alpha.png"}])
    mask = ManifestSource(load_manifest(path))[0]["edit_mask"]
    assert mask.sum() == 4 and mask[0:2, 0:2].all()


def test_corrupt_image_error_names_manifest_line(root):
    (root / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    path = write_manifest(root, [GOOD, {**GOOD, "source": "imgs/broken.png"}])
    source = ManifestSource(load_manifest(path))
    with pytest.raises(image_io.ImageError, match=r"manifest\.jsonl:2: .*broken\.png"):
        source[1]


def test_mask_size_mismatch(root):
    write_png(root / "masks" / "small.png", np.zeros((4, 4), np.uint8))
    path = write_manifest(root, [{**GOOD, "mask": "masks/small.png"}])
    with pytest.raises(ValueError, match=r"manifest\.jsonl:1: mask is 4x4 but the source"):
        ManifestSource(load_manifest(path))[0]
