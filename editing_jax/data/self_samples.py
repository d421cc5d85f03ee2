"""An editor's own successful edits of world examples, as training data (rejection-sampling fine-tuning).

A self-sample file (`.npz`, written by `save_self_samples`) names world examples by index and, optionally, holds
one edited image per example that the editor itself produced and the verifier accepted. `SelfSampleSource` reads
it back as a random-access source: element i is world example `indices[i]` of the file's split with its
`target_image` replaced by `target_images[i]` (every other field, the edit mask and scene graphs included, is the
world's). A file without `target_images` keeps the world's targets: the same examples with their ground truth,
the control that separates "train on what the editor already solves" from "train on its own outputs".

Training reads one with `data.source=self_samples`, `data.data_dir=FILE.npz`; evaluation splits stay the world's.
With `data.self_sample_fraction` f < 1, `MixedSource` draws each training element from the file with probability f
and otherwise takes the world's training example (the editor's own edits mixed into plain SFT).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from editing_jax.data import pipeline
from editing_jax.data.world import edits

__all__ = ["MixedSource", "SelfSampleSource", "load_self_sample_source", "save_self_samples"]

_FORMAT = "editing_jax.self_samples.v1"


def save_self_samples(path: str | os.PathLike[str], *, split: str, world_seed: int, size: int,
                      edit_types: tuple[str, ...], indices: np.ndarray, target_images: np.ndarray | None = None,
                      info: dict[str, Any] | None = None) -> pathlib.Path:  # fmt: skip
    """Writes a self-sample file atomically (a temporary file renamed into place).

    Args:
        path: the `.npz` to write.
        split, world_seed, size, edit_types: the world the indices refer to (`pipeline.WorldSource`'s arguments).
        indices: `[M]` world example indices.
        target_images: `[M, size, size, 3]` uint8 replacement targets, or None to keep the world's.
        info: JSON-serializable provenance (the command, counts), stored with the metadata.

    Raises:
        ValueError: no examples, repeated indices, or images of the wrong shape or dtype.
    """
    indices = np.asarray(indices, np.int64)
    if indices.ndim != 1 or not len(indices):
        raise ValueError(f"indices must be a non-empty 1-D array, got shape {indices.shape}")
    if len(np.unique(indices)) != len(indices):
        raise ValueError("indices must not repeat")
    arrays = {"indices": indices}
    if target_images is not None:
        target_images = np.asarray(target_images)
        expected = (len(indices), size, size, 3)
        if target_images.shape != expected or target_images.dtype != np.uint8:
            raise ValueError(f"target_images must be uint8 {expected}, got {target_images.dtype} {target_images.shape}")
        arrays["target_images"] = target_images
    metadata = {"format": _FORMAT, "split": split, "world_seed": int(world_seed), "size": int(size),
                "edit_types": list(edit_types), "info": info or {}}  # fmt: skip
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez(temporary, metadata=np.asarray(json.dumps(metadata)), **arrays)
    os.replace(temporary, path)
    return path


class SelfSampleSource:
    """Random-access source over a self-sample file (see the module docstring); picklable for grain workers."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no self-sample file")
        with np.load(self.path, allow_pickle=False) as data:
            self.metadata = json.loads(str(data["metadata"]))
            if self.metadata.get("format") != _FORMAT:
                raise ValueError(f"{self.path}: not a self-sample file (format {self.metadata.get('format')!r})")
            self.indices = np.asarray(data["indices"], np.int64)  # [M]
            self.target_images = np.asarray(data["target_images"]) if "target_images" in data else None
        config = edits.WorldConfig(size=self.metadata["size"], edit_types=tuple(self.metadata["edit_types"]))
        num_world = int(self.indices.max()) + 1
        self.world = pipeline.WorldSource(self.metadata["split"], num_world, self.metadata["world_seed"], config)

    @property
    def own_targets(self) -> bool:
        """True when targets are the editor's outputs, False when they are the world's."""
        return self.target_images is not None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> pipeline.Example:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} self samples")
        example = self.world[int(self.indices[index])]
        if self.target_images is not None:
            example["target_image"] = self.target_images[index]
        return example

    def __repr__(self) -> str:
        targets = "own" if self.own_targets else "world"
        return f"SelfSampleSource({str(self.path)!r}, len={len(self)}, targets={targets})"


def load_self_sample_source(path: str | os.PathLike[str], size: int) -> SelfSampleSource:
    """Opens a self-sample file and checks it was made at the training config's image size."""
    source = SelfSampleSource(path)
    if source.metadata["size"] != int(size):
        raise ValueError(f"{path}: self samples of size {source.metadata['size']}, the config has data.size={size}")
    return source


class MixedSource:
    """Self samples mixed into a world source: element i is, with probability `fraction`, a self sample chosen
    uniformly, else `world[i]`. Both draws are fixed functions of (seed, i), so the source is deterministic and
    picklable; its length is the world's."""

    def __init__(self, self_samples: SelfSampleSource, world, fraction: float, seed: int = 0):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"self_sample_fraction must be in (0, 1], got {fraction}")
        self.self_samples, self.world, self.fraction, self.seed = self_samples, world, float(fraction), int(seed)

    def __len__(self) -> int:
        return len(self.world)

    def pick(self, index: int) -> int | None:
        """The self-sample index that element `index` takes, or None where it takes the world example."""
        rng = np.random.default_rng([self.seed, int(index)])
        if rng.random() >= self.fraction:
            return None
        return int(rng.integers(len(self.self_samples)))

    def __getitem__(self, index: int) -> pipeline.Example:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        chosen = self.pick(index)
        return self.world[index] if chosen is None else self.self_samples[chosen]

    def __repr__(self) -> str:
        return f"MixedSource({self.self_samples!r}, fraction={self.fraction}, world_len={len(self)})"
