"""Exact reward for the synthetic editing world, shaped like CogniEdit's MLLM reward.

CogniEdit (eq. 12) rewards an edit with the sum of three MLLM scores on [0, 5]: alignment with the instruction,
coherence of the image, and consistency with the source. In the world the verifier measures the same three things
exactly, so `WorldReward` maps verifier outputs onto that scale (each component in [0, 5], reward in [0, 15]):

- alignment = 5 * edited_accuracy * kept_accuracy. The verifier's per-attribute checks against the target (see
  `verifier.score`) split in two: *edited* checks, which the unedited source scene fails (exactly the attributes
  the instruction asks to change), and *kept* checks, which it passes (everything the instruction leaves alone).
  Doing nothing scores 0 (no edited check passes); changing the right attribute but breaking another loses the kept
  fraction; recoloring a distractor instead of the referenced object scores 0. Identity edits have no edited checks
  (edited_accuracy = 1). Garbage is not exactly 0: the parser hallucinates objects in noise, which pass some checks
  by chance (alignment 0-3 on uniform noise), but its coherence (< 0.5) and consistency (0) keep its total under
  about 3.5. With `alignment_mode='all'` alignment is 5 * accuracy over all checks instead, closer to a plain
  "attribute accuracy" but weak: an unedited source passes 50-95 % of all checks, so a slightly blurry correct edit
  can total less than a perfect no-op.
- coherence = 5 * verifier coherence (explained foreground fraction times the worst template fit, in [0, 1]).
- consistency = 5 * (1 - clip(L1 / consistency_l1_scale, 0, 1)) where L1 is the mean absolute difference in [0, 1]
  units between the edited and source images outside the ground-truth edit mask. With the default scale 0.1 a
  pixel-perfect preservation scores 5, uniform noise (L1 about 0.25-0.5) scores 0, and a Gaussian blur (sigma 0.8
  px) of a whole 64 px render (L1 about 0.002-0.035) costs up to about 1.7 points.

Everything is deterministic NumPy on the host; the verifier costs a few milliseconds per 64 px image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from editing_jax.data.world import spec, verifier
from editing_jax.rewards import base

MAX_SCORE = 5.0
COMPONENTS: tuple[str, ...] = ("alignment", "coherence", "consistency")
ALIGNMENT_MODES = ("edited_times_kept", "all")
REQUIRED_INFO_KEYS: tuple[str, ...] = ("target_scene", "source_scene", "edit_mask")


@dataclasses.dataclass(frozen=True)
class WorldReward:
    """`RewardFn` for world samples: R = alignment + coherence + consistency, each in [0, 5].

    Each info must hold 'target_scene' (Scene JSON or `spec.Scene`), 'source_scene' (same) and 'edit_mask'
    (bool/uint8 [H, W], pixels the ground-truth edit changes), as in `EditSample.to_example()`.

    Returned keys, float32 [B]: 'reward', 'alignment', 'coherence', 'consistency' (summed into 'reward'), and the
    diagnostics 'success' (0/1: every attribute right and the scene coherent), 'attribute_accuracy' (all checks)
    and 'preservation_l1' (L1 outside the edit mask, [0, 1] units).

    Attributes:
        consistency_l1_scale: L1 outside the edit mask at which consistency reaches 0 (linear in between).
        alignment_mode: 'edited_times_kept' (default) or 'all'; see the module docstring.
    """

    consistency_l1_scale: float = 0.1
    alignment_mode: str = "edited_times_kept"

    def __post_init__(self):
        if not self.consistency_l1_scale > 0:
            raise ValueError(f"consistency_l1_scale must be > 0, got {self.consistency_l1_scale}")
        if self.alignment_mode not in ALIGNMENT_MODES:
            raise ValueError(f"alignment_mode must be one of {ALIGNMENT_MODES}, got {self.alignment_mode!r}")

    def __call__(
        self,
        source: np.ndarray,
        edited: np.ndarray,
        instructions: Sequence[str],
        infos: Sequence[Mapping[str, Any]],
    ) -> dict[str, np.ndarray]:
        batch = base.check_batch(source, edited, instructions, infos)
        if source.shape[1] != source.shape[2]:
            raise ValueError(f"world images are square, got {source.shape[1]}x{source.shape[2]}")
        targets, sources, masks = [], [], []
        for i, info in enumerate(infos):
            missing = [k for k in REQUIRED_INFO_KEYS if k not in info]
            if missing:
                raise KeyError(f"infos[{i}] lacks {missing}; WorldReward needs {list(REQUIRED_INFO_KEYS)}")
            targets.append(_as_scene(info["target_scene"]))
            sources.append(_as_scene(info["source_scene"]))
            mask = np.asarray(info["edit_mask"]).astype(bool)  # [H, W]
            if mask.shape != source.shape[1:3]:
                raise ValueError(f"infos[{i}]['edit_mask'] has shape {mask.shape}, images are {source.shape[1:3]}")
            masks.append(mask)

        result = verifier.verify(edited, targets, sources=source, edit_masks=masks)
        alignment = [self._alignment(*args) for args in zip(result.attributes, sources, targets, strict=True)]
        alignment = np.asarray(alignment, np.float32)  # [B] in [0, 1]
        l1 = result.preservation_l1.astype(np.float32)  # [B]
        consistency = 1.0 - np.clip(l1 / self.consistency_l1_scale, 0.0, 1.0)  # [B] in [0, 1]
        components = {
            "alignment": MAX_SCORE * alignment,
            "coherence": MAX_SCORE * np.clip(result.coherence, 0.0, 1.0),
            "consistency": MAX_SCORE * consistency,
        }
        outputs = {
            base.REWARD_KEY: sum(components[k] for k in COMPONENTS),
            **components,
            "success": result.success.astype(np.float32),
            "attribute_accuracy": result.attribute_accuracy,
            "preservation_l1": l1,
        }
        return base.check_outputs(outputs, batch)

    def _alignment(self, checks: Mapping[str, bool], source: spec.Scene, target: spec.Scene) -> float:
        """Alignment in [0, 1] from the verifier checks of one image (see the module docstring)."""
        if self.alignment_mode == "all":
            return float(np.mean(list(checks.values())))
        no_op = verifier.score(source, target)  # The checks a perfect no-op passes; same keys as `checks`.
        edited = [checks[k] for k in checks if not no_op[k]]
        kept = [checks[k] for k in checks if no_op[k]]
        edited_accuracy = float(np.mean(edited)) if edited else 1.0
        kept_accuracy = float(np.mean(kept)) if kept else 1.0
        return edited_accuracy * kept_accuracy


def _as_scene(value: spec.Scene | str | Mapping) -> spec.Scene:
    if isinstance(value, spec.Scene):
        return value
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        return spec.Scene.from_json(value)
    if isinstance(value, Mapping):
        return spec.Scene.from_dict(dict(value))
    raise TypeError(f"expected a Scene, its JSON or its dict, got {type(value).__name__}")
