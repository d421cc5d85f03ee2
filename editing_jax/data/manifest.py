"""User editing data on disk: a JSONL manifest of image paths and instructions.

Each non-blank line of the manifest is a JSON object::

    {"source": "imgs/0.png", "instruction": "make the cat blue",
     "target": "imgs/0_edited.png", "mask": "masks/0.png"}

``source`` and ``instruction`` are required; ``target`` and ``mask`` are optional (absent or
``null``); other keys are rejected so that a typo (``"tagret"``) cannot silently drop data. Paths
are relative to a root directory (default: the manifest's directory) and must stay inside it:
absolute paths, ``..`` components and symlinks resolving outside the root are rejected.
:func:`load_manifest` checks every line up front and reports the first problem as
``ManifestError("<manifest>:<line>: <what is wrong>")``; images are decoded later, lazily, by
:class:`ManifestSource`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["ManifestEntry", "ManifestError", "ManifestSource", "load_manifest"]

_REQUIRED_KEYS = ("source", "instruction")
_PATH_KEYS = ("source", "target", "mask")
_ALLOWED_KEYS = frozenset({"source", "instruction", "target", "mask"})


class ManifestError(ValueError):
    """A manifest line is malformed or points at a bad path; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One validated manifest line; paths are resolved, existing files inside the root."""

    line: int  # 1-based line number in the manifest.
    source: pathlib.Path
    instruction: str
    target: pathlib.Path | None = None
    mask: pathlib.Path | None = None
    location: str = ""  # "<manifest>:<line>", for error messages.


def _resolve_path(value: Any, key: str, root: pathlib.Path, where: str) -> pathlib.Path:
    """Checks a manifest path and returns it resolved (symlinks followed) inside ``root``."""
    if not isinstance(value, str):
        raise ManifestError(f"{where}: {key!r} must be a string path, got {type(value).__name__}")
    if not value:
        raise ManifestError(f"{where}: {key!r} is an empty path")
    if "\0" in value:
        raise ManifestError(f"{where}: {key!r} path {value!r} contains a NUL character")
    if os.path.isabs(value) or value.startswith(("/", "\\")):
        raise ManifestError(f"{where}: {key!r} path {value!r} is absolute; paths must be relative to {root}")
    parts = value.replace("\\", "/").split("/")
    if ".." in parts:
        raise ManifestError(f"{where}: {key!r} path {value!r} has a '..' component; paths must stay inside {root}")
    resolved = pathlib.Path(os.path.realpath(root / value))
    if resolved != root and root not in resolved.parents:
        raise ManifestError(
            f"{where}: {key!r} path {value!r} resolves to {resolved}, outside the root {root} (symlink?)"
        )
    if not resolved.exists():
        raise ManifestError(f"{where}: {key!r} file {value!r} does not exist under {root}")
    if not resolved.is_file():
        raise ManifestError(f"{where}: {key!r} path {value!r} is not a regular file")
    return resolved


def _parse_line(text: str, root: pathlib.Path, where: str, line: int) -> ManifestEntry:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in record]
    if missing:
        raise ManifestError(f"{where}: missing required key(s) {', '.join(map(repr, missing))}")
    unknown = sorted(set(record) - _ALLOWED_KEYS)
    if unknown:
        raise ManifestError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(_ALLOWED_KEYS))}"
        )
    instruction = record["instruction"]
    if not isinstance(instruction, str):
        raise ManifestError(f"{where}: 'instruction' must be a string, got {type(instruction).__name__}")
    if not instruction.strip():
        raise ManifestError(f"{where}: 'instruction' is empty")
    paths = {key: _resolve_path(record[key], key, root, where) for key in _PATH_KEYS if record.get(key) is not None}
    return ManifestEntry(line=line, instruction=instruction, location=where, **paths)


def load_manifest(
    manifest_path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
) -> list[ManifestEntry]:
    """Reads and validates a JSONL manifest.

    Args:
        manifest_path: The ``.jsonl`` file; blank lines are skipped.
        root: Directory the paths are relative to; default: the manifest's directory.

    Returns:
        One :class:`ManifestEntry` per non-blank line, in file order.

    Raises:
        ManifestError: The manifest or root cannot be read, has no entries, or any line is
            malformed (bad JSON, missing/unknown keys, wrong types) or names a path that is
            absolute, uses ``..``, resolves outside the root, or is not an existing file.
    """
    name = os.fspath(manifest_path)
    manifest = pathlib.Path(manifest_path)
    root_dir = pathlib.Path(os.path.realpath(manifest.parent if root is None else root))
    if not root_dir.is_dir():
        raise ManifestError(f"{name}: root {root_dir} is not a directory")
    try:
        text = manifest.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ManifestError(f"{name}: no such file") from e
    except UnicodeDecodeError as e:
        raise ManifestError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise ManifestError(f"{name}: cannot read ({e.strerror or e})") from e

    entries = [
        _parse_line(line, root_dir, f"{name}:{number}", number)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    if not entries:
        raise ManifestError(f"{name}: no entries")
    return entries


def _resize(image: np.ndarray, size: int, resample: str) -> np.ndarray:
    """Resizes uint8 ``[H, W]`` or ``[H, W, 3]`` to ``[size, size, ...]``."""
    from editing_jax.data import image_io

    resize_image = getattr(image_io, "resize_image", None)
    if resize_image is not None:
        return resize_image(image, size, resample=resample)
    from PIL import Image

    filters = {"bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}
    return np.asarray(Image.fromarray(image).resize((size, size), filters[resample]))


class ManifestSource:
    """grain random-access source over manifest entries; images are read on access.

    Element ``i`` is a dict:

    * ``source_image``: uint8 ``[H, W, 3]`` (``[size, size, 3]`` if ``size`` is given).
    * ``instruction``: str. ``source_path``: str (the resolved path).
    * If any entry has a target: ``target_image`` uint8 like ``source_image`` (zeros where the
      entry has none) and ``has_target`` bool.
    * If any entry has a mask: ``edit_mask`` bool ``[H, W]`` (nonzero pixel in any channel = edit
      region; transparent pixels count as outside; all False where the entry has none) and
      ``has_mask`` bool.

    Images go through ``image_io.read_image`` (EXIF orientation, alpha composited onto white).
    With ``size``, images are resized (bicubic, aspect ratio not kept) and masks resized with
    nearest neighbour; without it, images keep their size, so batching needs equal sizes.
    Read errors raise ``image_io.ImageError`` prefixed with the manifest line.
    """

    def __init__(self, entries: Sequence[ManifestEntry], size: int | None = None):
        if size is not None and size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.entries = list(entries)
        self.size = size
        self.has_targets = any(entry.target is not None for entry in self.entries)
        self.has_masks = any(entry.mask is not None for entry in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, path: pathlib.Path, entry: ManifestEntry, *, is_mask: bool) -> np.ndarray:
        from editing_jax.data import image_io

        # Masks are composited onto black so that transparent pixels are "not edited".
        background = (0, 0, 0) if is_mask else image_io.DEFAULT_BACKGROUND
        try:
            image = image_io.read_image(path, background=background)  # [H, W, 3]
        except image_io.ImageError as e:
            raise image_io.ImageError(f"{entry.location}: {e}") from e
        if is_mask:
            image = np.where(image.max(axis=-1) > 0, 255, 0).astype(np.uint8)  # [H, W]
        if self.size is not None:
            image = _resize(image, self.size, "nearest" if is_mask else "bicubic")
        return image

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[int(index)]
        source = self._read(entry.source, entry, is_mask=False)  # [H, W, 3]
        example: dict[str, Any] = {
            "source_image": source,
            "instruction": entry.instruction,
            "source_path": str(entry.source),
        }
        if self.has_targets:
            if entry.target is None:
                example["target_image"] = np.zeros_like(source)
            else:
                example["target_image"] = self._read(entry.target, entry, is_mask=False)
            example["has_target"] = np.bool_(entry.target is not None)
        if self.has_masks:
            if entry.mask is None:
                example["edit_mask"] = np.zeros(source.shape[:2], dtype=bool)  # [H, W]
            else:
                mask = self._read(entry.mask, entry, is_mask=True)  # [H, W] uint8 0/255
                if mask.shape != source.shape[:2]:
                    raise ValueError(
                        f"{entry.location}: mask is {mask.shape[1]}x{mask.shape[0]} but the "
                        f"source image is {source.shape[1]}x{source.shape[0]}"
                    )
                example["edit_mask"] = mask > 0  # [H, W] bool
            example["has_mask"] = np.bool_(entry.mask is not None)
        return example

    def __repr__(self) -> str:
        return f"ManifestSource({len(self)} entries, size={self.size})"
