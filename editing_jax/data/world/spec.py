"""Vocabulary and scene graphs of the synthetic fine-grained editing world.

A scene is a background plus 1-4 flat-colored objects, each in its own cell of a 3x3 grid. Every attribute is a
named, discrete value, so an edit has an exact target and a parsed image can be checked attribute by attribute.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

# Saturated object colors, far from every background color (the verifier separates objects from background by
# color distance). RGB in [0, 255].
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (255, 225, 0),
    "green": (30, 170, 40),
    "cyan": (0, 200, 220),
    "blue": (40, 70, 235),
    "purple": (140, 40, 200),
    "pink": (255, 120, 200),
}
COLORS: tuple[str, ...] = tuple(OBJECT_COLORS)
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
STYLES: tuple[str, ...] = ("filled", "outline")
# Row-major 3x3 grid; cell index = 3 * row + column.
CELLS: tuple[str, ...] = (
    "top-left",
    "top",
    "top-right",
    "left",
    "center",
    "right",
    "bottom-left",
    "bottom",
    "bottom-right",
)
CELL_PHRASES: dict[str, str] = {
    "top-left": "in the top left",
    "top": "at the top",
    "top-right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom-left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom-right": "in the bottom right",
}
# Solid backgrounds map to one color; patterns to two colors (see render.background_image).
BACKGROUND_COLORS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "white": ((255, 255, 255),),
    "black": ((0, 0, 0),),
    "gray": ((128, 128, 128),),
    "checkered": ((255, 255, 255), (200, 200, 200)),
    "striped": ((150, 150, 150), (80, 80, 80)),
}
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_COLORS)
EDIT_TYPES: tuple[str, ...] = (
    "color",
    "replace",
    "add",
    "remove",
    "move",
    "resize",
    "count",
    "background",
    "style",
    "identity",
)
# (color, kind) compositions that never occur in the train/val splits and occur in every test sample.
HELD_OUT_COMPOSITIONS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "circle"),
    ("green", "diamond"),
    ("yellow", "square"),
    ("pink", "circle"),
)
# Object extent as a fraction of the cell side, per size.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.6, "large": 0.9}
MAX_OBJECTS = 4


@dataclasses.dataclass(frozen=True, order=True)
class SceneObject:
    """One object: every attribute is a name from the vocabulary above."""

    cell: str
    kind: str
    color: str
    size: str = "large"
    style: str = "filled"

    def __post_init__(self):
        for field, value, allowed in (
            ("cell", self.cell, CELLS),
            ("kind", self.kind, KINDS),
            ("color", self.color, COLORS),
            ("size", self.size, SIZES),
            ("style", self.style, STYLES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(allowed)}")

    @property
    def composition(self) -> tuple[str, str]:
        return (self.color, self.kind)

    @property
    def name(self) -> str:
        """Referring name used in instructions and questions, e.g. 'red circle'."""
        return f"{self.color} {self.kind}"

    def describe(self) -> str:
        """Full description used in captions and add instructions, e.g. 'small red outlined circle'."""
        style = "outlined " if self.style == "outline" else ""
        return f"{self.size} {self.color} {style}{self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene graph: background and objects (at most one per cell).

    `position_free` marks a (color, kind) group whose members may sit in any cell when this scene is used as an
    edit target (count edits name no positions); it is ignored when rendering.
    """

    background: str
    objects: tuple[SceneObject, ...]
    position_free: tuple[str, str] | None = None

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; valid: {', '.join(BACKGROUNDS)}")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell: {cells}")
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: CELLS.index(o.cell))))

    @property
    def free_cells(self) -> list[str]:
        used = {o.cell for o in self.objects}
        return [c for c in CELLS if c not in used]

    def find(self, color: str, kind: str) -> list[SceneObject]:
        return [o for o in self.objects if o.composition == (color, kind)]

    def replace_object(self, old: SceneObject, new: SceneObject | None) -> Scene:
        objects = [o for o in self.objects if o != old]
        if new is not None:
            objects.append(new)
        return dataclasses.replace(self, objects=tuple(objects))

    def caption(self) -> str:
        parts = [f"a {o.describe()} {CELL_PHRASES[o.cell]}" for o in self.objects]
        background = f"on a {self.background} background"
        return ", ".join(parts + [background]) if parts else f"an empty scene {background}"

    def to_dict(self) -> dict:
        return {
            "background": self.background,
            "objects": [dataclasses.asdict(o) for o in self.objects],
            "position_free": list(self.position_free) if self.position_free else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        free = data.get("position_free")
        return cls(
            background=data["background"],
            objects=tuple(SceneObject(**o) for o in data["objects"]),
            position_free=tuple(free) if free else None,
        )

    @classmethod
    def from_json(cls, text: str) -> Scene:
        return cls.from_dict(json.loads(text))


def compositions(scenes: Sequence[Scene]) -> set[tuple[str, str]]:
    return {o.composition for s in scenes for o in s.objects}
