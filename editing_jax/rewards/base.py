"""The reward interface shared by the synthetic verifier reward and the MLLM reward.

A reward function scores a batch of edits on the host (NumPy, off the accelerator): it sees the source images, the
edited images, the instructions and one `info` dict per sample (whatever extra supervision the reward needs, e.g. the
world's target scene graph and edit mask), and returns per-sample float arrays. The key 'reward' is always present
and is the total that an RL objective maximizes; every other key is a component or a diagnostic, documented by the
reward that returns it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

REWARD_KEY = "reward"


@runtime_checkable
class RewardFn(Protocol):
    """Scores a batch of edits.

    Args:
        source: uint8 [B, H, W, 3] images before editing.
        edited: uint8 [B, H, W, 3] images after editing.
        instructions: B edit instructions.
        infos: B dicts of per-sample extra information (the world's `EditSample.to_example()` keys, for example).

    Returns:
        A dict of float32 [B] arrays that always holds 'reward' (the total) plus component keys.
    """

    def __call__(
        self,
        source: np.ndarray,
        edited: np.ndarray,
        instructions: Sequence[str],
        infos: Sequence[Mapping[str, Any]],
    ) -> dict[str, np.ndarray]: ...


def check_batch(
    source: np.ndarray,
    edited: np.ndarray,
    instructions: Sequence[str],
    infos: Sequence[Mapping[str, Any]],
) -> int:
    """Validates the arguments of a `RewardFn` call and returns the batch size B.

    Raises:
        ValueError: on a wrong rank, channel count, dtype, or on mismatched batch sizes.
        TypeError: when an instruction is not a string or an info is not a mapping.
    """
    for name, images in (("source", source), ("edited", edited)):
        if not isinstance(images, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array [B, H, W, 3] uint8, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{name} must have shape [B, H, W, 3], got {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"{name} must be uint8, got {images.dtype}")
    if source.shape != edited.shape:
        raise ValueError(f"source {source.shape} and edited {edited.shape} shapes differ")
    batch = source.shape[0]
    if isinstance(instructions, str):
        raise TypeError("instructions must be a sequence of strings, got a single string")
    if len(instructions) != batch or len(infos) != batch:
        raise ValueError(f"batch of {batch} images but {len(instructions)} instructions and {len(infos)} infos")
    for i, text in enumerate(instructions):
        if not isinstance(text, str):
            raise TypeError(f"instructions[{i}] must be a string, got {type(text).__name__}")
    for i, info in enumerate(infos):
        if not isinstance(info, Mapping):
            raise TypeError(f"infos[{i}] must be a mapping, got {type(info).__name__}")
    return batch


def check_outputs(outputs: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Checks a reward's outputs: 'reward' present, every value a float [B] array; returns float32 copies."""
    if REWARD_KEY not in outputs:
        raise ValueError(f"reward outputs must include {REWARD_KEY!r}, got keys {sorted(outputs)}")
    checked = {}
    for key, value in outputs.items():
        array = np.asarray(value, np.float32)
        if array.shape != (batch,):
            raise ValueError(f"reward output {key!r} must have shape ({batch},), got {array.shape}")
        checked[key] = array
    return checked
